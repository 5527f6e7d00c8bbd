"""One connector's loop: hold its lease, walk the platform's incremental API window by window
on modification time from the cursor (less the overlap, for the platform's late writes), queue
every order of a window through the intake, and only then move the cursor past the window.
A crash, a lost lease or a refusal re-reads the window; nothing is ever skipped."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog

from connect.adapters import adapter_for
from connect.adapters.base import CLOSED, OPEN, Adapter, Fetched, SplitWindow
from connect.config import Connector
from connect.errors import GiveUp, Retry
from connect.http import client as http_client
from connect.orders import map_payload
from connect.state import ConnectorState, Lease, now_ms
from orderq import lifecycle
from orderq.client import Redis

if TYPE_CHECKING:
    from orderq.intake import Intake

log = structlog.get_logger("orderq.connect")

FIRST_LOOKBACK_S = 24 * 3600  # a new connector without `start` begins a day back
BATCH = 1000  # orders per intake call
REFUSED_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)  # the intake sheds or Redis is unreachable
ERROR_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # a window that failed: read again after this
GIVE_UP_PAUSE_S = 60.0  # a refused call (credentials, signature) is tried again after this at least
MIN_WINDOW_MS = 1000  # a window that cannot be split further (the platforms' times are in seconds)
KNOWN_MAX = 200_000  # order versions remembered as queued (the overlap's re-reads skip them); then forgotten


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


class Poller:
    def __init__(
        self, connector: Connector, intake: Intake, channels: tuple[str, ...], stopping: asyncio.Event
    ) -> None:
        self.c = connector
        self.spec = connector.spec
        self.intake = intake
        self.channels = channels
        self.stopping = stopping
        self.client: Any = intake.redis.client
        self.state = ConnectorState(self.client, connector.name)
        self.lease = Lease(self.client, self.state.lease_key, connector.spec.lease_s)
        self.cls = adapter_for(connector.spec.platform)
        self.window_ms = int(min(self.spec.window_s or self.cls.window_s, self.cls.max_window_s) * 1000)
        self.lag_ms = int((self.spec.lag_s if self.spec.lag_s is not None else self.cls.lag_s) * 1000)
        self.overlap_ms = int(self.spec.overlap_s * 1000)
        self.log = log.bind(connector=connector.name, platform=connector.spec.platform)
        self.known: dict[str, int] = {}

    async def run(self) -> None:
        await self.state.register(self.spec.platform, self.spec.shop, self.c.channel)
        done = asyncio.Event()  # the lease is renewed until the window in hand is queued, stop or not
        keeper = asyncio.create_task(self.lease.keep(done))
        errors = 0
        try:
            async with http_client() as http:
                adapter = self.cls(self.c, http)
                adapter.stopping = self.stopping
                self.known = adapter.known
                listed = time.monotonic()
                while not self.stopping.is_set():
                    if not self.lease.held:  # another process polls this connector; take over when it stops
                        await self._sleep(self.lease.ttl_ms / 3000)
                        continue
                    try:
                        if time.monotonic() - listed > self.lease.ttl_ms / 1000:
                            await self.state.listed()  # its holder keeps it listed (state.configured)
                            listed = time.monotonic()
                        caught_up = await self.poll(adapter)
                        errors = 0
                    except GiveUp as exc:
                        await self._failed(exc, f"{exc.code} {exc.reason}")
                        await self._sleep(max(self.spec.every_s, GIVE_UP_PAUSE_S))
                        continue
                    except Exception as exc:  # Retry exhausted, Redis, a bug: the window is read again
                        await self._failed(exc, f"{type(exc).__name__}: {exc}")
                        await self._sleep(ERROR_BACKOFF_S[min(errors, len(ERROR_BACKOFF_S) - 1)])
                        errors += 1
                        continue
                    finally:
                        await self._flush_adapter_counts(adapter)
                    if caught_up:
                        await self._sleep(self.spec.every_s)
        finally:
            done.set()
            await asyncio.gather(keeper, return_exceptions=True)
            await self.lease.release()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _failed(self, exc: BaseException, reason: str) -> None:
        self.log.warning("connect.poll_failed", error=reason[:300])
        await self.state.error(reason)

    async def _flush_adapter_counts(self, adapter: Adapter) -> None:
        retries, pages, adapter.retries, adapter.pages = adapter.retries, adapter.pages, 0, 0
        try:
            await self.state.count(retries=retries, pages=pages)
        except Exception as exc:
            self.log.warning("connect.state_unwritable", error=repr(exc)[:200])

    async def poll(self, adapter: Adapter) -> bool:
        """Read from the cursor (less the overlap) up to the platform's clock (less its lag), one
        window at a time; True once caught up."""
        cursor = await self.state.cursor()
        if cursor is None:
            first = (
                self.spec.start.timestamp() * 1000 if self.spec.start else time.time() * 1000 - FIRST_LOOKBACK_S * 1000
            )
            cursor = int(first) // 1000 * 1000
        # The platforms' times are whole seconds, and a window ends a whole second before the
        # current one: an order modified while the window is read then always leaves it (its new
        # time is past the end) and never moves up inside it, which would shift an order across a
        # page boundary into a page read already (paged_from_last counts on orders leaving).
        limit = (now_ms() - self.lag_ms) // 1000 * 1000 - 1000
        # A late write shows up at most the overlap after its modification time (what the
        # overlap is for), inside a window being paged: it pushes the older orders down the
        # pages, and one may cross into a page read already. Only the overlap is read again, so
        # no window straddles ``settled``: what lies before it gets no late write any more and is
        # read whole here, the newer part again by the next polls until it is settled too (each
        # poll settles from the last one's line to its own: every instant is read settled once).
        settled = (limit - self.overlap_ms) // 1000 * 1000
        t = max(0, cursor - self.overlap_ms)
        while t < limit:
            if self.stopping.is_set() or not self.lease.held:
                return False
            end = min(t + self.window_ms, limit)
            if t < settled < end:
                end = settled
            await self.window(adapter, t, end)
            if end > cursor:
                if not await self.state.advance(self.lease, end):
                    self.lease.held = False
                    self.log.warning("connect.lease_lost_before_advance", window_end=end)
                    return False
                cursor = end
            t = end
        return True

    async def window(self, adapter: Adapter, start: int, end: int) -> None:
        try:
            fetched = await adapter.read(_utc(start), _utc(end))
        except SplitWindow as exc:
            if end - start <= MIN_WINDOW_MS:
                raise Retry(str(exc), "unsplittable") from None
            mid = (start + (end - start) // 2) // 1000 * 1000 or start + MIN_WINDOW_MS
            self.log.info("connect.window_split", start=start, end=end, reason=str(exc))
            await self.window(adapter, start, mid)
            await self.window(adapter, mid, end)
            return
        await self.queue(fetched)

    async def queue(self, fetched: Sequence[Fetched]) -> None:
        """Queue every open order of a window; returns once each is accepted or a duplicate."""
        orders = []
        invalid = 0
        closed: dict[str, str] = {}
        versions = []
        for f in fetched:
            key = f"{self.c.channel}:{f.order_id}"
            if self.known.get(f.order_id) == f.modified_ms:
                continue  # this version is queued (or recorded closed) already: an overlap re-read
            if f.kind == CLOSED:
                closed[key] = f.status
                versions.append(f)
            if f.kind != OPEN:
                continue
            checked = map_payload(self.c.mapping, f.payload, self.channels)
            if checked.order is None:  # it would fail the same way again: counted and reported, not retried
                invalid += 1
                detail = "; ".join(f"{d.path}: {d.message}" for d in checked.errors)[:300]
                self.log.warning("connect.order_invalid", order_key=key, errors=detail)
                await self.state.error(f"{key} does not map to a valid order: {detail}")
                continue
            orders.append(checked.order)
            versions.append(f)
        counts = {"accepted": 0, "duplicate": 0}
        for i in range(0, len(orders), BATCH):
            for outcome, n in (await self._submit(orders[i : i + BATCH])).items():
                counts[outcome] = counts.get(outcome, 0) + n
        new_closed = await order_closed(self.intake.redis, self.state, closed)
        await self.state.count(windows=1, invalid=invalid, closed=new_closed, **counts)
        if len(self.known) > KNOWN_MAX:  # forgetting only costs a detail call and a duplicate
            self.known.clear()
        for f in versions:  # every one is queued or recorded now (a refusal raised before this)
            self.known[f.order_id] = f.modified_ms
        self.log.info("connect.window", orders=len(fetched), invalid=invalid, closed=len(closed), **counts)

    async def _submit(self, orders: list[Any]) -> dict[str, int]:
        from orderq.intake import Outcome

        counts: dict[str, int] = {}
        tries = 0
        while orders:
            outcomes = await self.intake.submit(orders)
            again = []
            for order, outcome in zip(orders, outcomes, strict=True):
                if outcome in (Outcome.SHED, Outcome.UNAVAILABLE):
                    again.append(order)
                else:
                    counts[str(outcome)] = counts.get(str(outcome), 0) + 1
            orders = again
            if orders:
                if self.stopping.is_set():  # the cursor stays: the next process re-reads the window
                    raise Retry(f"{len(orders)} orders not queued at stop", "stopping")
                wait = REFUSED_BACKOFF_S[min(tries, len(REFUSED_BACKOFF_S) - 1)] * (0.5 + random.random())
                self.log.info("connect.intake_refused", orders=len(orders), retry_in_s=round(wait, 2))
                await self._sleep(wait)
                tries += 1
        return counts


async def order_closed(r: Redis, state: ConnectorState, closed: dict[str, str]) -> int:
    """Orders the platform reports cancelled, refunded or closed are never queued: each goes
    the cancellation path of contract §5 (an order queued before is cancelled or intercepted;
    one never seen is kept as a pending cancel, so a later push of it ends cancelled), then is
    recorded (order key -> platform status, in the connector's ``closed`` hash). Cancelling
    comes first and is repeated on every re-read: a repeat changes nothing, and a crash
    between the two steps cannot lose the cancel. Returns how many were not recorded before."""
    for key, status in closed.items():
        outcome = await lifecycle.cancel(r, key, cancel_reason(status), f"platform status {status}")
        # per order, and again on every re-read of the overlap: debug; the window line counts them
        log.debug("connect.order_closed", order_key=key, status=status, outcome=outcome.value)
    return await state.closed(closed)


def cancel_reason(status: str) -> str:
    """A platform's closing status -> the contract's cancel reason."""
    s = status.lower()
    if "refund" in s or s == "trade_closed":  # Taobao: closed after payment = refunded
        return "refund"
    if "cancel" in s or "close" in s:
        return "buyer_cancelled"
    return "other"
