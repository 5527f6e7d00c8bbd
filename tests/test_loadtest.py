"""Smoke runs of the locust scenarios (headless, a few seconds) against a real ingress:
the locustfile loads, sends orders the contract accepts, and judges the answers; at the
end the client-side oracle (loadtest/oracle.py) looks up every order it sent. The oracle's
own categories are shown here too, on states broken on purpose."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.oracle import ACCEPTED, REFUSED, UNKNOWN, Oracle
from orderq.client import Redis
from tests.conftest import ADMIN, ROOT, auth, make_order


def run_locust(
    args: list[str], env: dict[str, str], csv_prefix: Path, exit_code: int = 0, output: list[str] | None = None
) -> dict[str, dict[str, str]]:
    """Run locust headless; returns its ``--csv`` statistics rows by name, after checking the exit
    (and appends what it printed to ``output``). ``--stop-timeout``: at the end of the run a user
    finishes the request it has in flight, so its answer reaches the oracle (a user killed
    mid-request leaves its order in doubt: announced, never answered)."""
    proc = subprocess.run(
        [sys.executable, "-m", "locust", *args, "--headless", "--stop-timeout", "10", "--csv", str(csv_prefix)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == exit_code, f"locust exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    if output is not None:
        output.append(proc.stdout + proc.stderr)
    with open(f"{csv_prefix}_stats.csv", encoding="utf-8") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def oracle_of(csv_prefix: Path) -> dict[str, Any]:
    """The verdict the locustfile wrote at test stop."""
    return json.loads(Path(f"{csv_prefix}_oracle.json").read_text(encoding="utf-8"))


def clean(verdict: dict[str, Any]) -> bool:
    return verdict["lost"] == verdict["duplicated"] == verdict["unexpected"] == verdict["unchecked"] == 0


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
    # ... and every order it sent was looked up at the end: each acknowledged one there, each
    # queued one known to it (acknowledged, or in doubt: a user stopped at the end of the run
    # with its request out), nothing refused
    verdict = oracle_of(tmp_path / "steady")
    assert clean(verdict), verdict
    assert verdict["sent"] == verdict["acked"] + verdict["in_doubt"], verdict
    assert verdict["acked"] + verdict["recovered"] == accepted, verdict
    assert set(verdict["acked_statuses"]) == {"accepted"}  # no worker runs: all still queued


@pytest.mark.long  # make reliability: make test's 10-minute budget
async def test_oracle_that_cannot_check_fails_the_run(ingress, make_env, tmp_path):
    """A lookup the contract refuses (a wrong admin token) is no clean bill: locust exits 1."""
    base = await ingress()
    printed: list[str] = []
    run_locust(
        ["-f", "loadtest/locustfile.py", "-u", "2", "-r", "2", "-t", "4s", "--host", base, "Steady"],
        locust_env(make_env, ORDERQ_LOADTEST_PACING_S="0.2", ORDERQ_ADMIN_TOKEN="not-the-admin-token-at-all"),
        tmp_path / "blind",
        exit_code=1,
        output=printed,
    )
    verdict = oracle_of(tmp_path / "blind")
    assert verdict["sent"] > 0 and verdict["unchecked"] == verdict["sent"]
    # the printed statistics name it (the --csv files are written before the check ends)
    assert "ORACLE   unchecked" in printed[0] and f"{verdict['sent']} orders unchecked: " in printed[0]


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
    verdict = oracle_of(tmp_path / "retry")
    assert clean(verdict) and verdict["acked"] > 0, verdict


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
    # the shed orders were not written (contract §6); the ones taken are all there
    verdict = oracle_of(tmp_path / "spike")
    assert clean(verdict) and verdict["acked"] > 0, verdict


# --- the oracle's categories, on states broken on purpose ----------------------------------


async def test_oracle_counts_lost_unexpected_recovered_and_duplicated(ingress, r: Redis) -> None:
    """Jepsen's total-queue categories, through the contract and in Redis alike."""
    base = await ingress()
    oracle = Oracle()
    orders = [make_order(f"O{i}") for i in range(6)]
    async with httpx.AsyncClient(base_url=base) as c:
        for o in orders[:4]:
            resp = await c.post("/v1/orders", json=o, headers=auth())
            oracle.record_answer(f"tmall:{o['order_id']}", resp.status_code, resp.content)
        resp = await c.post("/v1/orders/batch", json={"orders": orders[4:]}, headers=auth())
        oracle.record_batch([f"tmall:{o['order_id']}" for o in orders[4:]], resp.status_code, resp.content)
    keys = [f"tmall:{o['order_id']}" for o in orders]
    assert oracle.acked == set(keys)
    # every order there: a clean verdict both ways
    for verdict in (oracle.check_http(base, ADMIN), await oracle.check_redis(r)):
        assert verdict.ok and (verdict.sent, verdict.acked) == (6, 6), verdict
        assert verdict.acked_statuses == {"accepted": 6}

    # an acknowledged order whose record vanished: lost
    await r.client.delete(r.partition_of(keys[0]).status(keys[0]))
    # one refused (503 shedding), yet written: unexpected (contract §6)
    oracle.answers[keys[1]] = REFUSED
    # one whose answer never came (a timeout), and it is there: recovered, which is fine
    oracle.answers[keys[2]] = UNKNOWN
    # one that was refused and is not there, and one in doubt and not there: nothing to say
    oracle.record("tmall:NEVER-1", REFUSED)
    oracle.record("tmall:NEVER-2", UNKNOWN)
    # an action applied twice, by the effect ledger (Redis only: the record lists each once)
    await r.client.hset(r.partition_of(keys[3]).status(keys[3]), mapping={"xn:notify.sms": 2})
    via_http = oracle.check_http(base, ADMIN)
    via_redis = await oracle.check_redis(r)
    for verdict in (via_http, via_redis):
        assert not verdict.ok
        assert (verdict.sent, verdict.acked, verdict.lost, verdict.unexpected, verdict.recovered) == (8, 4, 1, 1, 1)
        assert verdict.examples["lost"] == [keys[0]] and verdict.examples["unexpected"] == [keys[1]]
        assert verdict.examples["recovered"] == [keys[2]]
    assert via_redis.duplicated == 1 and via_redis.examples["duplicated"] == [f"{keys[3]} applied_twice:notify.sms"]
    assert via_http.duplicated == 0
    # a 200 duplicate whose only earlier answer was a refusal: that refusal was written
    oracle.answers[keys[4]] = REFUSED | 2
    assert (await oracle.check_redis(r)).unexpected == 2
    assert oracle.answers[keys[5]] == ACCEPTED


async def test_oracle_keeps_an_unanswered_request_in_doubt(ingress, r: Redis) -> None:
    """A sender stopped mid-request (locust kills its users at the end of a run) announced the
    request before it went out: its key is checked and judged in doubt, never dropped."""
    base = await ingress()
    oracle = Oracle()
    landed, answered, refused = (f"tmall:{o}" for o in ("INFLIGHT-1", "INFLIGHT-2", "INFLIGHT-3"))
    async with httpx.AsyncClient(base_url=base) as c:
        for key in (landed, answered, refused):
            oracle.sending([key])
            resp = await c.post("/v1/orders", json=make_order(order_id=key.split(":")[1]), headers=auth())
            assert resp.status_code == 202
            if key == answered:
                oracle.record_answer(key, resp.status_code, resp.content)
    # the first one's answer never reached the oracle; the third's said "refused" though it
    # was written: the answer, not the announcement, is what the oracle judges then
    oracle.record_answer(refused, 503, b'{"error": {"code": "shedding", "message": "x"}}')
    oracle.sending(["tmall:INFLIGHT-NEVER"])  # announced, never arrived: nothing to say
    for verdict in (oracle.check_http(base, ADMIN), await oracle.check_redis(r)):
        assert (verdict.sent, verdict.acked, verdict.in_doubt, verdict.lost) == (4, 1, 2, 0), verdict
        assert verdict.examples["recovered"] == [landed]
        assert verdict.examples["unexpected"] == [refused]
    # a batch's answer settles each of its keys
    batch = Oracle()
    batch.sending([landed, answered])
    batch.record_batch([landed, answered], 202, {"results": [{"status": "accepted"}, {"status": "accepted"}]})
    assert batch.in_flight == {} and batch.acked == {landed, answered}
