"""The order schema (contract §3) and the payload codecs every stage shares.

Orders are decoded and validated straight from the HTTP body into :class:`Order`.
Between stages they travel as msgpack of the same ``Struct`` (created_at already
in UTC), decoded once per stage with the module-level decoders below: the execute stage
with ``unpack_queued``, which trusts the checks the edge and validation made.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
import types
import typing
from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeAlias, TypeVar, Union

import msgspec
from msgspec import Meta, Struct

# A value decoded from JSON whose shape is the sender's (an order's extra fields, a channel's
# payload): nested dicts, lists, strings, numbers, booleans and None. Left open, as msgspec
# decodes it fastest and each reader checks the part it uses.
JSON: TypeAlias = Any
# A type built at run time from msgspec's type info, for msgspec.convert (Python has no static
# type for a type expression).
TypeForm: TypeAlias = Any

# Money: a decimal string with at most 2 decimals. Floats are refused by type.
Money = Annotated[
    str,
    Meta(pattern=r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,2})?$", description="decimal string, at most 2 decimals"),
]
Text = Annotated[str, Meta(min_length=1, max_length=200)]
LongText = Annotated[str, Meta(max_length=2000)]
Sku = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")]
OrderId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
ChannelName = Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")]
Qty = Annotated[int, Meta(ge=1, le=9999)]
Timestamp = Annotated[dt.datetime, Meta(tz=True)]


class Customer(Struct, omit_defaults=True):
    id: Text
    tier: Literal["vip", "regular"] = "regular"
    phone: Annotated[str, Meta(max_length=32)] | None = None
    ip: Annotated[str, Meta(max_length=64)] | None = None


class ShipTo(Struct, omit_defaults=True):
    name: Text
    phone: Annotated[str, Meta(min_length=1, max_length=32)]
    province: Text
    address: Annotated[str, Meta(min_length=1, max_length=500)]
    city: Annotated[str, Meta(max_length=200)] | None = None
    district: Annotated[str, Meta(max_length=200)] | None = None


class Line(Struct, omit_defaults=True):
    sku: Sku
    qty: Qty
    unit_price: Money | None = None
    paid_price: Money | None = None


class Coupon(Struct, omit_defaults=True):
    code: Text
    platform: Text
    amount: Money


class Gift(Struct, omit_defaults=True):
    sku: Sku
    qty: Qty = 1


class Order(Struct, omit_defaults=True):
    """One order as a channel sends it (contract §3), within the money bounds below."""

    channel: ChannelName
    order_id: OrderId
    created_at: Timestamp
    customer: Customer
    ship_to: ShipTo
    lines: Annotated[list[Line], Meta(min_length=1, max_length=200)]
    paid_amount: Money
    coupons: Annotated[list[Coupon], Meta(max_length=50)] = []
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")] = "CNY"
    remark: LongText | None = None
    gifts: Annotated[list[Gift], Meta(max_length=50)] = []
    extra: dict[str, JSON] = {}

    def __post_init__(self) -> None:
        # Runs on every decode (HTTP body and between stages): msgspec turns the ValueError
        # into a ValidationError, which validation_details() turns into paths. A screen in
        # floats first (well under a microsecond); the exact check only near the bounds.
        top = goods = paid_total = 0.0
        for ln in self.lines:
            if ln.paid_price is not None:
                v = float(ln.paid_price)
                paid_total += v * ln.qty
                if v > top:
                    top = v
                if ln.unit_price is None:
                    goods += v * ln.qty
            if ln.unit_price is not None:
                v = float(ln.unit_price)
                goods += v * ln.qty
                if v > top:
                    top = v
        paid = float(self.paid_amount)
        if (
            top <= _SCREEN_PRICE
            and goods <= _SCREEN_ORDER
            and paid_total <= _SCREEN_ORDER
            and (paid if not self.coupons else paid + sum([float(c.amount) for c in self.coupons])) <= _SCREEN_ORDER
        ):
            return
        problems = bound_problems(
            ((ln.qty, ln.unit_price, ln.paid_price) for ln in self.lines),
            self.paid_amount,
            [c.amount for c in self.coupons],
        )
        if problems:
            path, message = problems[0]
            raise ValueError(f"{message} (at {path})")

    @property
    def key(self) -> str:
        return f"{self.channel}:{self.order_id}"


# Money bounds: what a real shop never reaches, and what keeps every sum the stages compute
# exact: the ledger script (orderq/lua/checks.lua) adds a customer's day totals in Lua
# numbers (doubles, exact to 2**53) and multiplies them by the subsidy cap in basis points,
# and msgpack carries integers up to 2**64 only. 200 lines x 9999 x the price bound would
# not fit; the order bound keeps a day of 90 maximal orders per customer exact.
PRICE_MAX_CENTS = 1_000_000_000  # 10,000,000.00: a line's unit_price or paid_price
# 100,000,000.00: the goods total (goods_cents), the sum of qty x paid_price, paid_amount
# and paid_amount plus the coupons
ORDER_MAX_CENTS = 10_000_000_000
_SCREEN_PRICE = PRICE_MAX_CENTS / 100 * 0.999  # (in yuan, floats: below these, surely within)
_SCREEN_ORDER = ORDER_MAX_CENTS / 100 * 0.999


def _yuan(c: int) -> str:
    return f"{c // 100}.{c % 100:02d}"


def bound_problems(
    lines: Iterable[tuple[int, str | None, str | None]], paid_amount: str, coupon_amounts: list[str]
) -> list[tuple[str, str]]:
    """(path, message) of every money bound an order breaks; ``lines`` as (qty, unit_price,
    paid_price). The fields themselves already match the schema."""
    out: list[tuple[str, str]] = []
    over = f"more than {_yuan(ORDER_MAX_CENTS)}"
    goods = paid_total = 0
    for i, (qty, unit, paid) in enumerate(lines):
        for name, value in (("unit_price", unit), ("paid_price", paid)):
            if value is not None and cents(value) > PRICE_MAX_CENTS:
                out.append((f"lines[{i}].{name}", f"at most {_yuan(PRICE_MAX_CENTS)}"))
        if paid is not None:
            paid_total += cents(paid) * qty
        price = unit if unit is not None else paid  # as goods_cents() counts the goods
        if price is not None:
            goods += cents(price) * qty
    if goods > ORDER_MAX_CENTS:
        out.append(("lines", f"the goods total (qty x unit price) is {over}"))
    elif paid_total > ORDER_MAX_CENTS:
        out.append(("lines", f"the lines' qty x paid_price sum to {over}"))
    paid_cents = cents(paid_amount)
    if paid_cents > ORDER_MAX_CENTS:
        out.append(("paid_amount", f"at most {_yuan(ORDER_MAX_CENTS)}"))
    elif coupon_amounts and paid_cents + sum(cents(a) for a in coupon_amounts) > ORDER_MAX_CENTS:
        out.append(("coupons", f"paid_amount plus the coupon amounts is {over}"))
    return out


KNOWN_FIELDS = frozenset(Order.__struct_fields__)


class BatchBody(Struct):
    """``POST /v1/orders/batch``: orders stay raw so one bad order sinks only itself."""

    orders: list[msgspec.Raw]


S = TypeVar("S", bound=Struct)


def unconstrained(cls: type[S], _made: dict[type, type] | None = None) -> type[S]:
    """A subclass of Struct type ``cls`` with the same fields (names, order, defaults, config)
    whose types have every ``Annotated[..., Meta(...)]`` constraint stripped, its Struct types
    (in lists and unions too) replaced in turn. Its instances are instances of ``cls``; its
    ``__post_init__``, if any, is ``cls``'s. Derived here so that the schema has one home."""
    made: dict[type, type] = {} if _made is None else _made
    found = made.get(cls)
    if found is None:
        fields: list[tuple[str, TypeForm] | tuple[str, TypeForm, Any]] = []
        for f in msgspec.structs.fields(cls):
            tp = _strip(f.type, made)
            if f.default is not msgspec.NODEFAULT:
                fields.append((f.name, tp, f.default))
            elif f.default_factory is not msgspec.NODEFAULT:
                fields.append((f.name, tp, msgspec.field(default_factory=f.default_factory)))
            else:
                fields.append((f.name, tp))
        found = made[cls] = msgspec.defstruct(cls.__name__, fields, bases=(cls,), module=cls.__module__)
    return typing.cast(type[S], found)


def _strip(tp: TypeForm, made: dict[type, type]) -> TypeForm:
    origin: Any = typing.get_origin(tp)
    if origin is Annotated:
        return _strip(typing.get_args(tp)[0], made)
    if isinstance(tp, type) and issubclass(tp, Struct):
        return unconstrained(tp, made)
    if origin is Union or origin is types.UnionType:
        return functools.reduce(operator.or_, [_strip(t, made) for t in typing.get_args(tp)])
    if origin in (list, tuple, set, frozenset, dict):
        return types.GenericAlias(origin, tuple(_strip(t, made) for t in typing.get_args(tp)))
    return tp  # str, int, datetime, Any, Literal[...]


# Module-level codecs, reused (msgspec perf tips).
order_decoder = msgspec.json.Decoder(Order)
batch_decoder = msgspec.json.Decoder(BatchBody)
top_level_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
any_json_decoder = msgspec.json.Decoder()
json_encoder = msgspec.json.Encoder()
pack = msgspec.msgpack.Encoder().encode
unpack_order = msgspec.msgpack.Decoder(Order).decode
# The execute stage decodes the orders validation handed over with this: each was checked at
# the edge against the schema and again, in full, by validation (unpack_order: the gate, where
# a payload that reached a stream some other way ends ``unprocessable``), so the field
# constraints, two thirds of a full decode's cost, are not checked a third time. The money
# bounds are (Order.__post_init__). Operator paths (dead letters, replays) keep ``unpack_order``.
unpack_queued = msgspec.msgpack.Decoder(unconstrained(Order)).decode


class ErrorDetail(Struct):
    path: str
    message: str


def normalise(order: Order, body: bytes | msgspec.Raw) -> Order:
    """UTC ``created_at``; unknown top-level fields moved into ``extra`` (kept, not refused)."""
    created = order.created_at
    if created.utcoffset() != dt.timedelta(0):
        order.created_at = created.astimezone(dt.UTC)
    top = top_level_decoder.decode(body)
    if len(top) > len(KNOWN_FIELDS) or not KNOWN_FIELDS.issuperset(top):
        extra = dict(order.extra)
        for name, raw in top.items():
            if name not in KNOWN_FIELDS:
                extra[name] = any_json_decoder.decode(raw)
        order.extra = extra
    return order


def money(value: str | None) -> Decimal:
    return Decimal(value) if value else Decimal(0)


def cents(value: str) -> int:
    """``"1999.5"`` -> 199950 (the schema guarantees at most 2 decimals)."""
    whole, _, frac = value.partition(".")
    if len(frac) != 2:  # (the usual two decimals: one int() of the digits, no arithmetic)
        frac = (frac + "00")[:2]
    return int(whole + frac)


def sku_totals(items: list[Line] | list[Gift]) -> dict[str, int]:
    """Units per SKU (a SKU on several lines counts once, with their sum), in first-seen order."""
    out: dict[str, int] = {}
    for item in items:
        out[item.sku] = out.get(item.sku, 0) + item.qty
    return out


def flat_totals(items: list[Line] | list[Gift]) -> list[object]:
    """:func:`sku_totals` as the scripts read it: ``[sku, qty, sku, qty, ...]``."""
    return [x for sku, qty in sku_totals(items).items() for x in (sku, qty)]


def coupon_cents(o: Order) -> int:
    return sum(cents(c.amount) for c in o.coupons)


def goods_cents(o: Order) -> int:
    """The goods' value: each line's price (unit, else paid) x qty; with no line prices, what
    was paid plus what the coupons took off."""
    goods = 0
    for line in o.lines:
        price = line.unit_price or line.paid_price
        if price:
            goods += cents(price) * line.qty
    return goods or cents(o.paid_amount) + coupon_cents(o)


def utc_iso(ts_us: int) -> str:
    """Microseconds since the epoch -> ``2026-11-10T16:00:01.000000Z``."""
    t = dt.datetime.fromtimestamp(ts_us / 1_000_000, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _path(path: str) -> str:
    return path.removeprefix("$").removeprefix(".") or "$"


def validation_details(body: bytes | msgspec.Raw, first: msgspec.ValidationError) -> list[ErrorDetail]:
    """Every failing path of an invalid order, not only the first msgspec reports.

    Runs on the error path only: decodes the body generically and checks each field
    against its declared type, recursing into structs and lists.
    """
    try:
        doc = any_json_decoder.decode(body)
    except msgspec.DecodeError:
        return [_detail_of(first)]
    details: list[ErrorDetail] = []
    _check(doc, msgspec.inspect.type_info(Order), "", details)
    if not details and isinstance(doc, dict):  # every field is valid: the money bounds, then
        try:
            lines = [(ln["qty"], ln.get("unit_price"), ln.get("paid_price")) for ln in doc["lines"]]
            coupons = [c["amount"] for c in doc.get("coupons", [])]
            problems = bound_problems(lines, doc["paid_amount"], coupons)
        except (KeyError, TypeError, ValueError):
            problems = []
        details = [ErrorDetail(path=path, message=message) for path, message in problems]
    return details or [_detail_of(first)]


def _detail_of(err: msgspec.ValidationError) -> ErrorDetail:
    msg = str(err)
    message, sep, path = msg.rpartition(" - at `")
    if sep:
        return ErrorDetail(path=_path(path.rstrip("`")), message=message)
    return ErrorDetail(path="$", message=msg)


def _join(prefix: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{prefix}[{name}]"
    return f"{prefix}.{name}" if prefix else name


def _check(value: JSON, info: msgspec.inspect.Type, path: str, out: list[ErrorDetail]) -> None:
    inspect = msgspec.inspect
    while isinstance(info, inspect.Metadata):
        info = info.type
    if isinstance(info, inspect.UnionType):
        structs = [t for t in info.types if isinstance(t, inspect.StructType)]
        if structs and isinstance(value, dict):
            _check(value, structs[0], path, out)
            return
    if isinstance(info, inspect.StructType):
        if not isinstance(value, dict):
            out.append(ErrorDetail(path=path or "$", message=f"Expected `object`, got `{_kind(value)}`"))
            return
        for f in info.fields:
            sub = _join(path, f.encode_name)
            if f.encode_name not in value:
                if f.required:
                    out.append(ErrorDetail(path=sub, message=f"Object missing required field `{f.encode_name}`"))
                continue
            _check(value[f.encode_name], f.type, sub, out)
        return
    if isinstance(info, inspect.ListType) and isinstance(value, list):
        before = len(out)
        for i, item in enumerate(value):
            _check(item, info.item_type, _join(path, i), out)
        if len(out) == before:
            _convert(value, info, path, out)
        return
    _convert(value, info, path, out)


def _convert(value: JSON, info: msgspec.inspect.Type, path: str, out: list[ErrorDetail]) -> None:
    try:
        msgspec.convert(value, _type_of(info), strict=True)
    except msgspec.ValidationError as err:
        d = _detail_of(err)
        sub = path if d.path == "$" else (path + ("" if d.path.startswith("[") else ".") + d.path)
        out.append(ErrorDetail(path=sub or "$", message=d.message))


def _type_of(info: msgspec.inspect.Type) -> TypeForm:
    """Rebuild a Python type (with constraints) from msgspec's type info."""
    inspect = msgspec.inspect
    while isinstance(info, inspect.Metadata):
        info = info.type
    meta_kw: dict[str, Any] = {}
    for attr in ("pattern", "min_length", "max_length", "ge", "le", "gt", "lt", "tz"):
        v = getattr(info, attr, None)
        if v is not None:
            meta_kw[attr] = v
    base: TypeForm
    if isinstance(info, inspect.StrType):
        base = str
    elif isinstance(info, inspect.IntType):
        base = int
    elif isinstance(info, inspect.DateTimeType):
        base = dt.datetime
    elif isinstance(info, inspect.LiteralType):
        return Literal[tuple(info.values)]
    elif isinstance(info, inspect.NoneType):
        return None
    elif isinstance(info, inspect.UnionType):
        types = tuple(_type_of(t) for t in info.types)
        out: TypeForm = types[0]
        for t in types[1:]:
            out = out | t if t is not None else out | None
        return out
    elif isinstance(info, inspect.ListType):
        if not meta_kw:
            return list
        item = _type_of(info.item_type)
        return Annotated[list[item], Meta(**meta_kw)]  # type: ignore[valid-type]  # built at run time
    elif isinstance(info, inspect.DictType):
        return dict
    elif isinstance(info, inspect.StructType):
        return info.cls
    else:
        return Any
    return Annotated[base, Meta(**meta_kw)] if meta_kw else base


def _kind(value: JSON) -> str:
    return {dict: "object", list: "array", str: "str", int: "int", float: "float", bool: "bool"}.get(
        type(value), "null"
    )
