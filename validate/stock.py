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
SCAN_COUNT = 10_000  # holders read per HSCAN page
CHUNK = 5_000  # holders per status pipeline and per restock call


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

    Round trips: the holder lists (one per page of ``SCAN_COUNT`` holders, all SKUs in
    each), their statuses (one per ``CHUNK`` holders), then one pipeline of ``restock``
    calls. Holders are paged and settled in chunks so that a SKU with a million
    holders neither blocks the server nor builds one giant script call; settling is
    idempotent per holder, and physical stock is set by the last call of each SKU."""
    skus = list(dict.fromkeys(sku for sku, _ in items))
    physical = dict(items)  # the last value of a repeated SKU wins
    holders: dict[str, list[str]] = {sku: [] for sku in skus}
    cursors = dict.fromkeys(skus, 0)
    while cursors:
        pipe = r.client.pipeline(transaction=False)
        for sku, cur in cursors.items():
            pipe.hscan(keys.holders_key(sku), cur, count=SCAN_COUNT)
        for sku, (cur, page) in zip(list(cursors), await pipe.execute(), strict=True):
            holders[sku] += [k.decode() for k in page]
            if cur:
                cursors[sku] = cur
            else:
                del cursors[sku]
    unique = list(dict.fromkeys(k for ks in holders.values() for k in ks))
    status: dict[str, bytes | None] = {}
    for i in range(0, len(unique), CHUNK):
        chunk = unique[i : i + CHUNK]
        pipe = r.client.pipeline(transaction=False)
        for k in chunk:
            pipe.hget(r.partition_of(k).status(k), "s")
        status.update(zip(chunk, await pipe.execute(), strict=True))
    calls: list[list[object]] = []
    for sku in skus:
        done = [k for k in holders[sku] if status.get(k) is None or status[k] in SETTLED]
        for i in range(0, len(done), CHUNK):
            calls.append([keys.RULES_PREFIX, sku, "-", len(done[i : i + CHUNK]), *done[i : i + CHUNK]])
        calls.append([keys.RULES_PREFIX, sku, physical[sku], 0])
    res = await r.run(lambda pipe: [r.script(pipe, "restock", [SLOT_KEY], args) for args in calls])
    buf = r.settings.stock_buffer
    final = [row for args, row in zip(calls, res, strict=True) if args[2] != "-"]
    return [view(sku, int(p), int(rv), buf) for sku, ((p, rv),) in zip(skus, final, strict=True)]


async def release(r: Redis, order_keys: list[str]) -> int:
    """Return what these orders hold (units, single-use coupons, day subsidy); idempotent."""
    if not order_keys:
        return 0
    res = await r.run(lambda pipe: r.script(pipe, "release", [SLOT_KEY], [keys.RULES_PREFIX, *order_keys]))
    return int(res[0])
