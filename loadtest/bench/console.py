"""What the bench tells the person running it, on stderr (stdout carries the report)."""

from __future__ import annotations

import sys

from orderq.progress import Progress


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def step(label: str, total: int | None = None, unit: str = "orders") -> Progress:
    """A phase's progress: redrawn on a terminal, one line at its end otherwise."""
    return Progress(f"bench: {label}", total=total, unit=unit, stream=sys.stderr)
