"""The load generator of ``orderq bench``: cheap enough to share two cores with the server.

Why not httpx/aiohttp: on a 2-core machine every microsecond the generator spends is
taken from the ingress it measures. So this is a minimal HTTP/1.1 client on raw asyncio
protocols (run on uvloop): keep-alive connections, one request in flight per
connection, requests pre-encoded from byte templates (one ``%`` format per order), and
only the status line and ``Content-Length`` parsed from answers.

Two drivers: :func:`closed_loop` (N connections send back-to-back: the most a server
takes) and :func:`open_loop` (orders offered on a fixed schedule, latency measured from
the scheduled time, so a stalled server cannot hide its stall: no coordinated omission;
on a pool large enough that the excess waits in the server's sockets, and refused orders
sent again after their ``Retry-After``, as a channel does).

With an oracle (``loadtest/oracle.py``) on the :class:`Recorder` and ``take_keys`` given to a
driver, every order key sent and its answer are recorded (a batch's per-order results are
decoded then), for the check of every acknowledged order after the run.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loadtest.oracle import BATCH_STATUS, UNKNOWN, Oracle
from loadtest.series import TRACE
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
        self.track = False  # keep the keys of the request being built, for take_keys()
        self._keys: list[str] = []
        self.rnd = random.Random(seed)
        self.sample: list[str] = []
        self.sample_every = 0
        self.last_class = "regular"  # priority class (vip / new / regular) of the order built last
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
            self.last_class = "vip"
        elif roll < VIP_SHARE + NEW_SHARE:
            vip, cid = False, f"n{run}-{n}"
            self.last_class = "new"
        else:
            vip, cid = False, f"c{run}-{int(rnd() * REGULAR_POOL)}"
            self.last_class = "regular"
        tmpl = self.templates[(channel, vip, n & 3, rnd() < REMARK_SHARE, rnd() < GIFT_SHARE)]
        oid = f"B{run}-{n:08d}"
        if self.track:
            self._keys.append(f"{channel}:{oid}")
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

    def take_keys(self) -> list[str]:
        """The order keys of the request built last (with ``track`` on), in request order."""
        keys, self._keys = self._keys, []
        return keys


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
        self.retry_after: float | None = None  # of the last answer, when a 429 / 503 carried one

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
            self.retry_after = _retry_after(head) if self.status in (429, 503) else None
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


def _retry_after(head: bytes) -> float | None:
    """Seconds of a (lower-cased) answer head's ``Retry-After``, if it has one."""
    i = head.find(b"\r\nretry-after:")
    if i < 0:
        return None
    j = head.find(b"\r\n", i + 14)
    try:
        return max(0.0, float(head[i + 14 : j if j > 0 else len(head)]))
    except ValueError:
        return None


class BatchAck(msgspec.Struct):
    """The counts of a batch answer (the per-order ``results`` are skipped)."""

    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0
    shed: int = 0


_batch_ack = msgspec.json.Decoder(BatchAck)


class BatchResult(msgspec.Struct):
    status: str = ""


class BatchAnswer(BatchAck):
    """A batch answer with its per-order results (decoded only when an oracle records them)."""

    results: list[BatchResult] = []


_batch_answer = msgspec.json.Decoder(BatchAnswer)


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

    oracle: Oracle | None = None  # every key sent and its answer, when the run is checked afterwards
    ack_latencies: list[float] = field(default_factory=list)  # 202 / 200 only (latencies: every answer)
    # open loop (resends): every answer by class as (scheduled send, latency); orders offered,
    # taken at their first try, sends again after a Retry-After, never taken (gave up)
    by_class: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    offered: int = 0
    taken_first_try: int = 0
    resent: int = 0
    not_taken: int = 0
    last_taken: float = 0.0  # when the last order was taken (perf_counter)
    refused_since: list[float] = field(default_factory=list)  # scheduled sends that were refused
    connections: int = 0  # most connections the open loop held

    def add(self, latency: float, status: int, body: bytes, now: float, keys: list[str] | None = None) -> None:
        self.requests += 1
        self.latencies.append(latency)
        if status in (200, 202):
            self.ack_latencies.append(latency)
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
            if keys and self.oracle is not None:
                self.oracle.record_answer(keys[0], status, body)
        elif status == 202:
            if keys and self.oracle is not None:
                ans = _batch_answer.decode(body)
                record = self.oracle.record
                if len(ans.results) == len(keys):
                    for k, res in zip(keys, ans.results, strict=True):
                        record(k, BATCH_STATUS.get(res.status, UNKNOWN))
                else:
                    for k in keys:
                        record(k, UNKNOWN)
            else:
                ans = _batch_ack.decode(body)
            self.accepted += ans.accepted
            self.duplicates += ans.duplicates
            self.refused += ans.invalid + ans.shed
        else:
            self.refused += self.per_request
            if keys and self.oracle is not None:
                self.oracle.record_batch(keys, status, body)

    def lost_answer(self, keys: list[str] | None) -> None:
        """A request that got no answer (connection error): its orders are in doubt."""
        self.errors += 1
        if keys and self.oracle is not None:
            for k in keys:
                self.oracle.record(k, UNKNOWN)


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
    take_keys: Callable[[], list[str]] | None = None,
) -> float:
    """Every connection sends back-to-back for ``duration_s``; returns the elapsed seconds.
    ``take_keys``: the order keys of the request ``make`` built last (for ``rec``'s oracle)."""
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
            body = make()
            await _exchange(conns, i, host, port, body, rec, t0, take_keys() if take_keys else None)

    await _on_connections(host, port, connections, begin, worker)
    return pc() - start


OPEN_LOOP_CONNECTIONS = 2048  # the open loop's pool: past it, orders wait in the client
RESEND_JITTER = (1.0, 1.5)  # a refused order is sent again after Retry-After times a random factor in this
RESEND_GIVE_UP_S = 300.0  # an order still refused this long after its first send is given up
YIELD_EVERY = 64  # sends in a row before the open loop lets answers in
OPEN_AT_ONCE = 256  # connections opened concurrently while the pool is filled
WARM_UP = b"GET /healthz HTTP/1.1\r\nHost: %b\r\n\r\n"


async def open_loop(
    host: str,
    port: int,
    connections: int,
    make: Callable[[], bytes],
    offsets: Sequence[float],
    rec: Recorder,
    take_keys: Callable[[], list[str]] | None = None,
    *,
    resend: bool = True,
    classify: Callable[[], str] | None = None,
) -> float:
    """Send request ``k`` at ``start + offsets[k]`` on a free one of ``connections`` keep-alive
    connections, opened before the clock starts; the one freed last goes first, so a light load
    keeps to a few warm connections (one the server closed while idle is opened again when
    needed) and only a heavy one spreads over many. With a pool that large a late answer is the server's doing, and the
    excess waits where a server can see (and shed) it, in its sockets, as when many channels
    push at once; with a small pool it would queue here, in the client, invisible to any
    server. Latency counts from the scheduled time: when every connection is busy, the wait
    for one is part of the answer time a client would see. (Connections are not opened during
    the run: a new connection costs the server about two requests' work.)

    ``resend``: an order refused with ``Retry-After`` (503 overloaded / shedding / unavailable,
    429) is sent again once that has passed, times a random factor in ``RESEND_JITTER`` (so
    refused channels do not all come back in step), until taken (202, or 200: it was there) or
    ``RESEND_GIVE_UP_S`` after its first send; a resend's latency counts from its own scheduled
    time. ``classify`` gives the class (vip / new / regular) of the order ``make`` built last,
    for the answer times per class. Returns the seconds until the last answer.
    """
    loop = asyncio.get_running_loop()
    pc = time.perf_counter
    conns: list[HttpConnection] = []
    want = max(1, min(connections, _fd_budget()))
    while len(conns) < want:
        try:
            more = await open_connections(host, port, min(OPEN_AT_ONCE, want - len(conns)))
        except OSError:  # the server (or this process) takes no more connections: use these
            if not conns:
                raise
            break
        conns += more
        # one cheap request on each: the server has taken the connection before the clock starts
        await asyncio.gather(*(c.request(WARM_UP % host.encode()) for c in more))
    free = list(range(len(conns)))  # a stack: the connection freed last is used first
    # (due, seq, request, order keys, class, first send, attempt)
    retries: list[tuple[float, int, bytes, list[str] | None, str, float, int]] = []
    seq = itertools.count()
    tasks: set[asyncio.Task[None]] = set()
    wake: asyncio.Future[None] | None = None
    total = len(offsets)
    start = rec.first_send = pc() + 0.02

    def poke(_: object = None) -> None:
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def one(
        i: int, body: bytes, keys: list[str] | None, cls: str, since: float, first: float, attempt: int
    ) -> None:
        try:
            res = await _exchange(conns, i, host, port, body, rec, since, keys)
            retry_after = conns[i].retry_after
        finally:
            free.append(i)
        if res is None:
            return  # no answer: counted as an error; it may have landed, so it is not sent again
        now = pc()
        rec.by_class.setdefault(cls, []).append((since, now - since))
        if res[0] in (200, 202):
            rec.last_taken = now
            if attempt == 0:
                rec.taken_first_try += 1
            return
        if res[0] in (429, 503):
            rec.refused_since.append(since)
        if resend and retry_after is not None and now - first < RESEND_GIVE_UP_S:
            due = now + retry_after * random.uniform(*RESEND_JITTER)
            heapq.heappush(retries, (due, next(seq), body, keys, cls, first, attempt + 1))
        else:
            rec.not_taken += 1

    sent = 0
    k = 0
    try:
        while k < total or retries or tasks:
            now = pc()
            due_new = start + offsets[k] if k < total else math.inf
            due_retry = retries[0][0] if retries else math.inf
            due = min(due_new, due_retry)
            if due > now + 0.0005 or not free:
                # nothing due yet, or every connection busy: wait for the time or an answer
                wake = loop.create_future()
                timer = loop.call_later(due - now, poke) if now < due < math.inf else None
                await wake
                if timer is not None:
                    timer.cancel()
                continue
            i = free.pop()
            if due_retry <= due_new:
                since, _, body, keys, cls, first, attempt = heapq.heappop(retries)
                rec.resent += 1
            else:
                since = first = due_new
                body = make()
                keys = take_keys() if take_keys else None
                cls = classify() if classify else ""
                attempt = 0
                k += 1
                rec.offered += 1
            task = loop.create_task(one(i, body, keys, cls, since, first, attempt))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(poke)
            sent += 1
            if sent % YIELD_EVERY == 0:
                await asyncio.sleep(0)
    finally:
        for t in tasks:
            t.cancel()
        for c in conns:
            c.close()
        rec.connections = max(rec.connections, len(conns))
    return pc() - start


def _fd_budget() -> int:
    """Connections the open loop may hold: half the soft limit on open files."""
    try:
        import resource

        return max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX
        return OPEN_LOOP_CONNECTIONS


def resend_report(rec: Recorder) -> dict[str, Any]:
    """What an open loop with resends saw (contract §8, issue 14): every answer's latency (202
    and 503 alike), the share of orders taken at their first try, the resends, how long until
    every offered order was taken (from the first scheduled send; None while any was not),
    and the answer latency per class while the server refused (the window from the first to
    the last refused send; the whole phase when nothing was refused)."""
    out: dict[str, Any] = {
        "answer_ms": percentiles_ms(rec.latencies),
        "orders_offered": rec.offered,
        "taken_first_try_share": round(rec.taken_first_try / rec.offered, 4) if rec.offered else None,
        "resends": rec.resent,
        "not_taken": rec.not_taken + rec.errors,
        "all_taken_s": (
            round(rec.last_taken - rec.first_send, 2)
            if rec.offered and rec.last_taken and not rec.not_taken and not rec.errors
            else None
        ),
    }
    window = (min(rec.refused_since), max(rec.refused_since)) if rec.refused_since else None
    out["refusing_s"] = None if window is None else [round(t - rec.first_send, 2) for t in window]
    by: dict[str, Any] = {}
    for cls, pairs in sorted(rec.by_class.items()):
        values = [lat for since, lat in pairs if window is None or window[0] <= since <= window[1]]
        if values:
            q = percentiles_ms(values)
            by[cls or "-"] = {"n": len(values), "p50": q["p50"], "p99": q["p99"], "max": q["max"]}
    out["answer_ms_by_class"] = by
    return out


async def _exchange(
    conns: list[Any],
    i: int,
    host: str,
    port: int,
    body: bytes,
    rec: Recorder,
    since: float,
    keys: list[str] | None = None,
) -> tuple[int, bytes] | None:
    """Send one request on connection ``i`` and record its answer, timed from ``since``."""
    res = await _send(conns, i, host, port, body)
    now = time.perf_counter()
    trace = TRACE.get()  # the series `orderq bench --html` plots (loadtest/series.py)
    if trace is not None:
        trace.answer(rec, now, res[0] if res is not None else 0, now - since, body)
    if res is None:
        rec.lost_answer(keys)
        return None
    rec.add(now - since, res[0], res[1], now, keys)
    return res


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
