"""The test harness itself: one test's failure must not turn into another test's failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# An async test that pytest-timeout interrupts between two Redis calls, then an innocent test
# that only lets the collector run (as any test that allocates enough does).
PROBE = """
import asyncio
import gc
import time


async def test_interrupted_by_the_timeout(r):
    deadline = time.monotonic() + 4  # ends by itself past the timeout, as the tests' waits do
    while time.monotonic() < deadline:
        await r.client.hgetall("x")
        await asyncio.sleep(0.05)


def test_next_one():
    gc.collect()
"""


@pytest.mark.long  # a test of the test harness itself: make reliability
def test_a_timed_out_async_test_leaks_no_connection_into_the_next(tmp_path: Path) -> None:
    """Seen in make test: a timed-out test left a Redis connection open, and a later, unrelated
    test failed on its ResourceWarnings (unclosed socket, transport, Connection)."""
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-c", str(ROOT / "pyproject.toml")]
    cmd += ["--rootdir", str(ROOT), "--timeout", "2", str(probe)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert "Timeout (>2.0s)" in out, out[-3000:]
    assert "ResourceWarning" not in out, out[-5000:]
    assert "1 failed, 1 passed" in out, out[-3000:]
