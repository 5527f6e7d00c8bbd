"""What every platform adapter shares: the call with its retries and backoff, the reading of an
offset-paged window from its last page back, and the order as the poller gets it."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import httpx
import structlog

from connect.config import Connector
from connect.errors import GiveUp, Retry

log = structlog.get_logger("orderq.connect")
T = TypeVar("T")

CALL_TRIES = 8  # a call throttled or failing this many times in a row: the window is read again later
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # without a Retry-After, with jitter
STABLE_TRIES = 4  # passes over a window whose total keeps growing before it is split
BEIJING = dt.timezone(dt.timedelta(hours=8))


class SplitWindow(Exception):
    """The window holds more than the platform lets one query page through: read it in halves."""


OPEN, CLOSED, WAITING = "open", "closed", "waiting"


@dataclass(slots=True)
class Fetched:
    """One platform order: its id, its platform status and what that means here (``open``: paid,
    to be queued; ``closed``: cancelled, refunded or closed; ``waiting``: not paid yet, it comes
    back modified when it is), its modification time and the payload the channel's mapping reads."""

    order_id: str
    status: str
    kind: str
    modified_ms: int
    payload: dict[str, Any]


class Adapter:
    platform: ClassVar[str] = ""
    url: ClassVar[str] = ""  # the platform's production endpoint
    max_window_s: ClassVar[float] = 24 * 3600.0  # the platform's limit on one query's time range
    window_s: ClassVar[float] = 1800.0  # what the platform recommends
    lag_s: ClassVar[float] = 0.0  # how far behind the platform's clock a window must end
    page_size: ClassVar[int] = 100
    max_page_size: ClassVar[int] = 100
    credentials: ClassVar[tuple[str, ...]] = ()
    open_statuses: ClassVar[frozenset[str]] = frozenset()
    closed_statuses: ClassVar[frozenset[str]] = frozenset()
    DETAIL_IN_FLIGHT: ClassVar[int] = 16  # detail calls at once (a throttled one backs off alone)

    def fresh(self, f: Fetched) -> bool:
        """True unless this very version of the order was queued by this process already."""
        return self.known.get(f.order_id) != f.modified_ms

    def kind_of(self, status: str) -> str:
        if status in self.closed_statuses:
            return CLOSED
        return OPEN if status in self.open_statuses else WAITING

    def __init__(self, connector: Connector, http: httpx.AsyncClient) -> None:
        self.connector = connector
        self.spec = connector.spec
        self.secrets = connector.secrets
        self.http = http
        self.endpoint = connector.spec.url or self.url
        self.size = min(connector.spec.page_size or self.page_size, self.max_page_size)
        self.retries = 0  # calls retried since the poller last read the counter
        self.pages = 0
        self.stopping = asyncio.Event()  # the poller's: a stop cuts a backoff short (the window is read again)
        # order id -> modification time (ms) of the version this process already queued: the
        # overlap's re-reads of an unchanged order need no detail call (see ``fresh``)
        self.known: dict[str, int] = {}

    # --- what each platform supplies ---------------------------------------------------------
    async def read(self, start: dt.datetime, end: dt.datetime) -> list[Fetched]:
        """Every order modified in [start, end), with what its mapping needs."""
        raise NotImplementedError

    # --- shared --------------------------------------------------------------------------------
    async def call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn`` with retries on throttling and transient faults; :class:`GiveUp` at once."""
        for attempt in range(CALL_TRIES):
            try:
                return await fn()
            except GiveUp:
                raise
            except Retry as exc:
                if attempt == CALL_TRIES - 1:
                    raise
                self.retries += 1
                base = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                wait = exc.wait_s if exc.wait_s is not None else base * (0.5 + random.random())
                log.info("connect.retry", connector=self.connector.name, call=what, reason=exc.reason, wait_s=wait)
                try:
                    await asyncio.wait_for(self.stopping.wait(), wait)
                except TimeoutError:
                    continue
                raise Retry(f"stopped while backing off from {exc.reason}", "stopping") from None
        raise AssertionError("unreachable")

    async def paged_from_last(
        self, fetch: Callable[[int], Awaitable[tuple[list[dict[str, Any]], int]]], first_page: int, id_of: Any
    ) -> list[dict[str, Any]]:
        """An offset-paged window read from its last page back to its first, then its first page
        again. An order modified while the window is read leaves the window and shifts the ones
        behind it toward the pages not read yet, so reading backwards skips none. A late write
        into the window shifts them the other way: the total grows, and the window is read again
        (the intake takes the repeats as duplicates). A late write and a modified order together
        leave the total as it was: the poller reads a window again until it is past the overlap,
        where no late write lands (Poller.poll), and reads it once more then."""
        for _ in range(STABLE_TRIES):
            items, total = await fetch(first_page)
            seen = {id_of(x): x for x in items}
            pages = max(1, math.ceil(total / self.size))
            for p in range(first_page + pages - 1, first_page, -1):
                got, _ = await fetch(p)
                seen.update((id_of(x), x) for x in got)
            again, total_after = await fetch(first_page)
            seen.update((id_of(x), x) for x in again)
            self.pages += pages + 1
            if total_after <= total:
                return list(seen.values())
            log.info("connect.window_changed", connector=self.connector.name, before=total, after=total_after)
        raise SplitWindow(f"the window kept growing while read ({STABLE_TRIES} passes)")


async def gather_limited(n: int, calls: list[Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(n)

    async def one(c: Awaitable[T]) -> T:
        async with gate:
            return await c

    return list(await asyncio.gather(*(one(c) for c in calls)))


def obj(value: Any) -> dict[str, Any]:
    """A JSON object of a platform's answer; anything else is a garbled answer, tried again."""
    if not isinstance(value, dict):
        raise Retry(f"expected a JSON object, got {type(value).__name__}", "body")
    return value


def beijing(t: dt.datetime) -> str:
    """The ``yyyy-MM-dd HH:mm:ss`` Beijing time of the Chinese platforms' parameters."""
    return t.astimezone(BEIJING).strftime("%Y-%m-%d %H:%M:%S")


def beijing_ms(text: str) -> int:
    t = dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=BEIJING)
    return int(t.timestamp() * 1000)


def give_up_or_retry(code: str, reason: str, retry_codes: frozenset[str], wait_s: float | None = None) -> Exception:
    """A platform error code inside a 200 answer, as the exception the poller acts on."""
    if code in retry_codes:
        return Retry(reason, code, wait_s)
    return GiveUp(reason, code)
