"""Stock in the validation ledger: set (a warehouse count), read, release.

Model: ``reserved`` counts the units promised to orders whose goods have not yet left
the count. Validation reserves every line of an order atomically (rules.lua); an
order rejected by a reviewer returns its units (release.lua); an executed order keeps
them (its pick is under way) until the next count: ``PUT /v1/admin/stock`` sets the
physical stock and settles the reservations of executed orders, since the new count
no longer contains their goods (restock.lua). So between counts,
``sellable = floor(physical x ORDERQ_STOCK_BUFFER) - reserved`` never oversells.
"""

from __future__ import annotations

from typing import Any

from orderq import keys
from orderq.client import Redis

SLOT_KEY = keys.RULES_PREFIX  # names the ledger's slot for script routing
SETTLED = frozenset({b"executed", b"rejected"})  # holders whose units a recount settles
MAX_PHYSICAL = 1_000_000_000  # keeps physical x buffer (ppm) exact in Lua's doubles


def buffer_ppm(buffer: float) -> int:
    return round(buffer * 1_000_000)


def sellable(physical: int, reserved: int, buffer: float) -> int:
    """floor(physical x buffer) - reserved, in integers (as the ledger script computes it)."""
    return physical * buffer_ppm(buffer) // 1_000_000 - reserved


def view(sku: str, physical: int, reserved: int, buffer: float) -> dict[str, Any]:
    return {"sku": sku, "physical": physical, "reserved": reserved, "sellable": sellable(physical, reserved, buffer)}


async def get_stock(r: Redis, sku: str) -> dict[str, Any] | None:
    p, res = await r.client.hmget(keys.stock_key(sku), "p", "r")
    if p is None:
        return None
    return view(sku, int(p), int(res or 0), r.settings.stock_buffer)


async def set_stock(r: Redis, items: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Set physical stock and settle the reservations of executed (or gone) orders.
    Three round trips per request, whatever the number of SKUs: holders, their
    statuses, one ``restock`` call."""
    skus = list(dict.fromkeys(sku for sku, _ in items))
    physical = dict(items)  # the last value of a repeated SKU wins
    pipe = r.client.pipeline(transaction=False)
    for sku in skus:
        pipe.hkeys(keys.holders_key(sku))
    holders = [[k.decode() for k in ks] for ks in await pipe.execute()]
    unique = list(dict.fromkeys(k for ks in holders for k in ks))
    status: dict[str, bytes | None] = {}
    if unique:
        pipe = r.client.pipeline(transaction=False)
        for k in unique:
            pipe.hget(r.partition_of(k).status(k), "s")
        status = dict(zip(unique, await pipe.execute(), strict=True))
    args: list[object] = [keys.RULES_PREFIX]
    for sku, ks in zip(skus, holders, strict=True):
        done = [k for k in ks if status.get(k) is None or status[k] in SETTLED]
        args += [sku, physical[sku], len(done), *done]
    res = await r.run(lambda pipe: r.script(pipe, "restock", [SLOT_KEY], args))
    buf = r.settings.stock_buffer
    return [view(sku, int(p), int(rv), buf) for sku, (p, rv) in zip(skus, res[0], strict=True)]


async def release(r: Redis, order_keys: list[str]) -> int:
    """Return what these orders hold (units, single-use coupons, day subsidy); idempotent."""
    if not order_keys:
        return 0
    res = await r.run(lambda pipe: r.script(pipe, "release", [SLOT_KEY], [keys.RULES_PREFIX, *order_keys]))
    return int(res[0])
