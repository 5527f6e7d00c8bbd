"""Declarative channel mappings (contract §7), compiled once into small closures.

A mapping file (TOML, ``mappings/<channel>.toml``) mirrors the order schema (§3): each
order field says where its value lives in the channel's own payload and how to convert
it. An operator edits the file; nothing is interpreted per request beyond the closures
built here at start (a few dict lookups per field).

Field spec (:mod:`orderq.fieldspec`) — a string is a path; a table holds exactly one source
and optional steps::

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

The channel's own cancel and refund messages (contract §5), posted to the same endpoint as its
orders, are ``[[cancel]]`` entries, each a kind of message::

    [[cancel]]
    json     = ["data"]                                    # fields holding JSON text, read as what it encodes
    when     = { tag = ["206"], "data.aftersale_type" = [2] }   # every path holds one of its values
    order_id = { path = "data.p_id", type = "str" }
    reason   = { path = "data.reason_code", enum = { "14" = "out_of_stock" }, default = "refund" }
    note     = "data.cancel_reason"                        # optional, kept with the cancel

``reason`` must give one of the contract's reasons (:data:`orderq.lifecycle.CancelReason`).
A payload that no entry's ``when`` recognises is an order.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import msgspec
from msgspec import Struct

from orderq.convert import MISSING, Bad, key_of, to_str
from orderq.errors import ConfigError
from orderq.fieldspec import SOURCES, MappingError, SpecError, field_getter, table_of, value_filter
from orderq.lifecycle import CancelReason
from orderq.payloadpath import Getter, parse_path, path_getter
from orderq.schema import Coupon, Customer, Gift, Line, Order, ShipTo, any_json_decoder
from orderq.tomlkeys import Key, line_of

__all__ = ["CancelMessage", "Mapping", "MappingError", "SpecError", "compile_mapping", "load_dir", "load_file"]

Context = dict[str, list[int]]  # list target -> source index of each element kept

# Order targets: object fields, list fields (one struct per element), free-form extra.
OBJECTS: dict[str, type[Struct]] = {"customer": Customer, "ship_to": ShipTo}
LISTS: dict[str, type[Struct]] = {"lines": Line, "coupons": Coupon, "gifts": Gift}
LIST_KEYS = frozenset({"path", "fields", "keep_if", "drop_if"})


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
    cancels: tuple[CancelRule, ...] = ()  # the channel's cancel and refund messages, each a kind

    def cancel_of(self, payload: Any) -> CancelMessage | None:
        """The cancel a payload is (the first entry that recognises it), or None: an order.
        A recognised message without a usable order id or reason raises :class:`MappingError`."""
        for rule in self.cancels:
            msg = rule.match(payload)
            if msg is not None:
                return msg
        return None

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
    allowed = set(Order.__struct_fields__) | {"description", "cancel"}
    for name in doc:
        if name == "channel":
            raise SpecError(("channel",), "the channel is the file's name; do not map it")
        if name not in allowed:
            raise SpecError((name,), f"unknown order field {name!r} (known: {', '.join(sorted(allowed))})")
    steps: list[tuple[str, Callable[[Any, Context], Any]]] = []
    order_id: Getter | None = None
    for name, spec in doc.items():
        if name in ("description", "cancel"):
            continue
        key = (name,)
        if name in OBJECTS:
            steps.append((name, _object(spec, key, OBJECTS[name], name, sources)))
        elif name in LISTS:
            steps.append((name, _list(spec, key, LISTS[name], name, sources, lists)))
        elif name == "extra":
            steps.append((name, _object(spec, key, None, "extra", sources)))
        else:
            get, src = field_getter(spec, key)
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

    cancels = _cancel_rules(doc.get("cancel", []))
    return Mapping(channel, file, build, sources, lists, order_id, cancels)


def _object(
    spec: Any, key: Key, cls: type[Struct] | None, prefix: str, sources: dict[str, str]
) -> Callable[[Any, Context], Any]:
    """An object target (customer, ship_to) or free-form ``extra``: a table of field specs."""
    table = table_of(spec, key, "of field specs")
    known = set(cls.__struct_fields__) if cls is not None else set()
    parts: list[tuple[str, Getter | Callable[[Any, Context], Any], bool]] = []
    for name, sub in table.items():
        if cls is not None and name not in known:
            raise SpecError((*key, name), f"unknown field {name!r} of {prefix} (known: {', '.join(sorted(known))})")
        path = f"{prefix}.{name}"
        if cls is None and isinstance(sub, dict) and not any(s in sub for s in SOURCES):
            parts.append((name, _object(sub, (*key, name), None, path, sources), True))
            continue
        get, src = field_getter(sub, (*key, name))
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
    table = table_of(spec, key, "with path and fields")
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
    fields = table_of(table["fields"], (*key, "fields"), "of field specs")
    known = set(cls.__struct_fields__)
    parts: list[tuple[str, Getter]] = []
    for fname, sub in fields.items():
        if fname not in known:
            raise SpecError(
                (*key, "fields", fname), f"unknown field {fname!r} of {name} (known: {', '.join(sorted(known))})"
            )
        get, src = field_getter(sub, (*key, "fields", fname))
        sources[f"{name}[].{fname}"] = src
        parts.append((fname, get))
    keep = value_filter(table.get("keep_if"), (*key, "keep_if"), True)
    drop = value_filter(table.get("drop_if"), (*key, "drop_if"), False)

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


# --- cancel and refund messages (contract §5) ------------------------------------------------
CANCEL_REASONS = frozenset(get_args(CancelReason))
CANCEL_KEYS = frozenset({"json", "when", "order_id", "reason", "note"})
ORDER_ID_MAX = 128  # an order id longer than any platform's is not one (as the cancel endpoint)


@dataclass(frozen=True, slots=True)
class CancelMessage:
    """What a channel's cancel or refund message asks: cancel ``<channel>:<order_id>``."""

    order_id: str
    reason: str  # one of CANCEL_REASONS
    note: str


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``when`` test: the value at ``get`` is one of ``values``; ``inner`` if the path reads
    into a field holding JSON text; ``top``, the field name of a one-segment path (read with a
    plain ``dict.get``: an order, missing it, costs no exception)."""

    get: Getter
    values: frozenset[str]
    inner: bool
    top: str | None


@dataclass(frozen=True, slots=True)
class CancelRule:
    """One ``[[cancel]]`` entry, compiled."""

    json: tuple[str, ...]
    when: tuple[Condition, ...]
    order_id: tuple[Getter, str]
    reason: tuple[Getter, str]
    note: Getter | None

    def match(self, payload: Any) -> CancelMessage | None:
        """The cancel ``payload`` asks for, or None when ``when`` does not hold. Conditions run in
        the order written, each a dict lookup or two: an order pays a lookup per entry."""
        if not isinstance(payload, dict):
            return None
        src: Any = payload
        for test in self.when:
            if test.inner and src is payload:
                src = self._opened(payload)
            v = src.get(test.top) if test.top is not None else test.get(src)
            if v is None or v is MISSING or isinstance(v, dict | list) or key_of(v) not in test.values:
                return None
        if src is payload and self.json:
            src = self._opened(payload)
        get, name = self.order_id
        order_id = _cancel_order_id(get(src), name)
        get, name = self.reason
        reason = get(src)
        if not isinstance(reason, str) or reason not in CANCEL_REASONS:
            known = ", ".join(sorted(CANCEL_REASONS))
            given = "nothing" if reason is MISSING else repr(reason)
            raise MappingError(name, f"maps to {given}, not a cancel reason (known: {known})")
        note = self.note(src) if self.note is not None else MISSING
        text = key_of(note) if note is not MISSING and not isinstance(note, dict | list) else ""
        return CancelMessage(order_id, reason, text)

    def _opened(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``payload`` with each ``json`` field's JSON text decoded (an object stays as is)."""
        out = dict(payload)
        for name in self.json:
            v = payload.get(name)
            if isinstance(v, str):
                try:
                    out[name] = any_json_decoder.decode(v)
                except (msgspec.DecodeError, RecursionError):
                    raise MappingError(name, "expected JSON text of an object") from None
        return out


def _cancel_order_id(v: Any, name: str) -> str:
    if v is MISSING:
        raise MappingError(name, "a cancel message needs its order id")
    try:
        text = to_str(v).strip()
    except Bad as exc:
        raise MappingError(name, str(exc)) from None
    if not text or len(text) > ORDER_ID_MAX:
        raise MappingError(name, f"not an order id: {v!r}")
    return text


def _cancel_rules(spec: Any) -> tuple[CancelRule, ...]:
    """``[[cancel]]``: a list of tables, each compiled on its own (keys name its index)."""
    if not isinstance(spec, list):
        raise SpecError(("cancel",), "write each cancel message as a [[cancel]] table")
    return tuple(_cancel_rule(entry, ("cancel", str(i))) for i, entry in enumerate(spec))


def _cancel_rule(spec: Any, key: Key) -> CancelRule:
    table = table_of(spec, key, "with when, order_id and reason")
    for k in table:
        if k not in CANCEL_KEYS:
            raise SpecError((*key, k), f"unknown option {k!r} of a cancel (known: {', '.join(sorted(CANCEL_KEYS))})")
    for k in ("when", "order_id", "reason"):
        if k not in table:
            raise SpecError(key, f"a cancel needs {k!r}")
    json_fields = table.get("json", [])
    if not isinstance(json_fields, list) or not all(isinstance(f, str) and f for f in json_fields):
        raise SpecError((*key, "json"), 'json takes a list of top-level field names, like ["data"]')
    when = table_of(table["when"], (*key, "when"), 'of paths and their values, like { tag = ["106"] }')
    if not when:
        raise SpecError((*key, "when"), "when needs at least one path: every order would be a cancel")
    tests: list[Condition] = []
    for path, values in when.items():
        if not isinstance(values, list) or not values or any(isinstance(v, dict | list) for v in values):
            raise SpecError((*key, "when", path), 'expected a list of values, like ["106"]')
        try:
            segs = parse_path(path)
            if None in segs:
                raise ValueError(f"a when path is one plain path, got {path!r}")
            get = path_getter(path)
        except ValueError as exc:
            raise SpecError((*key, "when", path), str(exc)) from None
        top = segs[0] if len(segs) == 1 and isinstance(segs[0], str) else None
        tests.append(Condition(get, frozenset(key_of(v) for v in values), segs[0] in json_fields, top))
    reason_key = (*key, "reason")
    _check_reasons(table["reason"], reason_key)
    note = field_getter(table["note"], (*key, "note"))[0] if "note" in table else None
    return CancelRule(
        tuple(json_fields),
        tuple(tests),
        field_getter(table["order_id"], (*key, "order_id")),
        field_getter(table["reason"], reason_key),
        note,
    )


def _check_reasons(spec: Any, key: Key) -> None:
    """Every reason a spec can give at start (a constant, enum values, the default) must be the
    contract's; one read from the payload is checked when it comes."""
    given: list[tuple[Key, Any]] = []
    if isinstance(spec, dict):
        if "const" in spec:
            given.append((("const",), spec["const"]))
        if isinstance(spec.get("enum"), dict):
            given += [(("enum", str(k)), v) for k, v in spec["enum"].items()]
        if "default" in spec:
            given.append((("default",), spec["default"]))
    for where, value in given:
        if value not in CANCEL_REASONS:
            known = ", ".join(sorted(CANCEL_REASONS))
            raise SpecError((*key, *where), f"{value!r} is not a cancel reason (known: {known})")


def key_text(key: Key) -> str:
    """A key path as an operator reads it: ``cancel[1].reason``."""
    out = ""
    for part in key:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


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
        raise ConfigError(f"{path}:{line}", f"{key_text(exc.key)}: {exc.message}") from None


def load_dir(directory: Path, channels: tuple[str, ...]) -> dict[str, Mapping]:
    """Every ``<channel>.toml`` under ``directory``, compiled (samples and other files ignored)."""
    if not directory.is_dir():
        raise ConfigError("ORDERQ_MAPPINGS_DIR", f"not a directory: {directory}")
    return {p.stem: load_file(p, channels) for p in sorted(directory.glob("*.toml"))}
