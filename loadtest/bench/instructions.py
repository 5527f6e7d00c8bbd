"""Valkey's instructions per executed order in the burst drain (``--valkey-instructions``).

Seconds on this machine drift by a third within minutes, so a change to the scripts that saves
5 % of Valkey's work cannot be seen in a drain rate. callgrind counts the instructions the
server executes instead: the same figure run after run for the same code and orders. The
private instance's server runs under valgrind, counting nothing until the workers resume for
the drain and nothing after it; the count over the executed orders is the figure. Valgrind
makes the server some 50 times slower: for a burst of a few thousand orders, a before/after
measure of the server's share of the work, never a rate.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from orderq.errors import ConfigError, OrderqError

CONTROL_TIMEOUT_S = 60.0  # callgrind_control answers once the server's next basic block runs


class InstructionCount:
    """The valgrind command that runs the server, and the switch around the drain."""

    def __init__(self, data_dir: Path) -> None:
        for tool in ("valgrind", "callgrind_control"):
            if shutil.which(tool) is None:
                raise ConfigError("--valkey-instructions", f"needs {tool} on PATH (Debian: apt-get install valgrind)")
        self.out = data_dir / "valkey.callgrind"
        self.pid: int | None = None

    def wrap(self) -> tuple[str, ...]:
        return ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={self.out}")

    def _control(self, *args: str) -> None:
        assert self.pid is not None
        proc = subprocess.run(
            ["callgrind_control", *args, str(self.pid)], capture_output=True, text=True, timeout=CONTROL_TIMEOUT_S
        )
        if proc.returncode != 0:
            raise OrderqError(f"callgrind_control {' '.join(args)}: {proc.stdout}{proc.stderr}")

    def start(self, pid: int) -> None:
        """Count from now (the workers resume next)."""
        self.pid = pid
        self._control("--instr=on")

    def stop(self) -> int:
        """Stop counting; the instructions counted since ``start``."""
        self._control("--instr=off")
        before = set(self.out.parent.glob(self.out.name + ".*"))
        self._control("--dump")
        dumps = sorted(set(self.out.parent.glob(self.out.name + ".*")) - before, key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise OrderqError(f"callgrind wrote no dump next to {self.out}")
        for line in dumps[-1].read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1])
        raise OrderqError(f"no totals line in {dumps[-1]}")
