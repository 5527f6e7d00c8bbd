"""Faults under load: "nothing accepted is lost, nothing happens twice", shown.

Each test runs real processes (ingress, validate, execute) against a private Valkey of
its own (a fixed port, so the URL survives a restart), drives them with a small load loop
that records every order key sent and every answer in the client-side oracle
(``loadtest/oracle.py``), injects one fault, waits for the pipeline to drain, and then
reconciles:

- attempted / acknowledged: what the load loop sent and what got a 202;
- the oracle, every key looked up in Redis: lost (acknowledged, no record), duplicated (an
  action applied twice, by the effect ledger), unexpected (a record of an order that was
  refused: none allowed), recovered (an answer in doubt, yet the order is there);
- lost and duplicate effects by ``orderq audit``;
- duplicate deliveries: entries reclaimed from a dead or stalled consumer (the workers'
  ``*.reclaimed`` log events): allowed, as long as the effects stay single.

``ORDERQ_RELIABILITY_LONG=1`` makes the loads longer and the kills more (``make reliability``);
the figures of every test are appended as JSON lines to ``$ORDERQ_RELIABILITY_OUT`` if set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from loadtest.oracle import ACCEPTED, Oracle
from orderq import audit, stats
from orderq import client as oq_client
from orderq.client import Redis
from orderq.server import EmbeddedServer, free_port
from orderq.settings import Settings
from tests.conftest import StageProcess, auth, make_order
from tests.test_recovery import pending

LONG = os.environ.get("ORDERQ_RELIABILITY_LONG") == "1"
LOAD_S = 8.0 if LONG else 2.5  # steady load before and after a fault
CLIENTS = 8


# --- the oracle -----------------------------------------------------------------------


class Load:
    """Concurrent clients posting single orders (and a batch now and then) until stopped;
    every key sent once, every answer recorded in the oracle."""

    def __init__(self, base: str, prefix: str, timeout: float = 10.0) -> None:
        self.base, self.prefix, self.timeout = base, prefix, timeout
        self.oracle = Oracle()
        self.attempted: list[str] = []
        self.acked: set[str] = set()
        self.answers: dict[int, int] = {}
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    def accepted(self, keys: list[str]) -> None:
        """Orders acknowledged outside the load loop (a test's own sends)."""
        for key in keys:
            self.oracle.record(key, ACCEPTED)
            self.acked.add(key)
            self.attempted.append(key)

    async def start(self) -> Load:
        self._client = httpx.AsyncClient(base_url=self.base, timeout=self.timeout)
        self._tasks = [asyncio.create_task(self._run(n)) for n in range(CLIENTS)]
        return self

    async def _run(self, n: int) -> None:
        assert self._client is not None
        i = 0
        while not self._stop.is_set():
            i += 1
            if i % 10 == 0:  # a small batch now and then: the batch path under the same fault
                orders = [make_order(f"{self.prefix}{n}-{i}-{j}") for j in range(5)]
                keys = [f"tmall:{o['order_id']}" for o in orders]
                self.attempted += keys
                try:
                    resp = await self._client.post("/v1/orders/batch", json={"orders": orders}, headers=auth())
                except httpx.HTTPError as exc:
                    self.oracle.record_batch(keys, 0, None)
                    self.errors.append(repr(exc))
                    await asyncio.sleep(0.05)
                    continue
                self.answers[resp.status_code] = self.answers.get(resp.status_code, 0) + 1
                self.oracle.record_batch(keys, resp.status_code, resp.content)
                if resp.status_code == 202:
                    for res in resp.json()["results"]:
                        if res["status"] == "accepted":
                            self.acked.add(res["order_key"])
                continue
            order = make_order(f"{self.prefix}{n}-{i}")
            key = f"tmall:{order['order_id']}"
            self.attempted.append(key)
            try:
                resp = await self._client.post("/v1/orders", json=order, headers=auth())
            except httpx.HTTPError as exc:
                self.oracle.record_answer(key, 0)
                self.errors.append(repr(exc))
                await asyncio.sleep(0.05)  # a refused connection: do not spin
                continue
            self.answers[resp.status_code] = self.answers.get(resp.status_code, 0) + 1
            self.oracle.record_answer(key, resp.status_code, resp.content)
            if resp.status_code == 202:
                self.acked.add(key)
            elif resp.status_code >= 500:
                assert resp.status_code == 503, resp.text  # never a 500
                assert int(resp.headers["retry-after"]) >= 1
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._client is not None:
            await self._client.aclose()

    def answered(self, status: int) -> int:
        return self.answers.get(status, 0)


async def wait_for(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, OSError, httpx.HTTPError):
            if await check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def drained(r: Redis) -> bool:
    backlog, _ = await stats.backlog(r)
    return backlog == 0


async def reconcile(r: Redis, load: Load, procs: list[StageProcess]) -> dict[str, Any]:
    """The figures of one run, once the pipeline has drained."""
    await wait_for(lambda: drained(r), 30, "the backlog to drain")
    verdict = await load.oracle.check_redis(r)
    report = await audit.run(r)
    redelivered = sum(reclaimed(p) for p in procs)
    found = sum(verdict.acked_statuses.values())
    return {
        "attempted": len(load.attempted),
        "acknowledged": len(load.acked),
        "answers": {str(k): v for k, v in sorted(load.answers.items())},
        "client_errors": len(load.errors),
        "lost_acknowledged": verdict.lost,
        "duplicated": verdict.duplicated,
        "unexpected": verdict.unexpected,
        "recovered": verdict.recovered,
        "in_doubt": verdict.in_doubt,
        "lost_audit": report["lost"],
        "duplicate_effects": report["duplicate_effects"],
        "counter_mismatch": report["counter_mismatch"],
        "duplicate_deliveries": redelivered,
        "executed": report["executed"],
        "not_executed": found - verdict.acked_statuses["executed"],
        "_lost_keys": verdict.examples.get("lost", []) + report["lost_keys"][:10],
        "_dup_keys": verdict.examples.get("duplicated", []) + report["duplicate_effect_keys"][:10],
        "_unexpected_keys": verdict.examples.get("unexpected", []),
        # which of the audit's checks counted what (the report shows a mismatch by its kind)
        "audit_by": {k: v for k, v in report.items() if k.endswith("_by") and v},
    }


def reclaimed(proc: StageProcess) -> int:
    return sum(e.get("claimed", 0) for e in events(proc, ".reclaimed"))


def events(proc: StageProcess, suffix: str) -> list[dict[str, Any]]:
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{") and suffix in line:
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if str(e.get("event", "")).endswith(suffix):
                    out.append(e)
    return out


def record(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (pytest -s shows them) and append them to $ORDERQ_RELIABILITY_OUT."""
    line = json.dumps({"test": name, "long": LONG, **{k: v for k, v in figures.items() if not k.startswith("_")}})
    print(line)
    out = os.environ.get("ORDERQ_RELIABILITY_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(line + "\n")


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A private Valkey for one test, on a fixed port: a restart keeps the URL."""
    s = EmbeddedServer(tmp_path / "fault-valkey", port=free_port()).start()
    yield s
    s.resume()
    s.kill()


@pytest.fixture
async def rs(server: EmbeddedServer, settings_for: Callable[..., Settings]) -> AsyncIterator[Redis]:
    conn = await oq_client.connect(settings_for(ORDERQ_REDIS_URL=server.url))
    yield conn
    await conn.close()


async def start_pipeline(stages: Any, server: EmbeddedServer, **env: Any) -> tuple[str, list[StageProcess]]:
    """A real ingress, validate and execute process on ``server``; the ingress's URL."""
    env = {"ORDERQ_REDIS_URL": server.url, "ORDERQ_WORKER_BATCH": 50, **env}
    port = free_port()
    procs = [
        stages("ingress", ORDERQ_HTTP_PORT=port, **env),
        stages("validate", **env),
        stages("execute", **env),
    ]
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base) as c:

        async def up() -> bool:
            for p in procs:
                assert p.proc is not None and p.proc.poll() is None, p.log()
            return (await c.get("/readyz")).status_code == 200

        await wait_for(up, 20, "the ingress to be ready")
    return base, procs


def check(name: str, figures: dict[str, Any]) -> None:
    record(name, figures)
    assert figures["acknowledged"] > 0, figures
    assert figures["lost_audit"] == 0, figures["_lost_keys"]
    assert figures["duplicate_effects"] == 0 and figures["duplicated"] == 0, figures["_dup_keys"]
    assert figures["unexpected"] == 0, figures["_unexpected_keys"]
    assert figures["counter_mismatch"] == 0, figures["audit_by"]
    assert figures["not_executed"] == 0, figures


# --- the server killed ------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["fast", "fsync"])
async def test_server_sigkilled_and_restarted_on_its_aof(
    durability: str, server: EmbeddedServer, rs: Redis, stages: Any
) -> None:
    base, procs = await start_pipeline(stages, server, ORDERQ_DURABILITY=durability, ORDERQ_ACK_DEADLINE_MS=1000)
    load = await Load(base, "K").start()
    await asyncio.sleep(LOAD_S)
    kills = 3 if LONG else 1
    for _ in range(kills):
        before = len(load.acked)
        server.kill()  # as a crash: no SHUTDOWN, the AOF as it is on disk
        await asyncio.sleep(0.5)  # clients meet a dead server meanwhile
        server.start()
        await asyncio.sleep(LOAD_S)
        assert len(load.acked) > before, f"no order acknowledged after the restart: {load.answers}"
    await load.stop()
    figures = await reconcile(rs, load, procs)
    figures["durability"] = durability
    figures["server_kills"] = kills
    record(f"server_sigkill_{durability}", figures)
    assert figures["acknowledged"] > 0
    assert "500" not in figures["answers"], figures
    assert figures["lost_audit"] == 0, figures["_lost_keys"]
    assert figures["duplicate_effects"] == 0 and figures["duplicated"] == 0, figures["_dup_keys"]
    assert figures["unexpected"] == 0, figures["_unexpected_keys"]  # a refused order is not written
    # the counters agree with the records, a crash or not: whatever survived is counted once
    assert figures["counter_mismatch"] == 0, figures["audit_by"]
    if durability == "fsync":
        # acknowledged means on disk: a crash loses none of them
        assert figures["lost_acknowledged"] == 0, figures["_lost_keys"]
        assert figures["not_executed"] == 0, figures
    # fast: up to ~2 s of acknowledged writes may go with the crash (appendfsync everysec
    # holds the write itself while the previous fsync runs on a busy disk);
    # the figure is recorded, not asserted. Whatever survived is executed once.
    assert figures["not_executed"] == 0 or durability == "fast", figures
    for p in procs:
        assert p.proc is not None and p.proc.poll() is None, f"{p.stage} died:\n{p.log()[-3000:]}"


# --- the server stalled -----------------------------------------------------------------


async def test_server_stalled_under_load_answers_503_and_recovers(
    server: EmbeddedServer, rs: Redis, stages: Any
) -> None:
    deadline_ms = 500
    base, procs = await start_pipeline(stages, server, ORDERQ_ACK_DEADLINE_MS=deadline_ms)
    # a client timeout well above the ack deadline: a hang shows up as a client error
    load = await Load(base, "S", timeout=5.0).start()
    await asyncio.sleep(LOAD_S)
    stalls = 2 if LONG else 1
    for _ in range(stalls):
        before_503 = load.answered(503)
        server.pause()  # SIGSTOP: the server holds every connection and answers nothing
        try:
            await asyncio.sleep(4.0 if LONG else 3.0)
        finally:
            server.resume()
        assert load.answered(503) > before_503, f"no 503 during the stall: {load.answers}"
        acked = len(load.acked)
        await wait_for(lambda acked=acked: _true(len(load.acked) > acked + 50), 15, "acks after the stall")
    await load.stop()
    figures = await reconcile(rs, load, procs)
    figures["stalls"] = stalls
    check("server_stalled", figures)
    assert not load.errors, load.errors[:5]  # answered, never hung past the client's timeout
    assert figures["lost_acknowledged"] == 0, figures["_lost_keys"]


async def _true(value: bool) -> bool:
    return value


# --- workers killed -------------------------------------------------------------------


@pytest.mark.long
async def test_workers_sigkilled_repeatedly_under_load(rs: Redis, server: EmbeddedServer, stages: Any) -> None:
    env = {"ORDERQ_CLAIM_IDLE_MS": 1000}
    base, procs = await start_pipeline(stages, server, **env)
    load = await Load(base, "W").start()
    await asyncio.sleep(1.0)
    kills = 12 if LONG else 5
    held_total = 0
    kill_to_reclaim: list[float] = []
    live = {"validate": procs[1], "execute": procs[2]}
    for k in range(kills):
        stage = "validate" if k % 2 else "execute"
        victim = live[stage]
        assert victim.proc is not None
        # freeze, see what it holds, kill: a crash with a batch in hand
        os.kill(victim.proc.pid, signal.SIGSTOP)
        held = await pending(rs, stage)
        killed_at = time.time()
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        held_total += held
        successor = stages(stage, ORDERQ_REDIS_URL=server.url, ORDERQ_WORKER_BATCH=50, **env)
        procs.append(successor)
        live[stage] = successor
        if held:
            await wait_for(lambda s=successor: _true(bool(events(s, ".reclaimed"))), 20, f"{stage} reclaim")
            first = events(successor, ".reclaimed")[0]
            kill_to_reclaim.append(round(_ts(first["timestamp"]) - killed_at, 2))
        else:
            await asyncio.sleep(1.0)
    await asyncio.sleep(1.0)
    await load.stop()
    figures = await reconcile(rs, load, procs)
    figures.update(
        kills=kills,
        held_at_kill=held_total,
        kill_to_reclaim_s=kill_to_reclaim,
        claim_idle_ms=1000,
    )
    check("workers_sigkilled", figures)
    assert figures["lost_acknowledged"] == 0, figures["_lost_keys"]
    assert held_total > 0, "no kill caught a worker with a batch in hand"


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# --- the server out of memory ---------------------------------------------------------


async def out_of_memory(r: Redis) -> None:
    """``maxmemory`` under what is used: with ``noeviction`` every write is refused ("OOM
    command not allowed when used memory > 'maxmemory'")."""
    info = await r.client.info("memory")
    await r.client.config_set("maxmemory", max(1, int(info["used_memory"]) // 2))


async def test_maxmemory_reached_answers_503_and_loses_nothing(server: EmbeddedServer, rs: Redis, stages: Any) -> None:
    """The ingress answers 503 + Retry-After on every write path (single, batch, channel
    format), never 500; once memory is back, the refused orders are accepted on retry and
    every acknowledged order executes once."""
    base, procs = await start_pipeline(stages, server)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        pre = [make_order(f"P{i}") for i in range(300)]
        resp = await c.post("/v1/orders/batch", json={"orders": pre}, headers=auth())
        assert resp.json()["accepted"] == 300
        await out_of_memory(rs)
        try:
            refused: list[dict[str, Any]] = []
            for i in range(5):
                o = make_order(f"M{i}")
                resp = await c.post("/v1/orders", json=o, headers=auth())
                assert resp.status_code == 503, resp.text
                assert int(resp.headers["retry-after"]) >= 1
                assert "x-request-id" in resp.headers
                refused.append(o)
            batch = [make_order(f"MB{i}") for i in range(5)]
            resp = await c.post("/v1/orders/batch", json={"orders": batch}, headers=auth())
            assert resp.status_code == 503, resp.text
            assert int(resp.headers["retry-after"]) >= 1
            refused += batch
            sample = Path(__file__).resolve().parent.parent / "mappings" / "samples" / "tmall.json"
            resp = await c.post(
                "/v1/channels/tmall/orders",
                content=sample.read_bytes(),
                headers={**auth(), "Content-Type": "application/json"},
            )
            assert resp.status_code == 503, resp.text
            assert int(resp.headers["retry-after"]) >= 1
            assert (await c.get("/healthz")).status_code == 200
        finally:
            await rs.client.config_set("maxmemory", 0)
        # memory back: a retry of every refused order is accepted (202) or a replay of one
        # that landed whole (200), never lost in between
        for o in refused:
            resp = await c.post("/v1/orders", json=o, headers=auth())
            assert resp.status_code in (200, 202), resp.text
        resp = await c.post(
            "/v1/channels/tmall/orders",
            content=sample.read_bytes(),
            headers={**auth(), "Content-Type": "application/json"},
        )
        assert resp.status_code in (200, 202), resp.text
        channel_key = resp.json()["order_key"]
    load = Load(base, "-")
    load.accepted([f"tmall:{o['order_id']}" for o in pre + refused] + [channel_key])
    figures = await reconcile(rs, load, procs)
    check("maxmemory", figures)
    assert figures["lost_acknowledged"] == 0
    assert figures["executed"] == len(load.acked), figures


async def test_maxmemory_longer_than_the_delivery_limit_dead_letters_nothing(
    server: EmbeddedServer, rs: Redis, stages: Any
) -> None:
    """Workers must wait out a full server, not treat its refusals as poison entries."""
    base, procs = await start_pipeline(stages, server, ORDERQ_CLAIM_IDLE_MS=300, ORDERQ_MAX_DELIVERIES=2)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert procs[2].proc is not None
        os.kill(procs[2].proc.pid, signal.SIGSTOP)  # hold execution: orders wait in the ready lanes
        pre = [make_order(f"P{i}") for i in range(300)]
        resp = await c.post("/v1/orders/batch", json={"orders": pre}, headers=auth())
        assert resp.json()["accepted"] == 300
        await wait_for(lambda: _intake_empty(rs), 10, "validation")
        await out_of_memory(rs)
        os.kill(procs[2].proc.pid, signal.SIGCONT)
        try:
            await asyncio.sleep(2.5)  # longer than (max deliveries + 1) leases
        finally:
            await rs.client.config_set("maxmemory", 0)
    load = Load(base, "-")
    load.accepted([f"tmall:{o['order_id']}" for o in pre])
    figures = await reconcile(rs, load, procs)
    record("maxmemory_long", figures)
    assert (await stats.totals(rs))["dead_letters"] == 0
    assert figures["executed"] == 300, figures


async def _intake_empty(r: Redis) -> bool:
    return sum([await r.client.xlen(p.intake) for p in r.partitions]) == 0
