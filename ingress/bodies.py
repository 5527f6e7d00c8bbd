"""The HTTP API's request and response bodies (contract §3 to §5, §7), one Struct each.

The handlers decode requests into these and encode their answers from them, and
``GET /openapi.json`` is generated from the same types (:mod:`ingress.openapi`), so the
document says what the service really takes and answers. Response Structs built from a
ledger's or the stats' plain dicts are converted at the handler (``msgspec.convert``): a
field that drifts fails there, loudly, instead of in a client.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from orderq.connectors import ConnectorView
from orderq.ledger import stock
from orderq.ledger.coupons import CouponsBody as CouponsRequest
from orderq.lifecycle import CancelBody as CancelRequest
from orderq.lifecycle import CancelReason, EventSource, EventStatus, OrderEvent
from orderq.schema import ErrorDetail, Money, Sku, Text
from orderq.warehouses import WarehouseId
from orderq.warehouses import WarehousesBody as Warehouses

__all__ = [
    "CancelRequest",
    "ConnectorView",
    "CouponsRequest",
    "OrderEvent",
    "Warehouses",
]  # orderq's own types, documented as they are

Stage = Literal["normal", "degraded", "shedding"]
Priority = Literal["vip", "new", "regular"]
# orderq/wire.py Status: the pipeline's, then those the order's life after execution sets (§5)
PipelineStatus = Literal["accepted", "validated", "review", "held", "executed", "rejected"]
Status = Literal[PipelineStatus, "cancelled", "intercepting", "shipped", "delivered", "return_requested", "returned"]
PausableStage = Literal["validate", "execute"]
DeadLetterStage = Literal["validate", "execute", "dispatch"]


# --- errors and orders (§4) ---------------------------------------------------------------
class ErrorInfo(Struct):
    code: str
    message: str
    details: list[ErrorDetail]


class ErrorBody(Struct):
    """Every error the API answers (contract §4)."""

    error: ErrorInfo


class Accepted(Struct):
    """``POST /v1/orders`` and the channel formats: 202 queued, or 200 ``duplicate: true``."""

    order_key: str
    status: Literal["accepted"]
    duplicate: bool
    stage: Stage


class BatchRequest(Struct):
    """``POST /v1/orders/batch``. Each item is checked on its own against ``Order``: a bad
    item (any JSON value) is answered ``invalid`` in its result, the others go on."""

    orders: Annotated[list[Any], Meta(min_length=1, max_length=1000, description="each an Order")]


class BatchResult(Struct):
    order_key: str | None
    status: Literal["accepted", "duplicate", "invalid", "shed"]
    error: ErrorInfo | None


class BatchResponse(Struct):
    """Results in request order, and the count of each outcome."""

    results: list[BatchResult]
    accepted: int
    duplicates: int
    invalid: int
    shed: int


class Cancelled(Struct):
    """``POST …/cancel``: 200 ``cancelled``; 202 ``intercepting`` (the warehouse is asked to
    stop the parcel) or ``cancel_pending`` (the order is not known yet). A repeat answers the same."""

    order_key: str
    status: Literal["cancelled", "intercepting", "cancel_pending"]


class EventTaken(Struct):
    """``POST …/events``: the order's public status after the event."""

    order_key: str
    status: Status
    duplicate: bool


# --- the status record (§5) ---------------------------------------------------------------
class Times(Struct, omit_defaults=True):
    """When the order first entered each status it has been in; UTC, microseconds:
    ``2026-11-10T16:00:01.000000Z``."""

    accepted: str | UnsetType = UNSET
    validated: str | UnsetType = UNSET
    review: str | UnsetType = UNSET
    held: str | UnsetType = UNSET
    executed: str | UnsetType = UNSET
    rejected: str | UnsetType = UNSET
    cancelled: str | UnsetType = UNSET
    shipped: str | UnsetType = UNSET
    delivered: str | UnsetType = UNSET
    return_requested: str | UnsetType = UNSET
    returned: str | UnsetType = UNSET


ExecutedAction = Literal["wms.pick", "notify.sms", "invoice.request", "crm.remark_sync", "crm.gift_sync"]


class ActionState(Struct, omit_defaults=True):
    """An action's effect: the execute stage's, or one fired after execution (``wms.intercept``
    by a cancel, ``channel.ship_sync`` and the ``shipped`` notify.sms by a shipment)."""

    name: Literal[ExecutedAction, "wms.intercept", "channel.ship_sync"]
    state: Literal["done", "deferred", "dropped", "failed"]
    warehouse: str | UnsetType = UNSET  # a routed order's pick: one per warehouse
    kind: Literal["shipped"] | UnsetType = UNSET  # a second effect of the action: the shipping notice


class SkuQty(Struct):
    sku: str
    qty: int


class Parcel(Struct, omit_defaults=True):
    """What one warehouse ships of a routed order, and which rules decided it."""

    warehouse: str
    carrier: str | None
    rule: str  # the rule that chose the warehouse (split: the order needed several)
    lines: list[SkuQty]
    carrier_rule: str | UnsetType = UNSET  # the rule that chose the carrier
    distance_km: float | UnsetType | None = UNSET  # null: the address could not be located
    freight: Money | UnsetType = UNSET  # the estimate
    gifts: list[SkuQty] | UnsetType = UNSET


class Cancel(Struct, omit_defaults=True):
    """The order's cancel: what it led to (``intercepting`` until the warehouse answers)."""

    reason: CancelReason | None
    at: str | None  # when the cancel came (UTC)
    outcome: Literal["cancelled", "intercepting", "intercept_failed"]
    note: str | UnsetType = UNSET


class Shipment(Struct):
    """One parcel that left, by tracking number (the first event that named it)."""

    warehouse: str | None
    carrier: str | None
    tracking_no: str
    at: str


class SourceWord(Struct):
    """A source's latest word."""

    status: EventStatus
    at: str


class ConflictSide(Struct):
    source: EventSource | None  # null: the status kept is the one the pipeline set
    status: Literal[Status, EventStatus]


class Conflict(Struct):
    """Two sources that disagree: whose word the public status kept, and the other's."""

    at: str
    kept: ConflictSide
    other: ConflictSide


class TimelineEvent(Struct):
    """An event as a source reported it (the newest 200 are kept)."""

    source: EventSource
    status: EventStatus
    at: str
    carrier: str | None
    tracking_no: str | None
    warehouse: str | None


class StatusRecord(Struct, omit_defaults=True):
    """An order's status record (contract §5). ``shipments``, ``sources``, ``conflicts`` and
    ``timeline`` are there (empty at first) once the order executed, or once an event came."""

    order_key: str
    status: Status
    priority: Priority | None
    reasons: list[str]
    risk_score: int
    times: Times
    actions: list[ActionState]
    fulfilment_id: str | UnsetType = UNSET
    route: Parcel | list[Parcel] | UnsetType = UNSET  # a list when the order was split
    error: str | UnsetType = UNSET  # rejected as `unprocessable`: what broke on it
    cancel: Cancel | UnsetType = UNSET
    shipments: list[Shipment] | UnsetType = UNSET
    sources: dict[EventSource, SourceWord] | UnsetType = UNSET
    conflicts: list[Conflict] | UnsetType = UNSET
    timeline: list[TimelineEvent] | UnsetType = UNSET


# --- stats and probes (§4) ------------------------------------------------------------------
class ReadyDepth(Struct):
    vip: int
    new: int
    regular: int


class Depth(Struct):
    intake: int
    ready: ReadyDepth
    review: int
    deferred: int


class Rates(Struct):
    accepted_per_s: float
    validated_per_s: float
    executed_per_s: float


class Totals(Struct):
    accepted: int
    duplicates: int
    invalid: int
    shed: int
    validated: int
    rejected: int
    review: int
    held: int
    executed: int
    dead_letters: int


class SyncCounts(Struct):
    deferred: int
    dropped: int
    replayed: int


class Worker(Struct):
    stage: str
    pid: int
    host: str


class Stats(Struct):
    """``GET /v1/stats`` and ``orderq status --json``."""

    stage: Stage
    backlog: int
    depth: Depth
    rates: Rates
    totals: Totals
    executed_by_priority: ReadyDepth
    syncs: SyncCounts
    held: int
    holds: list[str]
    workers: list[Worker]
    paused: list[PausableStage]


class PauseRequest(Struct):
    """Unknown fields beside ``stage`` are ignored."""

    stage: PausableStage


class PauseResponse(Struct):
    stage: PausableStage
    paused: bool


class Health(Struct):
    status: Literal["ok"]


class Ready(Struct):
    status: Literal["ready"]
    stage: Stage


# --- stock, coupons, holds (§4) -------------------------------------------------------------
class StockItem(Struct, forbid_unknown_fields=True):
    sku: Sku
    physical: Annotated[int, Meta(ge=0, le=stock.MAX_PHYSICAL)]
    # one warehouse's count (a warehouse of PUT /v1/admin/warehouses); none: the SKU's total
    warehouse: WarehouseId | None = None


class StockRequest(Struct, forbid_unknown_fields=True):
    items: Annotated[list[StockItem], Meta(min_length=1, max_length=10_000)]


class WarehouseStock(Struct):
    physical: int
    allocated: int  # shipped from it since its last count


class StockView(Struct, omit_defaults=True):
    """sellable = floor(physical x ORDERQ_STOCK_BUFFER) - reserved."""

    sku: str
    physical: int
    reserved: int
    sellable: int
    warehouses: dict[str, WarehouseStock] | UnsetType = UNSET  # counted per warehouse: physical is the sum


class StockViews(Struct):
    items: list[StockView]


class CouponsWritten(Struct):
    coupons: int


class HoldRequest(Struct, forbid_unknown_fields=True):
    province: Text
    reason: Annotated[str, Meta(max_length=500)] = ""


class Hold(Struct):
    province: str
    reason: str
    since: str


class Holds(Struct):
    holds: list[Hold]


class HoldLifted(Struct):
    province: str
    released: int


# --- review and dead letters (§4, §5) -------------------------------------------------------
class ReviewItem(Struct):
    order_key: str
    reasons: list[str]
    risk_score: int
    since: str


class ReviewList(Struct):
    """Orders waiting for a reviewer, oldest first."""

    items: list[ReviewItem]


class DeadLetterItem(Struct):
    """An unresolved dead letter; ``id`` is opaque (it names where the entry is)."""

    id: str
    stage: DeadLetterStage
    order_key: str
    action: str | None  # dispatch: the action the downstream refused; else null
    error: str  # the last error
    deliveries: int
    since: str  # when it was dead-lettered (UTC)


class DeadLetterList(Struct):
    """Oldest first; ``next`` is the ``after`` of the next page (null: no more)."""

    items: list[DeadLetterItem]
    next: str | None


class DiscardRequest(Struct, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(min_length=1, max_length=500)]


class DeadLetterResolved(Struct):
    """The dead letter as it was, how it was resolved, and its order's status now."""

    id: str
    stage: DeadLetterStage
    order_key: str
    action: str | None
    error: str
    deliveries: int
    since: str
    resolution: Literal["replayed", "discarded"]
    status: str | None  # null: no status record


class DeadLetterSummary(Struct):
    unresolved: int
    oldest: list[DeadLetterItem]


class Connectors(Struct):
    """``GET /v1/admin/connectors``: every configured pull connector, by name."""

    connectors: list[ConnectorView]


# --- the dashboard's data -------------------------------------------------------------------
class SampleDepth(Struct):
    intake: int
    vip: int
    new: int
    regular: int
    review: int
    deferred: int


class SampleTotals(Struct):
    accepted: int
    validated: int
    executed: int
    rejected: int
    review: int
    dead_letters: int


class SampleRates(Struct):
    accepted: float
    validated: float
    executed: float
    rejected: float


class Sample(Struct):
    """One second of history; ``rates`` are the totals' deltas since the sample before."""

    ts: float
    stage: Stage
    backlog: int
    depth: SampleDepth
    totals: SampleTotals
    rates: SampleRates


class ActiveAlert(Struct):
    """An alert that holds now; its details (e.g. ``sku``, ``lag_s``) follow as extra fields."""

    alert: str
    kind: Literal["order_surge", "execution_lag", "dead_letters", "sku_out_of_stock", "ship_lag", "connector_lag"]
    since: str
    text: str


class Thresholds(Struct):
    open_depth: int
    close_depth: int
    shed_depth: int
    shed_vip_depth: int


class DashboardData(Struct):
    """``GET /dashboard/data``: the cached stats and the samples newer than ``since``."""

    stats: Stats
    reasons: dict[str, int]
    alerts: list[ActiveAlert]
    holds: list[Hold]
    dead_letters: DeadLetterSummary
    thresholds: Thresholds
    connectors: list[ConnectorView]  # as GET /v1/admin/connectors shows them
    computed_at: float
    history: list[Sample]
    history_newest: float | None


def convert(doc: Any, kind: type[Any]) -> Any:
    """``doc`` (built from plain dicts) as the documented Struct ``kind``."""
    return msgspec.convert(doc, kind)
