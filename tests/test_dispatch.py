"""The dispatch stage against real local HTTP servers standing in for the WMS, SMS gateway,
invoicing and CRM: every action arrives once (by its idempotency key); a target that is
down delays only its own actions, its circuit opens and half-opens, then everything
arrives once; a poison target's actions end in the dead-letter stream."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn

from dispatch.circuit import CLOSED, HALF_OPEN, OPEN, Circuit
from dispatch.worker import Dispatcher
from orderq import client as oq_client
from orderq import keys, stats, warehouses
from orderq.client import Redis
from orderq.ledger import stock
from orderq.schema import normalise, order_decoder, pack
from orderq.server import free_port
from orderq.settings import Settings
from orderq.supervisor import Supervisor
from orderq.warehouses import Warehouse
from tests.conftest import auth, drain, make_order
from tests.test_validate_rules import accept

PATHS = {
    "wms.pick": "/wms/pick",
    "notify.sms": "/sms/send",
    "invoice.request": "/invoice",
    "crm.remark_sync": "/crm/remark",
    "crm.gift_sync": "/crm/gift",
}
VARIABLE = {a: "ORDERQ_WEBHOOK_" + a.upper().replace(".", "_") for a in PATHS}


class Sink:
    """A downstream system on a free loopback port (uvicorn, in this event loop): records every
    request and answers per ``mode`` — ``ok`` 200, ``fail`` 500, or a status per order key."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "ok"
        self.status_of: dict[str, int] = {}  # order key -> status to answer for it
        self.requests: list[dict[str, Any]] = []  # {path, key, status, body}
        self.server: uvicorn.Server | None = None
        self.task: asyncio.Task[None] | None = None

    async def app(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        doc = json.loads(body)
        status = self.status_of.get(doc["order_key"], 200 if self.mode == "ok" else 500)
        self.requests.append(
            {"path": scope["path"], "key": headers.get("idempotency-key"), "status": status, "body": doc}
        )
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": b'{"ok": true}' if status == 200 else b'{"error": "boom"}'})

    async def start(self) -> Sink:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            lifespan="off",
            log_level="error",
            access_log=False,
            ws="none",
            interface="asgi3",
        )
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        """Down: the port refuses connections until ``start()`` again."""
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            await self.task
            self.server = self.task = None

    def delivered(self, path: str | None = None) -> Counter[str]:
        """Idempotency key -> times it was answered 2xx."""
        return Counter(q["key"] for q in self.requests if q["status"] == 200 and path in (None, q["path"]))

    def answered(self, status: int) -> Counter[str]:
        return Counter(q["key"] for q in self.requests if q["status"] == status)


@pytest.fixture
async def sinks() -> AsyncIterator[Callable[[], Any]]:
    made: list[Sink] = []

    async def make() -> Sink:
        s = await Sink().start()
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()


async def until(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = cond()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def executed_orders(ingress: Any, r: Redis, n: int) -> dict[str, set[str]]:
    """Post ``n`` orders through a real ingress and run them through validate+execute;
    returns order key -> the actions it owes downstream."""
    base = await ingress()
    orders = [
        make_order(
            f"D{i}",
            remark="请周末送" if i % 2 else None,
            gifts=[{"sku": "GIFT-1", "qty": 1}] if i % 3 == 0 else [],
            paid_amount="2899.00" if i % 4 else "99.00",
        )
        for i in range(n)
    ]
    for o in orders:
        if o["remark"] is None:
            del o["remark"]
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=10) as c:
        resp = await c.post("/v1/orders/batch", json={"orders": orders})
        assert resp.json()["accepted"] == n
    await drain(r)
    owed: dict[str, set[str]] = {}
    for i in range(n):
        acts = {"wms.pick", "notify.sms"}
        if i % 4:
            acts.add("invoice.request")
        if i % 2:
            acts.add("crm.remark_sync")
        if i % 3 == 0:
            acts.add("crm.gift_sync")
        owed[f"tmall:TD{i}"] = acts
    return owed


async def outbox_len(r: Redis, action: str) -> int:
    return sum([await r.client.xlen(p.outbox(action)) for p in r.partitions])


async def dead_letters(r: Redis) -> list[dict[bytes, bytes]]:
    out = []
    for p in r.partitions:
        out += [f for _id, f in await r.client.xrange(keys.dispatch_dead(p))]
    return out


# --- a real `orderq dispatch` process -------------------------------------------------------------
async def test_every_action_is_delivered_once_by_its_idempotency_key(ingress, stages, r, sinks):
    owed = await executed_orders(ingress, r, 24)
    sink = await sinks()
    env = {VARIABLE[a]: sink.url + path for a, path in PATHS.items()}
    proc = stages("dispatch", **env)
    expected = {f"{k}:{a}" for k, acts in owed.items() for a in acts}

    await until(lambda: set(sink.delivered()) >= expected, "every action delivered", timeout=60)
    await asyncio.sleep(0.3)  # a late duplicate would show now
    assert sink.delivered() == Counter(dict.fromkeys(expected, 1))  # each once, nothing else
    for q in sink.requests:
        order_key, action = q["key"].rsplit(":", 1)
        assert q["path"] == PATHS[action]
        assert (q["body"]["order_key"], q["body"]["action"]) == (order_key, action)
        assert q["body"]["order"]["order_id"] == order_key.split(":", 1)[1]
        assert q["body"]["order"]["created_at"] == "2026-11-10T16:00:01.000000Z"
        rec = await r.client.hget(r.partition_of(order_key).status(order_key), "f")
        assert q["body"]["fulfilment_id"] == rec.decode()
    # delivered entries are acknowledged and deleted: the outbox holds only what is undelivered
    await until(lambda: _all_empty(r), "outbox emptied")
    assert proc.stop() == 0
    assert "Traceback" not in proc.log()


async def _all_empty(r: Redis) -> bool:
    return all([await outbox_len(r, a) == 0 for a in PATHS])


# --- a target down for a while ---------------------------------------------------------------------
def dispatcher_settings(settings_for: Callable[..., Settings], **env: Any) -> Settings:
    base = {
        "ORDERQ_DISPATCH_FAILURES": 3,
        "ORDERQ_DISPATCH_OPEN_S": 0.1,
        "ORDERQ_DISPATCH_BACKOFF_S": 0.02,
        "ORDERQ_DISPATCH_TIMEOUT_S": 2,
        "ORDERQ_DISPATCH_PROBE_TIMEOUT_S": 1,
    }
    return settings_for(**{**base, **env})


@contextlib.asynccontextmanager
async def running(d: Dispatcher) -> AsyncIterator[asyncio.Task[int]]:
    task = asyncio.create_task(d.run())
    try:
        yield task
    finally:
        d.stop()
        await task
        await d.close()


async def test_a_target_down_delays_only_its_actions_then_all_arrive_once(ingress, r, sinks, settings_for):
    owed = await executed_orders(ingress, r, 12)
    wms, sms = await sinks(), await sinks()
    await wms.stop()  # the WMS is down: connections are refused
    settings = dispatcher_settings(
        settings_for,
        ORDERQ_WEBHOOK_WMS_PICK=wms.url + "/pick",
        ORDERQ_WEBHOOK_NOTIFY_SMS=sms.url + "/sms",
        ORDERQ_MAX_DELIVERIES=100,  # this test is about waiting, not giving up
    )
    conn = await oq_client.connect(settings)
    d = Dispatcher(conn, consumer="test-dispatch")
    circuit = d.targets["wms.pick"].circuit
    picks = {f"{k}:wms.pick" for k in owed}
    try:
        async with running(d):
            # the SMS gateway is unaffected by the WMS being down
            await until(lambda: set(sms.delivered()) == {f"{k}:notify.sms" for k in owed}, "every SMS delivered")
            await until(lambda: OPEN in circuit.states(), "the WMS circuit opened")
            assert await outbox_len(r, "wms.pick") == len(owed)  # waiting in Redis, none lost
            await until(lambda: circuit.states().count(OPEN) >= 2, "a failed probe re-opened it")
            # the WMS comes back, answering 500 for a while
            wms.mode = "fail"
            await wms.start()
            await until(lambda: len(wms.answered(500)) >= 2, "the WMS answering 500")
            wms.mode = "ok"
            await until(lambda: set(wms.delivered()) == picks, "every pick delivered", timeout=60)
            await until(lambda: _empty(r, "wms.pick"), "the pick outbox emptied")
        states = circuit.states()
        assert states[0] == CLOSED and states[-1] == CLOSED
        # open -> half-open (a probe) ... -> closed again
        i = states.index(OPEN)
        assert HALF_OPEN in states[i:] and states[states.index(HALF_OPEN, i) :][-1] == CLOSED
        assert wms.delivered() == Counter(dict.fromkeys(picks, 1))  # each pick applied once
        assert sms.delivered() == Counter({f"{k}:notify.sms": 1 for k in owed})
        assert await dead_letters(r) == []
        assert await outbox_len(r, "notify.sms") == 0
    finally:
        await conn.close()


async def _empty(r: Redis, action: str) -> bool:
    return await outbox_len(r, action) == 0


# --- a poison target ----------------------------------------------------------------------------------
async def test_a_poison_target_ends_in_the_dead_letter_stream(ingress, r, sinks, settings_for):
    owed = await executed_orders(ingress, r, 4)
    wms = await sinks()
    wms.mode = "fail"  # 500 for everything
    refused = "tmall:TD3"
    wms.status_of[refused] = 422  # this one the WMS refuses for good
    settings = dispatcher_settings(settings_for, ORDERQ_WEBHOOK_WMS_PICK=wms.url + "/pick", ORDERQ_MAX_DELIVERIES=3)
    conn = await oq_client.connect(settings)
    d = Dispatcher(conn, consumer="test-dispatch")
    try:
        await asyncio.wait_for(d.run(drain=True), 60)  # ends when nothing is left to deliver
        await d.close()
        tries = Counter(q["key"] for q in wms.requests)
        for k in owed:
            assert tries[f"{k}:wms.pick"] == (1 if k == refused else 3), tries  # ORDERQ_MAX_DELIVERIES
        dead = await dead_letters(r)
        assert sorted(f[b"k"].decode() for f in dead) == sorted(owed)
        for f in dead:
            assert f[b"action"] == b"wms.pick"
            assert f[b"error"].startswith(b"HTTP 422" if f[b"k"].decode() == refused else b"HTTP 500")
            assert int(f[b"deliveries"]) == (1 if f[b"k"].decode() == refused else 3)
        assert await outbox_len(r, "wms.pick") == 0
        assert (await stats.totals(r))["dead_letters"] == len(owed)
        for k in owed:  # the status record shows the action failed
            state = await conn.client.hget(r.partition_of(k).status(k), "x:wms.pick")
            assert state == b"failed"
    finally:
        await conn.close()


# --- the breaker alone, the configuration, the supervisor --------------------------------------------
def test_circuit_opens_half_opens_with_one_probe_and_backs_off():
    now = [0.0]
    c = Circuit("t", failures=3, open_s=1.0, clock=lambda: now[0])
    assert c.allowed(8) == 8
    for _ in range(2):
        c.failure()
    assert c.state == CLOSED
    c.success()  # a success resets the count
    for _ in range(3):
        c.failure()
    assert c.state == OPEN and c.allowed(8) == 0 and c.wait_s() == 1.0
    now[0] = 1.0
    assert c.allowed(8) == 1 and c.state == HALF_OPEN  # exactly one probe
    assert c.allowed(8) == 0
    c.failure()  # the probe failed: open again, twice as long
    assert c.state == OPEN and c.wait_s() == 2.0
    for _ in range(10):
        now[0] += c.wait_s()
        assert c.allowed(1) == 1
        c.failure()
    assert c.wait_s() == 12.0  # capped
    now[0] += 12.0
    assert c.allowed(1) == 1
    c.success()
    assert c.state == CLOSED and c.allowed(5) == 5
    c.failure(), c.failure(), c.failure()
    assert c.wait_s() == 1.0  # a closed circuit starts over from the first open time
    assert c.states()[:4] == [CLOSED, OPEN, HALF_OPEN, OPEN]


def test_webhook_settings_and_the_supervisor_plan(make_env):
    env = make_env(ORDERQ_WEBHOOK_WMS_PICK="http://127.0.0.1:9/pick")
    s = Settings.from_mapping(env)
    assert dict(s.webhooks) == {"wms.pick": "http://127.0.0.1:9/pick"}
    assert [c.stage for c in Supervisor(s).plan()][-1] == "dispatch"
    assert "dispatch" not in [c.stage for c in Supervisor(Settings.from_mapping(make_env())).plan()]


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ORDERQ_WEBHOOK_WMS_PICK": "wms.local/pick"}, "ORDERQ_WEBHOOK_WMS_PICK"),
        ({"ORDERQ_WEBHOOK_NOTIFY_SMS": "http://"}, "ORDERQ_WEBHOOK_NOTIFY_SMS"),
        ({"ORDERQ_WEBHOOK_WMS_PICKUP": "http://wms/pick"}, "ORDERQ_WEBHOOK_WMS_PICKUP"),
        ({}, "ORDERQ_WEBHOOK_<ACTION>"),  # `orderq dispatch` with nothing to deliver to
    ],
)
def test_a_bad_webhook_setting_exits_2_naming_the_variable(make_env, env, variable):
    from tests.test_channels import _run

    proc = _run(["dispatch"], make_env(**env))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    [line] = proc.stderr.strip().splitlines()
    assert variable in line


# --- routed picks (issue 9) ------------------------------------------------------------------------
async def test_each_pick_of_a_split_order_is_delivered_once_with_its_warehouse(r, sinks, settings_for):
    await warehouses.put(
        r,
        [
            Warehouse(id="SH", province="上海市", lat=31.23, lng=121.47, carriers=["sf"]),
            Warehouse(id="GZ-1", province="广东省", lat=23.13, lng=113.26, carriers=["zto"]),
        ],
    )
    await stock.set_stock(r, [("LAMP", 5, "SH"), ("DESK", 5, "GZ-1")])
    o = make_order(
        "SPLIT1",
        lines=[
            {"sku": "LAMP", "qty": 1, "unit_price": "900.00"},
            {"sku": "DESK", "qty": 2, "unit_price": "1900.00"},
        ],
        paid_amount="4700.00",
    )
    p = r.partition_of("tmall:TSPLIT1")
    await accept(r, o)
    await drain(r)
    wms = await sinks()
    conn = await oq_client.connect(dispatcher_settings(settings_for, ORDERQ_WEBHOOK_WMS_PICK=wms.url + "/pick"))
    d = Dispatcher(conn, consumer="test-dispatch")
    try:
        async with running(d):
            await until(lambda: len(wms.delivered()) == 2, "both picks delivered")
            await until(lambda: _empty(r, "wms.pick"), "the pick outbox emptied")
    finally:
        await conn.close()
    # (a warehouse id with "-": a magic character in Lua patterns, where the parcel is found)
    assert wms.delivered() == Counter({"tmall:TSPLIT1:wms.pick@SH": 1, "tmall:TSPLIT1:wms.pick@GZ-1": 1})
    fid = (await r.client.hget(p.status("tmall:TSPLIT1"), "f")).decode()
    bodies = {q["body"]["warehouse"]: q["body"] for q in wms.requests}
    assert bodies["SH"]["parcel"]["lines"] == [{"sku": "LAMP", "qty": 1}]
    assert bodies["GZ-1"]["parcel"]["lines"] == [{"sku": "DESK", "qty": 2}]
    assert bodies["GZ-1"]["parcel"]["carrier"] == "zto"
    assert {b["fulfilment_id"] for b in bodies.values()} == {f"{fid}-SH", f"{fid}-GZ-1"}


# --- restarts, crash loops and corrupt entries (issue 13) --------------------------------------------
async def test_restarts_alone_never_dead_letter_a_pending_delivery(r, sinks, settings_for):
    """Each restart claims what the last dispatcher held (Redis counts a delivery), but a claim is
    no failed attempt: after more restarts than ORDERQ_MAX_DELIVERIES, nothing is dead-lettered
    and each action arrives once when the target is back."""
    ks = await accept(r, *[make_order(f"RS{i}") for i in range(6)])
    await drain(r)
    wms = await sinks()
    await wms.stop()  # down: connections refused, which is no failed delivery
    settings = dispatcher_settings(
        settings_for, ORDERQ_WEBHOOK_WMS_PICK=wms.url + "/pick", ORDERQ_MAX_DELIVERIES=2, ORDERQ_CLAIM_IDLE_MS=200
    )
    conn = await oq_client.connect(settings)
    try:
        for i in range(5):  # five processes in turn, each stopped while it holds every pick
            d = Dispatcher(conn, consumer=f"restart-{i}")
            async with running(d):
                await until(lambda d=d: len(d.targets["wms.pick"].held) == len(ks), f"dispatcher {i} holding the picks")
            await asyncio.sleep(0.3)  # past the lease: the next one claims them
        counts = [
            row["times_delivered"]
            for p in r.partitions
            for row in await r.client.xpending_range(p.outbox("wms.pick"), keys.GROUP_DISPATCH, "-", "+", 100)
        ]
        assert len(counts) == len(ks) and min(counts) > 2  # Redis counted every claim ...
        assert await dead_letters(r) == []  # ... and none was taken for a failed delivery
        await wms.start()
        d = Dispatcher(conn, consumer="restart-last")
        async with running(d):
            await until(lambda: len(wms.delivered()) == len(ks), "every pick delivered")
            await until(lambda: _empty(r, "wms.pick"), "the pick outbox emptied")
        assert wms.delivered() == Counter({f"{k}:wms.pick": 1 for k in ks})
        assert await dead_letters(r) == []
        for k in ks:
            assert await r.client.hget(r.partition_of(k).status(k), "x:wms.pick") == b"done"
    finally:
        await conn.close()


async def test_an_entry_claimed_over_and_over_ends_as_a_failed_action(r, sinks, settings_for):
    """A crash loop must end: an entry claimed more than ORDERQ_MAX_DELIVERIES x 10 times (its
    dispatcher dies on it every time) is dead-lettered, and its action shows ``failed``."""
    (k,) = await accept(r, make_order("LOOP"))
    await drain(r)
    p = r.partition_of(k)
    stream = p.outbox("wms.pick")
    await r.client.xgroup_create(stream, keys.GROUP_DISPATCH, id="0")
    ((_, [(entry_id, _)]),) = await r.client.xreadgroup(keys.GROUP_DISPATCH, "crashed", {stream: ">"})
    await r.client.xclaim(stream, keys.GROUP_DISPATCH, "crashed", 0, [entry_id], retrycount=20, justid=True)
    wms = await sinks()
    settings = dispatcher_settings(
        settings_for, ORDERQ_WEBHOOK_WMS_PICK=wms.url + "/pick", ORDERQ_MAX_DELIVERIES=2, ORDERQ_CLAIM_IDLE_MS=100
    )
    conn = await oq_client.connect(settings)
    try:
        await asyncio.sleep(0.2)
        d = Dispatcher(conn, consumer="after-the-loop")
        await asyncio.wait_for(d.run(drain=True), 30)
        await d.close()
    finally:
        await conn.close()
    assert wms.requests == []
    (dead,) = await dead_letters(r)
    assert dead[b"k"] == k.encode() and dead[b"action"] == b"wms.pick"
    assert dead[b"error"].startswith(b"delivered 21 times")
    assert await r.client.hget(p.status(k), "x:wms.pick") == b"failed"
    assert await outbox_len(r, "wms.pick") == 0


async def test_corrupt_outbox_entries_end_alone_and_the_rest_arrive_once(r, sinks, settings_for):
    ks = await accept(r, *[make_order(f"CO{i}") for i in range(4)])
    await drain(r)
    stream = r.partitions[0].outbox("wms.pick")
    # a key that is not even UTF-8 and a payload that is not msgpack ...
    await r.client.xadd(stream, {"k": b"\xff\xfe", "f": b"x", "d": b"\xc1 not msgpack"})
    # ... and a valid order whose key cannot be sent in a header (not ASCII)
    raw = msgspec.json.encode(make_order("BAD"))
    await r.client.xadd(stream, {"k": "tmall:坏单", "f": "x", "d": pack(normalise(order_decoder.decode(raw), raw))})
    wms = await sinks()
    conn = await oq_client.connect(dispatcher_settings(settings_for, ORDERQ_WEBHOOK_WMS_PICK=wms.url + "/pick"))
    d = Dispatcher(conn, consumer="test-dispatch")
    try:
        await asyncio.wait_for(d.run(drain=True), 30)  # ends: nothing left, nothing stuck
        await d.close()
    finally:
        await conn.close()
    assert wms.delivered() == Counter({f"{k}:wms.pick": 1 for k in ks})
    dead = {f[b"k"].decode(): f for f in await dead_letters(r)}
    assert set(dead) == {"\ufffd\ufffd", "tmall:坏单"}  # (a key that is no text: as text, replaced)
    assert b"undecodable" in dead["\ufffd\ufffd"][b"error"]
    assert b"UnicodeEncodeError" in dead["tmall:坏单"][b"error"]
    assert all(int(f[b"deliveries"]) == 1 for f in dead.values())
    assert await outbox_len(r, "wms.pick") == 0
