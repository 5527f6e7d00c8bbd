"""``orderq import FILE [--channel C] [--mapping M]`` (contract §7) and ``orderq connect``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from connect import fileimport
from connect.config import load_mapping
from connect.table import TableError
from orderq.errors import ConfigError
from orderq.mapping import Mapping
from orderq.settings import Settings

SHOWN_INVALID = 50  # invalid rows printed on the terminal; the report has them all


def add_import_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("file", type=Path, help="a CSV (UTF-8 or GBK) or Excel (.xlsx) file with a header row")
    ap.add_argument("--channel", help="the channel of every order (default: a 'channel' column, else pos)")
    ap.add_argument(
        "--mapping", help="a mapping file, or a mapping name of ORDERQ_MAPPINGS_DIR (default: the contract's columns)"
    )
    ap.add_argument(
        "--report", type=Path, help=f"where the per-row report goes (default: FILE{fileimport.REPORT_SUFFIX})"
    )


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    from orderq.runner import run

    path: Path = args.file
    if not path.is_file():
        print(f"orderq: no such file: {path}", file=sys.stderr)
        return 1
    if args.channel is not None and args.channel not in settings.channels:
        raise ConfigError("--channel", f"unknown channel {args.channel!r} (known: {', '.join(settings.channels)})")
    mapping = None
    if args.mapping:
        mapping = load_mapping(args.mapping, args.channel or Path(args.mapping).stem, settings)
    codes: list[int] = []
    run(_import(settings, path, args.channel, mapping, args.report or fileimport.report_path(path), codes))
    return codes[0] if codes else 1


async def _import(
    settings: Settings, path: Path, channel: str | None, mapping: Mapping | None, report: Path, codes: list[int]
) -> None:
    from orderq.intake import Intake
    from orderq.progress import Progress

    try:
        with Progress(f"read {path.name}", unit="orders") as p:
            groups = fileimport.group_rows(path, channel, mapping)
            fileimport.check(groups, mapping, settings.channels)
            p.update(len(groups))
            bad = sum(1 for g in groups if g.outcome == "invalid")
            if bad:
                p.note(f"{bad:,} invalid")
    except TableError as exc:
        print(f"orderq: {path}: {exc}", file=sys.stderr)
        codes.append(1)
        return
    intake = await Intake.open(settings)
    try:
        valid = len(groups) - bad
        with Progress(f"queue {path.name}", total=valid, unit="orders") as p:
            await fileimport.submit(intake, groups, lambda phase, done, total: p.update(done))
    finally:
        await intake.close()
    result = fileimport.ImportResult(path, groups, {})
    for g in groups:
        result.counts[g.outcome] = result.counts.get(g.outcome, 0) + len(g.rows)
    try:
        fileimport.write_report(groups, report)
        where = f"report: {report}"
    except OSError as exc:
        where = f"no report written ({exc})"
    for row, order_id, field, message in result.invalid_rows()[:SHOWN_INVALID]:
        print(f"row {row}: invalid {field}: {message} (order {order_id or '?'})")
    rows = sum(result.counts.values())
    figures = ", ".join(f"{n:,} {k}" for k, n in sorted(result.counts.items()))
    print(f"{path.name}: {rows:,} rows, {len(groups):,} orders: {figures}; {where}")
    codes.append(0 if result.ok else 1)
