"""A connector's window read while the sale goes on (contract §7), in ``make test``: the platform
sales of ``test_connect_platforms.py`` run in ``make reliability`` only, and this is the short case
that caught their loss of orders modified while a window was paged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import StageProcess
from tests.test_connect_platforms import _sale, sim_factory  # noqa: F401 (the simulators' fixture)

pytestmark = pytest.mark.timeout(300)


def test_orders_modified_while_a_window_is_read_are_not_skipped(
    flushed: Any,
    stages: Callable[..., StageProcess],
    sim_factory: Any,  # noqa: F811 (the imported fixture, by name)
    tmp_path: Path,
) -> None:
    """JD (no lag): orders are modified (and new ones written) while the connector pages through
    a window that reaches the present; restarts make it read the whole sale's window again while
    the sale goes on. A window that ended in the current second let an order modified during the
    read move up inside it, shifting another across a page boundary into a page read already:
    skipped for good (12 of 10,000 in the long sale). Windows end a second before now."""
    _sale("jd", 4000, 1500, flushed, stages, sim_factory, tmp_path, kills=3)
