"""Reading an order file: CSV (UTF-8 or GBK, as Excel in China saves it) or Excel (.xlsx),
header row first, as ``(row number, {column: text})`` with the row numbers a spreadsheet
shows (the header is row 1).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from orderq.errors import OrderqError

Row = tuple[int, dict[str, str]]
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
# Excel in China writes dates without an offset: they are Beijing time.
BEIJING = dt.timezone(dt.timedelta(hours=8))


class TableError(OrderqError):
    """The file cannot be read as a table of orders (no header, unknown encoding, not a sheet)."""


def decode(raw: bytes) -> str:
    """UTF-8 (with or without Excel's BOM), else GB18030 (a superset of GBK and GB2312): a GBK
    file is almost never valid UTF-8, so the first strict decode that works is the right one."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError as exc:
        raise TableError(f"neither UTF-8 nor GBK text (byte {exc.start})") from None


def read_rows(path: Path) -> Iterator[Row]:
    if path.suffix.lower() in EXCEL_SUFFIXES:
        return _excel_rows(path)
    return _csv_rows(path.read_bytes())


def _header(cells: list[str]) -> list[str]:
    names = [c.strip().lower() for c in cells]
    if not any(names):
        raise TableError("the first row is empty: a header row with the column names is needed")
    return names


def _csv_rows(raw: bytes) -> Iterator[Row]:
    text = decode(raw)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        names = _header(next(reader))
    except StopIteration:
        raise TableError("the file is empty") from None
    for n, cells in enumerate(reader, 2):
        if not any(c.strip() for c in cells):
            continue
        yield n, {name: cell.strip() for name, cell in zip(names, cells, strict=False) if name}


def _excel_rows(path: Path) -> Iterator[Row]:
    import openpyxl

    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # a corrupt or foreign file: openpyxl raises many kinds
        raise TableError(f"not an Excel workbook: {exc}") from None
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        try:
            names = _header([cell_text(c) for c in next(rows)])
        except StopIteration:
            raise TableError("the sheet is empty") from None
        for n, cells in enumerate(rows, 2):
            texts = [cell_text(c) for c in cells]
            if not any(texts):
                continue
            yield n, {name: t for name, t in zip(names, texts, strict=False) if name}
    finally:
        book.close()


def cell_text(value: object) -> str:
    """An Excel cell as the text a CSV of it would hold: whole numbers without ``.0`` (phone
    numbers, quantities), decimals exactly as typed, dates in Beijing time with their offset."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return format(Decimal(repr(value)), "f")  # repr: the shortest text that reads back the same
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=BEIJING)).isoformat()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=BEIJING).isoformat()
    return str(value).strip()
