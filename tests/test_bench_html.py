"""``orderq bench --html``: a short real bench run writes one self-contained HTML page, and
headless Chromium (Debian's) draws every plot in it with data: backlog and breaker stage over
the run, answers per second by status, ack latency per class for each load phase, end-to-end
latency per priority. A screenshot is left in ``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.test_dashboard_browser import ARTIFACTS

BENCH_ARGS = [
    "--phases", "single,batch,burst,e2e",
    "--duration", "2",
    "--connections", "4",
    "--batch-connections", "2",
    "--batch-size", "20",
    "--max-orders", "300",
    "--rate", "100",
]  # fmt: skip

# A real bench run (~10 s) plus Chromium: make reliability, within make test's 10-minute budget.
pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One short real bench (it starts its own instance), its JSON report and HTML page."""
    tmp = tmp_path_factory.mktemp("bench-html")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
    env["ORDERQ_DATA_DIR"] = str(tmp / "nothing-runs-here")  # no embedded server: the bench starts one
    env.update({"ORDERQ_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)})
    out, page = tmp / "report.json", tmp / "report.html"
    proc = subprocess.run(
        [sys.executable, "-m", "orderq", "bench", "--json", str(out), "--html", str(page), *BENCH_ARGS],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert f"report written to {page}" in proc.stdout
    return json.loads(out.read_text(encoding="utf-8")), page


def test_the_report_records_the_series_it_plots(bench_run: tuple[dict[str, Any], Path]) -> None:
    report, page = bench_run
    s = report["series"]
    tl = s["timeline"]
    assert len(tl["t"]) >= 5 and len(tl["t"]) == len(tl["backlog"]) == len(tl["stage"])
    assert max(tl["backlog"]) > 0  # the burst queued behind paused workers shows
    assert set(tl["stage"]) <= {"normal", "degraded", "shedding"}
    sent = sum(report["phases"][p]["requests"] for p in ("single", "batch", "e2e"))
    assert sum(sum(v) for v in s["answers_per_s"].values()) == sent  # every answer, counted once
    # one load per phase that sent orders (single and batch queued the burst themselves)
    assert [(ld["per_request"], ld["requests"]) for ld in s["loads"]] == [
        (1, report["phases"]["single"]["requests"]),
        (20, report["phases"]["batch"]["requests"]),
        (1, report["phases"]["e2e"]["requests"]),
    ]
    for prio, e in report["phases"]["e2e"]["e2e_ms"].items():
        assert sum(e["hist"].values()) == e["n"], prio
    # one file, nothing fetched: no script, stylesheet link, image or URL
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"https?://|<script|<link|<img|@import|url\(", text)


async def test_every_plot_is_drawn_with_data_in_chromium(bench_run, browser) -> None:
    report, page_path = bench_run
    page = await browser.new_page(viewport={"width": 1000, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: problems.append(f"fetched {r.url}") if not r.url.startswith("file:") else None)
    await page.goto(page_path.as_uri())
    plots = await page.locator("figure.plot").evaluate_all(
        """figs => figs.map(f => {
            const svg = f.querySelector("svg");
            const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
            const paths = [...f.querySelectorAll("path.series")].map(p => {
                const b = p.getBBox();
                return {points: +p.getAttribute("data-points"), w: b.width, h: b.height};
            });
            return {id: f.id, width: box.width, height: box.height, paths,
                    segments: f.querySelectorAll("rect.stage-seg").length};
        })"""
    )
    ids = {p["id"] for p in plots}
    want = {"plot-backlog", "plot-stage", "plot-answers", "plot-ack-single", "plot-ack-batch", "plot-ack-e2e"}
    assert want <= ids, ids
    assert "plot-e2e-e2e" in ids, ids
    for p in plots:
        assert p["width"] > 400 and p["height"] > 100, p  # laid out on the page
        assert p["paths"], f"{p['id']} has no data series"
        for path in p["paths"]:
            assert path["points"] >= 2 and path["w"] > 0, (p["id"], path)  # drawn from real points
    stage = next(p for p in plots if p["id"] == "plot-stage")
    assert stage["segments"] >= 1  # the stage bands
    # the e2e plot has a curve per priority that executed orders
    e2e = report["phases"]["e2e"]["e2e_ms"]
    curves = next(p for p in plots if p["id"] == "plot-e2e-e2e")["paths"]
    assert len(curves) == sum(1 for e in e2e.values() if e["n"])
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "bench-report.png"), full_page=True)
    await page.close()
    assert problems == []
