"""Shared fixtures: a private real Valkey per test session (no mocks), a clean keyspace
per test, real ``orderq`` stage processes on free loopback ports, and in-process
workers with a drain mode so a test can run them to completion deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from orderq import client as oq_client
from orderq.control import Control
from orderq.server import EmbeddedServer, free_port
from orderq.settings import Settings

CHANNEL_TOKENS = {
    c: f"tok-{c}-{'x' * 16}" for c in ("tmall", "jd", "douyin", "pdd", "kuaishou", "shopify", "miniapp", "pos")
}
ADMIN_TOKEN = "tok-admin-" + "y" * 20
ROOT = Path(__file__).resolve().parent.parent


def auth(channel: str = "tmall") -> dict[str, str]:
    return {"Authorization": f"Bearer {CHANNEL_TOKENS[channel]}"}


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_order(n: int | str = 1, **over: Any) -> dict[str, Any]:
    """A valid order (contract §3); ``over`` replaces top-level fields."""
    o: dict[str, Any] = {
        "channel": "tmall",
        "order_id": f"T{n}",
        "created_at": "2026-11-11T00:00:01+08:00",
        "customer": {"id": f"u-{n}", "tier": "regular", "phone": "13812345678", "ip": "36.112.4.7"},
        "ship_to": {
            "name": "王芳",
            "phone": "13812345678",
            "province": "江苏省",
            "city": "苏州市",
            "district": "工业园区",
            "address": "星湖街 328 号 5 幢 1201",
        },
        "lines": [{"sku": "SOFA-OAK-3", "qty": 1, "unit_price": "2999.00", "paid_price": "2899.00"}],
        "paid_amount": "2899.00",
        "currency": "CNY",
    }
    o.update(over)
    return o


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            with contextlib.suppress(Exception):  # never in place of the test's own failure
                _cancel_abandoned_tasks(item)
        raise


def _cancel_abandoned_tasks(item: pytest.Item) -> None:
    """An async test interrupted from outside its event loop (pytest-timeout's SIGALRM raises
    inside the loop's select) leaves its task pending. pytest-asyncio then runs the fixtures'
    async teardown on the same loop, and the abandoned test runs on beside it: it reconnects
    the clients its fixtures just closed, and those connections leak, to warn (an error here)
    in whichever later test the collector happens to run. Cancel the test's tasks first, so its
    own ``finally``/``async with`` blocks run while its fixtures still exist."""
    if not inspect.iscoroutinefunction(getattr(item, "obj", None)):
        return
    # Every test here runs on a function-scoped loop (asyncio_default_*_loop_scope).
    runner = item._request.getfixturevalue("_function_scoped_runner")  # type: ignore[attr-defined]
    loop = runner.get_loop()
    if loop.is_closed() or loop.is_running():
        return
    pending = {t for t in asyncio.all_tasks(loop) if not t.done()}
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for t in pending:  # again while one goes on: Python 3.11's wait_for can swallow a cancel
            t.cancel()
        _, pending = loop.run_until_complete(asyncio.wait(pending, timeout=0.05))


def pytest_collection_finish(session: pytest.Session) -> None:
    # What collection imported lives as long as the session: keep it out of every per-test
    # collect below (one full collect of it costs ~80 ms on this machine; of a test's garbage, ~1)
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Charge a leak to the test that made it. An unclosed client, connection or transport warns
    (ResourceWarning, an error here) only when its object is collected; left to the collector's
    own timing, that is in whichever later test happens to allocate enough, which then fails
    for another test's leak. Set up first, torn down last: after this test's fixtures and its
    event loop are closed, nothing of it should be left to warn."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """One private Valkey for the whole session, on a free loopback port."""
    server = EmbeddedServer(tmp_path_factory.mktemp("valkey"), port=free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def make_env(valkey: EmbeddedServer, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Environment for a stage process or Settings: the private server, fixed tokens."""

    def make(**over: Any) -> dict[str, str]:
        env = {
            "ORDERQ_REDIS_URL": valkey.url,
            "ORDERQ_DATA_DIR": str(tmp_path / "data"),
            "ORDERQ_CHANNEL_TOKENS": ",".join(f"{c}={t}" for c, t in CHANNEL_TOKENS.items()),
            "ORDERQ_ADMIN_TOKEN": ADMIN_TOKEN,
            "ORDERQ_LOG_FORMAT": "json",
            "ORDERQ_CLAIM_IDLE_MS": "1000",
            # Validation rules inert unless a test turns them on (tests/test_validate_rules.py):
            # make_order's orders share a recipient and a SKU without stock record.
            "ORDERQ_UNKNOWN_SKU": "allow",
            "ORDERQ_DUP_WINDOW_S": "0",
        }
        env.update({k: str(v) for k, v in over.items()})
        return env

    return make


@pytest.fixture
def settings_for(make_env: Callable[..., dict[str, str]]) -> Callable[..., Settings]:
    def make(**over: Any) -> Settings:
        return Settings.from_mapping(make_env(**over))

    return make


@pytest.fixture
def flushed(valkey: EmbeddedServer) -> EmbeddedServer:
    """A clean keyspace for this test."""
    with redis.Redis.from_url(valkey.url) as c:
        c.flushall()
    return valkey


@pytest.fixture
async def r(flushed: EmbeddedServer, settings_for: Callable[..., Settings]) -> AsyncIterator[oq_client.Redis]:
    conn = await oq_client.connect(settings_for())
    yield conn
    await conn.close()


async def dispatch_all(settings: Settings, consumer: str) -> None:
    """Run a dispatcher with ``settings`` (its own connection) until nothing is left to deliver."""
    from dispatch.worker import Dispatcher

    conn = await oq_client.connect(settings)
    try:
        d = Dispatcher(conn, consumer=consumer)
        await asyncio.wait_for(d.run(drain=True), 60)
        await d.close()
    finally:
        await conn.close()


async def drain(r: oq_client.Redis, rounds: int = 3) -> int:
    """Run a validate and an execute worker in drain mode until no work is left."""
    from execute.worker import ExecuteWorker
    from validate.worker import ValidateWorker

    control = await Control(r).start()
    total = 0
    try:
        for _ in range(rounds):
            n = await ValidateWorker(r, control, consumer="drain-v").run(drain=True)
            n += await ExecuteWorker(r, control, consumer="drain-e").run(drain=True)
            total += n
            if n == 0:
                break
    finally:
        await control.stop()
    return total


class _Forked:
    """The part of ``subprocess.Popen`` the tests use, for a child of the fork server."""

    def __init__(self, server: _ForkServer, pid: int) -> None:
        self.server, self.pid = server, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.server.cond:
            if not self.server.cond.wait_for(lambda: self.pid in self.server.exits, timeout):
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        rc = self.poll()
        assert rc is not None
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never signal a pid that may have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ForkServer:
    """tests/zygote.py, started once per test process: stage processes forked from it start
    with everything imported (see its docstring)."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote"], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.cond = threading.Condition()
        self.exits: dict[int, int] = {}
        self.pids: queue.Queue[int] = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, name="fork-server", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            doc = json.loads(line)
            if "pid" in doc:
                self.pids.put(doc["pid"])
            else:
                with self.cond:
                    self.exits[doc["exit"]] = doc["rc"]
                    self.cond.notify_all()
        self.pids.put(0)  # the server is gone: a waiting start fails instead of hanging

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> _Forked:
        assert self.proc.stdin is not None
        with self.lock:
            req = {"argv": argv, "env": env, "cwd": str(ROOT), "log": str(log)}
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self.pids.get(timeout=30)
        if not pid:
            raise RuntimeError(f"the fork server exited {self.proc.poll()}")
        return _Forked(self, pid)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


_fork_server: _ForkServer | None = None
FORK = os.environ.get("ORDERQ_TEST_FORK", "1") != "0"


def _forked(argv: list[str], env: dict[str, str], log: Path) -> _Forked:
    global _fork_server
    if _fork_server is None or _fork_server.proc.poll() is not None:
        _fork_server = _ForkServer()
    return _fork_server.start(argv, env, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _fork_server is not None:
        _fork_server.close()


class StageProcess:
    """A real ``python -m orderq <stage>`` process (forked from the fork server unless
    ``ORDERQ_TEST_FORK=0``: the same entry point, a process of its own)."""

    def __init__(self, stage: str, env: dict[str, str], log_path: Path) -> None:
        self.stage = stage
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | _Forked | None = None

    def start(self) -> StageProcess:
        full = dict(os.environ)
        full.update(self.env)
        full.setdefault("PYTHONPATH", str(ROOT))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        if FORK:
            self.proc = _forked([self.stage], full, self.log_path)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orderq", self.stage], env=full, cwd=ROOT, stdout=self._log, stderr=self._log
            )
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15) -> int | None:
        self.terminate()
        return self.wait(timeout)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting: a test's processes stop side by side."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def stages(make_env: Callable[..., dict[str, str]], tmp_path: Path) -> Iterator[Callable[..., StageProcess]]:
    """Start real stage processes; all are stopped at the end of the test."""
    started: list[StageProcess] = []

    def start(stage: str, **env: Any) -> StageProcess:
        p = StageProcess(stage, make_env(**env), tmp_path / f"{stage}-{len(started)}.log").start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.terminate()
    for p in started:
        p.wait()


@pytest.fixture
def ingress(stages: Callable[..., StageProcess], flushed: EmbeddedServer) -> Callable[..., Any]:
    """Start a real ingress (uvicorn) on a free port; returns its base URL once it answers."""

    async def start(**env: Any) -> str:
        port = free_port()
        p = stages("ingress", ORDERQ_HTTP_PORT=port, **env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient() as c:
            while True:
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"ingress exited {p.proc.returncode}:\n{p.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(base + "/healthz")).status_code == 200:
                        return base
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ingress did not start:\n{p.log()}")
                await asyncio.sleep(0.05)

    return start


def unique(prefix: str = "T") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# --- a headless browser (Debian's chromium, driven by playwright; never `playwright install`) ---

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
async def browser() -> Any:
    pw_api = pytest.importorskip("playwright.async_api", reason="the playwright package is not installed")
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    async with pw_api.async_playwright() as pw:
        try:
            b = await pw.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM, args=ARGS)
        except Exception as exc:  # no display libraries, sandbox refusal, ...
            pytest.skip(f"Chromium cannot start here: {exc}")
        try:
            yield b
        finally:
            await b.close()
