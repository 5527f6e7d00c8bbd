"""Validation decisions for a whole batch: outcome, priority, reasons, risk score.

The schema was checked at the edge; here each order gets its priority class and
an outcome. Business rules (stock, coupons, risk) plug in as batch functions, so a
rule costs a bounded number of Redis round trips per batch, never one per order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orderq import keys
from orderq.schema import Order


@dataclass(slots=True)
class Decision:
    """What validation decided for one order."""

    order: Order
    outcome: str = "v"  # v validated · r rejected · w review
    priority: str = "regular"
    reasons: list[str] = field(default_factory=list)
    risk_score: int = 0


async def classify(client: Any, orders: list[Order]) -> list[str]:
    """Priority per order: ``vip`` by tier, ``new`` for a customer's first order seen, else ``regular``.

    One pipelined round trip for the batch. ``SET NX GET`` records which order was the
    customer's first, so a redelivered order is classified the same way again.
    """
    prios = ["vip" if o.customer.tier == "vip" else "" for o in orders]
    pipe = client.pipeline(transaction=False)
    asked = []
    for i, o in enumerate(orders):
        key = o.key
        pipe.set(keys.customer_key(o.channel, o.customer.id), key, nx=True, get=True, ex=keys.CUSTOMER_TTL_S)
        asked.append((i, key.encode()))
    if asked:
        firsts = await pipe.execute()
        for (i, key), first in zip(asked, firsts, strict=True):
            if not prios[i]:
                prios[i] = "new" if first is None or first == key else "regular"
    return prios


async def decide(client: Any, orders: list[Order]) -> list[Decision]:
    prios = await classify(client, orders)
    return [Decision(order=o, priority=p) for o, p in zip(orders, prios, strict=True)]
