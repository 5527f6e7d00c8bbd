"""The instance the bench measures: a running one it finds, or a private one it starts (the
embedded server in a temporary data dir and every stage as ``python -m orderq <stage>``,
through :class:`orderq.supervisor.Supervisor`); and the reference endpoint it compares with.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import httpx
import msgspec
import redis

from loadtest.bench.instructions import InstructionCount
from orderq import client as oq_client
from orderq import keys
from orderq.errors import ConfigError, OrderqError
from orderq.server import die_with_parent, free_port
from orderq.settings import Settings
from orderq.supervisor import Child, Supervisor
from orderq.tokens import ensure_tokens, tokens_path

START_TIMEOUT_S = 30.0  # a private instance's stages, or the reference endpoint, answer within this
STOP_TIMEOUT_S = 15.0  # the reference endpoint gets this long after SIGTERM


@dataclass
class Target:
    """Where the bench sends orders and reads Redis."""

    settings: Settings  # with redis_url and tokens resolved
    host: str
    port: int
    tokens: dict[str, str] | None  # None: ORDERQ_AUTH=off
    admin_token: str | None
    own: bool

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as c:
            return bool(c.ping())
    except (redis.RedisError, OSError):
        return False


def healthy(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def find_running(settings: Settings, args: argparse.Namespace) -> Target | None:
    """The running instance to measure, or None when one must be started."""
    if args.start or args.valkey_instructions:
        return None
    try:
        url = oq_client.resolve_url(settings)
    except ConfigError:
        url = None
    if url is None or not ping(url):
        if settings.redis_url:
            raise OrderqError(f"ORDERQ_REDIS_URL={settings.redis_url} does not answer")
        if args.url:
            raise OrderqError(
                f"--url given, but no Redis found (ORDERQ_REDIS_URL unset, none under {settings.data_dir})"
            )
        return None
    if args.url:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError("--url", f"expected http://host:port, got {args.url!r}")
        host, port = parts.hostname, parts.port or 80
    else:
        host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
        port = settings.http_port
    base = f"http://{host}:{port}"
    if not healthy(base):
        raise OrderqError(
            f"Redis at {url} runs, but no ingress answers at {base}: pass --url, or --start for a private instance"
        )
    tokens: dict[str, str] | None = None
    admin = None
    if settings.auth:
        if not (settings.channel_tokens and settings.admin_token) and not tokens_path(settings).is_file():
            raise ConfigError(
                "ORDERQ_CHANNEL_TOKENS",
                f"unset and no {tokens_path(settings)}: the bench needs the instance's tokens",
            )
        settings, _ = ensure_tokens(settings)
        tokens, admin = dict(settings.channel_tokens), settings.admin_token
    settings = dataclasses.replace(settings, redis_url=url)
    return Target(settings, host, port, tokens, admin, own=False)


class OwnInstance:
    """A private instance in a temporary data dir. Unlike ``orderq up`` a stage that dies is
    not restarted: the run stops with its log, since its figures would not be the pipeline's."""

    def __init__(self, settings: Settings, keep: bool = False, instructions: bool = False) -> None:
        self.keep = keep
        self.data_dir = Path(tempfile.mkdtemp(prefix="orderq-bench-"))
        self.settings = dataclasses.replace(settings, redis_url=None, redis_cluster=False, data_dir=self.data_dir)
        self.supervisor = Supervisor(self.settings)
        # --valkey-instructions: the server runs under callgrind (loadtest/bench/instructions.py)
        self.instructions = InstructionCount(self.data_dir) if instructions else None
        if self.instructions is not None:
            self.supervisor.server_wrap = self.instructions.wrap()
        self.logs: list[IO[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        """The environment the stages run with (the reference endpoint gets it too)."""
        return self.supervisor.env

    def start(self, breaker: bool) -> Target:
        s = self.settings
        sup = self.supervisor
        sup.start_server()
        assert sup.server is not None
        port = free_port()
        tokens = {c: secrets.token_urlsafe(18) for c in s.channels}
        admin = secrets.token_urlsafe(24)
        import orderq

        root = str(Path(orderq.__file__).resolve().parent.parent)
        sup.env.update(
            {
                "ORDERQ_REDIS_URL": sup.server.url,
                "ORDERQ_REDIS_CLUSTER": "0",
                "ORDERQ_DATA_DIR": str(self.data_dir),
                "ORDERQ_HTTP_HOST": "127.0.0.1",
                "ORDERQ_HTTP_PORT": str(port),
                "ORDERQ_CHANNEL_TOKENS": ",".join(f"{c}={t}" for c, t in tokens.items()),
                "ORDERQ_ADMIN_TOKEN": admin,
                "ORDERQ_AUTH": "on",
                "ORDERQ_LOG_LEVEL": "warning",
                "ORDERQ_LOG_FORMAT": "json",
                "PYTHONPATH": os.pathsep.join(p for p in (root, sup.env.get("PYTHONPATH", "")) if p),
            }
        )
        for c in sup.plan():
            # the breaker is started later when the phases need it off; no dispatch targets here
            if c.stage in ("ingress", "validate", "execute") or (c.stage == "breaker" and breaker):
                self._spawn(c)
        settings = dataclasses.replace(
            s,
            redis_url=sup.server.url,
            http_host="127.0.0.1",
            http_port=port,
            channel_tokens=tokens,
            admin_token=admin,
            auth=True,
        )
        target = Target(settings, "127.0.0.1", port, tokens, admin, own=True)
        self._wait_ready(target)
        return target

    def _spawn(self, child: Child) -> None:
        log = open(self.data_dir / f"{child.stage}-{len(self.supervisor.children)}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        self.supervisor.children.append(child)
        self.supervisor.spawn(child, output=log)

    def start_breaker(self) -> None:
        if not any(c.stage == "breaker" for c in self.supervisor.children):
            self._spawn(Child("breaker", 0))

    def _check_alive(self) -> None:
        for c in self.supervisor.children:
            if c.proc is not None and c.proc.poll() is not None:
                raise OrderqError(f"{c.stage} exited with {c.proc.returncode}:\n{self._tail(c.stage)}")

    def _tail(self, stage: str) -> str:
        out = []
        for path in sorted(self.data_dir.glob(f"{stage}-*.log")):
            out.append(path.read_text(encoding="utf-8", errors="replace")[-2000:])
        return "\n".join(out)

    def _wait_ready(self, t: Target) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(t.base_url):
            self._check_alive()
            if time.monotonic() > deadline:
                raise OrderqError(f"the ingress did not answer within {START_TIMEOUT_S:.0f}s:\n{self._tail('ingress')}")
            time.sleep(0.1)
        want = {"validate": self.settings.validate_processes, "execute": self.settings.execute_processes}
        assert self.supervisor.server is not None
        with redis.Redis.from_url(self.supervisor.server.url) as c:
            while True:
                seen: dict[str, int] = {}
                for raw in c.hvals(keys.WORKERS_KEY):
                    w = msgspec.json.decode(raw)
                    seen[w["stage"]] = seen.get(w["stage"], 0) + 1
                if all(seen.get(k, 0) >= n for k, n in want.items()):
                    return
                self._check_alive()
                if time.monotonic() > deadline:
                    raise OrderqError(f"the workers did not start within {START_TIMEOUT_S:.0f}s")
                time.sleep(0.1)

    def stop(self) -> None:
        """The stages as ``orderq up`` stops them (ingress first), then the server, then the dir."""
        self.supervisor.stop_children()
        for log in self.logs:
            log.close()
        if self.supervisor.server is not None:
            self.supervisor.server.stop()
        if not self.keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)


class ReferenceEndpoint:
    """``python -m loadtest.benchref`` on a free port, XADDing to ``stream`` on ``redis_url``."""

    def __init__(self, env: dict[str, str], redis_url: str, stream: str, run_id: str) -> None:
        self.port = free_port()
        self.stream = stream
        self.log_path = Path(tempfile.gettempdir()) / f"orderq-benchref-{run_id}.log"
        cmd = [sys.executable, "-m", "loadtest.benchref", "--port", str(self.port)]
        cmd += ["--redis-url", redis_url, "--stream", stream]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(self.base_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise OrderqError(f"the reference endpoint did not start: {self.log_path.read_text(errors='replace')}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)
