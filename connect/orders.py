"""From a file's rows or a platform's payload to a checked :class:`~orderq.schema.Order`: the
same decoder, schema and channel check as ``POST /v1/orders``, every failing path kept."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from connect.table import BEIJING
from orderq.mapping import Mapping, MappingError
from orderq.schema import (
    KNOWN_FIELDS,
    ErrorDetail,
    Order,
    json_encoder,
    normalise,
    order_decoder,
    validation_details,
)

# The contract's default columns (§7): order-level ones are read from an order's first row.
ORDER_COLUMNS = (
    "order_id",
    "created_at",
    "customer_id",
    "tier",
    "name",
    "phone",
    "province",
    "city",
    "district",
    "address",
    "paid_amount",
    "remark",
)
LINE_COLUMNS = ("sku", "qty", "unit_price", "paid_price")
DEFAULT_COLUMNS = frozenset(ORDER_COLUMNS + LINE_COLUMNS + ("channel",))
_UTC = dt.timedelta(0)
_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d")


class Checked(msgspec.Struct):
    """An order that passed, or the paths it failed on (``order`` None)."""

    order: Order | None
    errors: list[ErrorDetail] = []


def decode(doc: dict[str, Any], channels: tuple[str, ...]) -> Checked:
    body = json_encoder.encode(doc)
    try:
        order = order_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return Checked(None, validation_details(body, exc))
    if order.channel not in channels:
        return Checked(None, [ErrorDetail(path="channel", message=f"unknown channel {order.channel!r}")])
    if KNOWN_FIELDS.issuperset(doc):  # nothing to move into extra: spare normalise its second decode
        if order.created_at.utcoffset() != _UTC:
            order.created_at = order.created_at.astimezone(dt.UTC)
        return Checked(order)
    return Checked(normalise(order, body))


def map_payload(mapping: Mapping, payload: Any, channels: tuple[str, ...]) -> Checked:
    """A channel's own payload through its declarative mapping; paths name the channel's field."""
    try:
        doc, ctx = mapping.apply(payload)
    except MappingError as exc:
        return Checked(None, [ErrorDetail(path=exc.field, message=exc.message)])
    checked = decode(doc, channels)
    checked.errors = [
        ErrorDetail(path=mapping.channel_field(d.path, ctx), message=f"{d.message} (order field `{d.path}`)")
        for d in checked.errors
    ]
    return checked


def when(text: str) -> str:
    """A file's time as RFC 3339: with an offset as written; without one (Excel's
    ``2026/11/11 0:00:01``), Beijing time. Text that is no time is passed on for the schema
    to refuse with its path."""
    t = text.strip().replace("/", "-")
    parsed = _parse_time(t)
    if parsed is None:
        return text
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=BEIJING)
    return parsed.isoformat()


def _parse_time(t: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(t)
    except ValueError:
        pass
    for fmt in _TIME_FORMATS:
        try:
            return dt.datetime.strptime(t, fmt)
        except ValueError:
            continue
    return None


def _qty(text: str) -> int | str:
    t = text.strip()
    return int(t) if t.isdigit() and len(t) < 10 else t


def _put(doc: dict[str, Any], name: str, value: Any) -> None:
    if value not in (None, ""):
        doc[name] = value


def default_doc(channel: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    """The order document of one order's rows in the default columns."""
    first = rows[0]
    get = first.get
    customer: dict[str, Any] = {}
    _put(customer, "id", get("customer_id"))
    customer["tier"] = (get("tier") or "regular").lower()
    _put(customer, "phone", get("phone"))
    ship_to: dict[str, Any] = {}
    for name in ("name", "phone", "province", "city", "district", "address"):
        _put(ship_to, name, get(name))
    lines = []
    for row in rows:
        line: dict[str, Any] = {}
        _put(line, "sku", row.get("sku"))
        _put(line, "qty", _qty(row.get("qty", "")))
        _put(line, "unit_price", row.get("unit_price"))
        _put(line, "paid_price", row.get("paid_price"))
        lines.append(line)
    doc: dict[str, Any] = {"channel": channel, "customer": customer, "ship_to": ship_to, "lines": lines}
    _put(doc, "order_id", get("order_id"))
    if get("created_at"):
        doc["created_at"] = when(first["created_at"])
    _put(doc, "paid_amount", get("paid_amount"))
    _put(doc, "remark", get("remark"))
    extra = {k: v for k, v in first.items() if k not in DEFAULT_COLUMNS and v}
    if extra:  # columns beyond the contract's are kept, as unknown fields of an order are
        doc["extra"] = extra
    return doc
