"""``orderq import FILE`` and the watched folder's imports (contract §7): a file's rows grouped
into orders, each checked like ``POST /v1/orders``, queued through the intake in batches, and a
report with one line per row (``accepted``, ``duplicate`` or ``invalid`` with path and message).
Re-importing a file changes nothing: every order key is then a duplicate.
"""

from __future__ import annotations

import asyncio
import csv
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from connect.orders import Checked, decode, default_doc, map_payload
from connect.table import read_rows
from orderq.mapping import Mapping, MappingError
from orderq.schema import ErrorDetail

if TYPE_CHECKING:
    from orderq.intake import Intake

log = structlog.get_logger("orderq.import")

DEFAULT_CHANNEL = "pos"  # a file with no channel column and no --channel: a shop's POS or ERP export
BATCH = 1000  # orders per intake call (ORDERQ_BATCH_MAX's default)
IN_FLIGHT = 4  # intake calls at once: one batch's encoding overlaps another's round trip
RETRY_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # shed or unavailable: the same batch again, ever slower
GIVE_UP_S = 300.0  # a batch still refused after this is reported as such, not dropped silently
REPORT_SUFFIX = ".report.csv"
_ROW_PATH = re.compile(r"^(?:lines|rows)\[(\d+)\]")

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class Group:
    """The rows of one order (one row, or one per line when rows share an order id)."""

    channel: str
    rows: list[int] = field(default_factory=list)
    cells: list[dict[str, str]] = field(default_factory=list)
    checked: Checked | None = None
    outcome: str = ""

    @property
    def order_id(self) -> str:
        if self.checked is not None and self.checked.order is not None:
            return self.checked.order.order_id
        return self.cells[0].get("order_id", "")


@dataclass
class ImportResult:
    path: Path
    groups: list[Group]
    counts: dict[str, int]
    report: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return set(self.counts) <= {"accepted", "duplicate"}

    def invalid_rows(self) -> list[tuple[int, str, str, str]]:
        return [(row, g.order_id, path, msg) for g in self.groups for row, _, path, msg in _row_lines(g) if path]


def group_rows(path: Path, channel: str | None, mapping: Mapping | None) -> list[Group]:
    """Rows sharing an order id (per channel) are one order's lines, in the file's order."""
    groups: dict[tuple[str, str], Group] = {}
    alone: list[Group] = []
    for n, cells in read_rows(path):
        ch = channel or (mapping.channel if mapping else None) or cells.get("channel") or DEFAULT_CHANNEL
        try:
            oid = mapping.order_id(cells) if mapping is not None and mapping.order_id is not None else None
        except MappingError:
            oid = None
        if mapping is None:
            oid = cells.get("order_id") or None
        g = groups.get((ch, str(oid))) if oid is not None else None
        if g is None:
            g = Group(ch)
            if oid is not None:
                groups[(ch, str(oid))] = g
            else:
                alone.append(g)  # no order id: an order of its own, refused with the path
        g.rows.append(n)
        g.cells.append(cells)
    return sorted([*groups.values(), *alone], key=lambda g: g.rows[0])


def check(groups: Sequence[Group], mapping: Mapping | None, channels: tuple[str, ...]) -> None:
    for g in groups:
        if mapping is None:
            g.checked = decode(default_doc(g.channel, g.cells), channels)
        else:  # the mapping sees the first row's columns, and every row of the order as "rows"
            g.checked = map_payload(mapping, {**g.cells[0], "rows": g.cells}, channels)
        if g.checked.order is None:
            g.outcome = "invalid"


async def submit(intake: Intake, groups: Sequence[Group], progress: Progress | None = None) -> None:
    """Queue every valid order, ``BATCH`` at a time; shed or unavailable batches are sent again
    after a backoff (the intake's answer for a known key is ``duplicate``, so a retry of a batch
    that half-went-through is harmless)."""
    todo = [g for g in groups if g.checked is not None and g.checked.order is not None]
    batches = [todo[i : i + BATCH] for i in range(0, len(todo), BATCH)]
    gate = asyncio.Semaphore(IN_FLIGHT)
    done = 0

    async def one(batch: list[Group]) -> None:
        nonlocal done
        async with gate:
            await _send(intake, batch)
        done += len(batch)
        if progress is not None:
            progress("queue", done, len(todo))

    await asyncio.gather(*(one(b) for b in batches))
    invalid = sum(1 for g in groups if g.outcome == "invalid")
    if invalid:  # counted like the ingress counts a refused order (totals.invalid)
        await intake.count("invalid", invalid)


async def _send(intake: Intake, batch: list[Group]) -> None:
    from orderq.intake import Outcome

    waiting = batch
    deadline = time.monotonic() + GIVE_UP_S
    tries = 0
    while True:
        orders = [g.checked.order for g in waiting if g.checked is not None and g.checked.order is not None]
        outcomes = await intake.submit(orders)
        again = []
        for g, outcome in zip(waiting, outcomes, strict=True):
            g.outcome = str(outcome)
            if outcome in (Outcome.SHED, Outcome.UNAVAILABLE):
                again.append(g)
        if not again or time.monotonic() >= deadline:
            return
        waiting = again
        await asyncio.sleep(RETRY_S[min(tries, len(RETRY_S) - 1)])
        tries += 1


def _row_lines(g: Group) -> list[tuple[int, str, str, str]]:
    """(row, outcome, path, message) for each row of a group: an invalid order's error is put
    on the row of the line it names, its order-level errors on its first row."""
    errors = g.checked.errors if g.checked is not None else []
    if not errors:
        return [(row, g.outcome, "", "") for row in g.rows]
    by_row: dict[int, list[ErrorDetail]] = {}
    for d in errors:
        m = _ROW_PATH.match(d.path)
        i = int(m.group(1)) if m and int(m.group(1)) < len(g.rows) else 0
        by_row.setdefault(g.rows[i], []).append(d)
    out = []
    for row in g.rows:
        ds = by_row.get(row)
        if ds:
            out += [(row, "invalid", d.path, d.message) for d in ds]
        else:  # a sound line of an order refused as a whole
            out.append((row, "invalid", "", "the order has an invalid row"))
    return out


def write_report(groups: Sequence[Group], target: Path) -> None:
    """One line per row (per error, for a row with several), UTF-8 with a BOM so that Excel
    shows the Chinese text of the messages."""
    with target.open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow(("row", "order_id", "order_key", "outcome", "path", "message"))
        for g in groups:
            key = f"{g.channel}:{g.order_id}" if g.order_id else ""
            for row, outcome, path, message in _row_lines(g):
                w.writerow((row, g.order_id, key, outcome, path, message))


def write_failure(target: Path, message: str) -> None:
    """The report of a file that could not be read as a table at all."""
    with target.open("w", encoding="utf-8-sig", newline="") as f:
        w = csv.writer(f)
        w.writerow(("row", "order_id", "order_key", "outcome", "path", "message"))
        w.writerow(("", "", "", "invalid", "$", message))


async def import_file(
    intake: Intake,
    path: Path,
    channels: tuple[str, ...],
    channel: str | None = None,
    mapping: Mapping | None = None,
    report: Path | None = None,
    progress: Progress | None = None,
) -> ImportResult:
    t0 = time.perf_counter()
    groups = group_rows(path, channel, mapping)
    if progress is not None:
        progress("read", len(groups), len(groups))
    check(groups, mapping, channels)
    if progress is not None:
        progress("check", len(groups), len(groups))
    await submit(intake, groups, progress)
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.outcome] = counts.get(g.outcome, 0) + len(g.rows)
    result = ImportResult(path, groups, counts, report, time.perf_counter() - t0)
    if report is not None:
        write_report(groups, report)
    log.info("import.file", file=str(path), orders=len(groups), seconds=round(result.seconds, 3), **counts)
    return result


def report_path(path: Path) -> Path:
    return path.with_name(path.name + REPORT_SUFFIX)


def summary(result: ImportResult) -> dict[str, Any]:
    return {"file": str(result.path), "orders": len(result.groups), "rows": result.counts}
