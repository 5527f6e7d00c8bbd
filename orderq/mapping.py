"""Declarative channel mappings (contract §7), compiled once into small closures.

A mapping file (TOML, ``mappings/<channel>.toml``) mirrors the order schema (§3): each
order field says where its value lives in the channel's own payload and how to convert
it. An operator edits the file; nothing is interpreted per request beyond the closures
built here at start (a few dict lookups per field).

Field spec — a string is a path; a table holds exactly one source and optional steps::

    remark     = "buyer_message"                                   # path
    order_id   = { path = "orderId", type = "str" }                 # rename + type
    phone      = { path = ["receiver_mobile", "receiver_phone"] }   # first one present
    remark     = { join = ["buyer_words", "sku_order_list[].remark"], sep = "; " }
    currency   = { const = "CNY" }
    created_at = { path = "created", time = "Asia/Shanghai" }       # or "UTC", "+08:00", "epoch_s", "epoch_ms"
    paid_amount = { path = "pay_amount", money = "fen" }            # or "yuan"; per = "<qty path>" divides
    tier       = { path = "member.grade", enum = { "3" = "vip" }, default = "regular" }
    tier       = { path = "customer.tags", split = ",", enum = { VIP = "vip" }, default = "regular" }

Paths: ``a.b[0].c``; ``[]`` takes every element (joins only). Steps run in the order
split, enum, type, money, time; ``default`` stands in when the source is absent (null and
"" count as absent) or, with ``enum``, when no value maps. Lists (``lines``, ``coupons``,
``gifts``) are tables with ``path`` (the channel's list), ``fields`` (specs relative to
one element) and optionally ``keep_if`` / ``drop_if`` = ``{ path = "...", in = [...] }``.
``extra`` takes any names. ``channel`` is the file's own name, never mapped;
``description`` is free text for the operator.
"""

from __future__ import annotations

import re
import tomllib
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from msgspec import Struct

from orderq.convert import (
    CENT,
    MISSING,
    Bad,
    amount_of,
    enum_step,
    key_of,
    money_text,
    split_step,
    time_step,
    to_int,
    to_str,
)
from orderq.errors import ConfigError
from orderq.payloadpath import Getter, parse_path, path_getter
from orderq.schema import Coupon, Customer, Gift, Line, Order, ShipTo
from orderq.tomlkeys import Key, line_of

Context = dict[str, list[int]]  # list target -> source index of each element kept


class MappingError(Exception):
    """A payload the mapping cannot convert; ``field`` is the channel's own field path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SpecError(Exception):
    """A semantic error in a mapping file, at ``key``."""

    def __init__(self, key: Key, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


# Order targets: object fields, list fields (one struct per element), free-form extra.
OBJECTS: dict[str, type[Struct]] = {"customer": Customer, "ship_to": ShipTo}
LISTS: dict[str, type[Struct]] = {"lines": Line, "coupons": Coupon, "gifts": Gift}
FIELD_KEYS = frozenset({"path", "join", "sep", "const", "split", "enum", "default", "type", "money", "per", "time"})
SOURCES = ("path", "join", "const")
LIST_KEYS = frozenset({"path", "fields", "keep_if", "drop_if"})


# --- conversion steps: orderq/convert.py; only the one needing a quantity lives here --------
def _per(amount: Callable[[Any], Decimal], count: Getter, count_path: str) -> Callable[[Any, Any], str]:
    """A line total -> a unit price: divided by the element's quantity, rounded half up to the fen."""

    def step(v: Any, src: Any) -> str:
        c = count(src)
        try:
            n = to_int(c) if c is not MISSING else 0
        except Bad as exc:
            raise MappingError(count_path, str(exc)) from None
        if n <= 0:
            raise MappingError(count_path, f"cannot divide an amount by a quantity of {c!r}")
        return money_text((amount(v) / n).quantize(CENT, rounding=ROUND_HALF_UP))

    return step


def _money(amount: Callable[[Any], Decimal]) -> Callable[[Any], str]:
    """A money step: the amount as the schema's money text."""
    return lambda v: money_text(amount(v))


def _without_context(get: Getter) -> Callable[[Any, Context], Any]:
    """A top-level field's getter as a build step (it needs no list context)."""
    return lambda src, ctx: get(src)


# --- compiling -------------------------------------------------------------------------------
@dataclass
class Mapping:
    """One channel's compiled mapping: ``apply(payload)`` gives an order document."""

    channel: str
    file: Path
    build: Callable[[Any, Context], dict[str, Any]]
    sources: dict[str, str] = field(default_factory=dict)  # order path ("lines[].qty") -> channel field
    lists: dict[str, str] = field(default_factory=dict)  # list target -> channel list path
    order_id: Getter | None = None  # for a best-effort order key of a payload that does not map

    def apply(self, payload: Any) -> tuple[dict[str, Any], Context]:
        """The order document (to be decoded as :class:`Order`) and where list elements came
        from; :class:`MappingError` names the channel field that could not be converted."""
        if not isinstance(payload, dict):
            raise MappingError("$", f"expected a JSON object, got {type(payload).__name__}")
        ctx: Context = {}
        doc = self.build(payload, ctx)
        doc["channel"] = self.channel
        return doc, ctx

    def key_hint(self, payload: Any) -> str | None:
        """``<channel>:<order id>`` of a payload that failed, so a batch client can match results."""
        try:
            v = self.order_id(payload) if self.order_id is not None else MISSING
        except MappingError:
            return None
        return f"{self.channel}:{v}" if isinstance(v, str | int) and not isinstance(v, bool) else None

    def channel_field(self, order_path: str, ctx: Context) -> str:
        """The channel field an order path came from (``lines[1].qty`` -> ``orders.order[2].num``)."""
        m = re.match(r"^(\w+)\[(\d+)\](?:\.(.+))?$", order_path)
        if m and m.group(1) in self.lists:
            name, i, rest = m.group(1), int(m.group(2)), m.group(3)
            kept = ctx.get(name, [])
            src_i = kept[i] if i < len(kept) else i
            base = f"{self.lists[name]}[{src_i}]"
            if rest is None:
                return base
            sub = self.sources.get(f"{name}[].{rest}")
            return f"{base}.{sub}" if sub else f"{base} ({order_path} not mapped)"
        return self.sources.get(order_path) or f"{order_path} (not mapped)"


def compile_mapping(channel: str, doc: dict[str, Any], file: Path) -> Mapping:
    """Compile a parsed mapping file; :class:`SpecError` names the offending key."""
    sources: dict[str, str] = {}
    lists: dict[str, str] = {}
    allowed = set(Order.__struct_fields__) | {"description"}
    for name in doc:
        if name == "channel":
            raise SpecError(("channel",), "the channel is the file's name; do not map it")
        if name not in allowed:
            raise SpecError((name,), f"unknown order field {name!r} (known: {', '.join(sorted(allowed))})")
    steps: list[tuple[str, Callable[[Any, Context], Any]]] = []
    order_id: Getter | None = None
    for name, spec in doc.items():
        if name == "description":
            continue
        key = (name,)
        if name in OBJECTS:
            steps.append((name, _object(spec, key, OBJECTS[name], name, sources)))
        elif name in LISTS:
            steps.append((name, _list(spec, key, LISTS[name], name, sources, lists)))
        elif name == "extra":
            steps.append((name, _object(spec, key, None, "extra", sources)))
        else:
            get, src = _field(spec, key)
            sources[name] = src
            steps.append((name, _without_context(get)))
            if name == "order_id":
                order_id = get

    def build(src: Any, ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, step in steps:
            v = step(src, ctx)
            if v is not MISSING:
                out[name] = v
        return out

    return Mapping(channel, file, build, sources, lists, order_id)


def _table(spec: Any, key: Key, what: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise SpecError(key, f"expected a table ({what}), got {type(spec).__name__}")
    return spec


def _object(
    spec: Any, key: Key, cls: type[Struct] | None, prefix: str, sources: dict[str, str]
) -> Callable[[Any, Context], Any]:
    """An object target (customer, ship_to) or free-form ``extra``: a table of field specs."""
    table = _table(spec, key, "of field specs")
    known = set(cls.__struct_fields__) if cls is not None else set()
    parts: list[tuple[str, Getter | Callable[[Any, Context], Any], bool]] = []
    for name, sub in table.items():
        if cls is not None and name not in known:
            raise SpecError((*key, name), f"unknown field {name!r} of {prefix} (known: {', '.join(sorted(known))})")
        path = f"{prefix}.{name}"
        if cls is None and isinstance(sub, dict) and not any(s in sub for s in SOURCES):
            parts.append((name, _object(sub, (*key, name), None, path, sources), True))
            continue
        get, src = _field(sub, (*key, name))
        sources[path] = src
        parts.append((name, get, False))

    def build(src: Any, ctx: Context) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, get, nested in parts:
            v = get(src, ctx) if nested else get(src)  # type: ignore[call-arg]
            if v is not MISSING:
                out[name] = v
        return out

    return build


def _list(
    spec: Any, key: Key, cls: type[Struct], name: str, sources: dict[str, str], lists: dict[str, str]
) -> Callable[[Any, Context], Any]:
    table = _table(spec, key, "with path and fields")
    for k in table:
        if k not in LIST_KEYS:
            raise SpecError((*key, k), f"unknown option {k!r} of a list (known: {', '.join(sorted(LIST_KEYS))})")
    if "path" not in table or "fields" not in table:
        raise SpecError(key, f"a list needs 'path' (the channel's list) and [{name}.fields]")
    list_path = table["path"]
    try:
        if not isinstance(list_path, str) or None in parse_path(list_path):
            raise ValueError(f"a list path is one plain path, got {list_path!r}")
        read = path_getter(list_path)
    except ValueError as exc:
        raise SpecError((*key, "path"), str(exc)) from None
    lists[name] = list_path
    fields = _table(table["fields"], (*key, "fields"), "of field specs")
    known = set(cls.__struct_fields__)
    parts: list[tuple[str, Getter]] = []
    for fname, sub in fields.items():
        if fname not in known:
            raise SpecError(
                (*key, "fields", fname), f"unknown field {fname!r} of {name} (known: {', '.join(sorted(known))})"
            )
        get, src = _field(sub, (*key, "fields", fname))
        sources[f"{name}[].{fname}"] = src
        parts.append((fname, get))
    keep = _filter(table.get("keep_if"), (*key, "keep_if"), True)
    drop = _filter(table.get("drop_if"), (*key, "drop_if"), False)

    def build(src: Any, ctx: Context) -> Any:
        items = read(src)
        if items is MISSING:
            return MISSING
        if isinstance(items, dict):  # XML-born JSON: a one-element list arrives as the element
            items = [items]
        if not isinstance(items, list):
            raise MappingError(list_path, f"expected a list, got {type(items).__name__}")
        out: list[dict[str, Any]] = []
        kept: list[int] = []
        for i, item in enumerate(items):
            if (keep is not None and not keep(item)) or (drop is not None and not drop(item)):
                continue
            doc: dict[str, Any] = {}
            try:
                for fname, get in parts:
                    v = get(item)
                    if v is not MISSING:
                        doc[fname] = v
            except MappingError as exc:
                raise MappingError(f"{list_path}[{i}].{exc.field}", exc.message) from None
            out.append(doc)
            kept.append(i)
        ctx[name] = kept
        return out

    return build


def _filter(spec: Any, key: Key, keep: bool) -> Callable[[Any], bool] | None:
    """``keep_if`` / ``drop_if``: an element passes when its value is (not) in the list."""
    if spec is None:
        return None
    table = _table(spec, key, 'like { path = "...", in = [...] }')
    if set(table) != {"path", "in"} or not isinstance(table["in"], list):
        raise SpecError(key, 'expected { path = "...", in = [values] }')
    try:
        get = path_getter(table["path"])
    except ValueError as exc:
        raise SpecError((*key, "path"), str(exc)) from None
    values = frozenset(key_of(v) for v in table["in"])
    empty_in = "" in values

    def test(item: Any) -> bool:
        v = get(item)
        hit = empty_in if v is MISSING else key_of(v) in values
        return hit if keep else not hit

    return test


def _field(spec: Any, key: Key) -> tuple[Getter, str]:
    """A scalar field spec -> (getter, the channel field it reads, for error messages)."""
    if isinstance(spec, str):
        spec = {"path": spec}
    table = _table(spec, key, 'a path string or { path = "..." , ... }')
    for k in table:
        if k not in FIELD_KEYS:
            raise SpecError((*key, k), f"unknown option {k!r} (known: {', '.join(sorted(FIELD_KEYS))})")
    given = [s for s in SOURCES if s in table]
    if len(given) != 1:
        raise SpecError(key, "give exactly one of path, join or const")
    if "const" in table:
        extra = set(table) - {"const"}
        if extra:
            raise SpecError((*key, sorted(extra)[0]), "a const takes no other option")
        value = table["const"]
        return (lambda src: value), "(constant)"
    if "sep" in table and "join" not in table:
        raise SpecError((*key, "sep"), "sep goes with join")
    read, src_name = _reader(table, key)
    default = table.get("default", MISSING)
    steps: list[Callable[[Any], Any]] = []
    if "split" in table:
        if not isinstance(table["split"], str) or not table["split"]:
            raise SpecError((*key, "split"), "split takes a separator string")
        steps.append(split_step(table["split"]))
    if "enum" in table:
        if not isinstance(table["enum"], dict) or not table["enum"]:
            raise SpecError((*key, "enum"), 'enum takes a table like { "3" = "vip" }')
        steps.append(enum_step(table["enum"], default))
    if "type" in table:
        conv = {"str": to_str, "int": to_int}.get(table["type"])
        if conv is None:
            raise SpecError((*key, "type"), f"type is 'str' or 'int', got {table['type']!r}")
        steps.append(conv)
    per: Callable[[Any, Any], str] | None = None
    if "money" in table:
        if table["money"] not in ("yuan", "fen"):
            raise SpecError((*key, "money"), f"money is 'yuan' or 'fen', got {table['money']!r}")
        if "time" in table:
            raise SpecError((*key, "time"), "money and time exclude each other")
        amount = amount_of(table["money"])
        if "per" in table:
            try:
                per = _per(amount, path_getter(table["per"]), table["per"])
            except ValueError as exc:
                raise SpecError((*key, "per"), str(exc)) from None
        else:
            steps.append(_money(amount))
    elif "per" in table:
        raise SpecError((*key, "per"), "per goes with money")
    if "time" in table:
        try:
            if not isinstance(table["time"], str):
                raise ValueError
            steps.append(time_step(table["time"]))
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise SpecError(
                (*key, "time"),
                f"time is a zone (Asia/Shanghai, UTC, +08:00), epoch_s or epoch_ms; got {table['time']!r}",
            ) from None

    if not steps and per is None and default is MISSING:
        return read, src_name  # a plain path or join: the reader itself, no wrapper call

    def get(src: Any) -> Any:
        v = read(src)
        if v is MISSING:
            return default
        try:
            for step in steps:
                v = step(v)
            if per is not None:
                v = per(v, src)
        except Bad as exc:
            raise MappingError(src_name, str(exc)) from None
        return v

    return get, src_name


def _reader(table: dict[str, Any], key: Key) -> tuple[Getter, str]:
    """The source part of a field spec: path (or first present of several) or join."""
    try:
        if "join" in table:
            paths = table["join"]
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
                raise SpecError((*key, "join"), "join takes a list of paths")
            sep = table.get("sep", " ")
            if not isinstance(sep, str):
                raise SpecError((*key, "sep"), "sep is a string")
            getters = [path_getter(p) for p in paths]

            def joined(src: Any) -> Any:
                parts: list[str] = []
                for g in getters:
                    v = g(src)
                    if v is MISSING:
                        continue
                    for x in v if isinstance(v, list) else (v,):
                        s = key_of(x).strip() if not isinstance(x, dict | list) else ""
                        if s:
                            parts.append(s)
                return sep.join(parts) if parts else MISSING

            return joined, " + ".join(paths)
        path = table["path"]
        if isinstance(path, list):
            if not path or not all(isinstance(p, str) for p in path):
                raise SpecError((*key, "path"), "path takes a string or a list of strings")
            getters = [path_getter(p) for p in path]

            def first(src: Any) -> Any:
                for g in getters:
                    v = g(src)
                    if v is not MISSING:
                        return v
                return MISSING

            return first, " | ".join(path)
        if not isinstance(path, str):
            raise SpecError((*key, "path"), "path takes a string or a list of strings")
        return path_getter(path), path
    except ValueError as exc:
        raise SpecError((*key, "join" if "join" in table else "path"), str(exc)) from None


# --- files -----------------------------------------------------------------------------------
def load_file(path: Path, channels: tuple[str, ...]) -> Mapping:
    """Parse and compile one mapping file; :class:`ConfigError` names the file and line."""
    channel = path.stem
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read the mapping: {exc}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise ConfigError(where, f"not valid TOML: {exc}") from None
    if channel not in channels:
        raise ConfigError(
            str(path), f"no channel {channel!r} (the file name is the channel; known: {', '.join(channels)})"
        )
    try:
        return compile_mapping(channel, doc, path)
    except SpecError as exc:
        line = line_of(text, exc.key)
        raise ConfigError(f"{path}:{line}", f"{'.'.join(exc.key)}: {exc.message}") from None


def load_dir(directory: Path, channels: tuple[str, ...]) -> dict[str, Mapping]:
    """Every ``<channel>.toml`` under ``directory``, compiled (samples and other files ignored)."""
    if not directory.is_dir():
        raise ConfigError("ORDERQ_MAPPINGS_DIR", f"not a directory: {directory}")
    return {p.stem: load_file(p, channels) for p in sorted(directory.glob("*.toml"))}
