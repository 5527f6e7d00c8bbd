"""The conversion steps a mapping field can take (:mod:`orderq.mapping`): split, enum,
type, money (yuan or fen to a 2-decimal yuan string) and time (any zone or Unix time to
RFC 3339 UTC). Each is a small closure built once; a refused value raises :class:`Bad`,
which the mapping turns into a 422 naming the channel's field.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # the channel payload has no value here (absent, null or "")


class Bad(Exception):
    """A conversion step refused a value (the caller adds the channel field)."""


CENT = Decimal("0.01")
UTC = dt.UTC
# China has kept UTC+8 without daylight saving since 1991: used if the system has no tzdata.
FIXED_ZONES = {"Asia/Shanghai": 8, "Asia/Chongqing": 8, "Asia/Harbin": 8, "PRC": 8, "UTC": 0, "Etc/UTC": 0}
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def key_of(v: Any) -> str:
    """How a channel value is looked up in an ``enum`` / ``in`` table (TOML keys are strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def split_step(sep: str) -> Callable[[Any], Any]:
    def step(v: Any) -> Any:
        if isinstance(v, list):
            return [p.strip() for x in v for p in str(x).split(sep) if p.strip()]
        if not isinstance(v, str):
            raise Bad(f"expected a string to split, got {type(v).__name__}")
        return [p.strip() for p in v.split(sep) if p.strip()]

    return step


def enum_step(table: dict[str, Any], default: Any) -> Callable[[Any], Any]:
    values = {str(k): v for k, v in table.items()}
    choices = ", ".join(repr(k) for k in values)

    def step(v: Any) -> Any:
        for item in v if isinstance(v, list) else (v,):
            hit = values.get(key_of(item), MISSING)
            if hit is not MISSING:
                return hit
        if default is not MISSING:
            return default
        raise Bad(f"unknown value {v!r} (the mapping knows {choices})")

    return step


def to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise Bad(f"expected a string or a number, got {type(v).__name__}")
    if isinstance(v, float) and not v.is_integer():
        raise Bad(f"expected a whole number, got {v!r}")
    return str(int(v))


def to_int(v: Any) -> int:
    if isinstance(v, bool):
        raise Bad("expected an integer, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d+\s*", v):
        return int(v)
    raise Bad(f"expected an integer, got {v!r}")


def decimal_of(v: Any) -> Decimal:
    if isinstance(v, bool):
        raise Bad("expected an amount, got a boolean")
    try:
        if isinstance(v, int):
            return Decimal(v)
        if isinstance(v, float):
            return Decimal(repr(v))  # shortest repr: 19.9 -> Decimal("19.9"), not its binary value
        if isinstance(v, str):
            return Decimal(v.strip())
    except InvalidOperation:
        pass
    raise Bad(f"expected an amount, got {v!r}")


def money_text(d: Decimal) -> str:
    if not d.is_finite() or d < 0:
        raise Bad(f"expected a non-negative amount, got {d}")
    q = d.quantize(CENT)
    if q != d:
        raise Bad(f"amount {d} has more than 2 decimals")
    return f"{q:.2f}"


def amount_of(unit: str) -> Callable[[Any], Decimal]:
    """``yuan``: a decimal (string or number) of yuan; ``fen``: an integer of fen (cents)."""
    if unit == "yuan":
        return decimal_of

    def fen(v: Any) -> Decimal:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise Bad(f"expected an integer amount of fen, got {v!r}")
        return Decimal(v) / 100

    return fen


def zone_of(name: str) -> dt.tzinfo:
    """An IANA zone name, ``UTC`` or a fixed ``+08:00`` offset."""
    m = _OFFSET.match(name)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        return dt.timezone(sign * dt.timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        if name in FIXED_ZONES:
            return dt.timezone(dt.timedelta(hours=FIXED_ZONES[name]))
        raise


def time_step(spec: str) -> Callable[[Any], Any]:
    """Channel time -> RFC 3339 UTC to the microsecond. Strings without an offset are read in
    the zone ``spec`` names; ``epoch_s`` / ``epoch_ms`` read Unix times (UTC by definition)."""
    if spec in ("epoch_s", "epoch_ms"):
        scale = 1000 if spec == "epoch_ms" else 1

        def epoch(v: Any) -> str:
            if isinstance(v, str) and v.strip().isdigit():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise Bad(f"expected a Unix time, got {v!r}")
            try:
                t = dt.datetime.fromtimestamp(v / scale, UTC)
            except (OverflowError, OSError, ValueError):
                raise Bad(f"Unix time {v!r} out of range") from None
            return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

        return epoch
    tz = zone_of(spec)

    def text(v: Any) -> str:
        if not isinstance(v, str):
            raise Bad(f"expected a date-time string, got {v!r}")
        try:
            t = dt.datetime.fromisoformat(v.strip())
        except ValueError:
            raise Bad(f"expected a date-time like 2026-11-11 00:00:01, got {v!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=tz)
        return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    return text
