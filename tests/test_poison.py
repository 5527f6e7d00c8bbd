"""Poison entries (issue 13, contract §5): an order that cannot be processed never holds up
other orders. It gets a final state (``rejected``, reason ``unprocessable``) or a dead letter
of its own, with its error, within one lease; its batch-mates go on at once. A fault of the
stage itself (every entry fails) is blamed on no entry. And money that would break the
stages' arithmetic is refused at the door, with its paths, on every way in."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest

from execute.worker import ExecuteWorker
from orderq import client as oq_client
from orderq import keys, stats
from orderq.client import Redis
from orderq.control import Control
from orderq.settings import Settings
from orderq.status import render
from tests.conftest import ROOT, auth, make_order
from tests.test_validate_rules import accept
from validate.worker import ValidateWorker

LEASE_MS = 60_000  # no recovery sweep can help within a test: whatever ends, ends on first delivery

# The order of issue 13: its goods total overflowed the validation stage's arithmetic.
ABSURD_LINES = [{"sku": f"ABS-{i}", "qty": 9999, "unit_price": "999999999999.99"} for i in range(200)]


@pytest.fixture
async def r1(flushed: Any, settings_for: Callable[..., Settings]) -> AsyncIterator[Redis]:
    """A long lease, so only first deliveries count."""
    conn = await oq_client.connect(settings_for(ORDERQ_CLAIM_IDLE_MS=LEASE_MS))
    yield conn
    await conn.close()


async def queue_raw(r: Redis, key: str, payload: bytes, ta: bytes | None = None) -> keys.Partition:
    """Queue a payload the schema would refuse today (queued before the bounds existed, or
    corrupt) exactly as the intake script does: the status record and the intake entry."""
    p = r.partition_of(key)
    ((flag,),) = await r.run(
        lambda pipe: r.script(
            pipe, "intake", [p.intake, p.counters, p.status(key)], [r.settings.status_ttl_s, key, payload, ""]
        )
    )
    assert flag == 1
    if ta is not None:  # an entry whose accept time is not a number (a stage's int() fails on it)
        (entry_id, _), *_ = await r.client.xrevrange(p.intake, count=1)
        fields = (await r.client.xrange(p.intake, entry_id, entry_id))[0][1]
        await r.client.xdel(p.intake, entry_id)
        await r.client.xadd(p.intake, {**fields, b"ta": ta})
    return p


def absurd_payload(n: str) -> bytes:
    """The absurd order as the ingress packed it before the money bounds (msgpack map)."""
    doc = make_order(n, lines=ABSURD_LINES)  # key tmall:T<n>
    doc["created_at"] = "2026-11-10T16:00:01Z"
    return msgspec.msgpack.encode(doc)


async def record(r: Redis, key: str) -> dict[str, Any]:
    return render(key, await r.client.hgetall(r.partition_of(key).status(key)))


async def dead_letters(r: Redis) -> list[dict[bytes, bytes]]:
    return [f for p in r.partitions for _id, f in await r.client.xrange(p.dead)]


async def pending(r: Redis) -> int:
    n = 0
    for p in r.partitions:
        n += (await r.client.xpending(p.intake, keys.GROUP_VALIDATE))["pending"]
        for lane in p.lanes:
            n += (await r.client.xpending(lane, keys.GROUP_EXECUTE))["pending"]
    return n


async def run_once(r: Redis, worker: type[ValidateWorker] | type[ExecuteWorker]) -> int:
    """One worker in drain mode: it reads what is there, once (nothing is reclaimed: long lease)."""
    control = await Control(r).start()
    try:
        return await worker(r, control, consumer=f"once-{worker.stage}").run(drain=True)
    finally:
        await control.stop()


# --- the validate stage -------------------------------------------------------------------------


async def test_poison_intake_entries_end_alone_and_their_batch_mates_go_on(r1: Redis) -> None:
    ordinary = await accept(r1, *[make_order(f"OK{i}") for i in range(10)])
    # the absurd order of the issue, queued before the money bounds existed
    await queue_raw(r1, "tmall:TABSURD", absurd_payload("ABSURD"))
    # a corrupt entry: its payload is no msgpack at all
    await queue_raw(r1, "tmall:TCORRUPT", b"\xc1\xff not msgpack")
    # a valid order whose entry breaks the stage's Python (its accept time is no number)
    await queue_raw(r1, "tmall:TBADTIME", msgspec.msgpack.encode(make_order("BADTIME")), ta=b"soon")
    # a valid order whose status record is not a hash: the hand-off script fails on it alone
    p = await queue_raw(r1, "tmall:TWRONGTYPE", msgspec.msgpack.encode(make_order("WRONGTYPE")))
    await r1.client.delete(p.status("tmall:TWRONGTYPE"))
    await r1.client.set(p.status("tmall:TWRONGTYPE"), "not a hash")
    # (the stock of the absurd order's SKUs, to see that it reserved nothing)
    await r1.client.hset(keys.LEDGER_PREFIX + "sku:ABS-0", mapping={"p": 100, "r": 0})

    t0 = time.monotonic()
    await run_once(r1, ValidateWorker)
    await run_once(r1, ExecuteWorker)
    assert time.monotonic() - t0 < LEASE_MS / 1000

    for key in ordinary:  # the batch-mates went on at once
        assert (await record(r1, key))["status"] == "executed", key
    for key, error in (
        ("tmall:TABSURD", "at most 10000000.00"),
        ("tmall:TCORRUPT", "undecodable order payload"),
        ("tmall:TBADTIME", "ValueError"),
    ):
        rec = await record(r1, key)
        assert rec["status"] == "rejected" and rec["reasons"] == ["unprocessable"], rec
        assert error in rec["error"], rec
    # the one whose record cannot be written: a dead letter of its own, with its error
    (dead,) = await dead_letters(r1)
    assert dead[b"k"] == b"tmall:TWRONGTYPE" and b"WRONGTYPE" in dead[b"error"]
    assert int(dead[b"deliveries"]) == 1  # no delivery limit waited for
    assert await pending(r1) == 0
    assert await r1.client.hget(keys.LEDGER_PREFIX + "sku:ABS-0", "r") == b"0"  # its stock untouched
    totals = await stats.totals(r1)
    assert totals["executed"] == 10 and totals["rejected"] == 3 and totals["dead_letters"] == 1


# --- the execute stage --------------------------------------------------------------------------


async def test_poison_ready_entries_end_alone_and_their_batch_mates_go_on(r1: Redis) -> None:
    ordinary = await accept(r1, *[make_order(f"OK{i}") for i in range(10)])
    # (a gift: its stock is checked before the script, where the accept time is read)
    gift = [{"sku": "GIFT-1", "qty": 1}]
    validated = await accept(r1, make_order("BADTIME", gifts=gift), make_order("WRONGTYPE"))
    await run_once(r1, ValidateWorker)
    # stop the execute stage's first delivery short: move the two validated entries aside
    lane_of: dict[str, tuple[str, bytes, dict[bytes, bytes]]] = {}
    for p in r1.partitions:
        for lane in p.lanes:
            for entry_id, f in await r1.client.xrange(lane):
                if f[b"k"].decode() in validated:
                    lane_of[f[b"k"].decode()] = (lane, entry_id, f)
    for key, (lane, entry_id, f) in lane_of.items():
        await r1.client.xdel(lane, entry_id)
        if key == "tmall:TBADTIME":
            await r1.client.xadd(lane, {**f, b"ta": b"soon"})
        else:
            await r1.client.xadd(lane, f)
            await r1.client.delete(r1.partition_of(key).status(key))
            await r1.client.set(r1.partition_of(key).status(key), "not a hash")
    # a corrupt ready entry, with the status record the pipeline would have written for it
    p = r1.partition_of("tmall:TCORRUPT")
    await r1.client.hset(p.status("tmall:TCORRUPT"), mapping={"s": "validated", "ta": 1, "p": "vip"})
    await r1.client.xadd(p.ready("vip"), {"k": "tmall:TCORRUPT", "d": b"\x93\x01", "ta": 1})

    await run_once(r1, ExecuteWorker)

    for key in ordinary:
        assert (await record(r1, key))["status"] == "executed", key
    dead = {f[b"k"].decode(): f for f in await dead_letters(r1)}
    assert set(dead) == {"tmall:TCORRUPT", "tmall:TBADTIME", "tmall:TWRONGTYPE"}
    assert b"undecodable" in dead["tmall:TCORRUPT"][b"error"]
    assert b"ValueError" in dead["tmall:TBADTIME"][b"error"]
    assert b"WRONGTYPE" in dead["tmall:TWRONGTYPE"][b"error"]
    for f in dead.values():
        assert int(f[b"deliveries"]) == 1
        assert f[b"stream"].startswith(b"oq:") and b":rdy:" in f[b"stream"]  # where it failed
    assert await pending(r1) == 0
    assert (await record(r1, "tmall:TBADTIME"))["status"] == "validated"  # its dead letter owns it


# --- a fault of the stage, not of an entry ------------------------------------------------------


async def test_a_stage_broken_for_every_entry_blames_none_and_forgets_their_errors(
    flushed: Any, settings_for: Callable[..., Settings]
) -> None:
    r = await oq_client.connect(settings_for(ORDERQ_PARTITIONS=1, ORDERQ_CLAIM_IDLE_MS=200))
    try:
        ks = await accept(r, *[make_order(f"S{i}") for i in range(5)])
        (p,) = r.partitions
        for lane in p.lanes:  # every hand-off fails: no lane can be written
            await r.client.delete(lane)
            await r.client.set(lane, "not a stream")
        for _ in range(2):  # a first delivery, then a reclaimed one: both fail on every entry
            await run_once(r, ValidateWorker)
            await asyncio.sleep(0.3)
        for key in ks:  # no order is blamed for what is the stage's fault
            assert (await record(r, key))["status"] == "accepted"
        assert await dead_letters(r) == []
        assert await r.client.hlen(p.errors) == 5  # the last error of each, for a dead letter
        for lane in p.lanes:
            await r.client.delete(lane)
        await oq_client.ensure_groups(r)
        await run_once(r, ValidateWorker)  # the recovery sweep delivers them again: they go through
        for key in ks:
            assert (await record(r, key))["status"] == "validated"
        assert await r.client.hlen(p.errors) == 0  # bounded memory: their error records went with them
    finally:
        await r.close()


# --- through the real stages ----------------------------------------------------------------------


async def test_one_absurd_order_among_ten_ends_alone_within_one_lease(
    r1: Redis, ingress: Callable[..., Any], stages: Callable[..., Any]
) -> None:
    """The issue's scenario with real processes: the ten ordinary orders come through the
    ingress, the absurd one was queued before the bounds; within one lease the ten execute
    and the absurd one is rejected ``unprocessable``."""
    env = {"ORDERQ_CLAIM_IDLE_MS": 20_000}
    procs = [stages("validate", **env), stages("execute", **env)]
    base = await ingress()
    await queue_raw(r1, "tmall:TABSURD", absurd_payload("ABSURD"))
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=10) as c:
        resp = await c.post("/v1/orders/batch", json={"orders": [make_order(f"OK{i}") for i in range(10)]})
        assert resp.json()["accepted"] == 10
        while True:
            docs = [(await c.get(f"/v1/orders/tmall/{o}")).json() for o in ["TABSURD", *(f"TOK{i}" for i in range(10))]]
            if docs[0].get("status") == "rejected" and all(d.get("status") == "executed" for d in docs[1:]):
                break
            assert time.monotonic() - t0 < 18, (docs, procs[0].log()[-2000:], procs[1].log()[-2000:])
            await asyncio.sleep(0.1)
    assert docs[0]["reasons"] == ["unprocessable"] and "at most 10000000.00" in docs[0]["error"]
    log = [json.loads(line) for line in procs[0].log().splitlines() if line.startswith("{")]
    assert [e["order_key"] for e in log if e.get("event") == "validate.unprocessable"] == ["tmall:TABSURD"]


# --- money bounds at the door -----------------------------------------------------------------------


async def test_money_out_of_bounds_is_422_with_paths_on_every_way_in(ingress: Callable[..., Any], r1: Redis) -> None:
    base = await ingress()
    absurd = make_order("ABSURD", lines=ABSURD_LINES, paid_amount="999999999999.99")
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=10) as c:
        resp = await c.post("/v1/orders", json=absurd)
        assert resp.status_code == 422, resp.text
        paths = [d["path"] for d in resp.json()["error"]["details"]]
        assert paths == [f"lines[{i}].unit_price" for i in range(200)] + ["lines", "paid_amount"]
        # a batch: that item is invalid with the same paths, the others accepted
        resp = await c.post("/v1/orders/batch", json={"orders": [absurd, *(make_order(f"B{i}") for i in range(10))]})
        doc = resp.json()
        assert doc["accepted"] == 10 and doc["invalid"] == 1, doc
        item = doc["results"][0]
        assert item["status"] == "invalid" and item["order_key"] == "tmall:TABSURD"
        assert [d["path"] for d in item["error"]["details"]][-2:] == ["lines", "paid_amount"]
        # a channel's own format: the same schema, the channel's field named
        sample = json.loads((ROOT / "mappings" / "samples" / "tmall.json").read_text(encoding="utf-8"))
        tmall = copy.deepcopy(sample)
        tmall["tid"] = tmall["tid_str"] = "4023517781234567999"
        item = tmall["orders"]["order"][0]
        item["num"], item["price"] = 9999, "999999999.99"
        resp = await c.post("/v1/channels/tmall/orders", json=tmall)
        assert resp.status_code == 422, resp.text
        details = resp.json()["error"]["details"]
        assert any("price" in d["path"] and "lines[0].unit_price" in d["message"] for d in details), details
    assert await r1.client.exists(r1.partition_of("tmall:TABSURD").status("tmall:TABSURD")) == 0
