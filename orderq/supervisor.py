"""``orderq up``: the embedded server (when no URL is set) and every stage as its own
OS process (``python -m orderq <stage>``), restarted when it dies; SIGINT/SIGTERM stop
the stages gracefully first and the server last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog

from orderq.server import EmbeddedServer, die_with_parent, jemalloc_env
from orderq.settings import Settings
from orderq.tokens import ensure_tokens

log = structlog.get_logger("orderq.supervisor")

GRACE_S = 20.0  # a stage gets this long after SIGTERM to finish its batch
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # a crash-looping stage is retried ever slower
STABLE_S = 30.0  # a stage up this long is healthy again: its backoff resets


@dataclass
class Child:
    stage: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    next_start: float = 0.0
    failures: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        # every process it starts runs on the allocator ORDERQ_MALLOC names (orderq/server.py)
        self.env = jemalloc_env(settings.malloc, os.environ if env is None else env)
        self.server: EmbeddedServer | None = None
        self.server_wrap: tuple[str, ...] = ()  # what runs the embedded server (EmbeddedServer.wrap)
        self.children: list[Child] = []
        self.stopping = False

    def plan(self) -> list[Child]:
        s = self.settings
        out = [Child("ingress", i) for i in range(s.ingress_processes)]
        out += [Child("validate", i) for i in range(s.validate_processes)]
        out += [Child("execute", i) for i in range(s.execute_processes)]
        out.append(Child("breaker", 0))
        if s.webhooks:  # downstream endpoints configured: deliver the outbox to them
            out.append(Child("dispatch", 0))
        if s.import_dir is not None or (s.connectors_dir is not None and any(Path(s.connectors_dir).glob("*.toml"))):
            out.append(Child("connect", 0))  # pull connectors or the watched import folder (contract §7)
        return out

    def start_server(self) -> None:
        if self.settings.redis_url:
            return
        self.server = EmbeddedServer(self.settings.data_dir, wrap=self.server_wrap, malloc=self.settings.malloc)
        if self.server.adopt():
            log.warning("server.adopted", url=self.server.url, message="reusing the server this data dir already runs")
        else:
            self.server.start()
            log.info("server.started", url=self.server.url, data_dir=str(self.settings.data_dir))
        self.env["ORDERQ_REDIS_URL"] = self.server.url

    def spawn(self, child: Child, output: IO[bytes] | None = None) -> None:
        """Start ``child``; ``output``: a file for its stdout and stderr (default: inherited)."""
        cmd = [sys.executable, "-m", "orderq", child.stage]
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops the ingress
        # first and the workers after (a second signal would make uvicorn force-exit).
        child.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        child.started = time.monotonic()
        log.info("stage.started", stage=child.stage, pid=child.proc.pid)

    def run(self) -> int:
        settings, token_file = ensure_tokens(self.settings)
        if token_file is not None:
            self.env["ORDERQ_CHANNEL_TOKENS"] = ",".join(f"{c}={t}" for c, t in settings.channel_tokens.items())
            self.env["ORDERQ_ADMIN_TOKEN"] = settings.admin_token or ""
            print(f"orderq: bearer tokens are in {token_file.resolve()}", flush=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_hangup)
        self.start_server()
        try:
            self.children = self.plan()
            for c in self.children:
                self.spawn(c)
            print(
                f"orderq: ingress on http://{settings.http_host}:{settings.http_port}  (Ctrl-C stops everything)",
                flush=True,
            )
            self._watch()
        finally:
            self.stop_children()
            if self.server is not None:
                self.server.stop()
                log.info("server.stopped")
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _on_hangup(self, signum: int, frame: object) -> None:
        """SIGHUP: the execute stage re-reads its routing rules (routing/routing.toml)."""
        for c in self.children:
            if c.stage == "execute" and c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGHUP)

    def _watch(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            for c in self.children:
                if c.proc is not None and c.proc.poll() is not None:
                    code = c.proc.returncode
                    up_for = now - c.started
                    if up_for >= STABLE_S:
                        c.failures.clear()
                    c.failures.append(now)
                    delay = RESTART_BACKOFF_S[min(len(c.failures) - 1, len(RESTART_BACKOFF_S) - 1)]
                    log.warning("stage.died", stage=c.stage, pid=c.proc.pid, exit_code=code, restart_in_s=delay)
                    c.proc = None
                    c.next_start = now + delay
                if c.proc is None and now >= c.next_start and not self.stopping:
                    self.spawn(c)
            time.sleep(0.1)

    def stop_children(self) -> None:
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        # Ingress first (stop accepting), then the workers finish their batches.
        for stage_group in (("ingress", "connect"), ("validate", "execute", "breaker", "dispatch")):
            group = [c for c in live if c.stage in stage_group]
            for c in group:
                assert c.proc is not None
                c.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            for c in group:
                assert c.proc is not None
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("stage.killed", stage=c.stage, pid=c.proc.pid, reason="grace period over")
                    c.proc.kill()
                    c.proc.wait()
