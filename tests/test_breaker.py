"""Staged backpressure (contract §6): the breaker's hysteresis, deferred and dropped syncs,
shedding at the ingress. Real processes against the private Valkey, tiny thresholds
set through the environment; every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from breaker.controller import Hysteresis
from orderq import audit, keys
from orderq.settings import Settings
from tests.conftest import ADMIN, auth, make_order

THRESHOLDS = {
    "ORDERQ_BREAKER_OPEN_DEPTH": 20,
    "ORDERQ_BREAKER_CLOSE_DEPTH": 5,
    "ORDERQ_BREAKER_COOLDOWN_S": 0.5,
    "ORDERQ_SHED_DEPTH": 60,
    "ORDERQ_SHED_VIP_DEPTH": 200,
}
# These tests are about the breaker, not the business rules: every order validates.
RULES_OFF = {
    "ORDERQ_UNKNOWN_SKU": "allow",
    "ORDERQ_RISK_REVIEW_SCORE": 1000,
    "ORDERQ_DUP_WINDOW_S": 0,
    "ORDERQ_IP_ORDERS_PER_HOUR": 1_000_000,
}
ENV: dict[str, Any] = {**THRESHOLDS, **RULES_OFF}
SYNCS = ("crm.remark_sync", "crm.gift_sync")


def order(tag: str, i: int, *, tier: str = "regular", remark: str | None = None, gifts: bool = False) -> dict:
    """A valid order with its own customer and recipient phone (no rule links two of them)."""
    o = make_order(f"{tag}{i}", customer={"id": f"u-{tag}{i}", "tier": tier, "phone": f"139{i:08d}"})
    o["ship_to"] = {**o["ship_to"], "phone": f"138{i:08d}"}
    if remark:
        o["remark"] = remark
    if gifts:
        o["gifts"] = [{"sku": "GIFT-CUSHION", "qty": 1}]
    return o


async def poll(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Call ``check`` (sync or async) until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stats(c: httpx.AsyncClient) -> dict[str, Any]:
    resp = await c.get("/v1/stats", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stage_events(log_text: str) -> list[dict[str, Any]]:
    """The ``breaker.stage_changed`` events of a JSON log, in order."""
    events = []
    for line in log_text.splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and doc.get("event") == "breaker.stage_changed":
                events.append(doc)
    return events


async def records(c: httpx.AsyncClient, orders: list[dict]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in orders:
        resp = await c.get(f"/v1/orders/{o['channel']}/{o['order_id']}", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        out[f"{o['channel']}:{o['order_id']}"] = resp.json()
    return out


def expected_syncs(o: dict) -> set[str]:
    return {name for name, present in zip(SYNCS, (o.get("remark"), o.get("gifts")), strict=True) if present}


async def outbox_keys(r: Any, action: str) -> Counter[str]:
    """How many outbox entries each order has for ``action``, over every partition."""
    n: Counter[str] = Counter()
    for p in r.partitions:
        for _id, fields in await r.client.xrange(p.outbox(action)):
            n[fields[b"k"].decode()] += 1
    return n


async def push(c: httpx.AsyncClient, orders: list[dict]) -> dict[str, Any]:
    resp = await c.post("/v1/orders/batch", json={"orders": orders}, headers=auth())
    assert resp.status_code == 202, resp.text
    return resp.json()


# --- the pure decision ----------------------------------------------------------------


def hysteresis(**over: Any) -> Hysteresis:
    env = {k: str(v) for k, v in {**THRESHOLDS, **over}.items()}
    return Hysteresis(Settings.from_mapping(env))


def changes(h: Hysteresis, samples: list[tuple[int, float]]) -> list[tuple[str, str]]:
    out, stage = [], h.level
    for backlog, now in samples:
        new = h.decide(backlog, now)
        if new != stage:
            out.append((stage, new))
            stage = new
    return out


def test_thresholds_are_inclusive_going_up_and_the_shed_depth_skips_degraded():
    h = hysteresis()
    assert h.decide(19, 0.0) == "normal"
    assert h.decide(20, 0.1) == "degraded"
    assert hysteresis().decide(60, 0.0) == "shedding"


def test_oscillating_around_the_open_depth_changes_at_most_once():
    h = hysteresis()
    samples = [(20 if i % 2 else 19, i * 0.1) for i in range(100)]  # 10 s, 20x the cooldown
    assert changes(h, samples) == [("normal", "degraded")]


def test_oscillating_around_the_close_depth_does_not_close():
    h = hysteresis()
    h.decide(30, 0.0)
    samples = [(5 if i % 2 else 4, i * 0.1) for i in range(1, 100)]  # each dip shorter than the cooldown
    assert changes(h, samples) == []
    assert h.level == "degraded"
    # Held under the close depth for the cooldown: exactly one change.
    assert changes(h, [(4, 10.0 + i * 0.1) for i in range(10)]) == [("degraded", "normal")]


def test_oscillating_around_the_shed_depth_keeps_shedding():
    h = hysteresis()
    samples = [(60 if i % 2 == 0 else 59, i * 0.1) for i in range(100)]
    assert changes(h, samples) == [("normal", "shedding")]


def test_cooldown_counts_from_the_last_sample_at_or_over_the_close_depth():
    h = hysteresis()
    h.decide(25, 0.0)
    assert h.decide(4, 1.0) == "degraded"
    assert h.decide(4, 1.49) == "degraded"
    assert h.decide(5, 1.6) == "degraded"  # back at the close depth: the cooldown starts over
    assert h.decide(4, 1.7) == "degraded"
    assert h.decide(4, 2.19) == "degraded"
    assert h.decide(4, 2.2) == "normal"
    assert h.decide(4, 9.0) == "normal"


def test_shedding_steps_down_through_degraded_after_cooldowns():
    h = hysteresis()
    assert h.decide(100, 0.0) == "shedding"
    assert h.decide(30, 0.1) == "shedding"  # under the shed depth, cooldown not yet passed
    assert h.decide(30, 0.6) == "degraded"
    assert h.decide(3, 0.7) == "degraded"  # degraded has its own cooldown under the close depth
    assert h.decide(3, 1.2) == "normal"
    # Straight from shedding to normal when the backlog is already under the close depth.
    h = hysteresis()
    h.decide(100, 0.0)
    assert changes(h, [(0, 0.1), (0, 0.3), (0, 0.6)]) == [("shedding", "normal")]


def test_zero_cooldown_closes_on_the_first_sample_under_the_close_depth():
    h = hysteresis(ORDERQ_BREAKER_COOLDOWN_S=0)
    h.decide(25, 0.0)
    assert h.decide(5, 0.1) == "degraded"
    assert h.decide(4, 0.2) == "normal"


# --- real processes -------------------------------------------------------------------


async def test_degraded_defers_syncs_and_replays_each_once_back_in_normal(ingress, stages, r):
    base = await ingress(**ENV)
    breaker = stages("breaker", **ENV)
    validate = stages("validate", **ENV)
    # A: 30 orders (past the open depth of 20) with every mix of remark and gifts.
    a_orders = [order("A", i, remark="周末送货, 电梯房" if i % 3 else None, gifts=i % 2 == 0) for i in range(30)]
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        resp = await c.post("/v1/admin/pause", json={"stage": "execute"}, headers=ADMIN)
        assert resp.status_code == 200, resp.text
        assert (await push(c, a_orders))["accepted"] == 30

        def ready(doc: dict) -> int:
            return sum(doc["depth"]["ready"].values())

        async def degraded_and_validated() -> dict | None:
            doc = await stats(c)
            return doc if doc["stage"] == "degraded" and ready(doc) == 30 and doc["depth"]["intake"] == 0 else None

        doc = await poll(degraded_and_validated, "stage degraded with all 30 orders validated")
        assert doc["paused"] == ["execute"]
        ev = (await poll(lambda: stage_events(breaker.log()), "breaker.stage_changed in the log"))[0]
        assert ev["stage"] == "degraded" and ev["previous"] == "normal"
        assert ev["backlog"] >= 20
        assert (ev["open_depth"], ev["close_depth"], ev["cooldown_s"]) == (20, 5, 0.5)
        assert (ev["shed_depth"], ev["shed_vip_depth"]) == (60, 200)

        # B: 10 plain orders stay in intake (no validator), holding the backlog over the
        # close depth, so the stage stays degraded while the executors run A.
        validate.stop()
        stages("execute", **ENV)  # starts paused
        b_orders = [order("B", i) for i in range(10)]
        assert (await push(c, b_orders))["accepted"] == 10
        resp = await c.post("/v1/admin/resume", json={"stage": "execute"}, headers=ADMIN)
        assert resp.status_code == 200, resp.text

        async def a_executed() -> dict | None:
            doc = await stats(c)
            return doc if doc["totals"]["executed"] == 30 else None

        doc = await poll(a_executed, "the 30 A orders executed")
        n_syncs = sum(len(expected_syncs(o)) for o in a_orders)
        assert doc["stage"] == "degraded"
        assert doc["syncs"]["deferred"] == n_syncs
        assert doc["depth"]["deferred"] == n_syncs
        for o in a_orders:
            rec = (await records(c, [o]))[f"tmall:{o['order_id']}"]
            assert rec["status"] == "executed"
            states = {a["name"]: a["state"] for a in rec["actions"]}
            assert states["wms.pick"] == states["notify.sms"] == states["invoice.request"] == "done"
            assert {n for n, s in states.items() if s == "deferred"} == expected_syncs(o), rec
        for action in SYNCS:
            assert await outbox_keys(r, action) == Counter()

        # The validator is back: B drains, the backlog stays under the close depth for the
        # cooldown, the stage is normal and every deferred sync is replayed.
        stages("validate", **ENV)

        async def replayed() -> dict | None:
            doc = await stats(c)
            done = doc["stage"] == "normal" and doc["syncs"]["replayed"] == n_syncs and doc["depth"]["deferred"] == 0
            return doc if done and doc["totals"]["executed"] == 40 else None

        doc = await poll(replayed, "stage normal with every deferred sync replayed")
        assert doc["syncs"]["deferred"] == n_syncs
        for key, rec in (await records(c, a_orders)).items():
            assert all(a["state"] == "done" for a in rec["actions"]), (key, rec)
        for action in SYNCS:
            want = Counter(f"tmall:{o['order_id']}" for o in a_orders if action in expected_syncs(o))
            assert await outbox_keys(r, action) == want  # exactly one entry per order

    events = stage_events(breaker.log())
    assert [(e["previous"], e["stage"]) for e in events] == [("normal", "degraded"), ("degraded", "normal")]
    assert events[1]["backlog"] < 5
    report = await audit.run(r)
    assert report["lost"] == 0 and report["duplicate_effects"] == 0


async def test_drop_mode_discards_syncs_and_counts_them(ingress, stages, r):
    env = {**ENV, "ORDERQ_BREAKER_MODE": "drop"}
    base = await ingress(**env)
    stages("breaker", **env)
    stages("validate", **env)
    orders = [order("D", i, remark="请放门口", gifts=True) for i in range(25)]
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await push(c, orders))["accepted"] == 25

        async def degraded_and_validated() -> bool:
            doc = await stats(c)
            return doc["stage"] == "degraded" and sum(doc["depth"]["ready"].values()) == 25

        await poll(degraded_and_validated, "stage degraded with all 25 orders validated")
        stages("execute", **env)

        async def back_to_normal() -> dict | None:
            doc = await stats(c)
            return doc if doc["stage"] == "normal" and doc["totals"]["executed"] == 25 else None

        doc = await poll(back_to_normal, "all executed and the stage back to normal")
        assert (doc["syncs"]["dropped"], doc["syncs"]["deferred"], doc["syncs"]["replayed"]) == (50, 0, 0)
        assert doc["depth"]["deferred"] == 0
        for key, rec in (await records(c, orders)).items():
            states = {a["name"]: a["state"] for a in rec["actions"]}
            assert states["crm.remark_sync"] == states["crm.gift_sync"] == "dropped", key
            assert states["wms.pick"] == "done"
        for action in SYNCS:
            assert await outbox_keys(r, action) == Counter()  # dropped means never sent, not later
        assert sum((await outbox_keys(r, "wms.pick")).values()) == 25


async def test_shedding_refuses_regular_orders_keeps_vip_then_recovers(ingress, stages, r):
    base = await ingress(**ENV)
    breaker = stages("breaker", **ENV)
    pubsub = r.client.pubsub()
    await pubsub.subscribe(keys.EVENTS_CHANNEL)

    async def published(check: Callable[[dict], bool]) -> dict:
        """The next control event the breaker publishes that passes ``check``."""

        async def next_match() -> dict:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg and msg["type"] == "message":
                    data = msgspec.json.decode(msg["data"])
                    if check(data):
                        return data

        return await asyncio.wait_for(next_match(), 30)

    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as c:
            # 60 regular orders and no workers: the backlog reaches the shed depth.
            await push(c, [order("S", i) for i in range(60)])
            await published(lambda d: d.get("stage") == "shedding")
            # The ingress learns it from its own pub/sub subscription, which may read the event a
            # moment after this test's: wait for the ingress's own view (its /readyz names it);
            # from then on every regular order is refused.
            deadline = time.monotonic() + 5
            while (await c.get("/readyz")).json().get("stage") != "shedding":
                assert time.monotonic() < deadline, "the ingress never saw the shedding stage"
                await asyncio.sleep(0.01)
            resp = await c.post("/v1/orders", json=order("R", 1), headers=auth())
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"]["code"] == "shedding"
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await c.get("/readyz")).status_code == 200  # VIP orders still go in (contract §4)

            resp = await c.post("/v1/orders", json=order("V", 1, tier="vip"), headers=auth())
            assert resp.status_code == 202, resp.text
            assert resp.json()["stage"] == "shedding"

            mixed = [order("M", i, tier="vip" if i % 3 == 0 else "regular") for i in range(6)]
            body = await push(c, mixed)
            assert [x["status"] for x in body["results"]] == ["accepted", "shed", "shed"] * 2
            assert body["results"][1]["error"]["code"] == "shedding"
            assert (body["accepted"], body["shed"]) == (2, 4)
            # A shed order was not queued: sending it again later is not a duplicate.
            assert (await c.get("/v1/orders/tmall/M1", headers=ADMIN)).status_code == 404

            doc = await stats(c)
            assert doc["stage"] == "shedding"
            assert doc["totals"]["shed"] == 5
            assert doc["totals"]["accepted"] == 63

            # VIP orders past the VIP shed depth are refused too.
            await push(c, [order("W", i, tier="vip") for i in range(140)])
            await published(lambda d: d.get("backlog", 0) >= 200)
            resp = await c.post("/v1/orders", json=order("V", 2, tier="vip"), headers=auth())
            assert resp.status_code == 503, resp.text
            assert "Retry-After" in resp.headers

            # Workers drain the backlog: the stage steps back down and regular orders are welcome.
            stages("validate", **ENV)
            stages("execute", **ENV)
            await published(lambda d: d.get("stage") == "normal")
            # The ingress hears the same message on its own subscription, a moment apart.
            for _ in range(40):
                resp = await c.post("/v1/orders", json=order("R", 1), headers=auth())
                if resp.status_code != 503:
                    break
                await asyncio.sleep(0.05)
            assert resp.status_code == 202, resp.text
            assert (await c.get("/readyz")).status_code == 200
    finally:
        await pubsub.aclose()

    events = stage_events(breaker.log())
    assert events[0]["previous"] == "normal" and events[-1]["stage"] == "normal"
    assert "shedding" in [e["stage"] for e in events]
    for before, after in itertools.pairwise(events):
        assert after["previous"] == before["stage"]  # one event per change, none lost


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds come only from the ENV dicts above, never from the developer's shell."""
    for name in [*THRESHOLDS, "ORDERQ_BREAKER_MODE", "ORDERQ_CHANNEL_RATE"]:
        monkeypatch.delenv(name, raising=False)
