"""The validation rules against a real Valkey: every reason code, atomic stock under real
concurrency (two ``orderq validate`` processes), single-use coupons raced, replays."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest

from orderq import client as oq_client
from orderq import keys
from orderq.ledger import coupons, stock
from orderq.schema import normalise, order_decoder, pack
from orderq.settings import Settings
from orderq.status import render
from tests.conftest import ADMIN, auth, drain, make_order
from validate import checks

# The rules as the contract's defaults have them (conftest turns two of them off).
RULES_ON = {"ORDERQ_UNKNOWN_SKU": "review", "ORDERQ_DUP_WINDOW_S": "180"}


@pytest.fixture
async def rr(flushed: Any, settings_for: Callable[..., Settings]) -> AsyncIterator[oq_client.Redis]:
    """A connection whose settings have every rule on."""
    conn = await oq_client.connect(settings_for(**RULES_ON))
    yield conn
    await conn.close()


_n = 0


def order(**over: Any) -> dict[str, Any]:
    """A valid order with its own key and recipient (so no duplicate suspicion by accident)."""
    global _n
    _n += 1
    o = make_order(f"R{_n}-{time.monotonic_ns()}", **over)
    if "ship_to" not in over:
        o["ship_to"] = {**o["ship_to"], "name": f"买家{_n}", "phone": f"138{_n:08d}"[:11]}
    if "customer" not in over:
        o["customer"] = {**o["customer"], "ip": f"10.0.{_n // 250}.{_n % 250}"}
    return o


def line(sku: str, qty: int = 1, unit: str = "100.00", paid: str = "100.00") -> dict[str, Any]:
    return {"sku": sku, "qty": qty, "unit_price": unit, "paid_price": paid}


async def accept(r: oq_client.Redis, *orders: dict[str, Any]) -> list[str]:
    """Queue orders exactly as the ingress does: the intake script, one call per partition."""
    by_part: dict[Any, list[tuple[str, bytes]]] = {}
    for o in orders:
        raw = msgspec.json.encode(o)
        parsed = normalise(order_decoder.decode(raw), raw)
        by_part.setdefault(r.partition_of(parsed.key), []).append((parsed.key, pack(parsed)))

    def build(pipe: Any) -> None:
        for p, items in by_part.items():
            args: list[Any] = [r.settings.status_ttl_s]
            for key, payload in items:
                args += [key, payload, ""]
            r.script(pipe, "intake", [p.intake, p.counters, *(p.status(k) for k, _ in items)], args)

    await r.run(build)
    return [f"{o['channel']}:{o['order_id']}" for o in orders]


async def status(r: oq_client.Redis, key: str) -> dict[str, Any]:
    return render(key, await r.client.hgetall(r.partition_of(key).status(key)))


async def run(r: oq_client.Redis, *orders: dict[str, Any]) -> list[dict[str, Any]]:
    """Accept, validate and execute; the status records, in order."""
    ks = await accept(r, *orders)
    await drain(r)
    return [await status(r, k) for k in ks]


async def stock_of(r: oq_client.Redis, sku: str) -> dict[str, Any]:
    doc = await stock.get_stock(r, sku)
    assert doc is not None
    return doc


async def _started(procs: list[Any], timeout: float = 20) -> list[Any]:
    """Wait until every validate process is up and working (so the race is a real one)."""
    deadline = time.monotonic() + timeout
    while not all('"validate.started"' in p.log() for p in procs):
        assert time.monotonic() < deadline, [p.log() for p in procs]
        await asyncio.sleep(0.05)
    return procs


async def _settled(r: oq_client.Redis, ks: list[str], timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        docs = [await status(r, k) for k in ks]
        if all(d["status"] != "accepted" for d in docs):
            return docs
        assert time.monotonic() < deadline, [d["status"] for d in docs]
        await asyncio.sleep(0.05)


# --- stock -----------------------------------------------------------------------------
async def test_stock_reserved_until_sellable_runs_out(rr):
    await stock.set_stock(rr, [("CHAIR", 10)])  # sellable floor(9.5) = 9
    docs = await run(rr, *(order(lines=[line("CHAIR", 4)]) for _ in range(3)))
    assert sorted(d["status"] for d in docs) == ["executed", "executed", "rejected"]
    assert [d["reasons"] for d in docs if d["status"] == "rejected"] == [["out_of_stock:CHAIR"]]
    assert await stock_of(rr, "CHAIR") == {"sku": "CHAIR", "physical": 10, "reserved": 8, "sellable": 1}


async def test_order_short_on_one_line_reserves_nothing(rr):
    await stock.set_stock(rr, [("SOFA", 100), ("LAMP", 2)])  # LAMP: floor(1.9) = 1
    (s,) = await run(rr, order(lines=[line("SOFA", 5), line("LAMP", 2)]))
    assert s["status"] == "rejected" and s["reasons"] == ["out_of_stock:LAMP"]
    assert (await stock_of(rr, "SOFA"))["reserved"] == 0
    assert (await stock_of(rr, "LAMP"))["reserved"] == 0
    # the same SKU on two lines counts as one demand
    (s,) = await run(rr, order(lines=[line("SOFA", 50), line("SOFA", 46)]))
    assert s["reasons"] == ["out_of_stock:SOFA"]
    (s,) = await run(rr, order(lines=[line("SOFA", 50), line("SOFA", 45), line("LAMP", 1)]))
    assert s["status"] == "executed"
    assert (await stock_of(rr, "SOFA"))["reserved"] == 95


@pytest.mark.parametrize(
    ("policy", "outcome", "reasons"),
    [
        ("review", "review", ["unknown_sku:NOPE"]),
        ("reject", "rejected", ["unknown_sku:NOPE"]),
        ("allow", "executed", []),
    ],
)
async def test_unknown_sku_policy(flushed, settings_for, policy, outcome, reasons):
    r = await oq_client.connect(settings_for(**{**RULES_ON, "ORDERQ_UNKNOWN_SKU": policy}))
    try:
        await stock.set_stock(r, [("KNOWN", 10)])
        (s,) = await run(r, order(lines=[line("KNOWN", 2), line("NOPE", 1)]))
        assert s["status"] == outcome and s["reasons"] == reasons
        # review keeps the known lines reserved; a rejected order holds nothing
        assert (await stock_of(r, "KNOWN"))["reserved"] == (0 if outcome == "rejected" else 2)
    finally:
        await r.close()


async def test_redelivered_batch_reserves_once(rr):
    """The ledger records each order's decision in the same script: deciding a batch
    twice (a crash before the hand-off) holds stock, coupons and subsidy once."""
    await stock.set_stock(rr, [("DESK", 4)])  # sellable 3
    await coupons.put_coupons(rr, [coupons.CouponRecord(code="ONE", platform="tmall", amount="10.00", single_use=True)])
    raw = [
        order(lines=[line("DESK", 2)], coupons=[{"code": "ONE", "platform": "tmall", "amount": "10.00"}]),
        order(lines=[line("DESK", 1)]),
        order(lines=[line("DESK", 1), line("SOFA-OAK-3")]),  # short, and an unknown SKU
    ]
    parsed = [order_decoder.decode(msgspec.json.encode(o)) for o in raw]
    ta = [time.time_ns() // 1000 + i for i in range(3)]
    first = await checks.decide(rr, parsed, ta)
    await rr.client.hset(keys.stock_key("DESK"), "p", 100)  # a replay must not decide anew
    again = await checks.decide(rr, parsed, ta)
    await rr.client.hset(keys.stock_key("DESK"), "p", 4)
    assert [d.outcome for d in first] == [d.outcome for d in again] == ["v", "v", "r"]
    assert first[2].reasons == ["out_of_stock:DESK", "unknown_sku:SOFA-OAK-3"]
    assert [(d.reasons, d.risk_score, d.priority) for d in first] == [
        (d.reasons, d.risk_score, d.priority) for d in again
    ]
    assert (await stock_of(rr, "DESK"))["reserved"] == 3
    assert (await coupons.get_coupon(rr, "ONE"))["used_by"] == parsed[0].key  # type: ignore[index]
    # even a replay older than its record holds no unit twice (the holder list says so)
    await rr.client.delete(keys.decided_key(ta[0] // 1000 // 3_600_000))
    late = await checks.decide(rr, parsed[:2], ta[:2])
    assert [d.outcome for d in late] == ["v", "v"]
    assert (await stock_of(rr, "DESK"))["reserved"] == 3


async def test_order_decided_then_waiting_past_the_record_ttl_gets_its_first_decision(rr, monkeypatch):
    """Decided (its unit held), its validator dies before the hand-off, and the entry waits longer
    than a decision lives in its hour's bucket (a day; here 1 s). A look-alike order comes in
    meanwhile and goes to review as its duplicate. Redelivered, the first order gets its first
    decision back (validated, executed), not a new one: review as a duplicate of the later one."""
    import contextlib

    from redis.exceptions import ResponseError

    from orderq.schema import unpack_order

    monkeypatch.setattr(keys, "LEDGER_REPLAY_TTL_S", 1)
    await stock.set_stock(rr, [("TWIN", 10)])
    a = order(lines=[line("TWIN")], paid_amount="100.00")
    b = {**a, "order_id": a["order_id"] + "B", "customer": {**a["customer"], "ip": "10.9.9.9"}}
    (ka,) = await accept(rr, a)
    p = rr.partition_of(ka)
    with contextlib.suppress(ResponseError):  # (BUSYGROUP: a worker made it already)
        await rr.client.xgroup_create(p.intake, keys.GROUP_VALIDATE, id="0")
    ((_stream, [(_id, f)]),) = await rr.client.xreadgroup(keys.GROUP_VALIDATE, "dead-validator", {p.intake: ">"})
    (first,) = await checks.decide(rr, [unpack_order(f[b"d"])], [int(f[b"ta"])])
    assert first.outcome == "v" and (await stock_of(rr, "TWIN"))["reserved"] == 1
    (kb,) = await accept(rr, b)
    await drain(rr)  # the look-alike (the first entry is not idle long enough to be reclaimed)
    assert (await status(rr, kb))["reasons"] == [f"duplicate_suspect:{ka}"]
    await asyncio.sleep(1.5)  # past the lease and the bucket's TTL
    await drain(rr)
    st = await status(rr, ka)
    assert st["status"] == "executed" and st["reasons"] == [], st
    assert (await stock_of(rr, "TWIN"))["reserved"] == 2  # one unit each, none twice
    # both handed off: nothing kept open (each drained validator stopped before the next call that
    # would have closed its last batch's: a sweep does, as a validator's first call does)
    await checks.open_decisions().sweep(rr, force=True)
    assert await rr.client.hlen(keys.DECIDED_OPEN_KEY) == 0


async def test_recount_settles_in_chunks(rr, monkeypatch):
    """A recount settles executed holders chunk by chunk, and sets physical stock last."""
    monkeypatch.setattr(stock, "CHUNK", 2)
    await stock.set_stock(rr, [("BULK", 100), ("OTHER", 10)])
    await run(rr, *(order(lines=[line("BULK"), line("OTHER")]) for _ in range(7)))
    (waiting,) = await run(rr, order(lines=[line("BULK", 1, "100.00", "40.00")], paid_amount="40.00"))
    assert waiting["status"] == "review"
    assert (await stock_of(rr, "BULK"))["reserved"] == 8
    views = await stock.set_stock(rr, [("BULK", 90), ("OTHER", 3)])
    assert views == [
        {"sku": "BULK", "physical": 90, "reserved": 1, "sellable": 84},
        {"sku": "OTHER", "physical": 3, "reserved": 0, "sellable": 2},
    ]
    assert await rr.client.hkeys(keys.holders_key("BULK")) == [waiting["order_key"].encode()]


# --- coupons ---------------------------------------------------------------------------
def cpn(code: str, platform: str = "tmall", amount: str = "10.00") -> dict[str, str]:
    return {"code": code, "platform": platform, "amount": amount}


async def test_coupon_cross_platform(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    await coupons.put_coupons(rr, [coupons.CouponRecord(code="JD-5", platform="jd", amount="5.00")])
    on_payload, on_record, fine = await run(
        rr,
        order(coupons=[cpn("TM-1", platform="jd")]),  # the order itself names another platform
        order(coupons=[cpn("JD-5", platform="tmall")]),  # orderq's record says jd
        order(coupons=[cpn("TM-UNKNOWN")]),  # a tmall coupon orderq does not know: the platform's
    )
    assert on_payload["status"] == "rejected" and on_payload["reasons"] == ["coupon_cross_platform"]
    assert on_record["status"] == "rejected" and on_record["reasons"] == ["coupon_cross_platform"]
    assert fine["status"] == "executed" and fine["reasons"] == []
    assert (await stock_of(rr, "SOFA-OAK-3"))["reserved"] == 1


async def test_coupon_expired(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    await coupons.put_coupons(
        rr,
        [
            coupons.CouponRecord(code="OLD", platform="tmall", amount="5.00", expires_at=_dt("2020-01-01T00:00:00Z")),
            coupons.CouponRecord(code="NEW", platform="tmall", amount="5.00", expires_at=_dt("2099-01-01T00:00:00Z")),
        ],
    )
    old, new = await run(rr, order(coupons=[cpn("OLD", amount="5.00")]), order(coupons=[cpn("NEW", amount="5.00")]))
    assert old["status"] == "rejected" and old["reasons"] == ["coupon_expired"]
    assert new["status"] == "executed"


def _dt(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s)


async def test_single_use_coupon_not_burnt_by_a_rejected_order(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100), ("RARE", 1)])  # RARE: sellable 0
    await coupons.put_coupons(
        rr, [coupons.CouponRecord(code="ONCE", platform="tmall", amount="10.00", single_use=True)]
    )
    (short,) = await run(rr, order(lines=[line("RARE")], coupons=[cpn("ONCE")]))
    assert short["reasons"] == ["out_of_stock:RARE"]
    docs = await run(rr, order(coupons=[cpn("ONCE")]), order(coupons=[cpn("ONCE")]))
    assert sorted(d["status"] for d in docs) == ["executed", "rejected"]
    assert [d["reasons"] for d in docs if d["status"] == "rejected"] == [["coupon_used"]]


async def test_single_use_coupon_raced_by_two_validate_processes(rr, stages):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    await coupons.put_coupons(
        rr, [coupons.CouponRecord(code="RACE", platform="tmall", amount="10.00", single_use=True)]
    )
    env = {**RULES_ON, "ORDERQ_WORKER_BATCH": 1}
    procs = await _started([stages("validate", **env) for _ in range(2)])
    for _round in range(3):  # a few races, each a fresh coupon use
        await rr.client.hdel("oq:{ledger}:cpn:RACE", "u")
        ks = await accept(rr, *(order(coupons=[cpn("RACE")]) for _ in range(2)))
        docs = await _settled(rr, ks)
        assert sorted(d["status"] for d in docs) == ["rejected", "validated"], docs
        loser = next(d for d in docs if d["status"] == "rejected")
        assert loser["reasons"] == ["coupon_used"]
    for p in procs:
        assert p.stop() == 0


async def test_subsidy_cap_per_customer_day(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    cust = {"id": "u-cap", "tier": "regular", "phone": "13800000001"}
    big = order(customer={**cust, "ip": "1.1.1.1"}, lines=[line("SOFA-OAK-3", 1, "1000.00", "700.00")])
    big["coupons"] = [cpn("C-300", amount="300.00")]  # 300 of 1000: exactly the 30 % cap
    more = order(customer={**cust, "ip": "1.1.1.2"}, lines=[line("SOFA-OAK-3", 1, "100.00", "50.00")])
    more["coupons"] = [cpn("C-50", amount="50.00")]  # the day: 350 of 1100 > 30 %
    small = order(customer={**cust, "ip": "1.1.1.3"}, lines=[line("SOFA-OAK-3", 1, "100.00", "90.00")])
    small["coupons"] = [cpn("C-10", amount="10.00")]  # the day: 310 of 1100 <= 30 %
    (a,) = await run(rr, big)  # one at a time: the day's totals depend on the order
    (b,) = await run(rr, more)
    (c,) = await run(rr, small)
    assert a["status"] == "executed"
    assert b["status"] == "rejected" and b["reasons"] == ["subsidy_cap"]
    assert c["status"] == "executed"
    other = order(customer={"id": "u-other", "phone": "13800000002"}, lines=[line("SOFA-OAK-3", 1, "100.00", "50.00")])
    other["coupons"] = [cpn("C-50b", amount="50.00")]  # 50 % for a customer alone
    (d,) = await run(rr, other)
    assert d["reasons"] == ["subsidy_cap"]


# --- risk ------------------------------------------------------------------------------
async def test_virtual_phone_adds_to_the_score(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    o = order()
    o["ship_to"]["phone"] = "+86 170-1234-5678"
    (s,) = await run(rr, o)
    assert s["status"] == "executed" and s["reasons"] == ["risk_virtual_phone"] and s["risk_score"] == 40


async def test_sixth_order_from_one_ip_in_the_hour_is_a_burst(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])

    def from_ip() -> dict[str, Any]:
        o = order()
        o["customer"]["ip"] = "36.112.4.7"
        return o

    docs = []
    for _ in range(3):  # three batches of one: the window carries over between batches
        docs += await run(rr, from_ip())
    ks = []
    for _ in range(4):  # then one at a time into the intake, validated as one batch
        ks += await accept(rr, from_ip())
    await drain(rr)
    docs += [await status(rr, k) for k in ks]
    assert [d["reasons"] for d in docs[:5]] == [[]] * 5
    assert [d["reasons"] for d in docs[5:]] == [["risk_ip_burst"]] * 2
    assert docs[5]["risk_score"] == 50 and docs[5]["status"] == "executed"  # alone, under 80
    # orders accepted in the same instant (one batch request) count one each
    same = await run(rr, *(order(customer={"id": "u-same", "ip": "36.1.1.1"}) for _ in range(6)))
    assert sum(d["reasons"] == ["risk_ip_burst"] for d in same) == 1


async def test_windows_follow_the_accept_time(rr):
    """The IP hour and the duplicate window slide with the orders' accept times, across
    batches and across the hourly buckets they are kept in."""
    await stock.set_stock(rr, [("SOFA-OAK-3", 1000)])
    minute = 60_000_000  # µs
    t = (time.time_ns() // 1000 // (60 * minute) + 1) * 60 * minute  # the next full hour

    async def one(o: dict[str, Any], at: int) -> checks.Decision:
        (d,) = await checks.decide(rr, [order_decoder.decode(msgspec.json.encode(o))], [at])
        return d

    def from_ip() -> dict[str, Any]:
        o = order()
        o["customer"]["ip"] = "9.9.9.9"
        return o

    offsets = [-40, -20, -1, 5, 9, 15, 71]  # minutes around the hour; one order per batch
    got = [(await one(from_ip(), t + m * minute)).reasons for m in offsets]
    # the 6th falls within an hour of the 1st; at +71 only +15 (and itself) are within one
    assert got == [[], [], [], [], [], ["risk_ip_burst"], []]

    same = make_order("FP1")
    assert (await one(same, t)).reasons == []
    assert (await one(make_order("FP2", channel="pdd"), t + 179 * 10**6)).reasons == ["duplicate_suspect:tmall:TFP1"]
    later = await one(make_order("FP3", channel="jd"), t + 400 * 10**6)  # FP2 was 221 s before
    assert later.reasons == [] and later.outcome == "v"


async def test_pickup_point_without_door_number(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    bare, with_room, plain = order(), order(), order()
    bare["ship_to"]["address"] = "星湖街 328 号 菜鸟驿站"
    with_room["ship_to"]["address"] = "星湖街 328 号 菜鸟驿站 旁 5 幢 1201 室"
    a, b, c = await run(rr, bare, with_room, plain)
    assert a["reasons"] == ["risk_pickup_point_address"] and a["risk_score"] == 30
    assert b["reasons"] == [] and c["reasons"] == []


async def test_half_price_goes_to_review_and_keeps_its_stock(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    (s,) = await run(rr, order(lines=[line("SOFA-OAK-3", 1, "2999.00", "1499.00")], paid_amount="1499.00"))
    assert s["status"] == "review" and s["reasons"] == ["risk_price_anomaly"] and s["risk_score"] == 80
    assert (await stock_of(rr, "SOFA-OAK-3"))["reserved"] == 1


async def test_signals_add_up_to_review(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    o = order()
    o["ship_to"]["phone"] = "16512345678"
    o["ship_to"]["address"] = "幸福小区 自提点"
    (s,) = await run(rr, o)
    assert s["status"] == "executed" and s["risk_score"] == 70  # 40 + 30: under the bar
    ks = []
    for _ in range(6):
        o = order()
        o["ship_to"]["phone"] = "16712345678"  # virtual, and the 6th from one IP: 40 + 50
        o["customer"]["ip"] = "36.112.9.9"
        ks += await accept(rr, o)
    await drain(rr)
    last = await status(rr, ks[-1])
    assert last["status"] == "review" and last["risk_score"] == 90
    assert last["reasons"] == ["risk_virtual_phone", "risk_ip_burst"]


async def test_duplicate_suspect_across_channels(rr):
    await stock.set_stock(rr, [("SOFA-OAK-3", 100)])
    first = make_order("DUP1")
    second = make_order("DUP2", channel="jd")
    second["ship_to"] = {**second["ship_to"], "address": "星湖街328号5幢1201"}  # spacing differs
    second["customer"] = {**second["customer"], "ip": "8.8.8.8"}
    third = make_order("DUP3", channel="douyin")
    third["paid_amount"] = "2898.00"  # another amount: not the same order
    (a,) = await run(rr, first)
    b, c = await run(rr, second, third)
    assert a["status"] == "executed" and a["reasons"] == []
    assert b["status"] == "review" and b["reasons"] == ["duplicate_suspect:tmall:TDUP1"]
    assert c["status"] == "executed"


# --- the race ---------------------------------------------------------------------------
async def race_outcome(c: httpx.AsyncClient, docs: list[dict[str, Any]]) -> None:
    """30 orders for one unit each of HOT, 20 physical: exactly floor(20 x 0.95) = 19 got a unit
    (and executed), the other 11 were rejected out of stock, and the stock says so."""
    assert sum(d["status"] == "executed" for d in docs) == 19
    rejected = [d for d in docs if d["status"] == "rejected"]
    assert len(rejected) == 11 and all(d["reasons"] == ["out_of_stock:HOT"] for d in rejected)
    view = (await c.get("/v1/admin/stock/HOT", headers=ADMIN)).json()
    assert view == {"sku": "HOT", "physical": 20, "reserved": 19, "sellable": 0}


async def test_thirty_orders_race_for_twenty_units(ingress, stages, settings_for):
    """Two real validate processes, small batches, orders arriving in several requests:
    exactly floor(20 x 0.95) = 19 orders get a unit, the other 11 are out of stock."""
    env = {**RULES_ON, "ORDERQ_WORKER_BATCH": 3}
    base = await ingress(**env)
    procs = await _started([stages("validate", **env) for _ in range(2)])
    r = await oq_client.connect(settings_for(**env))
    try:
        async with httpx.AsyncClient(base_url=base) as c:
            resp = await c.put("/v1/admin/stock", json={"items": [{"sku": "HOT", "physical": 20}]}, headers=ADMIN)
            assert resp.status_code == 200, resp.text
            assert resp.json()["items"] == [{"sku": "HOT", "physical": 20, "reserved": 0, "sellable": 19}]
            orders = [order(lines=[line("HOT", 1)]) for _ in range(30)]

            async def post(chunk: list[dict[str, Any]]) -> None:
                resp = await c.post("/v1/orders/batch", json={"orders": chunk}, headers=auth())
                assert resp.json()["accepted"] == len(chunk), resp.text

            await asyncio.gather(*(post(orders[i : i + 3]) for i in range(0, 30, 3)))
            ks = [f"tmall:{o['order_id']}" for o in orders]
            docs = await _settled(r, ks)
            await drain(r)  # execute what was validated
            docs = [await status(r, k) for k in ks]
            await race_outcome(c, docs)
        for p in procs:
            assert p.stop() == 0
    finally:
        await r.close()


async def test_out_of_stock_streak_for_the_alert(rr):
    """The validate stage keeps each SKU's run of out-of-stock refusals; a reservation ends it."""
    await stock.set_stock(rr, [("GONE", 0), ("SOFA-OAK-3", 100)])
    for _ in range(2):  # two batches: refusals add up across them
        await run(rr, *(order(lines=[line("GONE"), line("SOFA-OAK-3")]) for _ in range(3)))
    assert await rr.client.hget(keys.OOS_STREAK_KEY, "GONE") == b"6"
    assert await rr.client.hget(keys.OOS_STREAK_KEY, "SOFA-OAK-3") is None
    await stock.set_stock(rr, [("GONE", 5)])
    (s,) = await run(rr, order(lines=[line("GONE")]))
    assert s["status"] == "executed"
    assert await rr.client.hget(keys.OOS_STREAK_KEY, "GONE") is None
