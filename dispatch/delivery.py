"""One target's HTTP side: the request an outbox entry becomes, and what the answer means.

An entry is POSTed as JSON ``{"order_key", "action", "fulfilment_id", "order"}`` (plus
``"warehouse"`` and ``"parcel"`` for a routed pick; ``"kind"``, ``"shipment"``, ``"cancel_reason"``
for the actions after execution) with ``Idempotency-Key: <order key>:<action>`` (``@<warehouse>``
for each pick of a split, ``:<kind>`` for a second effect such as the shipping notice): delivery
is at least once, and the key lets the target apply it once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from orderq.schema import unpack_order
from orderq.settings import Settings
from orderq.status import parse_parcel

if TYPE_CHECKING:
    from dispatch.worker import Held

BACKOFF_MAX_S = 60.0  # cap of one retry delay
RETRYABLE = frozenset({408, 409, 425, 429})  # 4xx that mean "later", not "never"
USER_AGENT = "orderq-dispatch/0.1"
_json = msgspec.json.Encoder()


class Result(StrEnum):
    """What one attempt means for its entry."""

    OK = "ok"  # delivered: acknowledged and deleted
    REFUSED = "refused"  # the target (or the entry itself) says never: dead-lettered at once
    RETRY = "retry"  # a failed delivery: retried with backoff, counted against ORDERQ_MAX_DELIVERIES
    UNREACHABLE = "unreachable"  # not a delivery (nothing was sent): waits with backoff, never counted
    BROKEN = "broken"  # an exception of ours, not the target's


@dataclass(slots=True)
class Outcome:
    result: Result
    detail: str = ""
    retry_after: float = 0.0  # the target's Retry-After, in seconds


def request_body(action: str, h: Held) -> bytes:
    """The JSON an action is delivered as (the order with UTC times to the microsecond)."""
    doc: dict[str, Any] | None = None
    if h.payload:  # (an action issued after execution may carry no order: "order": null)
        order = unpack_order(h.payload)
        doc = msgspec.to_builtins(order)
        doc["created_at"] = order.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body: dict[str, Any] = {"order_key": h.key, "action": action, "fulfilment_id": h.fid, "order": doc}
    if h.warehouse:  # a routed pick: which warehouse ships which lines, with which carrier
        body["warehouse"] = h.warehouse
        body["parcel"] = parse_parcel(h.route.decode()) if h.route else None
    if h.kind:  # e.g. the shipping notice, apart from the order's confirmation SMS
        body["kind"] = h.kind
    if h.shipment:  # channel.ship_sync and the shipping notice: carrier, tracking number, warehouse
        body["shipment"] = msgspec.json.decode(h.shipment)
    if h.cancel_reason:
        body["cancel_reason"] = h.cancel_reason
    return _json.encode(body)


def idempotency_key(action: str, h: Held) -> str:
    """One per effect: ``<order key>:<action>``, ``@<warehouse>`` for each pick of a split, and
    ``:<kind>`` for a second effect of the action (``:shipped``, the shipping notice)."""
    if h.kind:
        return f"{h.key}:{action}:{h.kind}"
    return f"{h.key}:{action}@{h.warehouse}" if h.warehouse else f"{h.key}:{action}"


class Endpoint:
    """One downstream URL: its connection pool (as many connections as requests in flight),
    the request of each attempt and its classification, and the backoff between attempts."""

    def __init__(self, action: str, url: str, settings: Settings) -> None:
        self.action = action
        self.url = url
        self.settings = settings
        concurrency = settings.dispatch_concurrency
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(settings.dispatch_timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            headers={"User-Agent": USER_AGENT, "Content-Type": "application/json"},
            follow_redirects=False,
        )

    async def post(self, h: Held, probe: bool) -> Outcome:
        """One attempt; never raises. ``probe``: the circuit's half-open probe, with its own
        short timeout."""
        s = self.settings
        try:
            headers = {"Idempotency-Key": idempotency_key(self.action, h), "X-Orderq-Attempt": str(h.tries + 1)}
            body = request_body(self.action, h)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Outcome(Result.REFUSED, f"undecodable order payload: {exc}")
        except Exception as exc:  # this entry cannot become a request: it ends alone
            return Outcome(Result.REFUSED, f"unprocessable: {type(exc).__name__}: {exc}"[:300])
        timeout = min(s.dispatch_probe_timeout_s, s.dispatch_timeout_s) if probe else s.dispatch_timeout_s
        try:
            resp = await self.http.post(self.url, content=body, headers=headers, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return Outcome(Result.UNREACHABLE, f"{type(exc).__name__}: {exc}"[:300])
        except httpx.HTTPError as exc:  # sent, maybe received: retry, the target dedups by key
            return Outcome(Result.RETRY, f"{type(exc).__name__}: {exc}"[:300])
        except Exception as exc:  # e.g. a header this entry's key cannot be encoded in
            return Outcome(Result.BROKEN, f"{type(exc).__name__}: {exc}"[:300])
        code = resp.status_code
        if 200 <= code < 300:
            return Outcome(Result.OK)
        detail = f"HTTP {code}: {resp.text[:200]}"
        if code >= 500 or code in RETRYABLE:
            return Outcome(Result.RETRY, detail, _retry_after(resp))
        return Outcome(Result.REFUSED, detail)

    def backoff(self, h: Held, retry_after: float) -> float:
        """Seconds until ``h``'s next attempt: exponential in its failures, with jitter, and
        never sooner than the target asked (both capped at BACKOFF_MAX_S)."""
        base = min(BACKOFF_MAX_S, self.settings.dispatch_backoff_s * 2 ** min(h.tries - 1, 30))
        delay = random.uniform(base / 2, base)  # jitter: the entries of one outage do not return in step
        return max(delay, min(retry_after, BACKOFF_MAX_S))

    async def close(self) -> None:
        await self.http.aclose()


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0
