"""Paths into a channel's own payload, as mapping files write them (:mod:`orderq.mapping`):
``a.b[0].c``, and ``[]`` for every element of a list."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from orderq.convert import MISSING

Getter = Callable[[Any], Any]  # channel object -> value or MISSING; a mapping's getter may raise MappingError
_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\d*)\]|(\.)")


def parse_path(text: str) -> list[str | int | None]:
    """``a.b[0].c[]`` -> ``["a", "b", 0, "c", None]`` (None: every element)."""
    if not isinstance(text, str) or not text or text.startswith(".") or text.endswith("."):
        raise ValueError(f"bad path {text!r}")
    out: list[str | int | None] = []
    pos = 0
    prev_dot = True
    while pos < len(text):
        m = _SEGMENT.match(text, pos)
        if m is None:
            raise ValueError(f"bad path {text!r} at {pos}")
        name, index, dot = m.groups()
        if dot:
            if prev_dot:
                raise ValueError(f"bad path {text!r}: empty name")
            prev_dot = True
        elif name is not None:
            if not prev_dot:
                raise ValueError(f"bad path {text!r}: missing '.' before {name!r}")
            out.append(name.strip())
            prev_dot = False
        else:
            if prev_dot and not out:
                raise ValueError(f"bad path {text!r}: index before a name")
            out.append(int(index) if index else None)
            prev_dot = False
        pos = m.end()
    return out


def present(v: Any) -> bool:
    """A value is there: not absent, null or empty."""
    return v is not None and v != "" and v is not MISSING


def path_getter(text: str) -> Getter:
    """A getter for one path; a path with ``[]`` yields a flat list of every value found."""
    segs = parse_path(text)
    if None in segs:
        return lambda src: _collect(src, segs, 0) or MISSING
    if len(segs) == 1:
        name = segs[0]

        def get_one(src: Any) -> Any:
            try:
                v = src[name]
            except (KeyError, IndexError, TypeError):
                return MISSING
            return v if v is not None and v != "" else MISSING

        return get_one

    def get(src: Any) -> Any:
        cur = src
        for s in segs:
            try:
                cur = cur[s]
            except (KeyError, IndexError, TypeError):
                return MISSING
        return cur if cur is not None and cur != "" else MISSING

    return get


def _collect(cur: Any, segs: list[str | int | None], i: int) -> list[Any]:
    for j in range(i, len(segs)):
        s = segs[j]
        if s is None:
            if isinstance(cur, dict):  # XML-born JSON: a one-element list arrives as the element
                cur = [cur]
            if not isinstance(cur, list):
                return []
            out: list[Any] = []
            for item in cur:
                out += _collect(item, segs, j + 1)
            return out
        try:
            cur = cur[s]
        except (KeyError, IndexError, TypeError):
            return []
    if isinstance(cur, list):
        return [v for v in cur if present(v)]
    return [cur] if present(cur) else []
