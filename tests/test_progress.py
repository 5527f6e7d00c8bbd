"""The progress display of long commands: one line per step off a terminal, a line redrawn in
place (and ended with a newline) on one, here a real pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import time

import pytest

from orderq import progress
from orderq.progress import Progress


def test_off_a_terminal_each_step_is_one_line_at_its_end() -> None:
    out = io.StringIO()
    with Progress("bench: single", unit="orders", stream=out) as p:
        for _ in range(1000):
            p.advance()
        assert out.getvalue() == ""  # nothing while the step runs
    with Progress("bench: burst drain", total=500, unit="orders drained", stream=out) as p:
        p.update(200)
        p.note("backlog 300")
        p.update(500)
        p.note("backlog 0")
    with Progress("bench: peers", stream=out):
        pass
    lines = out.getvalue().splitlines(keepends=True)
    assert len(lines) == 3 and all(line.endswith("\n") for line in lines)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith("bench: single: 1,000 orders · ") and lines[0].endswith(" s\n")
    assert lines[1].startswith("bench: burst drain: 500/500 orders drained · backlog 0 · ")
    assert lines[2].startswith("bench: peers: ") and lines[2].rstrip().endswith(" s")


def test_a_step_left_by_an_exception_says_so() -> None:
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("import", total=10, unit="orders", stream=out) as p:
        p.advance(4)
        raise KeyboardInterrupt
    assert out.getvalue().startswith("import: 4/10 orders · ")
    assert out.getvalue().endswith(" (stopped)\n")


def _read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the other side closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode()


def test_on_a_terminal_the_line_is_redrawn_at_most_ten_times_a_second_and_ends_with_a_newline() -> None:
    master, slave = pty.openpty()
    try:
        with open(slave, "w", encoding="utf-8", closefd=True) as tty:
            assert tty.isatty()
            t0 = time.monotonic()
            with Progress("bench: e2e", total=3000, unit="orders", stream=tty) as p:
                for _ in range(3000):
                    p.advance()
                    time.sleep(0.0002)
            took = time.monotonic() - t0
            text = _read_all(master)
    finally:
        os.close(master)
    text = text.replace("\r\n", "\n")  # the terminal's output processing turns \n into \r\n
    draws = text.split("\r")[1:]
    assert len(draws) >= 3, text  # redrawn while it ran, not only at the end
    assert len(draws) <= took / progress.REDRAW_S + 3, (len(draws), took)  # first, timed, last
    assert all(d.startswith("bench: e2e: [") for d in draws), draws
    assert "3,000/3,000 orders" in draws[-1] and "100%" in draws[-1]
    assert text.endswith("\n") and text.count("\n") == 1  # one line left on screen
    assert "\x1b[K" in draws[-1]  # what a longer earlier draw left is erased


def test_on_a_terminal_the_line_fits_its_width() -> None:
    master, slave = pty.openpty()
    try:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
        with open(slave, "w", encoding="utf-8") as tty, Progress("x" * 100, total=5, stream=tty) as p:
            p.advance(5)
        text = _read_all(master)
    finally:
        os.close(master)
    draws = text.replace("\r\n", "\n").split("\r")[1:]
    for draw in draws:
        assert len(draw.rstrip("\n").removesuffix("\x1b[K")) <= 39, draw
    assert draws[-1].startswith("xxx") and "…: 5/5 · " in draws[-1], draws[-1]  # the bar left out first
