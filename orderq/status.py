"""The status record (contract §5): stored as one hash per order, rendered here."""

from __future__ import annotations

from typing import Any

from orderq import keys
from orderq.schema import any_json_decoder, utc_iso

PICK_PREFIX = b"x:wms.pick@"  # ledger field of a routed order's pick: x:wms.pick@<warehouse>

# Life cycle of the record (contract §5). While its order waits the record has no TTL, so it
# can never vanish under an order that is still owed work; the script that moves an order into a
# final state starts ORDERQ_STATUS_TTL_S (an executed order owed a deferred sync: once replayed).
# Scripts that set or clear the TTL: handoff, execute, review, unhold, replay (orderq/lua).
WAITING = frozenset({"accepted", "validated", "review", "held"})
FINAL = frozenset({"rejected", "executed"})

# hash field -> name in "times"
TIME_FIELDS = {
    b"ta": "accepted",
    b"tv": "validated",
    b"tw": "review",
    b"th": "held",
    b"te": "executed",
    b"tr": "rejected",
}


def _items(text: str) -> list[dict[str, Any]]:
    out = []
    for item in text.split(",") if text else ():
        sku, _, qty = item.rpartition(":")
        out.append({"sku": sku, "qty": int(qty)})
    return out


def parse_parcel(text: str) -> dict[str, Any]:
    """One parcel of a route as route.lua writes it ("<warehouse>|<carrier>|<rule>|<carrier
    rule>|<km>|<freight cents>|<sku>:<qty>,...|<gift sku>:<qty>,...") -> the record's entry."""
    wh, carrier, rule, carrier_rule, km, freight, lines, gifts = text.split("|")
    cents = int(freight)
    doc: dict[str, Any] = {
        "warehouse": wh,
        "carrier": carrier or None,
        "rule": rule,
        "carrier_rule": carrier_rule,
        "distance_km": float(km) if km else None,
        "freight": f"{cents // 100}.{cents % 100:02d}",
        "lines": _items(lines),
    }
    if gifts:
        doc["gifts"] = _items(gifts)
    return doc


def parse_route(text: str) -> list[dict[str, Any]]:
    """A route (parcels joined by ';') -> its entries, in the order they were chosen."""
    return [parse_parcel(p) for p in text.split(";") if p]


def render(order_key: str, h: dict[bytes, bytes]) -> dict[str, Any]:
    """A status hash -> the contract's JSON record."""
    actions: list[dict[str, str]] = []
    for name in keys.ACTIONS:
        state = h.get(b"x:" + name.encode())
        if state is not None:
            actions.append({"name": name, "state": state.decode()})
        if name == "wms.pick":  # a routed order: one pick per warehouse (issue 9)
            for f, v in h.items():
                if f.startswith(PICK_PREFIX):
                    wh = f[len(PICK_PREFIX) :].decode()
                    actions.append({"name": name, "state": v.decode(), "warehouse": wh})
    times = {label: utc_iso(int(h[f])) for f, label in TIME_FIELDS.items() if h.get(f)}
    prio = h.get(b"p", b"").decode()
    record: dict[str, Any] = {
        "order_key": order_key,
        "status": h.get(b"s", b"accepted").decode(),
        "priority": prio or None,
        "reasons": any_json_decoder.decode(h[b"r"]) if h.get(b"r") else [],
        "risk_score": int(h.get(b"rs", b"0") or 0),
        "times": times,
        "actions": actions,
    }
    if h.get(b"f"):
        record["fulfilment_id"] = h[b"f"].decode()
    if h.get(b"err"):  # rejected as unprocessable: what broke on it (issue 13)
        record["error"] = h[b"err"].decode(errors="replace")
    if h.get(b"rt"):  # the route: one entry, or a list when the order was split
        route = parse_route(h[b"rt"].decode())
        record["route"] = route[0] if len(route) == 1 else route
    return record
