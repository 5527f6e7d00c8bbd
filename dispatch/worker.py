"""The dispatch stage: POSTs each executed action to its downstream system.

For every action with an ``ORDERQ_WEBHOOK_<ACTION>`` URL, the dispatcher reads the
action's outbox streams (one per partition) through the consumer group ``dispatch``
and POSTs each entry (the request and what its answer means: dispatch/delivery.py).
A delivered entry is acknowledged and deleted in one script call per batch, so the
outbox holds exactly the undelivered actions. An entry that references its order's copy
(orderq/ordercopies.py) gets the payload with one pipelined HMGET per partition after each
read and claim; the script that deletes the last entry referencing a copy deletes the copy.

Each target (action) runs on its own: its own loop, HTTP connection pool, concurrency,
backoff and circuit (dispatch/circuit.py), so a target that is down delays only its own
actions.

* Unreachable (connection refused, connect timeout): not a delivery; the entry waits
  with backoff and the circuit counts a failure. A target down for hours loses nothing.
* 5xx, 408/409/425/429, read timeouts: a failed delivery; retried with exponential
  backoff and jitter, dead-lettered after ``ORDERQ_MAX_DELIVERIES`` of them.
* Other 4xx: the target refuses this request for good; dead-lettered at once.
* An entry that cannot be sent (its payload does not decode, or building its request raises):
  dead-lettered at once, while the rest of its batch goes on.

Dead letters go to the partition's dispatch dead-letter stream, each with every field of its
entry (for a replay), the entry's own ledger field marked ``failed`` in the order's status record
(a routed pick: ``x:wms.pick@<warehouse>``; a second effect: ``x:<action>:<kind>``, e.g.
``x:notify.sms:shipped``) and counted in ``/v1/stats`` dead letters;
the record keeps no TTL until its last one is resolved (orderq/lua/dispatched.lua).
Entries held by a live dispatcher are kept fresh (``XCLAIM … JUSTID``); those of a dead
one are claimed after ``ORDERQ_CLAIM_IDLE_MS`` by the others. A claim is not a failed
delivery: restarts alone never dead-letter an entry; only one claimed more than
``ORDERQ_MAX_DELIVERIES`` x ``CRASH_LOOP_FACTOR`` times (a dispatcher that dies on it every
time) is, with its action marked ``failed``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any

import structlog

from dispatch.circuit import CLOSED, HALF_OPEN, OPEN, Circuit
from dispatch.delivery import Endpoint, Outcome, Result
from orderq import keys, ordercopies
from orderq.circuits import CircuitBoard
from orderq.client import Redis
from orderq.control import Control, cancel_and_wait
from orderq.errors import ConfigError
from orderq.runner import Stage
from orderq.settings import Settings
from orderq.worker import CRASH_LOOP_FACTOR, parse_read

log = structlog.get_logger("orderq.dispatch")

BLOCK_MS = 500  # longest blocking read when a target has nothing to do: bounds a SIGTERM's wait
READ_COUNT = 100  # entries read per stream per read
HOLD_FACTOR = 8  # a target holds at most concurrency x this entries; the rest wait in Redis
POLL_S = 0.1  # longest sleep while held entries wait for their backoff (new entries are read then)
RECLAIM_LIMIT = 500  # entries claimed from dead dispatchers per stream per sweep
ERROR_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # Redis unreachable: retry, never spin
NEVER = 2**31  # reclaim.lua's delivery limits for outbox entries: claims are not failed attempts


@dataclass(slots=True)
class Held:
    """An outbox entry this dispatcher owns until it is delivered or dead-lettered."""

    partition: keys.Partition
    stream: str
    id: str
    key: str  # order key
    fid: str  # fulfilment id
    payload: bytes  # msgpack order
    attempts: int = 0  # deliveries the target answered with a failure (the dead-letter budget)
    tries: int = 0  # every failure, unreachable included (the backoff exponent)
    due: float = 0.0
    error: str = ""
    warehouse: str = ""  # a routed pick: the warehouse that ships it
    route: bytes = b""  # ... and its parcel of the order's route (orderq/status.py parses it)
    kind: str = ""  # a second effect of one action: "shipped", the shipping notice (notify.sms)
    shipment: bytes = b""  # JSON of the shipment a channel.ship_sync or shipping notice carries
    cancel_reason: str = ""  # a wms.intercept: why the order was cancelled
    ref: bool = False  # the entry references its order's copy ('o'): payload read by ordercopies.fetch


def held_from(p: keys.Partition, stream: str, entry_id: str, fields: dict[bytes, bytes], due: float) -> Held:
    """Never raises, whatever the entry holds: a corrupt one fails on its own when sent."""
    k, f, d, w, rt, n, sh, c = (fields.get(name, b"") for name in (b"k", b"f", b"d", b"w", b"r", b"n", b"s", b"c"))
    k_, f_, w_, n_, c_ = (b.decode(errors="replace") for b in (k, f, w, n, c))
    h = Held(p, stream, entry_id, k_, f_, d, due=due, warehouse=w_, route=rt, kind=n_, shipment=sh, cancel_reason=c_)
    h.ref = ordercopies.REF in fields
    return h


class Target:
    """One action's delivery: its held entries, endpoint, circuit and loop."""

    def __init__(self, d: Dispatcher, action: str, url: str) -> None:
        s = d.settings
        self.d = d
        self.action = action
        self.endpoint = Endpoint(action, url, s)
        self.concurrency = s.dispatch_concurrency
        self.hold_max = s.dispatch_concurrency * HOLD_FACTOR
        self.circuit = Circuit(action, s.dispatch_failures, s.dispatch_open_s)
        self.held: dict[tuple[str, str], Held] = {}
        self.streams = {p.outbox(action): p for p in d.r.partitions}
        self.delivered = 0
        self.dead_lettered = 0
        self._next_reclaim = 0.0
        self._state = self.circuit.state
        self.log = log.bind(action=action, target=url)

    # --- the loop -------------------------------------------------------------------------
    async def run(self, drain: bool = False) -> None:
        errors = 0
        while not self.d.stopping.is_set():
            try:
                if not await self.step(drain):
                    break
                errors = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if "NOGROUP" in str(exc):  # a stream or group was deleted under us: recreate, at id 0
                    await self.d.ensure_groups()
                delay = ERROR_BACKOFF_S[min(errors, len(ERROR_BACKOFF_S) - 1)]
                errors += 1
                self.log.warning("dispatch.batch_failed", error=repr(exc), retry_in_s=delay)
                await self.d.sleep(delay)

    async def step(self, drain: bool) -> bool:
        """One round: take new work, send what is due (as the circuit allows), settle it.
        False when draining and nothing is left."""
        now = time.monotonic()
        if now >= self._next_reclaim:
            await self.reclaim()
        got = 0
        if len(self.held) < self.hold_max and self.circuit.state != OPEN:
            block = 0 if (self.held or drain) else BLOCK_MS
            got = await self.read(min(READ_COUNT, self.hold_max - len(self.held)), block)
        if not self.held:
            return not (drain and got == 0)
        now = time.monotonic()
        if self.circuit.state == CLOSED:
            due = sorted((h for h in self.held.values() if h.due <= now), key=lambda h: h.due)
            n = min(len(due), self.concurrency)
        else:  # the circuit spaces the requests now: its probe takes the entry waiting longest
            n = self.circuit.allowed(1)
            due = sorted(self.held.values(), key=lambda h: h.due)[:1] if n else []
        self._note_state()
        if n == 0:
            waits = [h.due - now for h in self.held.values() if h.due > now]
            if self.circuit.state == OPEN:
                waits = [self.circuit.wait_s()]
            await self.d.sleep(min([POLL_S, *waits]) if waits else POLL_S)
            return True
        batch = due[:n]
        probe = self.circuit.half_open
        t0 = time.perf_counter()
        outcomes = await asyncio.gather(*(self.endpoint.post(h, probe) for h in batch))
        await self.settle(batch, outcomes, t0)
        return True

    def _note_state(self) -> None:
        if self.circuit.state != self._state:
            self._state = self.circuit.state
            self.d.board.changed.set()
            emit = self.log.info if self._state == CLOSED else self.log.warning
            emit("dispatch.circuit", state=self._state, held=len(self.held), open_s=round(self.circuit.open_s, 3))

    # --- Redis ----------------------------------------------------------------------------
    async def read(self, count: int, block_ms: int) -> int:
        """New entries of this action's outbox streams (every partition), into ``held``."""
        r = self.d.r
        by_stream = {s.encode(): (p, 0) for s, p in self.streams.items()}
        group, consumer = keys.GROUP_DISPATCH, self.d.consumer
        if r.settings.redis_cluster:  # one stream per call: the partitions live on different slots
            replies = await r.run(
                # routed to each stream's master (no key lookup round trip per stream, see client.py)
                lambda pipe: [r.xreadgroup(pipe, group, consumer, s, count) for s in self.streams]
            )
            entries = [e for reply in replies for e in parse_read(reply, by_stream)]
            if not entries and block_ms:
                await self.d.sleep(min(block_ms / 1000, POLL_S * 2))
        else:
            reply = await r.client.xreadgroup(
                group, consumer, dict.fromkeys(self.streams, ">"), count=count, block=block_ms or None
            )
            entries = parse_read(reply, by_stream)
        now = time.monotonic()
        fresh: list[Held] = []
        for e in entries:
            slot = (e.stream, e.id)
            if slot not in self.held:
                self.held[slot] = h = held_from(e.partition, e.stream, e.id, e.fields, now)
                fresh.append(h)
        await self.with_copies(fresh)
        return len(entries)

    async def with_copies(self, fresh: list[Held]) -> None:
        """The payloads of the entries that reference their order's copy: one pipelined HMGET
        per partition. An entry whose copy is gone cannot become its request: dead-lettered."""
        wanted: dict[keys.Partition, list[str]] = {}
        for h in fresh:
            if h.ref:
                wanted.setdefault(h.partition, []).append(h.key)
        if not wanted:
            return
        copies = await ordercopies.fetch(self.d.r, wanted)
        gone: dict[str, list[Held]] = {}
        for h in fresh:
            if h.ref:
                payload = copies.get((h.partition.index, h.key))
                if payload is None:
                    h.attempts, h.error = 1, "its order's copy is gone: nothing to send"
                    gone.setdefault(h.stream, []).append(h)
                else:
                    h.payload = payload
        if gone:
            await self.write({}, gone)
            for items in gone.values():
                for h in items:
                    self.held.pop((h.stream, h.id), None)
                    self.log.warning("dispatch.dead_letter", order_key=h.key, entry_id=h.id, error=h.error)
            self.dead_lettered += sum(len(v) for v in gone.values())

    async def reclaim(self) -> None:
        """Claim entries a dead dispatcher held past the lease; dead-letter ones claimed too often."""
        r, s = self.d.r, self.d.settings
        self._next_reclaim = time.monotonic() + max(0.2, min(2.0, s.claim_idle_ms / 2000))
        targets = list(self.streams.items())
        # A claim counts a delivery in Redis, but it is no failed attempt (a restart, a stall):
        # reclaim.lua dead-letters nothing here; the attempts that failed are counted in settle().

        # Entries this target holds (waiting for their attempt, or in a long request) are not
        # claimed again: reclaim.lua skips the ids it is given.
        mine: dict[str, list[str]] = {}
        for stream, entry_id in self.held:
            mine.setdefault(stream, []).append(entry_id)

        def build(pipe: Any) -> None:
            for stream, p in targets:
                r.script(
                    pipe,
                    "reclaim",
                    [stream, keys.dispatch_dead(p), p.counters, p.errors],
                    [
                        keys.GROUP_DISPATCH,
                        self.d.consumer,
                        s.claim_idle_ms,
                        NEVER,
                        RECLAIM_LIMIT,
                        NEVER,
                        *mine.get(stream, ()),
                    ],
                )

        results = await r.run(build)
        now = time.monotonic()
        fresh: list[Held] = []
        for (stream, p), (entries, n_dead, _cursor) in zip(targets, results, strict=True):
            self.dead_lettered += int(n_dead)
            for entry_id, flat in entries:
                it = iter(flat)
                fields = dict(zip(it, it, strict=True))
                slot = (stream, entry_id.decode())
                if slot in self.held:  # (held since the ids were read: another sweep's)
                    continue
                h = self.held[slot] = held_from(p, stream, slot[1], fields, now)
                fresh.append(h)
        if fresh:
            self.log.warning("dispatch.reclaimed", claimed=len(fresh))
            await self.end_crash_loops(fresh)
            await self.with_copies([h for h in fresh if (h.stream, h.id) in self.held])

    async def end_crash_loops(self, claimed: list[Held]) -> None:
        """An entry claimed over and over (its dispatcher dies on it every time, recording
        nothing) is dead-lettered, its action ``failed``: a crash loop must end. One pipelined
        XPENDING per stream, on claims only."""
        r, s = self.d.r, self.d.settings
        limit = s.max_deliveries * CRASH_LOOP_FACTOR
        streams = sorted({h.stream for h in claimed})
        count = RECLAIM_LIMIT + self.hold_max
        replies = await r.run(
            lambda pipe: [
                pipe.xpending_range(stream, keys.GROUP_DISPATCH, "-", "+", count, consumername=self.d.consumer)
                for stream in streams
            ]
        )
        deliveries: dict[tuple[str, str], int] = {}
        for stream, rows in zip(streams, replies, strict=True):
            for row in rows:
                entry_id = row["message_id"]
                entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                deliveries[stream, entry_id] = int(row["times_delivered"])
        dead: dict[str, list[Held]] = {}
        for h in claimed:
            n = deliveries.get((h.stream, h.id), 0)
            if n > limit:
                h.attempts, h.error = n, f"delivered {n} times without completing"
                dead.setdefault(h.stream, []).append(h)
        if dead:
            await self.write({}, dead)
            for items in dead.values():
                for h in items:
                    self.held.pop((h.stream, h.id), None)
                    self.log.warning("dispatch.dead_letter", order_key=h.key, entry_id=h.id, deliveries=h.attempts)
            self.dead_lettered += sum(len(v) for v in dead.values())

    async def write(self, done: dict[str, list[Held]], dead: dict[str, list[Held]]) -> None:
        """Delivered entries acknowledged and deleted, given-up ones dead-lettered: one
        dispatched.lua call per stream."""
        streams = sorted(set(done) | set(dead))
        if not streams:
            return
        r = self.d.r

        def build(pipe: Any) -> None:
            for stream in streams:
                p = self.streams[stream]
                ok, gone = done.get(stream, []), dead.get(stream, [])
                args: list[Any] = [keys.GROUP_DISPATCH, self.action, len(ok)]
                for h in ok:  # (a delivered entry that referenced its order's copy gives it up)
                    args += [h.id, h.key if h.ref else ""]
                for h in gone:  # (the letter is the entry as it is in the stream; these, if it is gone)
                    args += [h.id, h.key, h.fid, h.payload, h.attempts, h.error[:500], h.warehouse, h.route]
                    args += [h.kind, h.shipment, h.cancel_reason]
                ks = [stream, keys.dispatch_dead(p), p.counters, p.order_copies, p.copy_refs]
                ks += [k for h in gone for k in (p.status(h.key), p.payload(h.key))]
                r.script(pipe, "dispatched", ks, args)

        await r.run(build)

    async def settle(self, batch: list[Held], outcomes: list[Outcome], t0: float) -> None:
        """Circuit, retries and the batch's Redis writes: one script call per stream."""
        s = self.d.settings
        now = time.monotonic()
        probed = self.circuit.state == HALF_OPEN
        done: dict[str, list[Held]] = {}
        dead: dict[str, list[Held]] = {}
        retried = 0
        # An exception of ours on one entry is that entry's: dead-lettered at once. On every
        # entry of a batch, it is nobody's: the batch waits and tries again (and counts it).
        ours = len(batch) > 1 and all(out.result == Result.BROKEN for out in outcomes)
        for h, out in zip(batch, outcomes, strict=True):
            if out.result == Result.BROKEN:
                h.error = out.detail
                h.attempts += 1
                h.tries += 1
                if ours and h.attempts < s.max_deliveries:
                    h.due = now + self.endpoint.backoff(h, 0.0)
                    retried += 1
                else:
                    dead.setdefault(h.stream, []).append(h)
                continue
            if out.result == Result.OK:
                self.circuit.success()
                done.setdefault(h.stream, []).append(h)
                continue
            h.error = out.detail
            if out.result == Result.REFUSED:  # the target is up and said no: not its health's fault
                h.attempts += 1
                self.circuit.success()
                dead.setdefault(h.stream, []).append(h)
                continue
            self.circuit.failure()
            h.tries += 1
            if out.result == Result.RETRY:
                h.attempts += 1
            if h.attempts >= s.max_deliveries:
                dead.setdefault(h.stream, []).append(h)
            else:
                h.due = now + self.endpoint.backoff(h, out.retry_after)
                retried += 1
        if probed and self.circuit.state == CLOSED:  # the target is back: what waited on it goes now
            for h in self.held.values():
                h.due = min(h.due, now)
        self._note_state()
        await self.write(done, dead)
        for group in (done, dead):
            for items in group.values():
                for h in items:
                    self.held.pop((h.stream, h.id), None)
        n_done = sum(len(v) for v in done.values())
        n_dead = sum(len(v) for v in dead.values())
        self.delivered += n_done
        self.dead_lettered += n_dead
        for items in dead.values():
            for h in items:
                self.log.warning(
                    "dispatch.dead_letter", order_key=h.key, entry_id=h.id, deliveries=h.attempts, error=h.error[:200]
                )
        self.log.info(
            "dispatch.batch",
            count=len(batch),
            delivered=n_done,
            retried=retried,
            dead_lettered=n_dead,
            held=len(self.held),
            circuit=self.circuit.state,
            duration_ms=round((time.perf_counter() - t0) * 1000, 2),
        )


class Dispatcher(Stage):
    """The dispatch stage: every configured target, each in its own task; a keep-alive for the
    entries they hold. On SIGTERM, requests in flight finish and held entries stay pending in
    Redis for the next dispatcher."""

    stage = "dispatch"

    def __init__(self, r: Redis, control: Control | None = None, consumer: str | None = None) -> None:
        super().__init__(r, control, consumer)
        self.targets = {a: Target(self, a, url) for a, url in self.settings.webhooks.items()}
        self.board = CircuitBoard(r.client, {a: t.circuit for a, t in self.targets.items()}, self.consumer)

    @classmethod
    def check(cls, settings: Settings) -> None:
        if not settings.webhooks:
            raise ConfigError("ORDERQ_WEBHOOK_<ACTION>", "no downstream webhook is set: nothing to dispatch")

    @property
    def delivered(self) -> int:
        return sum(t.delivered for t in self.targets.values())

    def started_fields(self) -> dict[str, Any]:
        return {"targets": dict(self.settings.webhooks)}

    def stopped_fields(self) -> dict[str, Any]:
        return {"delivered": self.delivered}

    async def ensure_groups(self) -> None:
        """The ``dispatch`` group on each configured outbox stream, at id 0 (never ``$``)."""
        pipe = self.r.client.pipeline(transaction=False)
        for t in self.targets.values():
            for stream in t.streams:
                pipe.xgroup_create(stream, keys.GROUP_DISPATCH, id="0", mkstream=True)
        for res in await pipe.execute(raise_on_error=False):
            if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
                raise res

    async def run(self, drain: bool = False) -> int:
        """Deliver until stopped; with ``drain``, until nothing is left to deliver (or given up).
        Returns the entries delivered."""
        await self.ensure_groups()
        keeper = asyncio.create_task(self._keep_alive())
        board = asyncio.create_task(self.board.run())
        try:
            await asyncio.gather(*(t.run(drain) for t in self.targets.values()))
        finally:
            await cancel_and_wait([keeper, board])  # not one cancel: a claim in flight can swallow it (3.11)
            await self.board.retire()
        return self.delivered

    async def _keep_alive(self) -> None:
        """Reset the idle time of every held entry (XCLAIM JUSTID: no delivery counted), so entries
        waiting out a backoff or an open circuit are not taken for a dead dispatcher's."""
        every = max(0.1, self.settings.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(every)
            held = [(stream, [h.id for h in hs]) for t in self.targets.values() for stream, hs in _by_stream(t)]
            if not held:
                continue
            try:
                await self.r.run(functools.partial(self._claim, held=held))
            except Exception as exc:
                log.warning("dispatch.keepalive_failed", error=repr(exc))

    def _claim(self, pipe: Any, held: list[tuple[str, list[str]]]) -> None:
        for stream, ids in held:
            pipe.xclaim(stream, keys.GROUP_DISPATCH, self.consumer, 0, ids, justid=True)

    async def close(self) -> None:
        for t in self.targets.values():
            await t.endpoint.close()


def _by_stream(t: Target) -> list[tuple[str, list[Held]]]:
    out: dict[str, list[Held]] = {}
    for h in list(t.held.values()):
        out.setdefault(h.stream, []).append(h)
    return list(out.items())
