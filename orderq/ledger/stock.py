"""Stock in the validation ledger: set (a warehouse count), read, release.

Model: ``reserved`` counts the units promised to orders whose goods have not yet left
the count. Validation reserves every line of an order atomically (checks.lua); an
order rejected by a reviewer returns its units (release.lua); an executed order keeps
them (its pick is under way) until the next count: ``PUT /v1/admin/stock`` sets the
physical stock and settles the reservations of executed orders, since the new count
no longer contains their goods (restock.lua). So between counts,
``sellable = floor(physical x ORDERQ_STOCK_BUFFER) - reserved`` never oversells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orderq import keys, wire
from orderq.client import Redis
from orderq.commands import Value

# holders a recount settles: every order past its wait (executed and after, rejected, cancelled)
SETTLED = frozenset(st.encode() for st in wire.TERMINAL_STATUSES)
MAX_PHYSICAL = 1_000_000_000  # keeps physical x buffer (ppm) exact in Lua's doubles
SCAN_COUNT = 10_000  # holders read per HSCAN page
CHUNK = 5_000  # holders per status pipeline and per restock call


def buffer_ppm(buffer: float) -> int:
    """ORDERQ_STOCK_BUFFER in parts per million: the integer form the ledger scripts take
    (checks.lua, route.lua), so Python and Lua floor the same product."""
    return round(buffer * 1_000_000)


def sellable(physical: int, reserved: int, buffer: float) -> int:
    """floor(physical x buffer) - reserved, in integers: the one formula of sellable stock
    (the scripts' Ledger.sellable, orderq/wire.py, computes it from buffer_ppm's argument)."""
    return physical * buffer_ppm(buffer) // 1_000_000 - reserved


def view(sku: str, physical: int, reserved: int, buffer: float) -> dict[str, Any]:
    return {"sku": sku, "physical": physical, "reserved": reserved, "sellable": sellable(physical, reserved, buffer)}


class PerWarehouse(ValueError):
    """Stock put without a warehouse for a SKU that is counted per warehouse."""


def _view_of(sku: str, h: dict[bytes, bytes], buffer: float) -> dict[str, Any]:
    doc = view(sku, int(h.get(b"p", 0)), int(h.get(b"r", 0)), buffer)
    whs = sorted(f[2:].decode() for f in h if f.startswith(b"w:"))
    if whs:  # counted per warehouse: physical is their sum
        doc["warehouses"] = {
            wh: {"physical": int(h[b"w:" + wh.encode()]), "allocated": int(h.get(b"a:" + wh.encode(), 0))} for wh in whs
        }
    return doc


async def get_stock(r: Redis, sku: str) -> dict[str, Any] | None:
    h = await r.client.hgetall(keys.stock_key(sku))
    if b"p" not in h:
        return None
    return _view_of(sku, h, r.settings.stock_buffer)


async def _holders(r: Redis, hashes: list[str]) -> dict[str, list[str]]:
    """Every holder (order key) listed in each holders hash, paged."""
    holders: dict[str, list[str]] = {h: [] for h in hashes}
    cursors = dict.fromkeys(hashes, 0)
    while cursors:
        pipe = r.client.pipeline(transaction=False)
        for name, cur in cursors.items():
            pipe.hscan(name, cur, count=SCAN_COUNT)
        for name, (cur, page) in zip(list(cursors), await pipe.execute(), strict=True):
            holders[name] += [k.decode() for k in page]
            if cur:
                cursors[name] = cur
            else:
                del cursors[name]
    return holders


async def set_stock(r: Redis, items: Sequence[tuple[str, int] | tuple[str, int, str | None]]) -> list[dict[str, Any]]:
    """Set physical stock (of a SKU, or of a SKU in one warehouse) and settle the
    reservations of executed (or gone) orders.

    Round trips: the holder lists (one per page of ``SCAN_COUNT`` holders, all SKUs in
    each), their statuses (one per ``CHUNK`` holders), then one pipeline of ``restock``
    calls. Holders are paged and settled in chunks so that a SKU with a million
    holders neither blocks the server nor builds one giant script call; settling is
    idempotent per holder, and physical stock is set by the last call of each SKU.
    A warehouse's count settles the units allocated there and the SKU's executed total
    holders. Raises PerWarehouse for a count without a warehouse of a SKU counted per
    warehouse (which warehouse's count would it be?)."""
    # (sku, warehouse or '') -> count; the last value of a repeated item wins
    physical = {(it[0], (it[2] if len(it) > 2 else None) or ""): it[1] for it in items}
    targets = list(physical)
    totals = [sku for sku, wh in targets if not wh]
    if totals:
        pipe = r.client.pipeline(transaction=False)
        for sku in totals:
            pipe.hkeys(keys.stock_key(sku))
        for sku, fields in zip(totals, await pipe.execute(), strict=True):
            if any(f.startswith(b"w:") for f in fields):
                raise PerWarehouse(f"SKU {sku!r} is counted per warehouse: name the warehouse of this count")
    hashes: dict[str, tuple[str, str]] = {}  # holders hash -> (sku, warehouse or '')
    for sku, wh in targets:
        hashes[keys.holders_key(sku)] = (sku, "")
        if wh:
            hashes[keys.wh_holders_key(sku, wh)] = (sku, wh)
    holders = await _holders(r, list(hashes))
    unique = list(dict.fromkeys(k for ks in holders.values() for k in ks))
    status: dict[str, bytes | None] = {}
    for i in range(0, len(unique), CHUNK):
        chunk = unique[i : i + CHUNK]
        pipe = r.client.pipeline(transaction=False)
        for k in chunk:
            pipe.hget(r.partition_of(k).status(k), wire.Field.STATUS)
        status.update(zip(chunk, await pipe.execute(), strict=True))
    calls: list[list[Value]] = []
    for name, (sku, wh) in hashes.items():
        done = [k for k in holders[name] if status.get(k) is None or status[k] in SETTLED]
        for i in range(0, len(done), CHUNK):
            calls.append([sku, wh, "-", len(done[i : i + CHUNK]), *done[i : i + CHUNK]])
    for sku, wh in targets:
        calls.append([sku, wh, physical[(sku, wh)], 0])
    await r.run(lambda pipe: [r.script(pipe, "restock", *restock_call([args])) for args in calls])
    pipe = r.client.pipeline(transaction=False)
    skus = list(dict.fromkeys(sku for sku, _ in targets))
    for sku in skus:
        pipe.hgetall(keys.stock_key(sku))
    buf = r.settings.stock_buffer
    return [_view_of(sku, h, buf) for sku, h in zip(skus, await pipe.execute(), strict=True)]


def restock_call(steps: Sequence[Sequence[Value]]) -> tuple[list[str], list[Value]]:
    """restock.lua's KEYS and ARGV for these steps, each ``[sku, warehouse or '', physical or '-',
    n, holder x n]``: every key it touches, built here."""
    ks: list[str] = []
    args: list[Value] = []
    for step in steps:
        sku, wh = str(step[0]), str(step[1])
        ks += [keys.stock_key(sku), keys.wh_holders_key(sku, wh) if wh else keys.holders_key(sku)]
        if wh:
            ks.append(keys.wh_skus_key(wh))
        args += step
    return ks, args


def release_call(records: Sequence[tuple[str, bytes | None]]) -> tuple[list[str], list[Value]]:
    """release.lua's KEYS and ARGV for these (order key, ledger record or None) pairs: every key
    it touches, built here from each record (an order without a record holds nothing)."""
    ks: list[str] = []
    args: list[Value] = []
    for key, raw in records:
        if raw is None:
            continue
        hold = wire.decode_hold(raw)
        skus = [str(sku) for sku in hold.held[::2]]
        ks += [keys.ledger_key(key), keys.subsidy_key(hold.day), *(keys.coupon_key(c) for c in hold.coupons)]
        for sku in skus:
            ks += [keys.stock_key(sku), keys.holders_key(sku)]
        args += [key, len(hold.coupons), len(skus)]
    return ks, args


async def release(r: Redis, order_keys: list[str]) -> int:
    """Return what these orders hold (units, single-use coupons, day subsidy); idempotent.
    Two round trips: the orders' ledger records, then release.lua with the keys they name."""
    if not order_keys:
        return 0
    pipe = r.client.pipeline(transaction=False)
    for key in order_keys:
        pipe.get(keys.ledger_key(key))
    ks, args = release_call(list(zip(order_keys, await pipe.execute(), strict=True)))
    if not args:
        return 0
    res = await r.run(lambda pipe: r.script(pipe, "release", ks, args))
    return int(res[0])
