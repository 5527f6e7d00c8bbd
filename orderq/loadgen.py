"""The load generator of ``orderq bench``: cheap enough to share two cores with the server.

Why not httpx/aiohttp: on a 2-core machine every microsecond the generator spends is
taken from the ingress it measures. So this is a minimal HTTP/1.1 client on raw asyncio
protocols (run on uvloop): keep-alive connections, one request in flight per
connection, requests pre-encoded from byte templates (one ``%`` format per order), and
only the status line and ``Content-Length`` parsed from answers.

Two drivers: :func:`closed_loop` (N connections send back-to-back: the most a server
takes) and :func:`open_loop` (orders offered on a fixed schedule, latency measured from
the scheduled time, so a stalled server cannot hide its stall: no coordinated omission).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from orderq.schema import json_encoder

# Channel mix of a multi-channel shop on a peak day (weights, not shares of the contract).
CHANNEL_WEIGHTS = {
    "tmall": 30,
    "jd": 20,
    "douyin": 20,
    "pdd": 15,
    "kuaishou": 5,
    "miniapp": 5,
    "shopify": 3,
    "pos": 2,
}
VIP_SHARE = 0.05  # customer.tier vip
NEW_SHARE = 0.30  # a customer id never seen before -> priority "new"
REGULAR_POOL = 1000  # the rest reuse these customer ids -> priority "regular" after their first order
VIP_POOL = 200
REMARK_SHARE = 0.30  # orders with a remark (crm.remark_sync, a non-core sync)
GIFT_SHARE = 0.20  # orders with a gift (crm.gift_sync)
SKUS = tuple(f"BENCH-{i:02d}" for i in range(20))
GIFT_SKU = "BENCH-GIFT"
# (unit_price, paid_price): paid within 10 % of the usual price, so no price-anomaly risk;
# half the orders are >= 500 (invoice.request runs).
PRICES = (("199.00", "189.00"), ("599.00", "569.00"), ("2999.00", "2899.00"), ("89.90", "85.00"))
CREATED_AT = "2026-06-18T00:00:01+08:00"


def _template(channel: str, vip: bool, price: tuple[str, str], remark: bool, gift: bool) -> bytes:
    """One order as JSON bytes with ``%(name)s`` slots for the per-order fields.

    Every field a validation rule keys on (recipient address, phone, IP) varies per
    order, so benchmark orders are not duplicate suspects or an IP burst: they measure
    the path a normal order takes.
    """
    order: dict[str, Any] = {
        "channel": channel,
        "order_id": "@oid@",
        "created_at": CREATED_AT,
        "customer": {"id": "@cid@", "tier": "vip" if vip else "regular", "phone": "@phone@", "ip": "@ip@"},
        "ship_to": {
            "name": "王芳",
            "phone": "@phone@",
            "province": "江苏省",
            "city": "苏州市",
            "district": "工业园区",
            "address": "星湖街 @n@ 号 5 幢 1201",
        },
        "lines": [{"sku": "@sku@", "qty": 1, "unit_price": price[0], "paid_price": price[1]}],
        "paid_amount": price[1],
        "currency": "CNY",
    }
    if remark:
        order["remark"] = "周末送货, 电梯房"
    if gift:
        order["gifts"] = [{"sku": GIFT_SKU, "qty": 1}]
    raw = json_encoder.encode(order).replace(b"%", b"%%")
    for name in (b"oid", b"cid", b"phone", b"ip", b"n", b"sku"):
        raw = raw.replace(b"@" + name + b"@", b"%(" + name + b")s")
    return raw


class OrderFactory:
    """Unique orders as ready-to-send request bytes: a run id plus a counter.

    ``sample`` collects every ``sample_every``-th order key, for end-to-end latency
    read back from the status records afterwards.
    """

    def __init__(
        self,
        run_id: str,
        host: str,
        tokens: dict[str, str] | None,
        channels: Sequence[str],
        seed: int = 618,
    ) -> None:
        self.run_id = run_id
        self.n = 0
        self.rnd = random.Random(seed)
        self.sample: list[str] = []
        self.sample_every = 0
        usable = [c for c in CHANNEL_WEIGHTS if c in channels and (tokens is None or c in tokens)]
        if not usable:
            raise ValueError("no channel with a token to send orders with")
        # recipients differ from run to run too: a second run against the same instance within
        # ORDERQ_DUP_WINDOW_S must not meet the first one's orders as duplicate suspects
        self.phone_offset = zlib.crc32(run_id.encode()) % 100_000_000
        self.channel_cycle = [c for c in usable for _ in range(CHANNEL_WEIGHTS[c])]
        self.rnd.shuffle(self.channel_cycle)
        self.templates = {
            (c, vip, pi, rm, gf): _template(c, vip, PRICES[pi], rm, gf)
            for c in usable
            for vip in (False, True)
            for pi in range(len(PRICES))
            for rm in (False, True)
            for gf in (False, True)
        }
        self.heads: dict[tuple[str, str], bytes] = {}
        for c in usable:
            auth = f"Authorization: Bearer {tokens[c]}\r\n" if tokens is not None else ""
            for path in ("/v1/orders", "/v1/orders/batch"):
                self.heads[(c, path)] = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: "
                ).encode()

    def _body(self, channel: str) -> bytes:
        n = self.n
        self.n = n + 1
        rnd = self.rnd.random
        roll = rnd()
        run = self.run_id
        if roll < VIP_SHARE:
            vip, cid = True, f"v{run}-{int(rnd() * VIP_POOL)}"
        elif roll < VIP_SHARE + NEW_SHARE:
            vip, cid = False, f"n{run}-{n}"
        else:
            vip, cid = False, f"c{run}-{int(rnd() * REGULAR_POOL)}"
        tmpl = self.templates[(channel, vip, n & 3, rnd() < REMARK_SHARE, rnd() < GIFT_SHARE)]
        oid = f"B{run}-{n:08d}"
        if self.sample_every and n % self.sample_every == 0:
            self.sample.append(f"{channel}:{oid}")
        return tmpl % {
            b"oid": oid.encode(),
            b"cid": cid.encode(),
            b"phone": f"138{(n + self.phone_offset) % 100_000_000:08d}".encode(),
            b"ip": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}".encode(),
            b"n": str(n).encode(),
            b"sku": SKUS[n % len(SKUS)].encode(),
        }

    def _channel(self) -> str:
        return self.channel_cycle[self.n % len(self.channel_cycle)]

    def single(self) -> bytes:
        """One ``POST /v1/orders`` request."""
        channel = self._channel()
        body = self._body(channel)
        return b"%b%d\r\n\r\n%b" % (self.heads[(channel, "/v1/orders")], len(body), body)

    def batch(self, size: int) -> bytes:
        """One ``POST /v1/orders/batch`` request of ``size`` orders (one channel: one token)."""
        channel = self._channel()
        body = b'{"orders":[' + b",".join(self._body(channel) for _ in range(size)) + b"]}"
        return b"%b%d\r\n\r\n%b" % (self.heads[(channel, "/v1/orders/batch")], len(body), body)


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.need = -1  # bytes of the whole answer once its head is parsed
        self.body_at = 0
        self.status = 0
        self.closed = False
        self.reusable = True

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(loop), host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            self._parse()

    def _parse(self) -> None:
        buf = self.buf
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                self._fail(ConnectionError("answer without Content-Length (chunked answers are not supported)"))
                return
            j = head.find(b"\r\n", i + 17)
            self.body_at = end + 4
            self.need = self.body_at + int(head[i + 17 : j if j > 0 else end])
            self.reusable = b"\r\nconnection: close" not in head
        if len(buf) >= self.need:
            body = bytes(buf[self.body_at : self.need])
            del buf[: self.need]
            self.need = -1
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, body))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection closed: {exc}"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        fut: asyncio.Future[tuple[int, bytes]] = self.loop.create_future()
        self.waiter = fut
        assert self.transport is not None
        self.transport.write(data)
        return fut

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class BatchAck(msgspec.Struct):
    """The counts of a batch answer (the per-order ``results`` are skipped)."""

    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0
    shed: int = 0


_batch_ack = msgspec.json.Decoder(BatchAck)


@dataclass
class Recorder:
    """Latencies (seconds) and outcome counts of one phase."""

    per_request: int = 1  # orders per request (batch size)
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0  # shed (503) or invalid orders: a benchmark order should never be
    errors: int = 0  # connection errors
    first_send: float = 0.0
    last_ack: float = 0.0
    acks: list[tuple[float, float]] = field(default_factory=list)  # (ack time, latency), when kept
    keep_acks: bool = False

    def add(self, latency: float, status: int, body: bytes, now: float) -> None:
        self.requests += 1
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.last_ack = now
        if self.keep_acks:
            self.acks.append((now, latency))
        if self.per_request == 1:
            if status == 202:
                self.accepted += 1
            elif status == 200:
                self.duplicates += 1
            else:
                self.refused += 1
        elif status == 202:
            ack = _batch_ack.decode(body)
            self.accepted += ack.accepted
            self.duplicates += ack.duplicates
            self.refused += ack.invalid + ack.shed
        else:
            self.refused += self.per_request


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies in seconds, as milliseconds."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[max(0, math.ceil(p * len(s)) - 1)] * 1000, 2)

    return {
        "p50": q(0.50),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": round(s[-1] * 1000, 2),
        "mean": round(sum(s) / len(s) * 1000, 2),
    }


async def open_connections(host: str, port: int, n: int) -> list[HttpConnection]:
    return list(await asyncio.gather(*(HttpConnection.open(host, port) for _ in range(n))))


async def _send(conns: list[HttpConnection], i: int, host: str, port: int, data: bytes) -> tuple[int, bytes] | None:
    """One request on connection ``i``; reopens a closed connection (an error is counted, not retried)."""
    conn = conns[i]
    if conn.closed or not conn.reusable:
        conn.close()
        conn = conns[i] = await HttpConnection.open(host, port)
    try:
        return await conn.request(data)
    except ConnectionError:
        conn.close()
        return None


async def closed_loop(
    host: str,
    port: int,
    connections: int,
    make: Callable[[], bytes],
    duration_s: float,
    rec: Recorder,
    max_requests: int = 0,
) -> float:
    """Every connection sends back-to-back for ``duration_s``; returns the elapsed seconds."""
    pc = time.perf_counter
    sent = 0
    start = deadline = 0.0

    def begin() -> None:
        nonlocal start, deadline
        start = rec.first_send = pc()
        deadline = start + duration_s

    async def worker(conns: list[Any], i: int) -> None:
        nonlocal sent
        while True:
            t0 = pc()
            if t0 >= deadline or (max_requests and sent >= max_requests):
                return
            sent += 1
            await _exchange(conns, i, host, port, make(), rec, t0)

    await _on_connections(host, port, connections, begin, worker)
    return pc() - start


async def open_loop(
    host: str,
    port: int,
    connections: int,
    make: Callable[[], bytes],
    offsets: Sequence[float],
    rec: Recorder,
) -> float:
    """Send request ``k`` at ``start + offsets[k]`` on whichever connection is free.

    Latency counts from the scheduled time: when every connection is busy, the wait for
    one is part of the answer time a client would see.
    """
    pc = time.perf_counter
    total = len(offsets)
    nxt = 0
    start = 0.0

    def begin() -> None:
        nonlocal start
        start = rec.first_send = pc() + 0.02

    async def worker(conns: list[Any], i: int) -> None:
        nonlocal nxt
        while nxt < total:
            k = nxt
            nxt = k + 1
            target = start + offsets[k]
            delay = target - pc()
            if delay > 0:
                await asyncio.sleep(delay)
            await _exchange(conns, i, host, port, make(), rec, target)

    await _on_connections(host, port, connections, begin, worker)
    return pc() - start


async def _exchange(conns: list[Any], i: int, host: str, port: int, body: bytes, rec: Recorder, since: float) -> None:
    """Send one request on connection ``i`` and record its answer, timed from ``since``."""
    res = await _send(conns, i, host, port, body)
    now = time.perf_counter()
    if res is None:
        rec.errors += 1
        return
    rec.add(now - since, res[0], res[1], now)


async def _on_connections(
    host: str,
    port: int,
    connections: int,
    begin: Callable[[], None],
    worker: Callable[[list[Any], int], Awaitable[None]],
) -> None:
    """Open the connections, then ``begin()`` (the clock starts) and one ``worker`` on each."""
    conns = await open_connections(host, port, connections)
    begin()
    try:
        await asyncio.gather(*(worker(conns, i) for i in range(connections)))
    finally:
        for c in conns:
            c.close()


def constant_schedule(rate: float, duration_s: float) -> list[float]:
    """Offsets (seconds) of ``rate`` orders/s for ``duration_s``."""
    n = max(1, round(rate * duration_s))
    return [k / rate for k in range(n)]


# The 618 midnight surge, as (share of the duration, relative rate): a ramp to the peak
# in the first second after midnight, a plateau while the sale opens, then a decay to a
# tail of late buyers. 21,000 orders in 60 s peak at ~1,200 orders/s, the rate the
# field report gives for that minute.
SURGE_SHAPE = ((0.0, 0.10), (0.01, 1.0), (0.08, 1.0), (0.20, 0.35), (0.50, 0.15), (1.0, 0.08))


def surge_schedule(orders: int, seconds: float, shape: Sequence[tuple[float, float]] = SURGE_SHAPE) -> list[float]:
    """Offsets of ``orders`` orders in ``seconds`` whose rate follows ``shape`` (piecewise linear)."""
    steps = 2000
    dt = seconds / steps

    def rel(u: float) -> float:
        for (u0, r0), (u1, r1) in itertools.pairwise(shape):
            if u <= u1:
                return r0 + (r1 - r0) * (u - u0) / (u1 - u0)
        return shape[-1][1]

    weights = [rel((i + 0.5) / steps) for i in range(steps)]
    scale = orders / (sum(weights) * dt)  # orders per second at relative rate 1.0
    offsets: list[float] = []
    carried = 0.0
    for i, w in enumerate(weights):
        rate = w * scale
        t0 = i * dt
        # orders due in this step, spread evenly over it
        due = carried + rate * dt
        count = int(due)
        carried = due - count
        offsets += [t0 + dt * (j + 0.5) / count for j in range(count)] if count else []
    while len(offsets) < orders:  # rounding leftovers go at the end
        offsets.append(seconds)
    return offsets[:orders]


def surge_peak_rate(orders: int, seconds: float, shape: Sequence[tuple[float, float]] = SURGE_SHAPE) -> float:
    """Orders/s at the plateau of :func:`surge_schedule`."""
    area = sum((u1 - u0) * (r0 + r1) / 2 for (u0, r0), (u1, r1) in itertools.pairwise(shape))
    return orders / (area * seconds)
