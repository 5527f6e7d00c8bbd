"""Overload of the ingress itself (contract §6): an ingress process that cannot acknowledge
within ``ORDERQ_ACK_TARGET_MS`` answers the excess at once with ``503 overloaded`` and
``Retry-After``, regular and new orders first, VIP last, and writes nothing of a refused order.
At normal load it refuses nothing.

The overload is real: Redis writes paused (``CLIENT PAUSE … WRITE``: a slow Redis, an idle
event loop), a flood of concurrent connections (out of CPU), and the controller's own event
loop blocked by a CPU hog (loop lag)."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ingress import admission
from loadtest import loadgen
from loadtest.factory import OrderFactory
from loadtest.recorder import Recorder, resend_report
from orderq import client as oq_client
from orderq import metrics, stats
from orderq.server import EmbeddedServer
from tests.conftest import CHANNEL_TOKENS, make_order, unique

TOKEN = CHANNEL_TOKENS["tmall"]


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, at: float, took: float) -> None:
        self.status, self.headers, self.body, self.at, self.took = status, headers, body, at, took

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def overloaded(self) -> bool:
        return self.status == 503 and self.json()["error"]["code"] == "overloaded"


class Conn:
    """A bare keep-alive HTTP/1.1 connection (httpx would cost the flood more CPU than the server)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, base: str) -> Conn:
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: bytes = b"", token: str | None = TOKEN) -> Answer:
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        t0 = time.perf_counter()
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
        data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        now = time.perf_counter()
        return Answer(int(lines[0].split()[1]), headers, data, now, now - t0)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def send_one(base: str, order: dict[str, Any]) -> Answer:
    conn = await Conn.open(base)
    try:
        return await conn.request("POST", "/v1/orders", json.dumps(order).encode())
    finally:
        await conn.close()


def order(tag: str, tier: str = "regular") -> dict[str, Any]:
    oid = unique(tag)
    return make_order(oid, customer={"id": f"u-{oid}", "tier": tier, "phone": "13812345678"})


async def written(r: oq_client.Redis, keys: list[str]) -> tuple[set[str], set[str]]:
    """(keys with a status record, keys with an intake stream entry)."""
    pipe = r.client.pipeline(transaction=False)
    for k in keys:
        pipe.exists(r.partition_of(k).status(k))
    for p in r.partitions:
        pipe.xrange(p.intake)
    res = await pipe.execute()
    with_record = {k for k, n in zip(keys, res[: len(keys)], strict=True) if n}
    queued = {fields[b"k"].decode() for entries in res[len(keys) :] for _, fields in entries}
    return with_record, queued & set(keys)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def scrape(base: str, until: Any = None, timeout: float = 10.0) -> str:
    """``/metrics`` once its figures satisfy ``until`` (counts are flushed once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = await Conn.open(base)
        try:
            text = (await conn.request("GET", "/metrics", token=None)).body.decode()
        finally:
            await conn.close()
        if until is None or until(text) or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.2)


@pytest.fixture
def pausable(flushed: EmbeddedServer) -> Iterator[redis.Redis]:
    """A plain client on the test server; whatever pause a test sets is lifted at the end."""
    c = redis.Redis.from_url(flushed.url)
    yield c
    c.execute_command("CLIENT", "UNPAUSE")
    c.close()


async def test_slow_redis_refuses_the_excess_at_once_vip_last_and_writes_nothing(
    ingress: Any, r: oq_client.Redis, pausable: redis.Redis
) -> None:
    # Writes wait as long as the pause lasts (no 503 unavailable meanwhile): what a client sees
    # is then only the admission control's doing.
    base = await ingress(ORDERQ_ACK_TARGET_MS=50, ORDERQ_ACK_DEADLINE_MS=60000)
    assert (await send_one(base, order("W"))).status == 202
    pausable.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
    paused_at = time.perf_counter()
    first = asyncio.ensure_future(send_one(base, order("A")))  # waits: Redis takes no write
    await asyncio.sleep(0.5)  # its age passes the target: the process stops taking more

    flood = [order("R") for _ in range(300)]
    flood_answers = await send_all(base, flood)

    # A batch now: its VIP orders are queued, its others shed for overload.
    batch = [order("BR"), order("BV", "vip"), order("BR"), order("BV", "vip")]
    conn = await Conn.open(base)
    batch_answer = asyncio.ensure_future(
        conn.request("POST", "/v1/orders/batch", json.dumps({"orders": batch}).encode())
    )
    await asyncio.sleep(0.3)

    # Regular and VIP orders together: every regular one is refused, VIP ones still taken.
    mixed = [order("MR") for _ in range(40)] + [order("MV", "vip") for _ in range(40)]
    random.shuffle(mixed)
    mixed_answers = await send_all(base, mixed)

    unpaused_at = time.perf_counter()
    pausable.execute_command("CLIENT", "UNPAUSE")
    futs = {**flood_answers, **mixed_answers}
    taken = dict(zip(futs, await asyncio.wait_for(asyncio.gather(*futs.values()), 60), strict=True))
    assert (await asyncio.wait_for(first, 30)).status == 202 and paused_at < unpaused_at

    # Every refusal came at once, while Redis took no write: 503 overloaded + Retry-After. The
    # orders taken were acknowledged once Redis wrote again.
    for a in taken.values():
        if a.status == 503:
            assert a.overloaded and int(a.headers["retry-after"]) >= 1, (a.status, a.body)
            assert a.at < unpaused_at
        else:
            assert a.status == 202 and a.at > unpaused_at, (a.status, a.body)

    refused_regular = [k for k in flood_answers if taken[k].status == 503]
    assert 0 < len(refused_regular) < len(flood), "the flood was not partly taken and partly refused"
    mixed_vip = {f"tmall:{o['order_id']}" for o in mixed if o["customer"]["tier"] == "vip"}
    assert all(taken[k].status == 202 for k in mixed_vip), "a VIP order refused while VIP room was left"
    assert all(taken[k].status == 503 for k in mixed_answers if k not in mixed_vip), "a regular order taken"

    ba = await asyncio.wait_for(batch_answer, 30)
    await conn.close()
    assert ba.status == 202 and int(ba.headers["retry-after"]) >= 1, (ba.status, ba.body)
    doc = ba.json()
    assert [x["status"] for x in doc["results"]] == ["shed", "accepted", "shed", "accepted"]
    assert doc["results"][0]["error"]["code"] == "overloaded" and doc["shed"] == 2 and doc["accepted"] == 2

    # Nothing of a refused order was written: no status record, no stream entry, no counter.
    refused_keys = [k for k, a in taken.items() if a.status == 503]
    refused_keys += [f"tmall:{o['order_id']}" for o in batch if o["customer"]["tier"] != "vip"]
    with_record, queued = await written(r, refused_keys)
    assert not with_record and not queued
    n_taken = 2 + sum(1 for a in taken.values() if a.status == 202) + 2  # warm-up, first, batch VIPs
    t = await stats.totals(r)
    assert (t["accepted"], t["shed"], t["invalid"], t["duplicates"]) == (n_taken, 0, 0, 0)
    n = len(refused_keys)
    text = await scrape(base, lambda s: f'orderq_overload_refused_total{{tier="regular"}} {n}.0' in s)
    assert metric(text, 'orderq_overload_refused_total{tier="regular"}') == n
    assert metric(text, 'orderq_overload_refused_total{tier="vip"}') == 0
    assert re.search(r"^orderq_ingress_inflight_limit\{process=.*\} \S+$", text, re.M)
    assert re.search(r"^orderq_ingress_capacity\{process=.*\} \d+\.0$", text, re.M)


async def overloaded(base: str, pausable: redis.Redis) -> list[asyncio.Future[Answer]]:
    """Fill the process's in-flight limit with orders Redis does not write (writes paused):
    from then on it refuses every regular order. Returns the orders left waiting."""
    assert (await send_one(base, order("W"))).status == 202
    pausable.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
    waiting = [asyncio.ensure_future(send_one(base, order("A")))]
    await asyncio.sleep(0.5)  # its age passes the target: the limit falls to its floor
    waiting += [asyncio.ensure_future(send_one(base, order("A"))) for _ in range(admission.MIN_LIMIT - 1)]
    await asyncio.sleep(0.5)
    return waiting


async def test_refused_orders_are_told_to_come_back_spread_over_time_not_in_a_crowd(
    ingress: Any, pausable: redis.Redis
) -> None:
    """Retry-After is a calendar: each refused order gets the next free comeback slot, booked at
    the pace the process takes orders (no order taken yet here: its floor, MIN_RATE a second),
    so the channels refused together come back spread out instead of all at once."""
    base = await ingress(ORDERQ_ACK_TARGET_MS=50, ORDERQ_ACK_DEADLINE_MS=60000)
    waiting = await overloaded(base, pausable)
    n = 3 * int(admission.MIN_RATE)
    answers = await send_all(base, [order("S") for _ in range(n)])
    pausable.execute_command("CLIENT", "UNPAUSE")
    done = await asyncio.wait_for(asyncio.gather(*answers.values(), *waiting), 60)
    after = sorted((a.at, int(a.headers["retry-after"])) for a in done[:n] if a.overloaded)
    assert len(after) > 2 * admission.MIN_RATE, len(after)
    told = collections.Counter(s for _, s in after)
    # one second's worth of comebacks per second (refusals take time too: twice that at most)
    assert max(told.values()) <= 2 * admission.MIN_RATE, told
    assert max(told) >= len(after) / admission.MIN_RATE - 1, told  # the later ones told to wait longer
    late = [s for _, s in after]
    inversions = sum(1 for x, y in itertools.pairwise(late) if y < x - 1)
    assert inversions == 0, late  # first refused, first back (answers read concurrently: off by one at most)


async def test_a_refusal_keeps_the_connection_and_honours_connection_close(ingress: Any, pausable: redis.Redis) -> None:
    """The overload refusal is written by the HTTP protocol itself (ingress/shed.py), below the
    framework: it is still a complete HTTP/1.1 answer — the contract's error body, its headers,
    the keep-alive connection serving the next request, ``Connection: close`` honoured."""
    base = await ingress(ORDERQ_ACK_TARGET_MS=50, ORDERQ_ACK_DEADLINE_MS=60000)
    waiting = await overloaded(base, pausable)
    conn = await Conn.open(base)
    try:
        for _ in range(3):
            a = await conn.request("POST", "/v1/orders", json.dumps(order("K")).encode())
            assert a.overloaded and a.json()["error"]["details"] == [], (a.status, a.body)
            assert a.headers["content-type"] == "application/json" and int(a.headers["retry-after"]) >= 1
            assert "date" in a.headers and a.headers.get("connection") != "close"
        assert (await conn.request("GET", "/healthz")).status == 200  # the same connection
        body = json.dumps(order("K")).encode()
        conn.writer.write(
            b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (TOKEN.encode(), len(body), body)
        )
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
        await conn.reader.readexactly(int(re.search(rb"content-length: (\d+)", head.lower()).group(1)))  # type: ignore[union-attr]
        assert await asyncio.wait_for(conn.reader.read(), 5) == b""  # closed by the server
    finally:
        pausable.execute_command("CLIENT", "UNPAUSE")
        await conn.close()
    assert all(a.status in (202, 503) for a in await asyncio.wait_for(asyncio.gather(*waiting), 60))


async def test_workers_yield_the_cpu_to_the_ingress(stages: Any) -> None:
    """Under CPU contention the ingress acknowledges first: the validate and execute processes
    run at ORDERQ_WORKER_NICE (10 by default), the ingress and the breaker at the default 0."""
    procs = {s: stages(s) for s in ("validate", "execute", "breaker")}
    await asyncio.sleep(2.0)  # each sets its niceness as it starts

    def nice(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[16])

    assert {s: nice(p.proc.pid) for s, p in procs.items()} == {"validate": 10, "execute": 10, "breaker": 0}


async def send_all(base: str, orders: list[dict[str, Any]]) -> dict[str, asyncio.Future[Answer]]:
    """Send every order at once, each on its own connection; return once the answers stopped
    coming (the refusals are in; the orders taken wait for Redis): a future per order key."""
    futs = {f"tmall:{o['order_id']}": asyncio.ensure_future(send_one(base, o)) for o in orders}
    done = -1
    while done != (done := sum(f.done() for f in futs.values())):  # until no answer for a second
        await asyncio.sleep(1.0)
    return futs


async def test_flood_of_connections_is_shed_regular_first_and_nothing_refused_is_written(
    ingress: Any, r: oq_client.Redis
) -> None:
    base = await ingress()
    conns = await asyncio.gather(*(Conn.open(base) for _ in range(800)))
    answers: list[tuple[dict[str, Any], Answer]] = []
    stop = time.monotonic() + 2.0

    async def pusher(conn: Conn) -> None:
        while time.monotonic() < stop:
            o = order("F", "vip" if random.random() < 0.05 else "regular")
            answers.append((o, await conn.request("POST", "/v1/orders", json.dumps(o).encode())))

    try:
        await asyncio.wait_for(asyncio.gather(*(pusher(c) for c in conns)), 60)
    finally:
        await asyncio.gather(*(c.close() for c in conns))

    refused = [(o, a) for o, a in answers if a.status == 503]
    assert refused, "800 connections at once did not overload the ingress"
    assert all(a.overloaded and int(a.headers["retry-after"]) >= 1 for _, a in refused)
    assert all(a.status in (202, 503) for _, a in answers)

    def taken_share(tier: str) -> float:
        mine = [a for o, a in answers if o["customer"]["tier"] == tier]
        return sum(1 for a in mine if a.status == 202) / len(mine)

    # Clients that resend the instant they are refused are the worst case: VIP orders then
    # arrive faster than even their own room drains, yet they are taken far more often.
    assert taken_share("vip") > 2 * taken_share("regular"), (taken_share("vip"), taken_share("regular"))
    # A refusal is answered without waiting for Redis, an acceptance with it.
    took = sorted(a.took for _, a in refused)
    took_taken = sorted(a.took for _, a in answers if a.status == 202)
    assert took[len(took) // 2] < took_taken[len(took_taken) // 2]

    keys = [f"tmall:{o['order_id']}" for o, _ in refused]
    with_record, queued = await written(r, keys)
    assert not with_record and not queued
    t = await stats.totals(r)
    assert t["accepted"] == sum(1 for _, a in answers if a.status == 202)


async def test_normal_load_refuses_nothing(ingress: Any, r: oq_client.Redis) -> None:
    base = await ingress()
    conns = await asyncio.gather(*(Conn.open(base) for _ in range(8)))
    statuses: list[int] = []

    async def pusher(conn: Conn, n: int) -> None:
        for i in range(n):
            o = order("N", "vip" if i % 10 == 0 else "regular")
            statuses.append((await conn.request("POST", "/v1/orders", json.dumps(o).encode())).status)
        await conn.close()

    await asyncio.gather(*(pusher(c, 50) for c in conns))
    assert statuses == [202] * 400
    text = await scrape(base, lambda s: "orderq_ingress_overload{" in s)
    assert metric(text, 'orderq_overload_refused_total{tier="regular"}') == 0
    assert metric(text, 'orderq_overload_refused_total{tier="vip"}') == 0
    assert re.search(r"^orderq_ingress_overload\{process=.*\} 0\.0$", text, re.M)


async def test_a_cpu_hog_in_the_event_loop_makes_the_controller_refuse_regular_orders_first() -> None:
    """The controller alone, on this test's own loop: a hog holding the loop 40 ms at a time
    is a loop lag above the setpoint; the limit falls to its floor, and with it full, regular
    orders are refused while VIP orders are still taken until twice that."""
    adm = admission.Admission(target_ms=50).start()
    try:
        regular, vip = json.dumps(order("H")).encode(), json.dumps(order("H", "vip")).encode()
        assert adm.admit(regular) is not None and adm.room() == admission.ANYONE
        hog_until = time.monotonic() + 0.5
        while time.monotonic() < hog_until:
            time.sleep(0.04)  # the hog: nothing else runs on the loop meanwhile
            await asyncio.sleep(0)
        assert adm.lag > adm.setpoint and adm.limit == admission.MIN_LIMIT
        tickets = [adm.admit(regular) for _ in range(admission.MIN_LIMIT)]
        assert sum(t is None for t in tickets) == 1  # one of them was in flight already
        assert adm.admit(regular) is None and adm.room() == admission.VIP_ONLY and not adm.refusing_all
        vips = [adm.admit(vip) for _ in range(admission.MIN_LIMIT)]
        assert all(t is not None for t in vips) and adm.refusing_all
        assert adm.admit(vip) is None and adm.refused == {"vip": 1, "regular": 2}
    finally:
        adm.stop()
        metrics.OVERLOAD_REFUSED.counts = {}  # counted in this test process: not for another test


def test_comebacks_are_booked_in_order_and_spread_past_the_horizon() -> None:
    """The calendar alone (no process): at its floor pace, refused orders are told later and
    later seconds in booking order; those past the 60-s horizon are spread over its second half
    instead of all being told its last second (one crowd); a refused VIP order comes back at once."""
    adm = admission.Admission(target_ms=50)
    horizon = admission.MAX_RETRY_AFTER_S
    told = [adm.retry_after_s() for _ in range(int(admission.MIN_RATE * horizon * 2))]
    within = told[: int(admission.MIN_RATE * (horizon - 5))]
    assert within == sorted(within) and within[0] <= 2 and within[-1] >= horizon - 6
    past = told[-2000:]
    assert all(horizon / 2 <= s <= horizon for s in past) and len(set(past)) > horizon / 4, set(past)
    assert adm.retry_after_s(vip=True) == 1


@pytest.mark.long  # a 17 s bench run: make reliability (make test's 10-minute budget)
async def test_bench_open_loop_resends_refused_orders_after_retry_after_until_all_are_taken(
    ingress: Any, r: oq_client.Redis, pausable: redis.Redis
) -> None:
    """``orderq bench``'s open loop, as a channel: an order refused 503 comes back after its
    Retry-After (with jitter) until taken; the report says how many at the first try, how many
    resends, when the last was taken, and every answer's latency by class."""
    base = await ingress(ORDERQ_ACK_TARGET_MS=50, ORDERQ_ACK_DEADLINE_MS=60000)
    host, port = base.removeprefix("http://").split(":")
    factory = OrderFactory(unique("r"), f"{host}:{port}", CHANNEL_TOKENS, list(CHANNEL_TOKENS))
    factory.track = True
    sent: list[str] = []

    def take_keys() -> list[str]:
        keys = factory.take_keys()
        sent.extend(keys)
        return keys

    rec = Recorder()
    pausable.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # lifts itself: Redis slow for 1.5 s
    offsets = loadgen.constant_schedule(1200, 0.5)
    elapsed = await asyncio.wait_for(
        loadgen.open_loop(
            host, int(port), 300, factory.single, offsets, rec, take_keys, classify=lambda: factory.last_class
        ),
        120,
    )
    rep = resend_report(rec)
    assert rep["orders_offered"] == len(offsets) == len(set(sent)) == 600
    assert rep["resends"] > 0 and rec.statuses.get(503, 0) == rep["resends"]
    assert 0 < rep["taken_first_try_share"] < 1
    assert rep["not_taken"] == 0 and 0 < rep["all_taken_s"] <= elapsed + 0.1
    assert rec.statuses.get(202, 0) == 600 and rep["answer_ms"]["p99"] > 0
    assert {"vip", "new", "regular"} <= set(rep["answer_ms_by_class"]) and rep["refusing_s"] is not None
    # Every order was taken once: a status record each, one intake entry each.
    with_record, queued = await written(r, sent)
    assert len(with_record) == len(queued) == 600
    assert (await stats.totals(r))["accepted"] == 600
