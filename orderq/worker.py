"""The loop every stream-consuming stage shares: fetch a batch, process it in one
script call per partition, reclaim what dead workers left, honour pause, drain and
SIGTERM. Stages subclass :class:`StreamWorker` and supply ``fetch`` and ``process``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from redis.exceptions import (
    BusyLoadingError,
    ClusterError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orderq import keys
from orderq.client import Redis, ensure_groups
from orderq.control import Control
from orderq.runner import Stage

log = structlog.get_logger("orderq.worker")

BLOCK_MS = 500  # longest wait for new work: bounds how long a SIGTERM or pause waits
ERROR_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)  # Redis unreachable: retry, never spin
RECLAIM_LIMIT = 1000  # entries claimed per stream per sweep
CRASH_LOOP_FACTOR = 10  # an entry that never records an error (its worker dies) is dead-lettered
# after this many times ORDERQ_MAX_DELIVERIES: a crash loop must end, an outage must not
LINGER_S = 0.004  # a small batch waits this long for more: fewer round trips per order at low load
IDLE_LOOP_S = 0.01  # how often an extra loop checks whether the stage fell behind
PRUNE_EVERY_S = 300.0  # how often a worker forgets consumers of dead processes
PRUNE_IDLE_MS = 3_600_000  # a consumer idle this long with nothing pending is gone for good


@dataclass(slots=True)
class Entry:
    """One stream entry a worker owns until it acknowledges it."""

    partition: keys.Partition
    stream: str
    id: str
    fields: dict[bytes, bytes]
    lane: int = 0  # executors: 1 vip, 2 new, 3 regular
    delivered_again: bool = False

    def get(self, name: bytes, default: bytes = b"") -> bytes:
        return self.fields.get(name, default)


@dataclass
class BatchResult:
    counts: dict[str, int] = field(default_factory=dict)
    # entries that cannot be processed (an undecodable payload), with their error, by (stream,
    # entry id) (ids are unique per stream only): the rest of the batch went on; these are
    # given up at once (StreamWorker.give_up)
    failed: dict[Any, tuple[Entry, str]] = field(default_factory=dict)


class StreamWorker(Stage):
    """Base of the validate and execute workers: a stage that consumes streams of every partition."""

    group = ""

    def __init__(self, r: Redis, control: Control | None = None, consumer: str | None = None) -> None:
        super().__init__(r, control, consumer)
        self.batch = self.settings.worker_batch
        self._next_reclaim = 0.0
        self.behind = False  # the last fetch came back at least half full
        self.loops = 1  # batches kept in flight (run() sets it)
        self.server_failing = False  # the last batch failed on the server, not on its entries
        # An entry is blamed for a failure only while the stage demonstrably works for others:
        # a batch-mate went through, or (a batch of one) some entry went through since the last
        # entry was blamed. A stage broken for every entry backs off instead (see _isolate).
        self._ok_since_blame = True
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        # Entry ids by stream that one of this worker's loops is processing now: the recovery
        # sweep of another loop must not take them back (reclaim.lua), however long they take.
        self._busy: dict[str, set[str]] = {}
        self.processed = 0
        self.log = log.bind(stage=self.stage, worker=self.consumer)
        self.debug = self.settings.log_level == "debug"

    # --- what a stage supplies -------------------------------------------------------
    def streams_of(self, p: keys.Partition) -> list[tuple[str, int]]:
        """The streams this stage consumes in partition ``p``, with their lane number."""
        raise NotImplementedError

    async def fetch(self, block_ms: int) -> list[Entry]:
        raise NotImplementedError

    async def process(self, entries: list[Entry]) -> BatchResult:
        raise NotImplementedError

    async def give_up(self, failed: list[tuple[Entry, str]]) -> None:
        """Entries that cannot be processed, each failed alone: end them now, each on its own,
        so that nothing waits behind them. By default, a dead letter each (poison.lua); a stage
        may give them a final state instead."""
        await self.dead_letter(failed)

    def started_fields(self) -> dict[str, Any]:
        return {"partitions": self.settings.partitions}

    def stopped_fields(self) -> dict[str, Any]:
        return {"processed": self.processed}

    # --- the loop ---------------------------------------------------------------------
    async def run(self, drain: bool = False) -> int:
        """Work until stopped; with ``drain``, until no work is left. Returns entries processed.

        Outside drain mode, ``ORDERQ_WORKER_CONCURRENCY`` batches are kept in flight, so one
        batch's Python work overlaps another's script time in Redis (each loop reads its own
        entries from the consumer group; scripts keep every hand-off atomic)."""
        loops = self.loops = 1 if drain else self.settings.worker_concurrency
        if loops == 1:
            await self._loop(drain, 0)
        else:
            await asyncio.gather(*(self._loop(drain, i) for i in range(loops)))
        return self.processed

    async def _loop(self, drain: bool, index: int) -> None:
        errors = 0
        retry: list[Entry] = []  # a batch the server refused: tried again as it is, after the backoff
        while not self.stopping.is_set():
            if self.paused or (index and not self.behind):
                # Extra loops help only while the stage is behind; at low load they would
                # split the trickle into more, smaller round trips.
                await self.sleep(0.05 if self.paused else IDLE_LOOP_S)
                continue
            entries, retry = retry, []
            try:
                now = time.monotonic()
                if now >= self._next_prune:
                    await self.prune_consumers()
                # No sweep while batches fail on the server (out of memory, unreachable): the
                # refusals are not the entries' fault, and each sweep would count a delivery.
                # A refused batch is not left to the sweep either: it stays this worker's, and
                # is tried again until the server takes it (nothing new is read meanwhile).
                sweep = not entries and now >= self._next_reclaim and not self.server_failing
                if sweep:
                    entries = await self.reclaim()
                if not entries:
                    entries = await self.fetch(0 if drain else BLOCK_MS)
                    self.server_failing = False  # the server answers again
                    self.behind = len(entries) >= self.batch // 2
                    if entries and not drain and len(entries) < self.batch // 4:
                        # A trickle: wait a moment for more, so one round trip carries many orders.
                        await asyncio.sleep(LINGER_S)
                        entries += await self.fetch(0)
                if not entries:
                    if drain:
                        break
                    continue
                held = self._hold(entries)
                try:
                    await self._process(entries)
                except Exception as exc:
                    if _server_side(exc):
                        raise
                    await self._isolate(entries, exc)  # find the entries at fault; the others go on
                finally:
                    self._release(held)
                errors = 0
                self.server_failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.server_failing = _server_side(exc)
                if self.server_failing and entries:
                    retry = entries
                    for e in entries:  # part of the batch may have been applied
                        e.delivered_again = True
                if "NOGROUP" in str(exc):  # a stream or group was deleted under us: recreate, at id 0
                    await self._ensure_groups()
                delay = ERROR_BACKOFF_S[min(errors, len(ERROR_BACKOFF_S) - 1)]
                errors += 1
                self.log.warning(f"{self.stage}.batch_failed", error=_describe(exc)[:300], retry_in_s=delay)
                await self.sleep(delay)

    def _hold(self, entries: list[Entry]) -> list[tuple[set[str], str]]:
        held = []
        for e in entries:
            ids = self._busy.setdefault(e.stream, set())
            ids.add(e.id)
            held.append((ids, e.id))
        return held

    @staticmethod
    def _release(held: list[tuple[set[str], str]]) -> None:
        for ids, entry_id in held:
            ids.discard(entry_id)

    async def _isolate(self, entries: list[Entry], exc: Exception) -> None:
        """A batch failed, and not on the server (a payload that breaks a rule, a bug): process
        it again at once in halves, and the halves that fail in halves again, so its batch-mates
        go on now (a few calls for one poison entry among hundreds, not one per entry), and
        give up each entry that fails alone (a final state or a dead letter of its own, with
        its error) within this delivery.

        Raises (the loop backs off) when the fault looks like the stage's rather than an
        entry's: every entry of the batch failed alone, or a lone entry failed with no success
        since the last entry blamed. Those entries keep their error for the recovery sweep,
        which dead-letters them after ORDERQ_MAX_DELIVERIES."""
        for e in entries:
            e.delivered_again = True  # part of the batch may have been applied: redeliveries now
        failed: list[tuple[Entry, str]] = []
        went_on = 0
        if len(entries) == 1:
            failed.append((entries[0], _describe(exc)))
            blame = self._ok_since_blame
        else:
            went_on = await self._halves(entries, failed)
            blame = went_on > 0
        self.log.warning(
            f"{self.stage}.batch_isolated",
            count=len(entries),
            went_on=went_on,
            failed=len(failed),
            blamed=blame,
            error=_describe(exc)[:200],
        )
        if not blame:
            await self._record_failures(failed)
            raise exc
        await self._give_up(failed)

    async def _halves(self, entries: list[Entry], failed: list[tuple[Entry, str]]) -> int:
        """Process each half of ``entries`` (that failed together); split a half that fails
        again, down to single entries, which go to ``failed``. Returns the entries that went on."""
        mid = len(entries) // 2
        went_on = 0
        for half in (entries[:mid], entries[mid:]):
            try:
                await self._process(half, quiet=True)
                went_on += len(half)
            except Exception as exc:
                if _server_side(exc):
                    raise
                if len(half) == 1:
                    failed.append((half[0], _describe(exc)))
                else:
                    went_on += await self._halves(half, failed)
        return went_on

    async def _give_up(self, failed: list[tuple[Entry, str]]) -> None:
        self._ok_since_blame = False
        try:
            await self.give_up(failed)
        except Exception as exc:
            if _server_side(exc) or type(self).give_up is StreamWorker.give_up:
                raise
            # the stage's own way failed on the entry as well (e.g. its status record is not
            # a hash): a dead letter, which touches nothing of the order
            self.log.warning(f"{self.stage}.give_up_failed", error=_describe(exc)[:200])
            await self.dead_letter(failed)
        for entry, error in failed:
            self.log.warning(
                f"{self.stage}.unprocessable", entry_id=entry.id, order_key=_key_of(entry), error=error[:200]
            )

    async def dead_letter(self, failed: list[tuple[Entry, str]]) -> int:
        """Dead-letter ``failed`` now, each with its own error: one poison.lua call per stream."""
        by_stream: dict[tuple[keys.Partition, str], list[str]] = {}
        for e, error in failed:
            by_stream.setdefault((e.partition, e.stream), []).extend((e.id, error[:500]))

        def build(pipe: Any) -> None:
            for (p, stream), args in by_stream.items():
                self.r.script(pipe, "poison", [stream, p.dead, p.counters, p.errors], [self.group, *args])

        return sum(int(n) for n in await self.r.run(build)) if by_stream else 0

    async def _ensure_groups(self) -> None:
        try:
            await ensure_groups(self.r)
        except Exception as exc:
            self.log.warning("groups.ensure_failed", error=repr(exc))

    async def _process(self, entries: list[Entry], quiet: bool = False) -> None:
        t0 = time.perf_counter()
        result = await self.process(entries)
        self.processed += len(entries) - len(result.failed)
        if len(result.failed) < len(entries):
            self._ok_since_blame = True
        if result.failed:  # the entry's own fault for sure (its payload): given up at once
            await self._give_up(list(result.failed.values()))
        if self.debug:  # per-order lines only at DEBUG: at INFO, one canonical line per batch
            failed = {id(e): err for e, err in result.failed.values()}
            for e in entries:
                err = failed.get(id(e))
                self.log.debug(
                    f"{self.stage}.order",
                    order_key=_key_of(e),
                    entry_id=e.id,
                    outcome="unprocessable" if err else "done",
                    redelivered=e.delivered_again,
                    error=err[:200] if err else None,
                )
        if quiet:  # one entry of an isolated batch: _isolate logs one line for the batch
            return
        self.log.info(
            f"{self.stage}.batch",
            count=len(entries),
            failed=len(result.failed),
            duration_ms=round((time.perf_counter() - t0) * 1000, 2),
            **result.counts,
        )

    async def _record_failures(self, failed: list[tuple[Entry, str]]) -> None:
        """Keep the last error of entries left pending: a dead letter carries it. The hand-off
        script deletes it when the entry later goes through (``clear_errors``)."""
        # Field "<stream>|<id>": entries of different streams of a partition can share an id.
        await self.r.run(
            lambda pipe: [pipe.hset(e.partition.errors, f"{e.stream}|{e.id}", err[:500]) for e, err in failed]
        )
        for entry, error in failed:
            self.log.warning(
                f"{self.stage}.entry_failed", entry_id=entry.id, order_key=_key_of(entry), error=error[:200]
            )

    async def reclaim(self) -> list[Entry]:
        """Claim entries idle past the lease (dead or stuck workers); dead-letter poison ones."""
        s = self.settings
        self._next_reclaim = time.monotonic() + max(0.2, min(2.0, s.claim_idle_ms / 2000))
        targets = [(p, stream, lane) for p in self.r.partitions for stream, lane in self.streams_of(p)]

        def build(pipe: Any) -> None:
            for p, stream, _lane in targets:
                self.r.script(
                    pipe,
                    "reclaim",
                    [stream, p.dead, p.counters, p.errors],
                    [
                        self.group,
                        self.consumer,
                        s.claim_idle_ms,
                        s.max_deliveries,
                        RECLAIM_LIMIT,
                        s.max_deliveries * CRASH_LOOP_FACTOR,
                        *self._busy.get(stream, ()),
                    ],
                )

        results = await self.r.run(build)
        entries: list[Entry] = []
        dead = 0
        for (p, stream, lane), (claimed, n_dead, _cursor) in zip(targets, results, strict=True):
            dead += int(n_dead)
            for entry_id, flat in claimed:
                entries.append(Entry(p, stream, entry_id.decode(), _pairs(flat), lane, delivered_again=True))
        if entries or dead:
            self.log.warning(f"{self.stage}.reclaimed", claimed=len(entries), dead_lettered=dead)
        return entries

    async def prune_consumers(self) -> int:
        """Delete consumers (one per process ever started) idle for an hour with nothing pending."""
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        streams = [stream for p in self.r.partitions for stream, _ in self.streams_of(p)]
        infos = await self.r.run(
            lambda pipe: [pipe.xinfo_consumers(s, self.group) for s in streams], raise_on_error=False
        )
        stale = []
        for stream, info in zip(streams, infos, strict=True):
            if isinstance(info, Exception):
                continue
            for c in info:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if c["pending"] == 0 and c["idle"] > PRUNE_IDLE_MS and name != self.consumer:
                    stale.append((stream, name))
        if stale:
            await self.r.run(lambda pipe: [pipe.xgroup_delconsumer(s, self.group, n) for s, n in stale])
            self.log.info(f"{self.stage}.consumers_pruned", count=len(stale))
        return len(stale)


def _server_side(exc: BaseException) -> bool:
    """Redis refused or could not be reached (or this process is out of memory): no entry of
    the batch is at fault."""
    if isinstance(exc, SERVER_SIDE):
        return True
    text = str(exc).rpartition("of pipeline caused error: ")[2]  # (redis-py's prefix in a pipeline)
    # NOGROUP: a stream or its group deleted under the worker (recreated, see _loop)
    return text.startswith(("OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN")) or any(
        part in text for part in ("OOM command not allowed", "NOGROUP")
    )


SERVER_SIDE: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    OSError,
    MemoryError,
    RedisConnectionError,  # BusyLoadingError, MaxClientsReachedError, AuthenticationError too
    RedisTimeoutError,
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    NoPermissionError,
    TryAgainError,
    ClusterError,  # ClusterDownError, MasterDownError
    RedisClusterException,  # the cluster client's own: slots not covered, unreachable
)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _key_of(e: Entry) -> str:
    return e.get(b"k").decode(errors="replace")


def clear_errors(entries: list[Entry]) -> str:
    """The ids of ``entries`` that may have an error record (every one delivered before), for
    the hand-off script to delete when they go through: ``""`` on a first delivery, which has
    none (no work for the script on the normal path)."""
    return " ".join(e.id for e in entries if e.delivered_again)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))


def parse_read(reply: Any, by_stream: dict[bytes, tuple[keys.Partition, int]]) -> list[Entry]:
    """Turn an XREADGROUP reply (RESP2 list form) into entries."""
    out: list[Entry] = []
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, messages in items:
        p, lane = by_stream[stream]
        if messages and isinstance(messages[0], list) and messages and not isinstance(messages[0][0], bytes):
            messages = messages[0]
        for entry_id, fields in messages:
            if fields is None:  # deleted while pending
                continue
            out.append(
                Entry(
                    p, stream.decode(), entry_id.decode(), fields if isinstance(fields, dict) else _pairs(fields), lane
                )
            )
    return out
