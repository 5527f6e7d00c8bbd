"""The status TTL counts from a final state only (contract §5): an order that waits — behind a
paused execute stage, in review, held by a region hold — keeps its record however long it
waits and goes on when it may; a rejected or executed order's record expires after
``ORDERQ_STATUS_TTL_S``. Against a real Valkey, over real HTTP, with a TTL of two seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from breaker.controller import Breaker
from execute.worker import ExecuteWorker
from orderq import client as oq_client
from orderq import keys
from orderq.control import Control
from orderq.settings import Settings
from orderq.wire import TERMINAL_STATUSES, WAITING_STATUSES
from tests.conftest import ADMIN, auth, dispatch_all, drain, make_order, unique
from tests.test_review_holds import JIANGSU, ZHEJIANG, get, half_price, post, reserved, set_stock, to
from tests.test_validate_rules import RULES_ON, accept, line, order, status
from validate.worker import ValidateWorker

TTL = 2
TTL_ENV = {"ORDERQ_STATUS_TTL_S": str(TTL)}  # conftest's inert rules: every plain order executes
ENV = {**RULES_ON, **TTL_ENV}  # every rule on: stock, review


@pytest.fixture
async def api(ingress: Any, settings_for: Callable[..., Settings]) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """An ingress with every rule on and a 2 s status TTL, an admin client, a connection."""
    base = await ingress(**ENV)
    r = await oq_client.connect(settings_for(**ENV))
    async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=10) as c:
        yield c, r
    await r.close()


async def poll(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def ttl_of(r: oq_client.Redis, key: str) -> int:
    """The record's TTL in seconds: -1 none, -2 no record."""
    return int(await r.client.ttl(r.partition_of(key).status(key)))


async def code(c: httpx.AsyncClient, order_id: str) -> int:
    return (await c.get(f"/v1/orders/tmall/{order_id}")).status_code


async def stage_only(r: oq_client.Redis, worker: type[ValidateWorker] | type[ExecuteWorker]) -> int:
    """Run one stage's worker in drain mode (the other stage is, in effect, paused)."""
    control = await Control(r).start()
    try:
        return await worker(r, control, consumer=f"drain-{worker.stage}").run(drain=True)
    finally:
        await control.stop()


def key_of(order_id: str) -> str:
    return f"tmall:{order_id}"


async def test_order_behind_a_paused_execute_stage_outlives_the_ttl(ingress, stages, r):
    """Seen: TTL 60 s, execute paused 65 s, the validated order's record expired (404) and on
    resume it was acknowledged and deleted without executing."""
    base = await ingress(**TTL_ENV)
    async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=10) as c:
        assert (await c.post("/v1/admin/pause", json={"stage": "execute"})).status_code == 200
        stages("validate", **TTL_ENV)
        stages("execute", **TTL_ENV)  # starts paused
        o = make_order(unique("P"))
        assert (await c.post("/v1/orders", json=o, headers=auth())).status_code == 202
        oid = o["order_id"]

        async def validated() -> bool:
            resp = await c.get(f"/v1/orders/tmall/{oid}")
            return resp.status_code == 200 and resp.json()["status"] == "validated"

        await poll(validated, "the order validated")
        assert await ttl_of(r, key_of(oid)) == -1
        await asyncio.sleep(TTL + 1.5)  # the stage stays paused past the TTL
        assert (await get(c, oid))["status"] == "validated"

        assert (await c.post("/v1/admin/resume", json={"stage": "execute"})).status_code == 200

        async def executed() -> dict[str, Any] | None:
            rec = await get(c, oid)
            return rec if rec["status"] == "executed" else None

        rec = await poll(executed, "the order executed after resume")
        assert [a["state"] for a in rec["actions"] if a["name"] == "wms.pick"] == ["done"]
        picks = [f[b"k"].decode() for p in r.partitions for _, f in await r.client.xrange(p.outbox("wms.pick"))]
        assert picks == [key_of(oid)]
        # final now: the TTL runs from here
        assert 0 < await ttl_of(r, key_of(oid)) <= TTL

        async def gone() -> bool:
            return await code(c, oid) == 404

        await poll(gone, "the executed order's record expired", timeout=TTL + 5)


async def test_waiting_orders_keep_their_record_final_ones_expire(api):
    c, r = api
    await set_stock(c, SOFA=10, GONE=0, **{"SOFA-OAK-3": 10})
    assert (await c.post("/v1/admin/holds", json={"province": JIANGSU, "reason": "typhoon"})).status_code == 201
    in_review = half_price()
    in_review["ship_to"]["province"] = ZHEJIANG
    to_reject = half_price()
    to_reject["ship_to"]["province"] = ZHEJIANG
    to_reject["lines"][0]["qty"] = 2
    to_reject["paid_amount"] = "2400.00"
    (review_id, reject_id, held_id, oos_id, done_id) = await post(
        c, in_review, to_reject, to(JIANGSU), order(lines=[line("GONE")]), to(ZHEJIANG)
    )
    await drain(r)
    got = {k: (await get(c, k))["status"] for k in (review_id, reject_id, held_id, oos_id, done_id)}
    assert list(got.values()) == ["review", "review", "held", "rejected", "executed"]
    for k, st in got.items():
        assert (await ttl_of(r, key_of(k)) == -1) == (st in WAITING_STATUSES), (k, st)
        assert (0 < await ttl_of(r, key_of(k)) <= TTL) == (st in TERMINAL_STATUSES), (k, st)
    assert await reserved(c, "SOFA") == 3

    await asyncio.sleep(TTL + 1.5)
    # final: gone; waiting: all there, still listed, still decidable, still held
    assert await code(c, oos_id) == 404 and await code(c, done_id) == 404
    assert [(await get(c, k))["status"] for k in (review_id, reject_id, held_id)] == ["review", "review", "held"]
    listed = {i["order_key"] for i in (await c.get("/v1/review")).json()["items"]}
    assert listed == {key_of(review_id), key_of(reject_id)}

    resp = await c.post(f"/v1/review/tmall/{review_id}/approve")
    assert resp.status_code == 200 and resp.json()["status"] == "validated"
    resp = await c.post(f"/v1/review/tmall/{reject_id}/reject")
    assert resp.status_code == 200 and resp.json()["status"] == "rejected"
    assert await reserved(c, "SOFA") == 1  # its ledger record outlived the TTL too: its 2 units are back
    assert 0 < await ttl_of(r, key_of(reject_id)) <= TTL
    assert await ttl_of(r, key_of(review_id)) == -1  # approved: waits for execution

    resp = await c.delete(f"/v1/admin/holds/{quote(JIANGSU)}")
    assert resp.status_code == 200 and resp.json()["released"] == 1
    await drain(r)
    assert [(await get(c, k))["status"] for k in (review_id, held_id)] == ["executed", "executed"]
    for k in (review_id, held_id):
        assert 0 < await ttl_of(r, key_of(k)) <= TTL
    await asyncio.sleep(TTL + 1)
    for k in (review_id, reject_id, held_id):
        assert await code(c, k) == 404
    # nothing of the decided review orders is kept either (their ledger records aged with them)
    assert not await r.client.exists(*(keys.ledger_key(key_of(k)) for k in (review_id, reject_id)))


async def test_record_written_with_a_ttl_before_loses_it_once_its_order_waits(flushed, settings_for):
    """Records written before this change carry a TTL from their acceptance: the hand-off to a
    waiting state removes it."""
    r = await oq_client.connect(settings_for(**TTL_ENV))
    try:
        (key,) = await accept(r, make_order(unique("OLD")))
        await r.client.expire(r.partition_of(key).status(key), 100)
        await stage_only(r, ValidateWorker)
        assert (await status(r, key))["status"] == "validated"
        assert await ttl_of(r, key) == -1
    finally:
        await r.close()


async def test_entry_whose_record_is_missing_is_neither_executed_nor_dropped(flushed, settings_for):
    """Its record is its effect ledger: without it, executing could repeat effects. It fails with
    its error and becomes a dead letter an operator can see; it is never silently acknowledged."""
    r = await oq_client.connect(settings_for(**TTL_ENV, ORDERQ_MAX_DELIVERIES=1))
    try:
        (key,) = await accept(r, make_order(unique("GONE")))
        p = r.partition_of(key)
        await stage_only(r, ValidateWorker)
        assert (await status(r, key))["status"] == "validated"
        await r.client.delete(p.status(key))
        await stage_only(r, ExecuteWorker)
        assert await r.client.xlen(p.outbox("wms.pick")) == 0  # not executed
        if not await r.client.xlen(p.dead):  # left pending with its error: the recovery sweep
            await asyncio.sleep(1.2)  # (past the claim idle time) dead-letters it
            await stage_only(r, ExecuteWorker)
        (dead,) = await r.client.xrange(p.dead)  # nor acknowledged and dropped: a dead letter
        fields = dead[1]
        assert fields[b"k"].decode() == key and b"status record missing" in fields[b"error"]
        assert await r.client.xlen(p.outbox("wms.pick")) == 0
        assert not await r.client.exists(p.status(key))  # nothing pretends it was decided

        # At validation nothing has taken effect yet: an intake entry whose record is gone is
        # validated and executed, its record written again.
        (key2,) = await accept(r, make_order(unique("GONE")))
        await r.client.delete(r.partition_of(key2).status(key2))
        await drain(r)
        assert (await status(r, key2))["status"] == "executed"
    finally:
        await r.close()


async def test_review_and_held_orders_whose_record_is_missing_still_go_on(api):
    """A parked order (review or held) never executed: found without its record (deleted by
    hand, or expired before waiting records were kept) it is still decided or released."""
    c, r = api
    await set_stock(c, SOFA=10, **{"SOFA-OAK-3": 10})
    assert (await c.post("/v1/admin/holds", json={"province": JIANGSU, "reason": "typhoon"})).status_code == 201
    in_review = half_price()
    in_review["ship_to"]["province"] = ZHEJIANG
    review_id, held_id = await post(c, in_review, to(JIANGSU))
    await drain(r)
    assert [(await get(c, k))["status"] for k in (review_id, held_id)] == ["review", "held"]
    for k in (review_id, held_id):
        await r.client.delete(r.partition_of(key_of(k)).status(key_of(k)))
        assert await code(c, k) == 404

    assert [i["order_key"] for i in (await c.get("/v1/review")).json()["items"]] == [key_of(review_id)]
    resp = await c.post(f"/v1/review/tmall/{review_id}/approve")
    assert resp.status_code == 200 and resp.json()["status"] == "validated"
    resp = await c.delete(f"/v1/admin/holds/{quote(JIANGSU)}")
    assert resp.status_code == 200 and resp.json()["released"] == 1
    await drain(r)
    assert [(await get(c, k))["status"] for k in (review_id, held_id)] == ["executed", "executed"]
    picks = {f[b"k"].decode() for p in r.partitions for _, f in await r.client.xrange(p.outbox("wms.pick"))}
    assert picks == {key_of(review_id), key_of(held_id)}


async def test_executed_order_owed_a_deferred_sync_keeps_its_record_until_replayed(flushed, settings_for):
    r = await oq_client.connect(settings_for(**TTL_ENV))
    try:
        await r.client.hset(keys.BREAKER_KEY, "stage", "degraded")
        (key,) = await accept(r, make_order(unique("DF"), remark="周末送货"))
        await drain(r)
        rec = await status(r, key)
        assert rec["status"] == "executed"
        assert {a["name"]: a["state"] for a in rec["actions"]}["crm.remark_sync"] == "deferred"
        await asyncio.sleep(TTL + 1)
        assert await ttl_of(r, key) == -1  # still owed work
        await r.client.hset(keys.BREAKER_KEY, "stage", "normal")
        assert await Breaker(r).replay_deferred() == 1
        rec = await status(r, key)
        assert {a["name"]: a["state"] for a in rec["actions"]}["crm.remark_sync"] == "done"
        assert 0 < await ttl_of(r, key) <= TTL
    finally:
        await r.close()


async def test_executed_order_keeps_its_record_while_a_dispatch_dead_letter_is_unresolved(flushed, settings_for):
    """Contract §5: a record never expires while a dead letter of its order is unresolved. Two
    executed orders (one owed a deferred sync); the WMS and the SMS gateway refuse their actions
    for good. Their records stay past the TTL — the plain one's had started at ``executed``, the
    other's deferred sync is replayed meanwhile — and the TTL starts again only once the last
    dead letter of the order is resolved (a replay, a discard)."""
    from orderq import deadletters
    from tests.test_dispatch import Sink

    r = await oq_client.connect(settings_for(**TTL_ENV))
    sink = await Sink().start()
    try:
        (plain,) = await accept(r, make_order(unique("DD")))
        await drain(r)
        await r.client.hset(keys.BREAKER_KEY, "stage", "degraded")  # its remark sync is deferred
        (owed,) = await accept(r, make_order(unique("DD"), remark="周末送货"))
        await drain(r)
        assert 0 < await ttl_of(r, plain) <= TTL and await ttl_of(r, owed) == -1
        sink.status_of[plain] = sink.status_of[owed] = 422  # refused for good: a dead letter at once
        await dispatch_all(
            settings_for(
                **TTL_ENV,
                ORDERQ_WEBHOOK_WMS_PICK=sink.url + "/pick",
                ORDERQ_WEBHOOK_NOTIFY_SMS=sink.url + "/sms",
                ORDERQ_DISPATCH_BACKOFF_S=0.02,
            ),
            "dd",
        )
        letters = {(d.order_key, d.action): d.id for d in (await deadletters.list_dead(r))[0]}
        assert len(letters) == 4
        assert await ttl_of(r, plain) == -1  # its TTL had started: a dead letter took it away
        await r.client.hset(keys.BREAKER_KEY, "stage", "normal")
        assert await Breaker(r).replay_deferred() == 1  # its last deferred sync: owed no more of those
        assert await ttl_of(r, owed) == -1
        await asyncio.sleep(TTL + 1)
        assert await ttl_of(r, plain) == -1 and await ttl_of(r, owed) == -1  # past the TTL, still there
        for key in (plain, owed):
            await deadletters.replay(r, letters[key, "wms.pick"])
            assert await ttl_of(r, key) == -1  # one left unresolved
            await deadletters.discard(r, letters[key, "notify.sms"], "no phone")
            assert 0 < await ttl_of(r, key) <= TTL  # the last one resolved: final again, the TTL runs
            actions = {a["name"]: a["state"] for a in (await status(r, key))["actions"]}
            assert actions["wms.pick"] == "done" and actions["notify.sms"] == "failed"
    finally:
        await sink.stop()
        await r.close()
