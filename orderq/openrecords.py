"""Ledger records kept open as long as their order waits.

The validation ledger remembers each order's decision (checks.lua) and route (route.lua), so an
order that passes the script again gets its first answer back and holds nothing twice. Those
records live in hour buckets with a TTL (``keys.LEDGER_REPLAY_TTL_S``, a day: a redelivery
comes within a lease). An order may wait much longer between the script and the step that
moves it on — a dead letter replayed next week, a region hold, a stage down after a crash —
so until that step its record is also kept *open*, in a hash without TTL
(``keys.DECIDED_OPEN_KEY``, ``keys.ROUTED_OPEN_KEY``), where the script looks for the orders
older than half the buckets' TTL (a younger order's record is in its bucket still).

The step that moves an order on (the hand-off, the execute script) runs in the order's
partition slot, the ledger in its own: no script does both. So the worker reports the orders
that moved on (:meth:`OpenRecords.done`) and its next ledger script call closes them (deletes
their open records) along with its own work, no round trip of its own. What a worker left
open when it stopped, and orders that left their wait another way (a discard), are found by
a sweep, one page per script call every ``SWEEP_S``: an open record whose order's status
record is gone, or past the states in which the script may see the order again, is closed.
Memory follows the orders that wait, plus the last batch of each worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import structlog

from orderq.client import Redis
from orderq.wire import Field

log = structlog.get_logger("orderq.ledger")

SWEEP_S = 300.0  # a pass over the open records, per process, this often
SWEEP_PAGE = 500  # records looked at per script call while a pass is under way


class OpenRecords:
    """One worker's side of one open-records hash: what to close, and the sweep."""

    def __init__(self, key: str, waiting: frozenset[str]) -> None:
        self.key = key
        self.waiting = waiting  # statuses in which the order may pass the script again
        self._closing: list[str] = []
        self._next_sweep = 0.0  # the first call sweeps: a restart is when a worker left some open
        self._cursor = 0

    def done(self, order_keys: Iterable[str]) -> None:
        """These orders moved on: close their records with the next script call."""
        self._closing.extend(order_keys)

    def take(self) -> list[str]:
        """The order keys to close, for the script call about to be made."""
        out, self._closing = self._closing, []
        return out

    def give_back(self, order_keys: list[str]) -> None:
        """The call that carried ``order_keys`` failed: close them with the next one."""
        self._closing[:0] = order_keys

    async def sweep(self, r: Redis, force: bool = False) -> int:
        """When a pass is due (or under way): one page of the hash; closes the records of orders
        that no longer wait. Returns how many it closed. Never raises (but a cancel): the batch
        whose script call it precedes must not fail for it (a server that fails it fails the
        call anyway)."""
        now = time.monotonic()
        if now < self._next_sweep and not force:
            return 0
        try:
            return await self._page(r, now)
        except Exception as exc:
            self._next_sweep, self._cursor = now + SWEEP_S, 0
            log.warning("ledger.open_sweep_failed", key=self.key, error=repr(exc)[:300])
            return 0

    async def _page(self, r: Redis, now: float) -> int:
        cursor, page = await r.client.hscan(self.key, self._cursor, count=SWEEP_PAGE)
        self._cursor = int(cursor)
        if self._cursor == 0:
            self._next_sweep = now + SWEEP_S
        names = list(page)
        if not names:
            return 0
        records = [r.partition_of(text).status(text) for text in (k.decode(errors="replace") for k in names)]
        found = await r.run(lambda pipe: [pipe.hget(rec, Field.STATUS) for rec in records])
        stale = [k for k, st in zip(names, found, strict=True) if st is None or st.decode() not in self.waiting]
        if stale:
            await r.client.hdel(self.key, *stale)
            log.info("ledger.open_closed", key=self.key, closed=len(stale))
        return len(stale)
