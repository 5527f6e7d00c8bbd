"""The load generator of ``orderq bench``: cheap enough to share two cores with the server
(raw asyncio connections, :mod:`loadtest.connection`; orders as pre-built bytes,
:mod:`loadtest.factory`; run on uvloop).

Two drivers: :func:`closed_loop` (N connections send back-to-back: the most a server
takes) and :func:`open_loop` (orders offered on a fixed schedule, latency measured from
the scheduled time, so a stalled server cannot hide its stall: no coordinated omission;
on a pool large enough that the excess waits in the server's sockets, and refused orders
sent again after their ``Retry-After``, as a channel does), and the schedules it offers:
a constant rate or the 618 midnight surge.

Each driver records into a :class:`loadtest.recorder.Recorder`; with an oracle on it and
``take_keys`` given to the driver, every order key sent and its answer are recorded, for the
check of every acknowledged order after the run. A progress display on the recorder counts
the orders sent.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from loadtest.connection import HttpConnection, open_connections, send
from loadtest.recorder import Recorder
from loadtest.series import TRACE


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
    progress = rec.progress

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
            if progress is not None:
                progress.advance(rec.per_request)
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
    progress = rec.progress
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
                if progress is not None:
                    progress.advance()
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
    res = await send(conns, i, host, port, body)
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
