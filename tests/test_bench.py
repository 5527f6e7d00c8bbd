"""``orderq bench`` end to end: it starts its own instance, runs every phase briefly and
writes a report with every figure of contract §8 (values checked for sanity, never for
speed), then stops what it started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PRIORITIES = ("vip", "new", "regular")


def _run_bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
    env.update(
        {
            "ORDERQ_DATA_DIR": str(tmp_path / "nothing-runs-here"),  # no embedded server: bench starts one
            "ORDERQ_LOG_FORMAT": "json",
            "PYTHONPATH": str(ROOT),
        }
    )
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "orderq", "bench", "--json", str(out), *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, json.loads(out.read_text(encoding="utf-8"))


def test_bench_reports_every_figure_of_the_contract(tmp_path: Path) -> None:
    proc, rep = _run_bench(
        tmp_path,
        "--duration", "2",
        "--connections", "4",
        "--batch-connections", "2",
        "--batch-size", "20",
        "--max-orders", "600",
        "--rate", "100",
        "--spike", "--spike-orders", "200", "--spike-seconds", "2",
        "--reference",
    )  # fmt: skip
    assert rep["schema"] == "orderq.bench/1"
    assert rep["phases_run"] == ["single", "batch", "burst", "reference", "e2e", "spike"]
    s = rep["summary"]

    # orders/s accepted, single and batch requests
    assert s["accepted_per_s"]["single"] > 0 and s["accepted_per_s"]["batch"] > 0
    assert rep["phases"]["single"]["orders_accepted"] > 0
    assert rep["phases"]["batch"]["orders_accepted"] > 0
    assert rep["phases"]["single"]["refused"] == 0 and rep["phases"]["batch"]["refused"] == 0

    # ack latency p50/p95/p99/max, ordered
    for phase in ("single", "batch", "e2e", "spike"):
        q = s["ack_ms"][phase]
        assert 0 < q["p50"] <= q["p95"] <= q["p99"] <= q["max"], (phase, q)

    # end-to-end latency p50/p99 per priority: every class was sampled and executed
    for phase in ("e2e", "spike"):
        e2e = s["e2e_ms"][phase]
        assert set(PRIORITIES) <= set(e2e)
        assert sum(e2e[p]["n"] for p in PRIORITIES) > 0
        for p in PRIORITIES:
            if e2e[p]["n"]:
                assert 0 < e2e[p]["p50"] <= e2e[p]["p99"], (phase, p, e2e[p])
        assert set(rep["phases"][phase]["sampled_outcomes"]) == {"executed"}

    # executed orders/s: capacity (the burst drain) and sustained at the offered rate
    assert s["executed_per_s"]["capacity"] > 0 and s["executed_per_s"]["sustained"] > 0
    # time to drain a burst back to backlog 0, peak backlog, breaker stages visited
    burst = rep["phases"]["burst"]
    assert burst["orders_queued"] == (
        rep["phases"]["single"]["orders_accepted"] + rep["phases"]["batch"]["orders_accepted"]
    )
    assert burst["executed"] == burst["orders_queued"]
    for phase in ("burst", "e2e", "spike"):
        assert s["drain_s"][phase] is not None and s["drain_s"][phase] >= 0
        assert "normal" in s["stages_visited"][phase]
    assert s["peak_backlog"]["burst"] == burst["orders_queued"]
    # Redis memory per queued order: a status record plus a stream entry is hundreds of bytes
    assert 50 < s["redis_memory_per_queued_order_bytes"] < 100_000
    # ... and per order once the burst is drained: what an executed order keeps (its status
    # record, its outbox entries: no dispatcher runs, so they stay)
    after = burst["memory_after_drain"]
    assert after["settled"] is True
    assert s["redis_memory_per_order_after_drain_bytes"] == after["per_order_bytes"]
    assert 0 < after["outbox_per_order_bytes"] <= after["per_order_bytes"] < 100_000, after

    # nothing lost, no action applied twice
    assert s["lost"] == 0 and s["duplicate_effects"] == 0
    assert rep["phases"]["spike"]["lost"] == 0
    audit = rep["audit"]
    sent = sum(rep["phases"][k]["orders_accepted"] for k in ("single", "batch", "e2e", "spike"))
    assert audit["accepted"] == sent
    assert audit["executed"] == sent  # bench orders have stock and no risk signal
    assert audit["failed"] == []

    # the client-side oracle: every order sent to orderq (not the reference's) looked up
    o = rep["oracle"]
    assert o["sent"] == o["acked"] == sent, o
    assert o["lost"] == o["duplicated"] == o["unexpected"] == o["unchecked"] == 0, o
    assert o["acked_statuses"] == {"executed": sent}
    assert s["oracle"]["lost"] == 0 and "examples" not in s["oracle"]

    # the machine it ran on
    m = s["machine"]
    assert m["cores"] >= 1 and m["cpu_model"] and m["python"].startswith("CPython 3.")
    assert m["server"] in ("valkey", "redis") and re.match(r"^\d+\.\d+", m["server_version"])

    # reference endpoint: measured, compared, and its stream deleted afterwards
    ref = rep["phases"]["reference"]
    assert ref["single"]["orders_accepted"] > 0 and ref["batch"]["orders_accepted"] > 0
    assert ref["ratios"]["single"] > 0 and ref["ratios"]["batch"] > 0
    assert ref["cleaned"] is True

    # every target is listed; the ones about correctness hold even in a tiny run
    names = {t["name"]: t for t in rep["targets"]}
    assert names["spike lost"]["ok"] is True
    assert names["oracle: lost + duplicated + unexpected"]["ok"] is True
    assert len(rep["targets"]) == 12

    # the printed report carries the same figures, and the private instance is gone
    assert "orders/s accepted" in proc.stdout and "end-to-end vip" in proc.stdout
    assert f"{sent:,} orders sent · {sent:,} acknowledged · lost 0 · duplicated 0 · unexpected 0" in proc.stdout
    assert "after the drain:" in proc.stdout
    # off a terminal each phase's progress is one line, written at its end
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("bench: ")]
    for phase in ("single", "batch", "burst", "reference single", "reference batch", "e2e", "spike"):
        lines = [line for line in progress if line.startswith(f"bench: {phase}: ")]
        assert len(lines) == 1 and re.search(r" · [\d.]+ s$", lines[0]), (phase, progress)
    assert re.search(r"^bench: burst: .*: ([\d,]+)/\1 orders drained · ", "\n".join(progress), re.M), progress
    started = re.search(r"starting a private one in (\S+)", proc.stderr)
    assert started, proc.stderr
    assert not Path(started.group(1)).exists()
