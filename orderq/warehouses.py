"""Warehouses: where goods ship from. Kept in one hash (``keys.WAREHOUSES_KEY``),
set as a whole by ``PUT /v1/admin/warehouses`` and mirrored in every process by
:class:`orderq.control.Control` (pub/sub, then a re-read every second), so the execute
stage routes without reading them per batch.

With none configured, orderq ships everything from one implicit warehouse (``default``)
and no routing rule fires: behaviour is what it was before warehouses existed.

A warehouse leaves the set only once nothing of it is left to count: a PUT that
drops one that still counts stock or has open allocations is refused (:class:`InUse`), since
its stock records could never be corrected again (no count may name a warehouse that is not
in the set). Count it to 0 first, and let its open picks execute and be settled by a count.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from orderq import geo, keys
from orderq.client import Redis
from orderq.commands import Value
from orderq.errors import OrderqError
from orderq.schema import Text

RETIRE_TRIES = 5  # retire.lua calls while a removed warehouse's SKU set changes under the read

WarehouseId = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
Carrier = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9_-]*$")]


class Warehouse(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: WarehouseId
    province: Text
    city: Text | None = None
    # coordinates; without them, the city's (else the province capital's) from orderq/geo.py
    lat: Annotated[float, Meta(ge=-90, le=90)] | None = None
    lng: Annotated[float, Meta(ge=-180, le=180)] | None = None
    serves: Annotated[list[Text], Meta(max_length=64)] = []  # provinces it is meant for; [] all
    carriers: Annotated[list[Carrier], Meta(max_length=16)] = []  # first: its usual carrier

    @property
    def at(self) -> tuple[float, float]:
        if self.lat is not None and self.lng is not None:
            return (self.lat, self.lng)
        at = geo.locate(self.province, self.city)
        assert at is not None, "checked by problems()"
        return at


class WarehousesBody(msgspec.Struct, forbid_unknown_fields=True):
    warehouses: Annotated[list[Warehouse], Meta(max_length=1000)]


class StockLeft(msgspec.Struct, frozen=True):
    """What keeps a warehouse in the set: a SKU it still counts or has allocated."""

    warehouse: str
    sku: str
    physical: int  # its count
    allocated: int  # units routed there that no count has settled yet
    orders: int  # orders holding them


class InUse(OrderqError):
    """A warehouse to remove still has stock or open allocations; nothing was changed."""

    def __init__(self, total: int, left: list[StockLeft]) -> None:
        self.total = total  # SKUs x warehouses in the way
        self.left = left  # up to 100 of them
        names = ", ".join(repr(w) for w in sorted({s.warehouse for s in left}))
        super().__init__(
            f"cannot remove warehouse {names}: {total} SKU(s) still counted or allocated there; count it "
            "to 0 with PUT /v1/admin/stock, let its open picks execute and a count settle them, then remove it"
        )


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Warehouse).decode


def problems(ws: list[Warehouse]) -> list[tuple[str, str]]:
    """(path, message) of what the schema cannot say: ids unique, a place that can be located."""
    out = []
    seen: set[str] = set()
    for i, w in enumerate(ws):
        if w.id in seen:
            out.append((f"warehouses[{i}].id", f"warehouse {w.id!r} is listed twice"))
        seen.add(w.id)
        if w.id == keys.DEFAULT_WAREHOUSE:
            out.append((f"warehouses[{i}].id", f"{keys.DEFAULT_WAREHOUSE!r} names stock put without a warehouse"))
        if (w.lat is None) != (w.lng is None):
            out.append((f"warehouses[{i}].lat", "give both lat and lng, or neither"))
        elif w.lat is None and geo.locate(w.province, w.city) is None:
            out.append((f"warehouses[{i}]", f"unknown place {w.province!r}/{w.city!r}: give lat and lng"))
    return out


async def put(r: Redis, ws: list[Warehouse]) -> None:
    """Replace the whole set, atomically, and tell every process. Raises InUse, changing
    nothing, when a warehouse it drops still has stock or open allocations; otherwise the
    ledger forgets the dropped ones first (retire.lua), so no executor allocates there again."""
    ids = [w.id for w in ws]
    gone = sorted(w.decode() for w in set(await r.client.hkeys(keys.WAREHOUSES_KEY)) - {i.encode() for i in ids})
    for _ in range(RETIRE_TRIES):
        res = await _retire(r, gone, ids)
        if res != [-1]:
            break
    else:
        raise RuntimeError(f"the SKU sets of {gone} kept changing: retry the request")
    if res:
        total, rows = res
        left = [StockLeft(wh.decode(), sku.decode(), int(p), int(a), int(o)) for wh, sku, p, a, o in rows]
        raise InUse(int(total), left)
    pipe = r.client.pipeline(transaction=not r.settings.redis_cluster)
    pipe.delete(keys.WAREHOUSES_KEY)
    if ws:
        pipe.hset(keys.WAREHOUSES_KEY, mapping={w.id: _encode(w) for w in ws})
    await pipe.execute()
    await r.client.publish(keys.EVENTS_CHANNEL, _encode({"warehouses": "set"}))


async def _retire(r: Redis, gone: list[str], ids: list[str]) -> list[Any]:
    """One retire.lua call with every key it touches: each removed warehouse's SKU set is read
    first (the script answers [-1] when one changed in between)."""
    pipe = r.client.pipeline(transaction=False)
    for wh in gone:
        pipe.smembers(keys.wh_skus_key(wh))
    ks: list[str] = [keys.RETIRED_WAREHOUSES_KEY]
    args: list[Value] = [len(gone)]
    for wh, members in zip(gone, await pipe.execute(), strict=True):
        skus = sorted(m.decode() for m in members)
        ks.append(keys.wh_skus_key(wh))
        for sku in skus:
            ks += [keys.stock_key(sku), keys.wh_holders_key(sku, wh)]
        args += [wh, len(skus), *skus]
    args += ids
    (res,) = await r.run(lambda pipe: r.script(pipe, "retire", ks, args))
    return list(res)


def decode_all(raw: dict[bytes, bytes]) -> dict[str, Warehouse]:
    """The hash as read by HGETALL -> id -> Warehouse, in id order (stable rankings)."""
    return {k.decode(): _decode(v) for k, v in sorted(raw.items())}


async def get_all(r: Redis) -> dict[str, Warehouse]:
    return decode_all(await r.client.hgetall(keys.WAREHOUSES_KEY))
