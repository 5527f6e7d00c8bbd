"""Where each key of a TOML file is defined, for error messages with a line number
(tomllib gives no positions)."""

from __future__ import annotations

import re

Key = tuple[str, ...]  # a key path inside a TOML file

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(
    r"^\s*((?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+))*)\s*="
)
_INLINE_KEY = re.compile(r"[{,]\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*=")


def _split_key(text: str) -> Key:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def key_lines(text: str) -> dict[Key, int]:
    """Where each key of a TOML file is defined (first line), for semantic error messages.
    Keys inside an inline table are found on their line too; tomllib gives no positions. The
    n-th ``[[name]]`` table's keys are under ``(name, "n", ...)``, as tomllib's list holds it."""
    out: dict[Key, int] = {}
    table: Key = ()
    arrays: dict[Key, int] = {}  # [[name]] -> how many seen
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            table = _split_key(m.group(1))
            out.setdefault(table, lineno)
            if line.lstrip().startswith("[["):
                arrays[table] = arrays.get(table, -1) + 1
                table = (*table, str(arrays[table]))
                out.setdefault(table, lineno)
            continue
        m = _ASSIGN.match(line)
        if not m:
            continue
        key = table + _split_key(m.group(1))
        out.setdefault(key, lineno)
        for inner in _INLINE_KEY.findall(line[m.end() :]):
            out.setdefault((*key, *_split_key(inner)), lineno)
    return out


def line_of(text: str, key: Key) -> int:
    """The line defining ``key``, or its nearest defined parent (1 when none is found)."""
    lines = key_lines(text)
    for n in range(len(key), 0, -1):
        if key[:n] in lines:
            return lines[key[:n]]
    return 1
