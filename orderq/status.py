"""The status record (contract §5): stored as one hash per order, rendered here."""

from __future__ import annotations

from typing import Any

from orderq import keys
from orderq.schema import any_json_decoder, utc_iso

# hash field -> name in "times"
TIME_FIELDS = {
    b"ta": "accepted",
    b"tv": "validated",
    b"tw": "review",
    b"th": "held",
    b"te": "executed",
    b"tr": "rejected",
}


def render(order_key: str, h: dict[bytes, bytes]) -> dict[str, Any]:
    """A status hash -> the contract's JSON record."""
    actions = []
    for name in keys.ACTIONS:
        state = h.get(b"x:" + name.encode())
        if state is not None:
            actions.append({"name": name, "state": state.decode()})
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
    return record
