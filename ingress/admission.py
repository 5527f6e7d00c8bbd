"""Admission control of one ingress process (contract §6, "overload of the ingress itself").

When this process cannot acknowledge within ``ORDERQ_ACK_TARGET_MS`` (out of CPU, or Redis
slow) it answers the excess at once with ``503`` ``overloaded`` + ``Retry-After``: ``regular``
and ``new`` orders first, VIP orders last. Nothing of a refused order is written. Every way in
(``POST /v1/orders`` and ``/batch``, the channel routes, the Shopify webhook) asks this one
controller before the order is decoded and before any Redis call.

How it decides — an adaptive limit on the orders in flight (admitted, not yet answered), as
Netflix's concurrency-limits do, driven by a measured queueing delay, as CoDel is:

- **Signal.** An order's acknowledgement time is the wait before the event loop reaches its
  request plus its time in flight. uvicorn does not timestamp requests, so the first part is
  measured as the loop's lag: a timer due every ``TICK_S`` records how late it fires, i.e. how
  long the loop's turn kept every waiting socket waiting (the usual asyncio sojourn proxy;
  at ten times the 618 spike requests wait there, in the sockets, for seconds). The second
  part is the age of the oldest order still in flight: a slow or stalled Redis shows there,
  with an idle loop. Their sum estimates what an order arriving now would see.
- **A standing delay, not a burst.** Like CoDel (Nichols & Jacobson, "Controlling Queue
  Delay", 2012), which acts on the *minimum* sojourn over an interval, the limit only falls
  once the delay has stayed above the setpoint (``SETPOINT_SHARE`` of the target: the rest is
  the margin for the tail) for an interval as long as the setpoint. One long turn (a
  collection, a dashboard computation) sheds nothing.
- **Response.** Then the limit is cut in proportion, ``limit * setpoint / least delay`` (at
  most halved per sample); when the delay is under half the setpoint it grows again by
  ``GROW_PER_S``, back to ``START_LIMIT``, past it only while the limit is reached (as
  Netflix's limits do). It stays within ``MIN_LIMIT`` … ``MAX_LIMIT``.
- **Why a limit rather than a drop probability** (PIE, RFC 8033): in an event loop the orders
  one turn admits are what make the next turns long, so a cap on the orders in flight bounds
  the turn at once; and while the process is saturated it admits as many orders as its CPU
  can take whatever the limit's value, where a probability must be found by trial and
  oscillates around it — refusing more orders than needed for the same delay.
- **Priority.** The ingress cannot tell ``new`` from ``regular`` (that takes the validation
  ledger), so both are "other": admitted while fewer than ``limit`` orders of any kind are in
  flight. A VIP order is admitted while fewer than ``limit`` VIP orders taken past that point
  are in flight: the others' orders never take a VIP's place, and a VIP order is refused only
  when VIP orders alone fill the limit — by then every other order is refused too.
- **Cost.** A refusal is a comparison, a peek at ``customer.tier`` (a ~3 µs partial decode,
  done only once the limit is reached) and a response built at start: no order decode, no
  Redis round trip, no log line; the refusals are counted in memory and flushed with the
  metrics once a second. For ``POST /v1/orders`` and ``/batch`` it is answered by the HTTP
  protocol itself, without an ASGI task or the framework (:mod:`ingress.shed`).
- **Coming back.** ``Retry-After`` books each refused order a slot in a calendar paced by what
  the process can take (below, :data:`RATE_S`), so refused channels come back spread out.

A batch request is one unit in flight (its orders are a fraction of a single order's cost
each): with room for every order it is taken whole; with room for VIP orders only, its other
orders come back ``"shed"`` (error ``overloaded``, and the answer carries ``Retry-After``)
while its VIP orders are queued; with no room at all the whole request gets the 503.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from typing import Any

import msgspec
from starlette.responses import Response

from ingress import responses
from orderq import metrics

TICK_S = 0.005  # loop-lag sampling period: ~200 cheap timer callbacks a second
SETPOINT_SHARE = 0.5  # delay held under half the target: the other half is the tail's margin
INTERVAL_SHARE = 1.0  # CoDel's interval, in setpoints: how long the delay stays above one before the limit falls
START_LIMIT = 256  # orders in flight at start (~30 ms of single-order work on this hardware)
# Never fewer: 128 single orders take ~15 ms of CPU, so a delay with fewer in flight is not this
# process's own queue (a starved machine, a slow Redis), and at the 618 spike's rate (1,200/s)
# fewer than 128 are in flight while acknowledgements take under 100 ms: nothing is refused.
MIN_LIMIT = 128
MAX_LIMIT = 4096  # past START_LIMIT only while the limit is reached with a low delay (a slow, idle Redis)
GROW_PER_S = 0.5  # growth rate of the limit while the delay is low: back to START_LIMIT, or past it if reached
# Retry-After: a calendar of comebacks. The process estimates the orders it can take per second
# (its capacity: the most it took in a window of RATE_S, or one over the CPU seconds an order
# cost in a window of at least COST_ORDERS orders and few refusals, whichever is higher; the best
# figure fades by CAPACITY_FADE a window, so a slower machine is learnt); each refused order is
# given the next free slot of a calendar booked at that pace, starting a second from now (a
# comeback refused again because first sends took its slot is booked again; booking half the
# pace left comebacks waiting long after the spike). The capacity, not the rate taken while
# refusing: a flood of refusals slows what the process takes while it lasts, and comebacks booked
# at that pace would wait long after it is over. So refused channels come back spread at a pace
# the process can take, and one refusal per order is the rule, where a fixed or random
# Retry-After sends them back in crowds that are refused again and again (measured at ten times
# the 618 spike: 3.2 refusals per order offered, each costing a third of an acceptance). A VIP
# order (refused only when VIP orders alone fill the limit) is not booked: it comes back after
# a second. Within 1 … MAX_RETRY_AFTER_S.
RATE_S = 0.25
COST_ORDERS = 20  # ~80 orders/s: the timer's own cost is then a tenth of the figure at most
CAPACITY_FADE = 0.998  # per window: the best figure halves in ~90 s unless seen again
MIN_RATE = 200.0  # orders/s assumed at least (no window measured yet, a stalled Redis)
MAX_RETRY_AFTER_S = 60

ANYONE, VIP_ONLY, NOBODY = 0, 1, 2  # what :meth:`Admission.room` says there is room for
MESSAGE = "this ingress process cannot acknowledge in time; retry after Retry-After seconds"
ERROR = {"code": "overloaded", "message": MESSAGE, "details": []}  # a shed batch item's error
BODY = responses.error_bytes("overloaded", MESSAGE)  # the 503's body


class _PeekCustomer(msgspec.Struct):
    tier: Any = None


class _Peek(msgspec.Struct):
    """The few fields admission needs; msgspec skips the rest of the order without building it."""

    channel: Any = None
    order_id: Any = None
    customer: _PeekCustomer | None = None


class _BatchPeek(msgspec.Struct):
    orders: list[_Peek] = []


_peek = msgspec.json.Decoder(_Peek)
_batch_peek = msgspec.json.Decoder(_BatchPeek)
_PEEK_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def peek(body: bytes | msgspec.Raw) -> tuple[bool, str | None]:
    """(VIP?, order key or None) of one order's JSON, without decoding the order."""
    try:
        p = _peek.decode(body)
    except _PEEK_ERRORS:
        return False, None
    vip = p.customer is not None and p.customer.tier == "vip"
    key = f"{p.channel}:{p.order_id}" if isinstance(p.channel, str) and isinstance(p.order_id, str) else None
    return vip, key


def tiers_of_batch(body: bytes) -> tuple[int, int]:
    """(VIP orders, other orders) in a batch body, for the refusal counter."""
    try:
        orders = _batch_peek.decode(body).orders
    except _PEEK_ERRORS:
        return 0, 0
    vip = sum(1 for p in orders if p.customer is not None and p.customer.tier == "vip")
    return vip, len(orders) - vip


Cohort = list[float]  # [start of a tick, orders admitted during it still in flight]
Ticket = tuple[Cohort, bool]  # (its cohort, taken on the VIP room): what an admitted order gives back


class Admission:
    """The controller of one ingress process; every method is called on its event loop."""

    def __init__(self, target_ms: int) -> None:
        self.target_s = target_ms / 1000
        self.setpoint = self.target_s * SETPOINT_SHARE
        self.limit = float(START_LIMIT)
        self.inflight = 0  # orders (batch requests) admitted and not answered yet
        self.vip_inflight = 0  # of which VIP orders admitted while the limit was reached
        self.lag = 0.0  # last sampled loop lag (s)
        self.delay = 0.0  # last estimate: lag + age of the oldest order in flight (s)
        self.refused = {"vip": 0, "regular": 0}  # since start, by customer tier
        self._seen = dict(self.refused)  # as of the last state() call
        self._ticks: deque[Cohort] = deque([[time.perf_counter(), 0]])
        self._peak = 0  # most orders in flight since the last tick
        self._above_since = 0.0  # when the delay went above the setpoint (0: it is not)
        self._least = 0.0  # least delay seen since then
        self._due = 0.0
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None
        # Prebuilt answers: a refusal allocates nothing of its own.
        self._refusals = [
            Response(BODY, 503, {"Retry-After": str(s)}, media_type="application/json")
            for s in range(MAX_RETRY_AFTER_S + 1)
        ]
        self.capacity = MIN_RATE  # most orders (batch requests) taken per second in a window, fading
        self._answered = 0  # orders (batch requests) admitted and answered since start
        self._window = (0.0, 0, 0.0, 0)  # start, answered, CPU time and refused of the rate window
        self._next_slot = 0.0  # perf_counter time of the calendar's next free comeback slot

    # --- lifecycle ----------------------------------------------------------------------
    def start(self) -> Admission:
        now = time.perf_counter()
        self._last = now
        self._arm(asyncio.get_running_loop(), now)
        metrics.publish_state(self.state)
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        metrics.publish_state(None)

    def _arm(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self._due = now + TICK_S
        self._handle = loop.call_at(loop.time() + TICK_S, self._tick, loop)

    # --- the control loop ---------------------------------------------------------------
    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.perf_counter()
        lag = now - self._due if now > self._due else 0.0
        ticks = self._ticks
        while len(ticks) > 1 and ticks[0][1] <= 0:
            ticks.popleft()
        oldest = now - ticks[0][0] if ticks[0][1] > 0 else 0.0
        delay = lag + oldest
        self.lag, self.delay = lag, delay
        dt = min(now - self._last, 0.1)
        self._last = now
        if delay > self.setpoint:
            if not self._above_since:
                self._above_since, self._least = now, delay
            self._least = min(self._least, delay)
            # CoDel's test: the least delay seen has stayed above the setpoint a whole interval
            if now - self._above_since >= self.setpoint * INTERVAL_SHARE:
                self.limit = max(MIN_LIMIT, self.limit * max(0.5, self.setpoint / self._least))
        else:
            self._above_since = 0.0
            binding = self._peak >= self.limit
            if delay < self.setpoint / 2 and (self.limit < START_LIMIT or binding) and self.limit < MAX_LIMIT:
                ceiling = MAX_LIMIT if binding else START_LIMIT  # back to the start, past it only when reached
                self.limit = min(ceiling, max(self.limit, self.limit * (1 + GROW_PER_S * dt)))
        self._peak = self.inflight
        if now - self._window[0] >= RATE_S:
            self._measure_rate(now)
        ticks.append([now, 0])
        self._arm(loop, now)

    # --- per request --------------------------------------------------------------------
    def room(self) -> int:
        """:data:`ANYONE`, :data:`VIP_ONLY` or :data:`NOBODY`: whom an order may be taken for now."""
        if self.inflight < self.limit:
            return ANYONE
        return VIP_ONLY if self.vip_inflight < self.limit else NOBODY

    @property
    def refusing_all(self) -> bool:
        """True while this process refuses every order, VIP included (readiness: ``/readyz``)."""
        return self.inflight >= self.limit and self.vip_inflight >= self.limit

    def enter(self, vip: bool = False) -> Ticket:
        """Count one order (or one batch request) in flight until :meth:`leave`; ``vip``: taken
        on the VIP orders' own room (:data:`VIP_ONLY`)."""
        t = self._ticks[-1]
        t[1] += 1
        self.inflight += 1
        if vip:
            self.vip_inflight += 1
        if self.inflight > self._peak:
            self._peak = self.inflight
        return (t, vip)

    def leave(self, ticket: Ticket) -> None:
        t, vip = ticket
        t[1] -= 1
        self.inflight -= 1
        self._answered += 1
        if vip:
            self.vip_inflight -= 1

    def place(self, body: bytes | msgspec.Raw) -> tuple[int, bool]:
        """Where one order's raw JSON goes now: (:data:`ANYONE` or :data:`VIP_ONLY`, the room
        it is taken on; VIP?) or (:data:`NOBODY`, VIP?): refused, and counted. Its tier is
        peeked at only once the limit is reached (VIP? is False before)."""
        room = self.room()
        if room == ANYONE:
            return ANYONE, False
        vip = peek(body)[0]
        if vip and room == VIP_ONLY:
            return VIP_ONLY, True
        self.count(vip)
        return NOBODY, vip

    def admit(self, body: bytes | msgspec.Raw) -> Ticket | None:
        """One order's raw JSON: a ticket (in flight until :meth:`leave`), or None: refused
        (counted; answer :meth:`refusal`)."""
        room, _ = self.place(body)
        return None if room == NOBODY else self.enter(vip=room == VIP_ONLY)

    def count_batch(self, body: bytes) -> int:
        """Count every order of a refused batch body by tier; returns how many."""
        vip, other = tiers_of_batch(body)
        self.count(True, vip)
        self.count(False, other)
        return vip + other

    def admit_tier(self, vip: bool) -> Ticket | None:
        """Like :meth:`admit` for an order whose tier is known (the channel routes map first)."""
        room = self.room()
        if room == ANYONE:
            return self.enter()
        if vip and room == VIP_ONLY:
            return self.enter(vip=True)
        self.count(vip)
        return None

    def count(self, vip: bool, n: int = 1) -> None:
        """Count ``n`` orders of a tier as refused."""
        tier = "vip" if vip else "regular"
        self.refused[tier] += n
        metrics.OVERLOAD_REFUSED.inc(tier, n)

    def _measure_rate(self, now: float) -> None:
        """Update :attr:`capacity` from the window of :data:`RATE_S` that ends now."""
        start, answered, cpu, refused = self._window
        cpu_now, refused_now = time.process_time(), self.refused["vip"] + self.refused["regular"]
        if start:
            taken = self._answered - answered  # answered, not admitted: a stalled write takes nothing
            best = max(MIN_RATE, taken / (now - start), self.capacity * CAPACITY_FADE)
            if taken >= COST_ORDERS and 4 * (refused_now - refused) <= taken and cpu_now > cpu:
                best = max(best, taken / (cpu_now - cpu))  # every CPU second on orders like these
            self.capacity = best
        self._window = (now, self._answered, cpu_now, refused_now)

    def retry_after_s(self, vip: bool = False, n: int = 1) -> int:
        """``Retry-After`` for ``n`` refused orders: their slots in the comeback calendar."""
        if vip:
            return 1
        now = time.perf_counter()
        slot = max(self._next_slot, now + 1.0)
        if slot - now > MAX_RETRY_AFTER_S:
            # Booked past the horizon (an overload the process cannot take back in a minute):
            # anywhere in its second half, at random, rather than all on its last second, where
            # they would come back as one crowd. The calendar goes on from the horizon.
            slot = now + MAX_RETRY_AFTER_S * (0.5 + 0.5 * random.random())
            self._next_slot = now + MAX_RETRY_AFTER_S
        else:
            self._next_slot = slot + n / self.capacity
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(slot - now)))

    def refusal(self, vip: bool = False, n: int = 1) -> Response:
        """The 503 ``overloaded`` answer, with ``Retry-After`` (see :data:`RATE_S`)."""
        return self._refusals[self.retry_after_s(vip, n)]

    def retry_after(self, n: int = 1) -> dict[str, str]:
        """``Retry-After`` of a batch answer whose ``n`` orders were shed for overload."""
        return {"Retry-After": str(self.retry_after_s(n=n))}

    def state(self) -> dict[str, float]:
        """For ``/metrics``, once a flush: 0 took every order since the last call, 1 refused
        ``regular``/``new`` ones, 2 refused VIP ones too; the limit, orders in flight, loop lag."""
        vip = self.refused["vip"] - self._seen["vip"]
        other = self.refused["regular"] - self._seen["regular"]
        self._seen = dict(self.refused)
        level = 2 if vip else 1 if other else 0
        return {
            "state": level,
            "limit": round(self.limit, 1),
            "inflight": self.inflight,
            "vip_inflight": self.vip_inflight,
            "lag_s": round(self.lag, 4),
            "capacity": round(self.capacity),
        }
