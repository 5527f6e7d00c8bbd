"""Progress of a long command on stderr: a line redrawn in place on a terminal, one line per
step when the output goes to a file or a pipe (a CI log keeps a record, not a thousand redraws).

Usage::

    from orderq.progress import Progress

    with Progress("import orders.jsonl", total=len(rows), unit="orders") as p:
        for row in rows:
            ...
            p.advance()  # or p.advance(n) for n at once, or p.update(done) with a running count
        p.note("3 invalid")  # optional text shown after the count

- ``total``: what ``done`` counts up to; ``None`` when unknown (a counter, no bar).
- ``unit``: the word after the count (``"orders"``); ``stream``: where to write (stderr).
- On a terminal (``stream.isatty()``) the line is redrawn with ``\\r`` at most every
  :data:`REDRAW_S` (``advance`` and ``note`` stay cheap in a tight loop), fitted to the
  terminal's width (the label shortened first), and ended with a newline when the ``with``
  block exits, so the last figures stay on screen.
- Not on a terminal: nothing while the step runs, then one line at its end::

      import orders.jsonl: 1,200/1,200 orders · 3 invalid · 4.2 s

- A step left by an exception says so (``stopped``) in that last line.
- Single-threaded use: call it from the thread (or event loop) that runs the step.
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import TextIO

REDRAW_S = 0.1  # a terminal line is redrawn at most ten times a second
BAR_WIDTH = 24  # characters of the bar when the total is known
FALLBACK_COLUMNS = 80  # terminal width when the stream cannot tell
MIN_LABEL = 12  # label characters kept before the bar is left out on a narrow terminal


class Progress:
    """One step of a long command (see the module docstring)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "",
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = _isatty(self.stream)
        self.detail = ""
        self.started = 0.0
        self.elapsed = 0.0
        self._next_draw = 0.0

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if self.tty:
            self._draw(self.started)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.elapsed = time.monotonic() - self.started
        stopped = " (stopped)" if exc_type is not None else ""
        if self.tty:
            self._draw(time.monotonic(), suffix=stopped)
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: {self.figures(self.elapsed)}{stopped}\n")
        self.stream.flush()

    def advance(self, n: int = 1) -> None:
        """``n`` more done."""
        self.done += n
        if self.tty:
            now = time.monotonic()
            if now >= self._next_draw:
                self._draw(now)

    def update(self, done: int) -> None:
        """Set the count done so far (for a step that polls a running count)."""
        self.advance(done - self.done)

    def note(self, detail: str) -> None:
        """Text shown after the count (e.g. ``"backlog 120"``); ``""`` removes it."""
        self.detail = detail
        if self.tty:
            now = time.monotonic()
            if now >= self._next_draw:
                self._draw(now)

    def figures(self, elapsed: float) -> str:
        """The count, the note and the time, as the line shows them."""
        parts = []
        if self.total is not None:
            parts.append(f"{self.done:,}/{self.total:,} {self.unit}".rstrip())
        elif self.done or self.unit:
            parts.append(f"{self.done:,} {self.unit}".rstrip())
        if self.detail:
            parts.append(self.detail)
        parts.append(f"{elapsed:.1f} s")
        return " · ".join(parts)

    def _draw(self, now: float, suffix: str = "") -> None:
        self._next_draw = now + REDRAW_S
        figures = f"{self.figures(now - self.started)}{suffix}"
        width = _columns(self.stream) - 1  # the last column would wrap on some terminals
        bar = ""
        if self.total and len(figures) + BAR_WIDTH + 8 + MIN_LABEL <= width:
            share = min(1.0, max(0.0, self.done / self.total))
            full = round(share * BAR_WIDTH)
            bar = f"[{'#' * full}{'.' * (BAR_WIDTH - full)}] {share:4.0%} "
        # a narrow terminal loses the bar, then label characters, before any figure
        room = width - len(bar) - len(figures) - 2
        label = self.label if len(self.label) <= room else self.label[: max(0, room - 1)] + "…"
        line = f"{label}: {bar}{figures}"
        # \r back to the start, the line, then erase what a longer earlier line left
        self.stream.write(f"\r{line[:width]}\x1b[K")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or FALLBACK_COLUMNS
    except (AttributeError, OSError, ValueError):
        return FALLBACK_COLUMNS
