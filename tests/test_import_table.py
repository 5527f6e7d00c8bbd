"""Reading order files: encodings as Excel in China saves them, Excel cells as text, times."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from connect.orders import when
from connect.table import TableError, cell_text, decode, read_rows


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "gbk", "gb18030"])
def test_encodings(encoding: str, tmp_path: Path) -> None:
    p = tmp_path / "o.csv"
    p.write_bytes('order_id,name\r\nA1,王芳\r\n,\r\nA2,"李, 雷"\r\n'.encode(encoding))
    assert list(read_rows(p)) == [(2, {"order_id": "A1", "name": "王芳"}), (4, {"order_id": "A2", "name": "李, 雷"})]


def test_not_text_and_empty(tmp_path: Path) -> None:
    with pytest.raises(TableError):
        decode(b"\xff\xfe\x00\x81\x30")
    p = tmp_path / "empty.csv"
    p.write_bytes(b"")
    with pytest.raises(TableError):
        list(read_rows(p))


def test_cells_and_times() -> None:
    assert cell_text(13812345678.0) == "13812345678" and cell_text(19.9) == "19.9" and cell_text(None) == ""
    assert cell_text(dt.datetime(2026, 11, 11, 0, 0, 1)) == "2026-11-11T00:00:01+08:00"
    assert when("2026/11/11 0:00:01") == "2026-11-11T00:00:01+08:00"
    assert when("2026-11-11T00:00:01Z") == "2026-11-11T00:00:01+00:00"
    assert when("next tuesday") == "next tuesday"  # left for the schema to refuse with its path
