"""Field specs of a mapping file (:mod:`orderq.mapping`), compiled into getters: where a value
lives in the channel's own payload (a path, the first present of several, a join, a constant) and
the steps that convert it (split, enum, type, money, time). A getter raises :class:`MappingError`
naming the channel's field; a spec that cannot compile raises :class:`SpecError` at its key.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

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
from orderq.payloadpath import Getter, path_getter
from orderq.tomlkeys import Key


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


FIELD_KEYS = frozenset({"path", "join", "sep", "const", "split", "enum", "default", "type", "money", "per", "time"})
SOURCES = ("path", "join", "const")


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


def table_of(spec: Any, key: Key, what: str) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise SpecError(key, f"expected a table ({what}), got {type(spec).__name__}")
    return spec


def value_filter(spec: Any, key: Key, keep: bool) -> Callable[[Any], bool] | None:
    """``keep_if`` / ``drop_if``: an element passes when its value is (not) in the list."""
    if spec is None:
        return None
    table = table_of(spec, key, 'like { path = "...", in = [...] }')
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


def field_getter(spec: Any, key: Key) -> tuple[Getter, str]:
    """A scalar field spec -> (getter, the channel field it reads, for error messages)."""
    if isinstance(spec, str):
        spec = {"path": spec}
    table = table_of(spec, key, 'a path string or { path = "..." , ... }')
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
