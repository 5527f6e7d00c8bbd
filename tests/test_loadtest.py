"""Smoke runs of the locust scenarios (headless, a few seconds) against a real ingress:
the locustfile loads, sends orders the contract accepts, and judges the answers."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run_locust(args: list[str], env: dict[str, str], csv_prefix: Path) -> dict[str, dict[str, str]]:
    """Run locust headless; returns its ``--csv`` statistics rows by name, after checking the exit."""
    proc = subprocess.run(
        [sys.executable, "-m", "locust", *args, "--headless", "--csv", str(csv_prefix)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"locust exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    with open(f"{csv_prefix}_stats.csv", encoding="utf-8") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def locust_env(make_env, **over: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
    env.update(make_env())  # the test ingress's tokens, as a load tester would export them
    env.update(over)
    return env


async def test_steady_scenario_sends_valid_orders(ingress, make_env, tmp_path, r):
    base = await ingress()
    rows = run_locust(
        ["-f", "loadtest/locustfile.py", "-u", "5", "-r", "5", "-t", "3s", "--host", base, "Steady"],
        locust_env(make_env, ORDERQ_LOADTEST_PACING_S="0.1"),
        tmp_path / "steady",
    )
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 10
    assert int(total["Failure Count"]) == 0
    assert int(rows["POST /v1/orders"]["Request Count"]) > 0
    # What locust counted as accepted is what the ingress queued.
    accepted = sum([await r.client.xlen(p.intake) for p in r.partitions])
    assert accepted >= int(rows["POST /v1/orders"]["Request Count"])


@pytest.mark.long
async def test_retry_storm_replays_get_duplicate_answers(ingress, make_env, tmp_path):
    base = await ingress()
    rows = run_locust(
        ["-f", "loadtest/locustfile.py", "-u", "4", "-r", "4", "-t", "3s", "--host", base, "RetryStorm"],
        locust_env(make_env, ORDERQ_LOADTEST_PACING_S="0.05"),
        tmp_path / "retry",
    )
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["POST /v1/orders (replay)"]["Request Count"]) > 0  # each answered 200 duplicate


async def test_spike618_shape_runs_and_takes_shedding_as_the_contract_says(ingress, stages, make_env, tmp_path):
    # Tiny thresholds and no workers: the spike passes the shed depth, regular orders get
    # 503 + Retry-After, which the scenario counts in its own row, not as a failure.
    shed = {"ORDERQ_BREAKER_OPEN_DEPTH": "5", "ORDERQ_BREAKER_CLOSE_DEPTH": "2", "ORDERQ_SHED_DEPTH": "10"}
    base = await ingress(**shed)
    stages("breaker", **shed)
    env = locust_env(
        make_env,
        ORDERQ_SPIKE_ORDERS="40",
        ORDERQ_SPIKE_SECONDS="2",
        ORDERQ_SPIKE_WARMUP_S="0.5",
        ORDERQ_SPIKE_TAIL_S="0.5",
        ORDERQ_SPIKE_BASE_USERS="2",
    )
    rows = run_locust(["-f", "loadtest/spike618.py", "--host", base], env, tmp_path / "spike")
    assert int(rows["POST /v1/orders"]["Request Count"]) >= 5  # a 3 s shape on a loaded machine
    assert int(rows["POST /v1/orders [503]"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
