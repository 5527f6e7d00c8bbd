"""The one way an order enters orderq: shed or queue it, durably, exactly once per order key.

Every way in calls this: the ingress's HTTP routes (single, batch, channel formats, the
Shopify webhook) over the ingress's own Redis client and committer, and the callers outside
the ingress (pull connectors, file import) through :meth:`Intake.open`. So a queued order is
the same record whichever way it came: the same intake script, the same group commit, the
same ``WAITAOF``/``WAIT`` per ``ORDERQ_DURABILITY``/``ORDERQ_WAIT_REPLICAS``, the same
counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Sequence
from enum import StrEnum
from typing import NamedTuple

from orderq import client as oq_client
from orderq import keys, metrics
from orderq.client import UNAVAILABLE, Redis
from orderq.committer import Committer
from orderq.control import Control
from orderq.errors import ServerUnavailable
from orderq.schema import Order, pack
from orderq.settings import Settings


class Outcome(StrEnum):
    """What became of one submitted order."""

    ACCEPTED = "accepted"  # queued now, durably
    DUPLICATE = "duplicate"  # its order key was queued before (or earlier in the same call)
    SHED = "shed"  # refused: the breaker sheds this order's tier; nothing written
    UNAVAILABLE = "unavailable"  # Redis did not confirm the write: in doubt, submit it again later


class Commit(NamedTuple):
    """The outcomes of one call, in input order, and why Redis did not confirm (None: it did)."""

    outcomes: list[Outcome]
    error: ServerUnavailable | None


_UTC = dt.timedelta(0)


class Intake:
    """Sheds and queues orders; see :meth:`submit`."""

    def __init__(self, redis: Redis, committer: Committer, control: Control, *, owned: bool = False) -> None:
        self.redis = redis
        self.committer = committer
        self.control = control
        self.shed_vip_depth = redis.settings.shed_vip_depth
        self._owned = owned  # opened by :meth:`open`: close() closes the clients too

    @classmethod
    async def open(cls, settings: Settings) -> Intake:
        """An intake with its own Redis client, committer and view of the breaker, for a caller
        outside the ingress. :meth:`close` it when done."""
        r = await oq_client.connect(settings)
        try:
            control = await Control(r).start()
        except BaseException:
            await r.close()
            raise
        return cls(r, Committer(r), control, owned=True)

    async def close(self) -> None:
        """Waits for the writes under way; closes the clients if :meth:`open` made them."""
        await self.committer.close()
        if self._owned:
            with contextlib.suppress(Exception):  # its per-channel counts: the process may end now
                await metrics.flush(self.redis)
            await self.control.stop()
            await self.redis.close()

    # --- one order (the ingress's single-order path: no list, no extra await) -----------------
    def sheds(self, order: Order) -> bool:
        """True when the breaker sheds ``order``: it is shedding and the order is not VIP, or the
        backlog has passed ``ORDERQ_SHED_VIP_DEPTH``, where VIP orders are shed too."""
        c = self.control
        if c.stage != "shedding":
            return False
        return order.customer.tier != "vip" or c.backlog >= self.shed_vip_depth

    def queue(self, order: Order) -> asyncio.Future[int]:
        """Queue one order that is not shed (see :meth:`sheds`) with the next group commit. The
        future gives 1 (queued) or 0 (its key is known: a duplicate), or raises
        :class:`ServerUnavailable` (in doubt)."""
        return self.committer.submit(order.key, pack(order), order.customer.tier)

    async def count(self, field: str, n: int = 1) -> None:
        """Add ``n`` to a global counter (``shed``, ``invalid``, ``duplicates``); a counter is not
        worth failing a request for, so an unreachable Redis skips it."""
        try:
            await self.redis.client.hincrby(keys.COUNTERS_GLOBAL, field, n)
        except UNAVAILABLE:
            pass

    async def count_many(self, counts: dict[str, int]) -> None:
        """:meth:`count` of several counters in one round trip; zero counts are left out."""
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return
        try:
            pipe = self.redis.client.pipeline(transaction=False)
            for k, v in counts.items():
                pipe.hincrby(keys.COUNTERS_GLOBAL, k, v)
            await pipe.execute()
        except UNAVAILABLE:
            pass

    # --- many orders ----------------------------------------------------------------------
    async def submit(self, orders: Sequence[Order]) -> list[Outcome]:
        """Shed or queue ``orders`` in one group commit; their outcomes in input order.

        The orders must have passed the schema (decoded by :mod:`orderq.schema`'s decoders or
        ``msgspec.convert``: a Struct built by hand skips its constraints) on a channel of
        ``ORDERQ_CHANNELS``. A key repeated within the call is a duplicate of its first
        occurrence. ``ACCEPTED`` and ``DUPLICATE`` are durable per ``ORDERQ_DURABILITY`` before
        this returns; ``UNAVAILABLE`` orders are in doubt and are to be submitted again (the
        resubmission of one that was in fact written is a ``DUPLICATE``)."""
        for order in orders:
            created = order.created_at
            if created.utcoffset() != _UTC:  # the stages read created_at as UTC
                order.created_at = created.astimezone(dt.UTC)
        return (await self.commit(orders)).outcomes

    async def commit(self, orders: Sequence[Order], *, refused: dict[str, int] | None = None) -> Commit:
        """:meth:`submit` for orders already normalised (:func:`orderq.schema.normalise`), with why
        Redis did not confirm. ``refused``: counters of the same request's orders refused before
        intake (``invalid``), added in the same round trip as this call's own."""
        outcomes: list[Outcome] = []
        pending: list[tuple[int, asyncio.Future[int]]] = []
        seen: set[str] = set()
        n_dup = n_shed = 0
        unsent: list[tuple[str, str]] = []  # (channel, outcome) of the orders that never reach Redis
        for order in orders:
            key = order.key
            if key in seen:
                n_dup += 1
                outcomes.append(Outcome.DUPLICATE)
                unsent.append((order.channel, "duplicate"))
                continue
            seen.add(key)
            if self.sheds(order):
                n_shed += 1
                outcomes.append(Outcome.SHED)
                unsent.append((order.channel, "shed"))
                continue
            outcomes.append(Outcome.ACCEPTED)
            pending.append((len(outcomes) - 1, self.queue(order)))
        if pending:
            flags = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        else:
            flags = []
        error: ServerUnavailable | None = None
        by_channel = metrics.CHANNEL_ORDERS
        for (i, _), flag in zip(pending, flags, strict=True):
            if isinstance(flag, BaseException):
                if error is None:
                    error = flag if isinstance(flag, ServerUnavailable) else ServerUnavailable(str(flag))
                outcomes[i] = Outcome.UNAVAILABLE
                continue
            if not flag:
                outcomes[i] = Outcome.DUPLICATE
            by_channel.inc(orders[i].channel, "accepted" if flag else "duplicate")  # as the script counted it
        if error is None:
            # Keys repeated within the call never reach Redis (the intake script counts the
            # other duplicates and the accepted orders). A call Redis did not confirm is
            # submitted again whole, so its counters wait for that.
            await self.count_many({**(refused or {}), "shed": n_shed, "duplicates": n_dup})
            for channel, outcome in unsent:
                by_channel.inc(channel, outcome)
        return Commit(outcomes, error)
