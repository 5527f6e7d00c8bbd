"""``orderq bench --cancel-share``: cancels a share of the acknowledged orders at random moments
while a phase runs (contract §5, ``POST /v1/orders/{channel}/{order_id}/cancel``), then checks
every cancelled order and the stock.

Each acknowledged order is drawn with probability ``share``; its cancel goes out at one of
three moments, picked at random: as soon as the ack is read (before validation, mostly), a
random 0-250 ms later (queued under load; at a light load often already executed) or 1-3 s
later (executed: an interception). An order whose cancel answers ``intercepting`` waits for
the warehouse: the bench's instance delivers ``wms.intercept`` to no warehouse, so the bench
answers as the warehouse's system would, posting the ``intercepted`` event (source ``wms``,
admin token) right away; the order then ends ``cancelled`` and its stock is released.

Requests go on their own small pool of raw keep-alive connections (:mod:`loadtest.connection`),
built as bytes per cancel: a few microseconds each, beside the orders' load generator.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import msgspec

from loadtest.connection import HttpConnection, open_connections, send
from orderq import client as oq_client
from orderq.wire import Field

CANCEL_CONNECTIONS = 16  # the cancels' own pool: a cancel never waits behind the orders' load
# moment -> (least, most) seconds after the ack, drawn uniformly
MOMENTS: dict[str, tuple[float, float]] = {"at_ack": (0.0, 0.0), "soon": (0.0, 0.25), "late": (1.0, 3.0)}
ATTEMPTS = 4  # a cancel (idempotent: a repeat answers the same) is sent again on no answer, 429, 5xx
RETRY_S = 0.5
REASON = b'{"reason":"buyer_cancelled","note":"orderq bench"}'
INTERCEPTED = b'{"source":"wms","status":"intercepted"}'
# What a cancel led to, as the report counts it: cancelled (200), intercepted (202 intercepting,
# then the warehouse's intercepted event taken), pending (202 cancel_pending: the cancel overtook
# its order), too_late (409: shipped), not_cancellable (409: rejected), error (no usable answer)
OUTCOMES = ("cancelled", "intercepted", "pending", "too_late", "not_cancellable", "error")
ENDS_CANCELLED = frozenset({"cancelled", "intercepted", "pending"})
CORE_ACTIONS = tuple(Field.ACTION.encode() + a for a in (b"wms.pick", b"notify.sms", b"invoice.request"))
AFTER_SHIPMENT = Field.ACTION.encode() + b"channel.ship_sync"
EXAMPLES = 10
STOCK_RECHECK_S = 1.0  # a stage that skipped a cancelled entry settles its release just after


class CancelAnswer(msgspec.Struct):
    status: str = ""


class ErrorBody(msgspec.Struct):
    code: str = ""


class ErrorAnswer(msgspec.Struct):
    error: ErrorBody = msgspec.field(default_factory=ErrorBody)


_cancel_answer = msgspec.json.Decoder(CancelAnswer)
_error_answer = msgspec.json.Decoder(ErrorAnswer)


class Canceller:
    """One phase's cancels: :meth:`on_ack` draws each acknowledged order; a scheduler sends
    the drawn ones when due; :meth:`finish` waits for the last and gives the phase's figures.
    ``answers`` (order key -> (moment, outcome)) collects every phase's, for :func:`check`."""

    def __init__(
        self,
        share: float,
        host: str,
        port: int,
        tokens: Mapping[str, str] | None,  # channel -> token (None: auth off)
        admin_token: str | None,
        answers: dict[str, tuple[str, str]],
        seed: int = 618,
    ) -> None:
        self.share = share
        self.host = host
        self.port = port
        self.tokens = tokens
        self.admin_token = admin_token
        self.answers = answers
        self.rnd = random.Random(seed)
        self.moments = list(MOMENTS)
        self.due: list[tuple[float, int, str, str]] = []  # heap of (due, seq, key, moment)
        self.seq = itertools.count()
        self.outcomes: Counter[str] = Counter()
        self.by_moment: dict[str, Counter[str]] = {m: Counter() for m in MOMENTS}
        self.intercept_events = 0
        self.conns: list[HttpConnection] = []
        self.free: asyncio.Queue[int] = asyncio.Queue()  # connections not in use
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake: asyncio.Future[None] | None = None
        self.closing = False
        self.scheduler: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.conns = await open_connections(self.host, self.port, CANCEL_CONNECTIONS)
        for i in range(len(self.conns)):
            self.free.put_nowait(i)
        self.scheduler = asyncio.create_task(self._schedule())

    def on_ack(self, key: str) -> None:
        """An order was acknowledged: draw it, and schedule its cancel at a random moment."""
        rnd = self.rnd.random
        if rnd() >= self.share:
            return
        moment = self.moments[int(rnd() * len(self.moments))]
        lo, hi = MOMENTS[moment]
        at = time.perf_counter() + lo + (hi - lo) * rnd()
        heapq.heappush(self.due, (at, next(self.seq), key, moment))
        if self.due[0][2] == key:
            self._poke()

    def _poke(self, _: object = None) -> None:
        if self.wake is not None and not self.wake.done():
            self.wake.set_result(None)

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while self.due or not self.closing:
            now = time.perf_counter()
            if self.due and self.due[0][0] <= now:
                _, _, key, moment = heapq.heappop(self.due)
                i = await self.free.get()
                task = loop.create_task(self._one(i, key, moment))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                continue
            self.wake = loop.create_future()
            timer = loop.call_later(self.due[0][0] - now, self._poke) if self.due else None
            await self.wake
            if timer is not None:
                timer.cancel()

    async def _one(self, i: int, key: str, moment: str) -> None:
        try:
            outcome = await self._cancel(i, key)
        finally:
            self.free.put_nowait(i)
        self.outcomes[outcome] += 1
        self.by_moment[moment][outcome] += 1
        self.answers[key] = (moment, outcome)

    async def _cancel(self, i: int, key: str) -> str:
        channel, _, order_id = key.partition(":")
        path = f"/v1/orders/{channel}/{order_id}"
        token = self.tokens.get(channel) if self.tokens is not None else None
        res = await self._post(i, f"{path}/cancel", token, REASON)
        if res is None:
            return "error"
        status, body = res
        try:
            if status == 409:
                code = _error_answer.decode(body).error.code
                return code if code in ("too_late", "not_cancellable") else "error"
            said = _cancel_answer.decode(body).status if status in (200, 202) else ""
        except msgspec.DecodeError:
            return "error"
        if said == "cancelled":
            return "cancelled"
        if said == "cancel_pending":
            return "pending"
        if said != "intercepting":
            return "error"
        ev = await self._post(i, f"{path}/events", self.admin_token, INTERCEPTED)
        if ev is None or ev[0] != 202:
            return "error"
        self.intercept_events += 1
        return "intercepted"

    async def _post(self, i: int, path: str, token: str | None, body: bytes) -> tuple[int, bytes] | None:
        """POST ``body``; sent again (it is idempotent) on no answer, 429 or 5xx; None if never answered."""
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n{auth}Content-Type: application/json\r\n"
        data = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
        res = None
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_S)
            res = await send(self.conns, i, self.host, self.port, data)
            if res is not None and res[0] != 429 and res[0] < 500:
                break
        return res

    async def finish(self) -> dict[str, Any]:
        """Send what is still due (each at its moment), wait for every answer: the phase's figures."""
        self.closing = True
        self._poke()
        if self.scheduler is not None:
            await self.scheduler
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        for c in self.conns:
            c.close()
        return {
            "share": self.share,
            "sent": sum(self.outcomes.values()),
            "outcomes": {k: self.outcomes[k] for k in OUTCOMES},
            "by_moment": {m: {k: c[k] for k in OUTCOMES if c[k]} for m, c in self.by_moment.items()},
            "intercept_events": self.intercept_events,
        }


async def read_stock(http: httpx.AsyncClient, admin_token: str | None, skus: list[str]) -> dict[str, int] | None:
    """Sellable units per SKU, read through the contract (``GET /v1/admin/stock/{sku}``); None
    when a SKU has no stock record."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    out: dict[str, int] = {}
    for sku in skus:
        resp = await http.get(f"/v1/admin/stock/{sku}", headers=headers)
        if resp.status_code != 200:
            return None
        out[sku] = int(resp.json()["sellable"])
    return out


async def check(
    r: oq_client.Redis,
    answers: Mapping[str, tuple[str, str]],
    statuses: Mapping[str, str],
    units: Callable[[str], dict[str, int]],
    stock_before: dict[str, int] | None,
    stock_now: Callable[[], Any],
) -> dict[str, Any]:
    """After the drain: each cancelled order in its final ``cancelled`` state with no core action
    after its cancel (read from its status record), and the stock exact: sellable now = sellable
    at the start - the units of every order found that is neither cancelled nor rejected.
    ``statuses``: the oracle's status of every order found; ``stock_now``: reads the stock again."""
    outcomes = Counter(outcome for _m, outcome in answers.values())
    out: dict[str, Any] = {
        "sent": len(answers),
        "outcomes": {k: outcomes[k] for k in OUTCOMES},
        "intercept_events": outcomes["intercepted"],
        "final_cancelled": 0,
        "not_final": 0,
        "acted_after_cancel": 0,
    }
    examples: dict[str, list[str]] = {}

    def bad(category: str, key: str, why: str) -> None:
        out[category] += 1
        kept = examples.setdefault(category, [])
        if len(kept) < EXAMPLES:
            kept.append(f"{key} {why}")

    expected = [(k, o) for k, (_m, o) in answers.items() if o in ENDS_CANCELLED]
    for i in range(0, len(expected), 1000):
        chunk = expected[i : i + 1000]
        pipe = r.client.pipeline(transaction=False)
        for key, _o in chunk:
            pipe.hgetall(r.partition_of(key).status(key))
        for (key, outcome), h in zip(chunk, await pipe.execute(), strict=True):
            st = h.get(Field.STATUS.encode(), b"missing").decode()
            if st != "cancelled":
                bad("not_final", key, f"{outcome}, now {st}")
                continue
            out["final_cancelled"] += 1
            why = _acted_after(h, outcome)
            if why:
                bad("acted_after_cancel", key, why)
    out["examples"] = examples
    out["stock"] = await _stock(statuses, units, stock_before, stock_now)
    out["stock_exact"] = out["stock"]["exact"]
    return out


def _acted_after(h: Mapping[bytes, bytes], outcome: str) -> str:
    """Why a cancelled order's record shows a core action after its cancel ('' none)."""
    executed = h.get(Field.EXECUTED_AT.encode())
    if outcome != "intercepted":  # cancelled before execution: nothing of the execute stage
        acted = [f.decode() for f in h if f.startswith(CORE_ACTIONS)]
        if executed or acted:
            return f"executed after a {outcome} cancel: {', '.join(acted) or 'executed time'}"
        return ""
    at = h.get(Field.CANCEL_AT.encode())
    if not executed or not at or int(executed) > int(at):
        return "intercepted, yet not executed before its cancel"
    if AFTER_SHIPMENT in h:
        return "intercepted, yet its shipment was synced to the channel"
    return ""


async def _stock(
    statuses: Mapping[str, str],
    units: Callable[[str], dict[str, int]],
    before: dict[str, int] | None,
    stock_now: Callable[[], Any],
) -> dict[str, Any]:
    held: Counter[str] = Counter()
    of_cancelled: Counter[str] = Counter()
    for key, st in statuses.items():
        if st == "rejected":  # refused before reserving, or its units given back
            continue
        (of_cancelled if st == "cancelled" else held).update(units(key))
    doc: dict[str, Any] = {
        "units_held": sum(held.values()),
        "units_of_cancelled": sum(of_cancelled.values()),
        "mismatches": [],
        "exact": None,
    }
    if before is None:
        doc["note"] = "no stock record for the bench SKUs: not checked"
        return doc
    for attempt in range(2):
        now = await stock_now()
        if now is None:
            doc["note"] = "a bench SKU's stock record is gone"
            return doc
        doc["mismatches"] = [
            {"sku": sku, "expected": before[sku] - held[sku], "sellable": now[sku]}
            for sku in sorted(before)
            if now[sku] != before[sku] - held[sku]
        ]
        if not doc["mismatches"] or attempt:
            break
        await asyncio.sleep(STOCK_RECHECK_S)
    doc["exact"] = not doc["mismatches"]
    return doc
