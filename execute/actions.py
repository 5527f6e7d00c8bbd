"""Which downstream actions an order gets, and their state under the breaker."""

from __future__ import annotations

from hashlib import blake2b

from orderq.schema import Order, cents

INVOICE_FROM_CENTS = 50_000  # invoice.request when paid_amount >= 500 CNY


def fulfilment_id(order_key: str) -> str:
    """Deterministic per order, so a redelivered order names the same fulfilment."""
    return "F-" + blake2b(order_key.encode(), digest_size=8).hexdigest().upper()


def plan(order: Order, stage: str, mode: str, picks: list[str] | None = None) -> str:
    """``name=state,...`` for the execute script: core actions always ``done``; non-core
    syncs ``done`` in stage normal, else ``deferred``/``dropped`` per breaker mode. A routed
    order has one ``wms.pick@<warehouse>`` per warehouse in ``picks``."""
    acts = [f"wms.pick@{w}=done" for w in picks] if picks else ["wms.pick=done"]
    acts.append("notify.sms=done")
    if cents(order.paid_amount) >= INVOICE_FROM_CENTS:
        acts.append("invoice.request=done")
    sync_state = "done" if stage == "normal" else ("deferred" if mode == "defer" else "dropped")
    if order.remark:
        acts.append(f"crm.remark_sync={sync_state}")
    if order.gifts:
        acts.append(f"crm.gift_sync={sync_state}")
    return ",".join(acts)
