"""The records Python and the Lua scripts hand each other, named once.

Each record is a msgspec Struct with ``array_like=True``: it travels as a msgpack array
(compact, and what ``cmsgpack`` unpacks fastest), and the script reads it through one
accessor table at its top (field name -> index), so a field is renamed or added in one
place on each side. A field added later goes at the end with a default, so a record written
by the previous version still decodes.

Outcome codes and statuses are ``str`` enums: their values are what the scripts and the
status hash store, so a member compares equal to the stored text.
"""

from __future__ import annotations

import enum
import re

import msgspec


class Status(enum.StrEnum):
    """The status record's ``s`` field (contract §5)."""

    ACCEPTED = "accepted"
    VALIDATED = "validated"
    REVIEW = "review"
    HELD = "held"
    REJECTED = "rejected"
    EXECUTED = "executed"
    # set after execution by the order's platform or the warehouse (the lifecycle events)
    CANCELLED = "cancelled"
    INTERCEPTING = "intercepting"
    SHIPPED = "shipped"
    DELIVERED = "delivered"
    RETURN_REQUESTED = "return_requested"
    RETURNED = "returned"


# An order in a waiting status is still owed work by the machines (or waits for a reviewer, a
# lifted hold): its record has no TTL and it has a place to be. Every other status owes nothing.
WAITING_STATUSES = frozenset({Status.ACCEPTED, Status.VALIDATED, Status.REVIEW, Status.HELD})
TERMINAL_STATUSES = frozenset(Status) - WAITING_STATUSES


class Decided(enum.StrEnum):
    """What validation decided for an order (checks.lua's answer, handoff.lua's head)."""

    VALIDATED = "v"
    REVIEW = "w"
    REJECTED = "r"
    UNPROCESSABLE = "x"  # the order broke validation itself: rejected with its error (handoff only)


class Executed(enum.StrEnum):
    """What the execute stage does with a validated order (execute.lua's head)."""

    EXECUTED = "e"
    HELD = "h"  # its province is under a region hold
    REVIEW = "w"  # its freight is over the limit of a freight_review rule


class RouteOutcome(enum.StrEnum):
    """What routing decided for an order (route.lua's answer)."""

    SHIP = "s"
    REVIEW = "w"  # its freight is over the limit of a freight_review rule


class ActionState(enum.StrEnum):
    """An action's state in the status hash (``x:<action>``)."""

    DONE = "done"
    DEFERRED = "deferred"  # skipped by the breaker, replayed later
    DROPPED = "dropped"  # skipped by the breaker in drop mode
    FAILED = "failed"  # given up by the dispatcher


class Field(enum.StrEnum):
    """Fields of the status hash (one per order, partition slot). The Lua scripts write the
    same names; orderq/lua/*.lua keep them in a table named ``F``."""

    STATUS = "s"
    PRIORITY = "p"
    REASONS = "r"  # JSON array of reason codes
    RISK_SCORE = "rs"
    FULFILMENT_ID = "f"
    ROUTE = "rt"  # the route's text (RouteParcel texts joined by ';')
    ERROR = "err"  # what broke on an order rejected as unprocessable
    DISCARD_REASON = "dr"  # the operator's reason for discarding its dead letter
    APPROVED = "ap"  # approved by a person: not sent back to review
    DEAD = "dl"  # a dead letter of the order is unresolved
    ACCEPTED_AT = "ta"  # times, in µs since the epoch
    VALIDATED_AT = "tv"
    REVIEW_AT = "tw"
    HELD_AT = "th"
    EXECUTED_AT = "te"
    REJECTED_AT = "tr"
    ACTION = "x:"  # prefix: x:<action>[@<warehouse>] -> ActionState (the effect ledger)
    APPLIED = "xn:"  # prefix: xn:<action> -> times the action was applied (the audit's duplicate check)
    # the order (msgpack), read only from a record written when the payload lived here; an executed
    # order's payload now has its own key (keys.Partition.payload): a long value here would turn
    # the record's listpack into a hashtable
    PAYLOAD = "d"
    # what the systems downstream reported (orderq/lua/event.lua): the source whose word set the
    # public status, JSON of the timeline, each source's latest word, the shipments, the conflicts
    STATUS_SOURCE = "ss"
    TIMELINE = "tl"
    SOURCES = "so"
    SHIPMENTS = "sh"
    CONFLICTS = "cf"
    EVENT = "ev:"  # prefix: ev:<source>|<status>|<tracking no> -> its time: an event's dedup
    SHIPPED_AT = "tsh"
    DELIVERED_AT = "tdl"
    RETURN_REQUESTED_AT = "tqr"
    RETURNED_AT = "trt"
    # a cancel (orderq/lua/cancel.lua): its reason, note, time (µs), what it led to (cancelled |
    # intercepting, then what the warehouse answered) and when the order became cancelled
    CANCEL_REASON = "cr"
    CANCEL_NOTE = "cn"
    CANCEL_AT = "ca"
    CANCEL_OUTCOME = "co"
    CANCELLED_AT = "tc"
    READY_ENTRY = "re"  # "<lane 1..3 vip|new|regular>|<entry id>" of its ready-lane entry: a cancel
    # releases what a validated order holds at once, from the entry's payload (cancel.lua)


TIME_FIELDS = {
    Field.ACCEPTED_AT: Status.ACCEPTED,
    Field.VALIDATED_AT: Status.VALIDATED,
    Field.REVIEW_AT: Status.REVIEW,
    Field.HELD_AT: Status.HELD,
    Field.EXECUTED_AT: Status.EXECUTED,
    Field.CANCELLED_AT: Status.CANCELLED,
    Field.REJECTED_AT: Status.REJECTED,
    Field.SHIPPED_AT: Status.SHIPPED,
    Field.DELIVERED_AT: Status.DELIVERED,
    Field.RETURN_REQUESTED_AT: Status.RETURN_REQUESTED,
    Field.RETURNED_AT: Status.RETURNED,
}


class DecisionRow(msgspec.Struct, array_like=True):
    """One order as checks.lua reads it (an element of the batch argument)."""

    key: str
    channel: str
    customer: str  # "<channel>:<customer id>": the subsidy and first-order field
    accepted_ms: int
    base_score: int  # risk score of what Python checked
    pre_rejected: int  # 1: Python rejected it already (its coupon is another platform's)
    ip: str  # '' none
    fingerprint: str  # recipient+items+amount; '' duplicate rule off
    day: int  # Beijing day of the accept time (the subsidy cap's day)
    goods: int  # cents
    coupons: int  # cents
    # sku, qty, index in KEYS of keys.stock_key(sku) (keys.holders_key(sku) the next), ... (one
    # entry per SKU; the index travels with its line: one Lua table per list costs unpacking time)
    lines: list[str | int]
    codes: list[str | int]  # coupon code, index in KEYS of keys.coupon_key(code), ...
    accepted_ms_text: str  # the accept time as text: Lua formats numbers slowly
    approval: int  # 1: needs a manager's approval (review unless something rejects)
    # Its other keys, as indices into the call's KEYS (each distinct key of a batch is passed once):
    decided_key: int  # keys.decided_key of its accept hour
    customer_key: int  # keys.customer_key
    hold_key: int  # keys.ledger_key: written if it goes to review
    ip_key: int  # keys.ip_key of its accept hour, and of the hour before (0 both: no IP)
    ip_prev_key: int
    dup_key: int  # keys.dup_key of its window bucket, and of the one before (0 both: rule off)
    dup_prev_key: int
    subsidy_key: int  # keys.subsidy_key of its day


class DecisionReply(msgspec.Struct, array_like=True):
    """checks.lua's answer for one order."""

    outcome: Decided
    extra_score: int  # risk added by the ledger's windows
    first_order: int  # 1: the customer's first order (priority new)
    reasons: list[str]


class ReviewHold(msgspec.Struct, array_like=True):
    """What an order in review holds in the ledger (its ledger record, keys.ledger_key):
    written by checks.lua (or by the execute stage for a freight review), read by release.lua
    when a reviewer rejects the order. The keys it names are built by keys.py from it."""

    outcome: Decided
    extra_score: int
    reasons: list[str]
    held: list[str | int]  # sku, qty, ... of the units reserved
    coupons: list[str]  # single-use coupons it used
    day: int  # Beijing day of its subsidy totals (keys.subsidy_key)
    customer: str  # "<channel>:<customer id>": its field in the subsidy hash
    goods: int  # cents added to the day's goods total
    coupon_cents: int  # cents added to the day's coupon total
    released: int = 0  # 1 once release.lua returned it


ROUTE_SEP, PARCEL_SEP, ITEM_SEP = ";", "|", ","


class RouteParcel(msgspec.Struct, frozen=True):
    """One parcel of a route. Text, not msgpack: route.lua builds it by joining a head that
    Python rendered once per candidate warehouse (head(), cached per place) to the freight and
    items it decides, the cheapest form for the script, and it is stored as is: in the status
    hash (Field.ROUTE, parcels joined by ROUTE_SEP) and in a pick's outbox entry. Its text:
    "<warehouse>|<carrier>|<rule>|<carrier rule>|<km>|<freight cents>|<sku>:<qty>,...|<gift
    sku>:<qty>,..." (names hold none of the separators: execute/routing.py's NAME)."""

    warehouse: str
    carrier: str  # '' none named
    rule: str  # the warehouse rule that chose it ('split': one parcel of several)
    carrier_rule: str
    km: float | None
    freight_cents: int
    lines: list[tuple[str, int]]
    gifts: list[tuple[str, int]]

    @staticmethod
    def head(warehouse: str, carrier: str, rule: str, carrier_rule: str, km: float | None) -> str:
        """A parcel's text up to its km, ending in the separator route.lua goes on from."""
        return PARCEL_SEP.join((warehouse, carrier, rule, carrier_rule, "" if km is None else str(km), ""))

    @classmethod
    def parse(cls, text: str) -> RouteParcel:
        wh, carrier, rule, carrier_rule, km, freight, lines, gifts = text.split(PARCEL_SEP)
        distance = float(km) if km else None
        return cls(wh, carrier, rule, carrier_rule, distance, int(freight), _items(lines), _items(gifts))


def _items(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(ITEM_SEP) if text else ():
        sku, _, qty = item.rpartition(":")
        out.append((sku, int(qty)))
    return out


def parse_route(text: str) -> list[RouteParcel]:
    """A route (the status hash's Field.ROUTE) -> its parcels, in the order they were chosen."""
    return [RouteParcel.parse(p) for p in text.split(ROUTE_SEP) if p]


def route_warehouses(text: bytes) -> set[bytes]:
    """The warehouses a route's parcels ship from, without parsing the rest."""
    return {parcel.split(PARCEL_SEP.encode(), 1)[0] for parcel in text.split(ROUTE_SEP.encode()) if parcel}


decision_rows = msgspec.msgpack.Encoder().encode
decode_replies = msgspec.msgpack.Decoder(list[DecisionReply]).decode
encode_hold = msgspec.msgpack.Encoder().encode
decode_hold = msgspec.msgpack.Decoder(ReviewHold).decode


def _lua_table(pairs: dict[str, str] | dict[str, int]) -> str:
    return "{" + ", ".join(f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in pairs.items()) + "}"


# The accessor tables a script may use, by the name it uses: the status hash's fields (F), and
# per record its field -> index (e.g. o[DecisionRow.day]). Generated from the definitions above,
# so Python and every script read the same names.
_TABLES = {
    "F": _lua_table({f.name.lower(): f.value for f in Field}),
    **{
        rec.__name__: _lua_table({name: i for i, name in enumerate(rec.__struct_fields__, 1)})
        for rec in (DecisionRow, DecisionReply, ReviewHold)
    },
}
# Shared ledger arithmetic: sellable units, floor(physical x buffer) - reserved with the buffer in
# ppm, as orderq/ledger/stock.py's sellable() computes it in Python (checks.lua, route.lua).
_TABLES["Ledger"] = (
    "{sellable = function(physical, reserved, ppm) return math.floor(physical * ppm / 1000000) - reserved end}"
)
_USES = re.compile(r"\b(" + "|".join(_TABLES) + r")\b")


def with_tables(script: str) -> str:
    """``script`` with the accessor tables it uses defined in front, on its first line (so the
    line numbers of its errors stay those of the file)."""
    used = dict.fromkeys(m.group(1) for m in _USES.finditer(script))
    if not used:
        return script
    return " ".join(f"local {name} = {_TABLES[name]}" for name in used) + " " + script
