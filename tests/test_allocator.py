"""ORDERQ_MALLOC: the embedded Valkey and every process ``orderq up`` starts run on jemalloc
when the system has it (the server binary's own allocator is the C library's, a fifth of
Valkey's time per order here), and on the C library's when told ``libc``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orderq.server import EmbeddedServer, has_jemalloc
from orderq.settings import Settings
from orderq.supervisor import Supervisor

pytestmark = pytest.mark.skipif(not has_jemalloc(), reason="libjemalloc2 not installed (make jemalloc installs it)")


def mapped(pid: int | str) -> str:
    return Path(f"/proc/{pid}/maps").read_text(encoding="utf-8")


@pytest.mark.parametrize(("malloc", "jemalloc"), [("jemalloc", True), ("libc", False)])
def test_the_embedded_server_runs_on_the_allocator_named(tmp_path: Path, malloc: str, jemalloc: bool) -> None:
    server = EmbeddedServer(tmp_path, malloc=malloc).start()
    try:
        assert server.proc is not None
        assert ("libjemalloc" in mapped(server.proc.pid)) is jemalloc
    finally:
        server.stop()


@pytest.mark.parametrize(("malloc", "jemalloc"), [("jemalloc", True), ("libc", False)])
def test_the_stages_run_on_the_allocator_named(monkeypatch: pytest.MonkeyPatch, malloc: str, jemalloc: bool) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    env = Supervisor(Settings(malloc=malloc)).env  # what every stage process is started with
    maps = subprocess.run(
        [sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=env, capture_output=True, text=True
    ).stdout
    assert ("libjemalloc" in maps) is jemalloc
