"""The status record (contract §5): stored as one hash per order, rendered here."""

from __future__ import annotations

from typing import Any

from orderq import keys
from orderq.schema import any_json_decoder, utc_iso
from orderq.wire import TIME_FIELDS, Field, RouteParcel
from orderq.wire import parse_route as wire_route

# the effect ledger's field of a routed order's pick: x:wms.pick@<warehouse>
PICK_PREFIX = f"{Field.ACTION}wms.pick@".encode()

# Life cycle of the record (contract §5). While its order waits the record has no TTL, so it
# can never vanish under an order that is still owed work; the script that moves an order into a
# final state starts ORDERQ_STATUS_TTL_S (an executed order owed a deferred sync: once replayed).
# Scripts that set or clear the TTL: handoff, execute, review, unhold, replay (orderq/lua).
_TIMES = {f.encode(): status.value for f, status in TIME_FIELDS.items()}
_F = {f: f.encode() for f in Field}  # the hash's fields as redis-py returns them


def _entry(parcel: RouteParcel) -> dict[str, Any]:
    """A parcel as the status record (and a pick's delivery) shows it."""
    cents = parcel.freight_cents
    doc: dict[str, Any] = {
        "warehouse": parcel.warehouse,
        "carrier": parcel.carrier or None,
        "rule": parcel.rule,
        "carrier_rule": parcel.carrier_rule,
        "distance_km": parcel.km,
        "freight": f"{cents // 100}.{cents % 100:02d}",
        "lines": [{"sku": sku, "qty": qty} for sku, qty in parcel.lines],
    }
    if parcel.gifts:
        doc["gifts"] = [{"sku": sku, "qty": qty} for sku, qty in parcel.gifts]
    return doc


def parse_parcel(text: str) -> dict[str, Any]:
    """One parcel's text (wire.RouteParcel) -> the record's entry."""
    return _entry(RouteParcel.parse(text))


def parse_route(text: str) -> list[dict[str, Any]]:
    """A route's text -> its entries, in the order they were chosen."""
    return [_entry(p) for p in wire_route(text)]


def render(order_key: str, h: dict[bytes, bytes]) -> dict[str, Any]:
    """A status hash -> the contract's JSON record."""
    actions: list[dict[str, str]] = []
    for name in keys.ACTIONS:
        state = h.get(_F[Field.ACTION] + name.encode())
        if state is not None:
            actions.append({"name": name, "state": state.decode()})
        if name == "wms.pick":  # a routed order: one pick per warehouse
            for f, v in h.items():
                if f.startswith(PICK_PREFIX):
                    wh = f[len(PICK_PREFIX) :].decode()
                    actions.append({"name": name, "state": v.decode(), "warehouse": wh})
    times = {label: utc_iso(int(h[f])) for f, label in _TIMES.items() if h.get(f)}
    prio = h.get(_F[Field.PRIORITY], b"").decode()
    record: dict[str, Any] = {
        "order_key": order_key,
        "status": h.get(_F[Field.STATUS], b"accepted").decode(),
        "priority": prio or None,
        "reasons": any_json_decoder.decode(h[_F[Field.REASONS]]) if h.get(_F[Field.REASONS]) else [],
        "risk_score": int(h.get(_F[Field.RISK_SCORE], b"0") or 0),
        "times": times,
        "actions": actions,
    }
    if fid := h.get(_F[Field.FULFILMENT_ID]):
        record["fulfilment_id"] = fid.decode()
    if err := h.get(_F[Field.ERROR]):  # rejected as unprocessable: what broke on it
        record["error"] = err.decode(errors="replace")
    if text := h.get(_F[Field.ROUTE]):  # the route: one entry, or a list when the order was split
        route = parse_route(text.decode())
        record["route"] = route[0] if len(route) == 1 else route
    _after_execution(record, h)
    return record


# What the order's life after execution adds (contract §5): the lifecycle actions' ledger fields
# (x:<action>, and x:notify.sms:shipped for the shipping notice), the cancel, and what the events
# of the systems downstream said (orderq/lua/event.lua writes these JSON fields).
_LIFE_ACTIONS = (
    (_F[Field.ACTION] + b"wms.intercept", {"name": "wms.intercept"}),
    (_F[Field.ACTION] + b"channel.ship_sync", {"name": "channel.ship_sync"}),
    (_F[Field.ACTION] + b"notify.sms:shipped", {"name": "notify.sms", "kind": "shipped"}),
)
_EVENT_PARTS = (
    (Field.SHIPMENTS, "shipments", list),
    (Field.SOURCES, "sources", dict),
    (Field.CONFLICTS, "conflicts", list),
)


def _after_execution(record: dict[str, Any], h: dict[bytes, bytes]) -> None:
    for f, action in _LIFE_ACTIONS:
        if state := h.get(f):
            record["actions"].append({**action, "state": state.decode()})
    if outcome := h.get(_F[Field.CANCEL_OUTCOME]):
        at = h.get(_F[Field.CANCEL_AT])
        cancel = {
            "reason": h.get(_F[Field.CANCEL_REASON], b"").decode() or None,
            "at": utc_iso(int(at)) if at else None,
            "outcome": outcome.decode(),
        }
        if note := h.get(_F[Field.CANCEL_NOTE]):
            cancel["note"] = note.decode(errors="replace")
        record["cancel"] = cancel
    executed = _F[Field.EXECUTED_AT] in h
    for field, name, empty in _EVENT_PARTS:
        if text := h.get(_F[field]):
            record[name] = any_json_decoder.decode(text)
        elif executed:
            record[name] = empty()
    if text := h.get(_F[Field.TIMELINE]):
        record["timeline"] = any_json_decoder.decode(text)
    elif executed:
        record["timeline"] = []
