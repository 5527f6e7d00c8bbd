"""``orderq import`` and the watched folder (contract §7), end to end against the private Valkey:
a GBK CSV in the default columns grouped into orders, a bad row reported by row and field with
exit 1, a re-import that is all duplicates, an Excel file, and files dropped into
``ORDERQ_IMPORT_DIR`` moved to done/ or failed/ with their report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import redis

from orderq import keys
from orderq.schema import Order
from tests.conftest import ROOT, StageProcess

HEADER = (
    "order_id,created_at,customer_id,tier,name,phone,province,city,district,address,"
    "sku,qty,unit_price,paid_price,paid_amount,remark"
)
ROWS = [
    "F1001,2026/11/11 0:00:01,u-1,vip,王芳,13812345678,江苏省,苏州市,工业园区,星湖街 328 号,"
    "SOFA-OAK-3,1,2999.00,2899.00,3098.00,周末送货",
    "F1001,,,,,,,,,,GIFT-CUSHION,2,99.50,99.50,,",
    "F1002,2026-11-11T00:05:00+08:00,u-2,,李雷,13900000000,浙江省,杭州市,西湖区,文三路 1 号,"
    "LAMP-1,3,10.00,10.00,30.00,",
    "F1003,2026-11-11 00:06:00,u-3,regular,韩梅,13700000000,广东省,深圳市,南山区,科技园 8 栋,"
    "TABLE-2,abc,500.00,500.00,500.00,",
    "F1004,2026-11-11 00:07:00,u-4,regular,赵磊,13600000000,广东省,广州市,天河区,体育西路 3 号,"
    "CHAIR-9,2,50.00,50.00,100.00,",
]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "orderq", *args], env=full, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def queued(url: str) -> dict[str, list[Order]]:
    """Every order in the intake streams, by order key (a key twice would be a double)."""
    out: dict[str, list[Order]] = {}
    with redis.Redis.from_url(url) as c:
        for p in keys.partitions(4):
            for _, fields in c.xrange(p.intake):
                order = msgspec.msgpack.decode(fields[b"d"], type=Order)
                out.setdefault(fields[b"k"].decode(), []).append(order)
    return out


def report_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def test_gbk_csv_grouped_bad_row_and_reimport(
    flushed: Any, make_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    src = tmp_path / "order_20261111.csv"
    src.write_bytes(("\r\n".join([HEADER, *ROWS]) + "\r\n").encode("gbk"))
    env = make_env()
    first = _run(["import", str(src), "--channel", "pos"], env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "row 5: invalid lines[0].qty" in first.stdout
    got = queued(flushed.url)
    assert sorted(got) == ["pos:F1001", "pos:F1002", "pos:F1004"]
    assert all(len(v) == 1 for v in got.values())
    f1001 = got["pos:F1001"][0]
    assert [(ln.sku, ln.qty) for ln in f1001.lines] == [("SOFA-OAK-3", 1), ("GIFT-CUSHION", 2)]
    assert f1001.ship_to.name == "王芳" and f1001.customer.tier == "vip" and f1001.remark == "周末送货"
    assert f1001.created_at.isoformat() == "2026-11-10T16:00:01+00:00"  # Beijing time without offset
    rows = report_rows(tmp_path / "order_20261111.csv.report.csv")
    by_row = {int(r["row"]): r for r in rows}
    assert {n: by_row[n]["outcome"] for n in by_row} == {
        2: "accepted",
        3: "accepted",
        4: "accepted",
        5: "invalid",
        6: "accepted",
    }
    assert by_row[5]["path"] == "lines[0].qty" and "int" in by_row[5]["message"]

    again = _run(["import", str(src), "--channel", "pos"], env)
    assert again.returncode == 1
    rows = report_rows(tmp_path / "order_20261111.csv.report.csv")
    assert {int(r["row"]): r["outcome"] for r in rows} == {
        2: "duplicate",
        3: "duplicate",
        4: "duplicate",
        5: "invalid",
        6: "duplicate",
    }
    assert {k: len(v) for k, v in queued(flushed.url).items()} == {"pos:F1001": 1, "pos:F1002": 1, "pos:F1004": 1}

    good = tmp_path / "good.csv"
    good.write_bytes(("\r\n".join([HEADER, ROWS[0], ROWS[1]]) + "\r\n").encode("utf-8-sig"))
    ok = _run(["import", str(good)], env)  # no --channel, no channel column: pos
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert report_rows(tmp_path / "good.csv.report.csv")[0]["outcome"] == "duplicate"


def test_excel_file(flushed: Any, make_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    import datetime as dt

    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.append(HEADER.split(","))
    sheet.append(
        [
            "X1",
            dt.datetime(2026, 11, 11, 0, 0, 1),
            "u-9",
            "",
            "王芳",
            13812345678,
            "江苏省",
            "苏州市",
            "",
            "星湖街 1 号",
            "SKU-1",
            2,
            19.9,
            19.9,
            39.8,
            "",
        ]
    )
    path = tmp_path / "orders.xlsx"
    book.save(path)
    done = _run(["import", str(path), "--channel", "jd"], make_env())
    assert done.returncode == 0, done.stdout + done.stderr
    (order,) = queued(flushed.url)["jd:X1"]
    assert order.ship_to.phone == "13812345678" and order.paid_amount == "39.8" and order.lines[0].unit_price == "19.9"
    assert order.created_at.isoformat() == "2026-11-10T16:00:01+00:00"


def _wait_for(cond: Callable[[], bool], timeout: float, what: str, proc: StageProcess) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.proc is not None and proc.proc.poll() is None, f"connect exited:\n{proc.log()}"
        assert time.monotonic() < deadline, f"{what} did not happen:\n{proc.log()[-3000:]}"
        time.sleep(0.1)


def test_watched_folder(flushed: Any, stages: Callable[..., StageProcess], tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    proc = stages("connect", ORDERQ_IMPORT_DIR=folder)
    # an upload under way (.part) is left alone; renamed when complete, it is taken
    part = folder / "order_20261111.csv.part"
    part.write_bytes(("\r\n".join([HEADER, ROWS[0], ROWS[1], ROWS[2]]) + "\r\n").encode("gbk"))
    time.sleep(2.5)
    assert part.exists()
    part.rename(folder / "order_20261111.csv")
    bad = folder / "order_20261112.csv"
    bad.write_bytes(("\r\n".join([HEADER, ROWS[3], ROWS[4]]) + "\r\n").encode("gbk"))
    _wait_for(lambda: (folder / "done" / "order_20261111.csv").exists(), 30, "the good file moved to done/", proc)
    _wait_for(lambda: (folder / "failed" / "order_20261112.csv").exists(), 30, "the bad file moved to failed/", proc)
    good_report = report_rows(folder / "done" / "order_20261111.csv.report.csv")
    assert [r["outcome"] for r in good_report] == ["accepted"] * 3
    bad_report = {int(r["row"]): r for r in report_rows(folder / "failed" / "order_20261112.csv.report.csv")}
    assert bad_report[2]["outcome"] == "invalid" and bad_report[2]["path"] == "lines[0].qty"
    assert bad_report[3]["outcome"] == "accepted"
    assert sorted(queued(flushed.url)) == ["pos:F1001", "pos:F1002", "pos:F1004"]
    assert not [p for p in folder.iterdir() if p.is_file()]


ERP_MAPPING = """
description = "an ERP export: Chinese column names, one row per line"
order_id    = "单号"
created_at  = { path = "下单时间", time = "Asia/Shanghai" }
paid_amount = { path = "实付", money = "yuan" }

[customer]
id = "会员"

[ship_to]
name     = "收货人"
phone    = "电话"
province = "省"
address  = "地址"

[lines]
path = "rows"
[lines.fields]
sku = "货号"
qty = { path = "数量", type = "int" }
"""


def test_mapping_file(flushed: Any, make_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    (tmp_path / "erp.toml").write_text(ERP_MAPPING, encoding="utf-8")
    src = tmp_path / "erp.csv"
    rows = [
        "单号,下单时间,会员,收货人,电话,省,地址,货号,数量,实付",
        "E1,2026-11-11 08:00:00,m-1,王芳,13812345678,江苏省,星湖街 1 号,SKU-A,2,120.50",
        "E1,,,,,,,SKU-B,1,",
        "E2,2026-11-11 08:01:00,m-2,李雷,13900000000,浙江省,文三路 2 号,SKU-C,many,10",
    ]
    src.write_bytes(("\r\n".join(rows) + "\r\n").encode("gbk"))
    done = _run(["import", str(src), "--channel", "miniapp", "--mapping", str(tmp_path / "erp.toml")], make_env())
    assert done.returncode == 1, done.stdout + done.stderr
    (order,) = queued(flushed.url)["miniapp:E1"]
    assert [(ln.sku, ln.qty) for ln in order.lines] == [("SKU-A", 2), ("SKU-B", 1)] and order.paid_amount == "120.50"
    report = {int(r["row"]): r for r in report_rows(tmp_path / "erp.csv.report.csv")}
    assert report[2]["outcome"] == report[3]["outcome"] == "accepted"
    assert report[4]["outcome"] == "invalid" and report[4]["path"].startswith("rows[0].数量")


def test_folder_file_left_by_a_killed_process(
    flushed: Any, stages: Callable[..., StageProcess], make_env: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """A process killed in the middle of an import leaves its file in working/, partly queued:
    the next one imports it again (the queued part as duplicates) and moves it on."""
    folder = tmp_path / "drop"
    (folder / "working").mkdir(parents=True)
    src = folder / "working" / "order_20261113.csv"
    src.write_bytes(("\r\n".join([HEADER, ROWS[0], ROWS[1], ROWS[2]]) + "\r\n").encode("gbk"))
    part = tmp_path / "part.csv"
    part.write_bytes(("\r\n".join([HEADER, ROWS[2]]) + "\r\n").encode("gbk"))
    assert _run(["import", str(part), "--channel", "pos"], make_env()).returncode == 0  # what got queued before
    proc = stages("connect", ORDERQ_IMPORT_DIR=folder)
    _wait_for(lambda: (folder / "done" / "order_20261113.csv").exists(), 30, "the file moved to done/", proc)
    outcomes = [r["outcome"] for r in report_rows(folder / "done" / "order_20261113.csv.report.csv")]
    assert outcomes == ["accepted", "accepted", "duplicate"]
    assert {k: len(v) for k, v in queued(flushed.url).items()} == {"pos:F1001": 1, "pos:F1002": 1}
