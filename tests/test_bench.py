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

import pytest

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
    assert len(rep["targets"]) == 13

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


def test_bench_cancels_a_share_of_orders_and_checks_each_outcome(tmp_path: Path) -> None:
    """``--cancel-share``: cancels at random moments (right after the ack, while queued, after
    execution: interceptions the bench answers as the warehouse would); every cancelled order
    ends cancelled with no core action after its cancel, and the stock is exactly what the orders
    not cancelled hold."""
    proc, rep = _run_bench(
        tmp_path,
        "--phases", "e2e",
        "--duration", "1",
        "--rate", "300",
        "--spike", "--spike-orders", "300", "--spike-seconds", "1",
        "--cancel-share", "0.2",
    )  # fmt: skip
    assert rep["config"]["cancel_share"] == 0.2
    outcomes = ("cancelled", "intercepted", "too_late", "pending", "not_cancellable", "error")
    for phase in ("e2e", "spike"):
        pc = rep["phases"][phase]["cancels"]
        assert pc["sent"] > 0, (phase, pc)
        assert sum(pc["outcomes"][k] for k in outcomes) == pc["sent"], (phase, pc)
        assert set(pc["by_moment"]) == {"at_ack", "soon", "late"}, pc
    c = rep["cancels"]
    sent = rep["phases"]["e2e"]["cancels"]["sent"] + rep["phases"]["spike"]["cancels"]["sent"]
    assert c["sent"] == sent
    # cancels before execution end at once; after it they are interceptions the warehouse answers
    assert c["outcomes"]["cancelled"] > 0 and c["outcomes"]["intercepted"] > 0, c
    assert c["outcomes"]["too_late"] == c["outcomes"]["error"] == c["outcomes"]["not_cancellable"] == 0, c
    assert c["intercept_events"] == c["outcomes"]["intercepted"]
    # every cancelled order is in its final cancelled state, nothing acted after its cancel
    assert c["final_cancelled"] == sent - c["outcomes"]["too_late"], c
    assert c["not_final"] == c["acted_after_cancel"] == 0, c
    # stock: what is sellable now is exactly the initial figure less the orders not cancelled
    assert c["stock_exact"] is True, c["stock"]
    assert c["stock"]["units_held"] > 0 and c["stock"]["units_of_cancelled"] > 0, c["stock"]
    assert c["stock"]["mismatches"] == [], c["stock"]

    # nothing lost, nothing applied twice: cancelled orders included
    o = rep["oracle"]
    assert o["lost"] == o["duplicated"] == o["unexpected"] == o["unchecked"] == 0, o
    assert o["acked_statuses"]["cancelled"] == sent, o
    assert rep["audit"]["lost"] == 0 and rep["audit"]["duplicate_effects"] == 0
    assert rep["summary"]["cancels"]["stock_exact"] is True
    names = {t["name"]: t for t in rep["targets"]}
    t = names["cancels: lost 0, duplicates 0, stock exact"]
    assert t["ok"] is True, t
    assert re.search(rf"^cancels\s+{sent:,} sent · cancelled \d+ · intercepted→cancelled \d+ · ", proc.stdout, re.M)
    assert "stock exact" in proc.stdout


def test_bench_without_cancels_reports_none(tmp_path: Path) -> None:
    """The default sends no cancel: no cancel section, and its target is not measured."""
    import argparse

    from loadtest.bench import arguments, report
    from orderq.errors import ConfigError
    from orderq.settings import Settings

    ap = argparse.ArgumentParser()
    arguments.add_arguments(ap)
    assert ap.parse_args([]).cancel_share == 0.0
    for bad in ("-0.1", "1", "1.5"):
        with pytest.raises(ConfigError, match="--cancel-share"):
            arguments.check(ap.parse_args(["--cancel-share", bad]), Settings())
    rep = {"phases": {}, "oracle": None}
    t = {x["name"]: x for x in report.targets(rep)}["cancels: lost 0, duplicates 0, stock exact"]
    assert t["ok"] is None and t["value"] is None


async def test_cancel_checks_find_stock_off_by_one_unit_and_actions_after_a_cancel() -> None:
    """The checks behind ``stock_exact`` and ``acted_after_cancel`` are exact: one unit off, or
    an order executed after a cancel that answered ``cancelled``, is found."""
    from loadtest.bench import cancels

    statuses = {"tmall:B1-00000000": "executed", "tmall:B1-00000001": "cancelled", "jd:B1-00000002": "rejected"}
    units = {"tmall:B1-00000000": {"A": 1, "G": 1}, "tmall:B1-00000001": {"B": 2}, "jd:B1-00000002": {"A": 5}}
    before = {"A": 100, "B": 100, "G": 10}

    async def now_exact() -> dict[str, int]:
        return {"A": 99, "B": 100, "G": 9}

    async def now_off() -> dict[str, int]:
        return {"A": 99, "B": 98, "G": 9}  # the cancelled order's units were never given back

    exact = await cancels._stock(statuses, units.__getitem__, before, now_exact)
    assert exact["exact"] is True and exact["units_held"] == 2 and exact["units_of_cancelled"] == 2
    off = await cancels._stock(statuses, units.__getitem__, before, now_off)
    assert off["exact"] is False and off["mismatches"] == [{"sku": "B", "expected": 100, "sellable": 98}]

    te, ca = b"te", b"ca"
    assert cancels._acted_after({b"s": b"cancelled", ca: b"5"}, "cancelled") == ""
    assert "x:wms.pick" in cancels._acted_after({b"s": b"cancelled", b"x:wms.pick@SH": b"done"}, "cancelled")
    assert cancels._acted_after({b"s": b"cancelled", te: b"9"}, "pending") != ""
    assert cancels._acted_after({b"s": b"cancelled", te: b"4", ca: b"5", b"x:wms.pick": b"done"}, "intercepted") == ""
    assert cancels._acted_after({b"s": b"cancelled", te: b"6", ca: b"5"}, "intercepted") != ""


@pytest.mark.long  # valgrind runs the server some 50 times slower: make reliability
def test_bench_counts_valkey_instructions_per_drained_order(tmp_path: Path) -> None:
    """``--valkey-instructions``: the private server runs under callgrind, counting only the
    drain; the figure is per executed order (a script call per batch costs tens of thousands of
    instructions, an order's share of the drain hundreds of thousands)."""
    proc, rep = _run_bench(tmp_path, "--phases", "burst", "--burst-orders", "200", "--valkey-instructions")
    burst = rep["phases"]["burst"]
    assert burst["executed"] == 200
    assert 20_000 < burst["valkey_instructions_per_order"] < 20_000_000
    assert "Valkey instructions per executed order" in proc.stdout
    assert list((tmp_path / "nothing-runs-here").glob("valkey*")) == []  # (a private instance's dir)


def test_bench_counts_instructions_only_of_its_own_server() -> None:
    import argparse

    from loadtest.bench import arguments
    from orderq.errors import ConfigError
    from orderq.settings import Settings

    ap = argparse.ArgumentParser()
    arguments.add_arguments(ap)
    with pytest.raises(ConfigError, match="--valkey-instructions"):
        arguments.check(ap.parse_args(["--valkey-instructions", "--url", "http://127.0.0.1:1"]), Settings())
