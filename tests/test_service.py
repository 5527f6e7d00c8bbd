"""``orderq up`` as an operator runs it: a real process tree with its own embedded
Valkey, stopped with SIGTERM and started again on the same data dir; ``orderq audit``
as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderq.client import Redis
from orderq.server import free_port
from orderq.settings import read_dotenv
from tests.conftest import make_order

ROOT = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> dict[int, str]:
    """Direct children of ``pid``: pid -> command line (arguments joined by spaces)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and cmdline:
            out[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Up:
    """One ``orderq up`` process on a data dir; stdout and stderr go to files."""

    def __init__(self, data_dir: Path, port: int, log_dir: Path) -> None:
        self.data_dir, self.port, self.log_dir = data_dir, port, log_dir
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "ORDERQ_DATA_DIR": str(self.data_dir),
                "ORDERQ_HTTP_PORT": str(self.port),
                "ORDERQ_LOG_FORMAT": "json",
                "ORDERQ_CLAIM_IDLE_MS": "1000",
                # make_order's orders share a recipient and a SKU with no stock record: keep
                # the business rules from sending them all to review (as tests/conftest.py does)
                "ORDERQ_UNKNOWN_SKU": "allow",
                "ORDERQ_DUP_WINDOW_S": "0",
            }
        )
        return env

    def start(self) -> Up:
        self.runs += 1
        self.out = self.log_dir / f"up-{self.runs}.out"
        self.err = self.log_dir / f"up-{self.runs}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orderq", "up"],
                env=self.env(),
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        return self

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def log(self) -> str:
        return self.stdout() + self.err.read_text(errors="replace")

    async def ready(self, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"orderq up exited {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(self.base + "/readyz")).status_code == 200 and len(self.stages()) == 4:
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(f"orderq up did not get ready:\n{self.log()}")
                await asyncio.sleep(0.1)

    def stages(self) -> dict[str, int]:
        """Stage name -> pid of the supervisor's children whose command line says ``orderq <stage>``."""
        assert self.proc is not None
        found = {}
        for pid, cmd in children_of(self.proc.pid).items():
            m = re.search(r"orderq (ingress|validate|execute|breaker)\b", cmd)
            if m:
                found[m.group(1)] = pid
        return found

    def terminate(self, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        """After a failed test: stop whatever this run left behind."""
        if self.proc is None:
            return
        kids = children_of(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in kids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    u = Up(tmp_path / "data", free_port(), tmp_path)
    yield u
    u.cleanup()


def audit(data_dir: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
    full["PYTHONPATH"] = str(ROOT)
    if data_dir is not None:
        full["ORDERQ_DATA_DIR"] = str(data_dir)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "orderq", "audit"], env=full, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def audit_values(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(\w+): (\d+)$", out, re.M)}


async def wait_executed(c: httpx.AsyncClient, n: int, up: Up, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = (await c.get("/v1/stats")).json()
        if doc["totals"]["executed"] >= n and doc["backlog"] == 0:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"not executed in time: {doc}\n{up.log()}")
        await asyncio.sleep(0.1)


async def test_up_runs_everything_survives_restart_and_restarts_stages(up: Up) -> None:
    up.start()
    await up.ready()
    # tokens were generated, written under the data dir, and their place printed
    tokens_file = up.data_dir / "tokens.env"
    assert f"bearer tokens are in {tokens_file.resolve()}" in up.stdout()
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"
    tokens = read_dotenv(tokens_file)
    channel = dict(p.split("=", 1) for p in tokens["ORDERQ_CHANNEL_TOKENS"].split(","))
    tmall = {"Authorization": f"Bearer {channel['tmall']}"}
    admin = {"Authorization": f"Bearer {tokens['ORDERQ_ADMIN_TOKEN']}"}
    first = up.stages()
    assert set(first) == {"ingress", "validate", "execute", "breaker"}

    n = 1000
    async with httpx.AsyncClient(base_url=up.base, timeout=30) as c:
        assert (await c.post("/v1/orders", json=make_order("S0"))).status_code == 401  # never open
        for i in range(0, n, 250):
            batch = [
                make_order(j, customer={"id": f"u{j}", "tier": "vip" if j % 7 == 0 else "regular"})
                for j in range(i, i + 250)
            ]
            resp = await _send(c, "/v1/orders/batch", {"orders": batch}, tmall)
            assert resp.status_code == 202, resp.text
            # A resend after a 503 may find some of the batch already queued: accepted or duplicate.
            assert resp.json()["accepted"] + resp.json()["duplicates"] == 250, resp.text
        for i in range(20):
            resp = await _send(c, "/v1/orders", make_order(f"S{i}"), tmall)
            assert resp.status_code in (200, 202), resp.text
    # Stop right after the acks, work still in flight: a graceful stop of the whole tree.
    assert up.proc is not None
    tree = children_of(up.proc.pid)
    assert any("valkey-server" in cmd for cmd in tree.values()), tree
    assert up.terminate() == 0, up.log()
    assert "stage.killed" not in up.log() and "Traceback" not in up.log(), up.log()
    for pid, cmd in tree.items():
        assert not alive(pid), f"{cmd} ({pid}) outlived orderq up"
    assert not (up.data_dir / "redis.url").exists()

    # Start again on the same data dir: every accepted order is still known and gets executed.
    up.start()
    await up.ready()
    async with httpx.AsyncClient(base_url=up.base, timeout=30, headers=admin) as c:
        doc = await wait_executed(c, n + 20, up)
        assert doc["totals"]["accepted"] == n + 20
        assert doc["totals"]["executed"] == n + 20
        rec = (await c.get("/v1/orders/tmall/T7")).json()
        assert rec["status"] == "executed" and rec["priority"] == "vip"
        # the dedup memory survived too: a replay is still a replay
        resp = await c.post("/v1/orders", json=make_order("S3"), headers=tmall)
        assert resp.status_code == 200 and resp.json()["duplicate"] is True

        result = audit(up.data_dir)
        assert result.returncode == 0, result.stdout + result.stderr
        values = audit_values(result.stdout)
        assert values["accepted"] == n + 20 and values["executed"] == n + 20
        assert values["lost"] == 0 and values["duplicate_effects"] == 0

        # A stage that dies is restarted.
        before = up.stages()
        os.kill(before["execute"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while up.stages().get("execute") in (None, before["execute"]):
            assert time.monotonic() < deadline, f"execute not restarted:\n{up.log()}"
            await asyncio.sleep(0.1)
        assert up.stages()["validate"] == before["validate"]
        batch = [make_order(f"R{i}") for i in range(50)]
        resp = await c.post("/v1/orders/batch", json={"orders": batch}, headers=tmall)
        assert resp.json()["accepted"] == 50
        await wait_executed(c, n + 70, up)
    assert up.terminate() == 0, up.log()
    assert "stage.killed" not in up.log() and "Traceback" not in up.log(), up.log()
    # the server went with `up`: audit has nothing to find, which is a configuration error
    assert audit(up.data_dir).returncode == 2


async def test_audit_exits_1_when_an_order_is_lost(r: Redis, make_env: Any) -> None:
    from tests.conftest import drain
    from tests.test_recovery import push

    await push(r, [make_order(i) for i in range(20)])
    await drain(r)
    ok = audit(env=make_env())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert audit_values(ok.stdout)["executed"] == 20
    # accepted, yet in no stream and in no final state: lost
    key = "tmall:GHOST"
    await r.client.hset(r.partition_of(key).status(key), mapping={"s": "accepted", "ta": int(time.time() * 1e6)})
    lost = audit(env=make_env())
    assert lost.returncode == 1, lost.stdout + lost.stderr
    assert audit_values(lost.stdout)["lost"] == 1
    assert "tmall:GHOST" in lost.stdout


async def _send(c: httpx.AsyncClient, path: str, body: object, headers: dict[str, str]) -> httpx.Response:
    """POST as a channel does: a 503 + Retry-After (the machine saturated, the ack deadline
    passed) is resent after the delay; the key makes the resend idempotent."""
    for _ in range(10):
        resp = await c.post(path, json=body, headers=headers)
        if resp.status_code != 503:
            return resp
        await asyncio.sleep(min(2.0, float(resp.headers.get("Retry-After", "1"))))
    return resp


def test_a_stopped_stage_that_cannot_exit_is_made_to_with_its_stacks(tmp_path: Path) -> None:
    """Once a stage has stopped, nothing holds its process: a stuck teardown (here a thread that
    never ends) gets every thread's stack written to stderr and the process exits anyway."""
    script = (
        "import threading, time\n"
        "from orderq import runner\n"
        "runner.EXIT_GRACE_S = 0.5\n"
        "threading.Thread(target=time.sleep, args=(3600,), name='stuck-teardown').start()\n"
        "runner.exit_watchdog('execute', 0)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0 and time.monotonic() - t0 < 20
    assert "execute stopped but its process did not exit" in proc.stderr
    assert "time.sleep" in proc.stderr or "Thread" in proc.stderr  # the stuck thread's stack


async def test_sighup_to_orderq_up_reloads_the_routing_rules_and_stops_nothing(up: Up) -> None:
    up.start()
    await up.ready()
    before = up.stages()
    assert up.proc is not None
    up.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "execute.rules_reloaded" not in up.log():
        assert time.monotonic() < deadline, up.log()[-3000:]
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert up.stages() == before and up.proc.poll() is None  # every stage still the same process
    assert up.terminate() == 0


# --- a stage that stopped exits (issue 13) --------------------------------------------------
# Python 3.11's asyncio.wait_for, which redis-py puts around every write (its socket timeout),
# swallows a cancel that lands as the write completes (CPython gh-86296): the task carries on.
# Whatever cancels a task once and then waits for it can wait for ever.
STUBBORN = """
async def stubborn():  # a task whose first cancel is swallowed, as gh-86296 does
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
"""


async def test_stopping_the_metrics_flusher_ends_although_a_cancel_is_swallowed(r: Redis) -> None:
    """A stage stops its metrics flusher on its way out; a flusher that carried on through its
    one cancel kept the stage running after SIGTERM."""
    from orderq import metrics

    scope: dict[str, Any] = {"asyncio": asyncio}
    exec(STUBBORN, scope)
    flusher = asyncio.create_task(scope["stubborn"]())
    await asyncio.sleep(0.02)
    stop = asyncio.create_task(metrics.stop_flusher(flusher, r))
    done, _ = await asyncio.wait({stop}, timeout=3)
    while not flusher.done():  # (without the fix: end it, so this test leaves nothing running)
        flusher.cancel()
        await asyncio.sleep(0.01)
    await stop
    assert done, "stop_flusher waited for ever on a flusher that swallowed its cancel"
    assert flusher.cancelled()


def test_a_stage_process_exits_although_a_leftover_task_swallows_its_cancel(tmp_path: Path) -> None:
    """What a stage leaves running (a library's background task) is cancelled once by
    asyncio.run on the way out; one that swallows it held the process, with no stop_slow report
    (the event loop's own work was done), until the exit watchdog shot it."""
    script = (
        "import asyncio, time\n"
        "from orderq import runner\n" + STUBBORN + "async def stage():\n"
        "    asyncio.create_task(stubborn())\n"
        "    await asyncio.sleep(0.05)\n"
        "    runner.exit_watchdog('validate', 0)  # as runner.serve does once its stage stopped\n"
        "t0 = time.monotonic()\n"
        "runner.run(stage())\n"
        "print(f'exited after {time.monotonic() - t0:.2f}s', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "exited after" in proc.stdout, proc.stdout + proc.stderr  # not shot by the watchdog
    assert "did not exit" not in proc.stderr
