"""deploy/prometheus: the rules pass ``promtool check rules`` and their unit tests
(``promtool test rules tests.yml``), and a real Prometheus scraping a running orderq
evaluates every recording rule to a number and every rule without error.

promtool and prometheus come from Debian's ``prometheus`` package (``make prometheus``
installs it when root); without them these tests skip and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderq.server import free_port
from tests.conftest import ROOT, auth, make_order, unique

RULES_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = ("recording.yml", "alerts.yml")
NO_PROMETHEUS = "Debian's prometheus package is not installed (`make prometheus`, or apt-get install prometheus)"

# PromQL words that are not metric names (functions are recognised by their "(").
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def recording_rules() -> dict[str, str]:
    """``record`` name -> ``expr`` of deploy/prometheus/recording.yml.

    A reader for the shape that file keeps (``- record:`` then ``expr:``, the expression
    inline or folded with ``>-``); no YAML library is among the project's dependencies.
    """
    rules: dict[str, str] = {}
    lines = (RULES_DIR / "recording.yml").read_text(encoding="utf-8").splitlines()
    name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"\s*- record:\s*(\S+)\s*$", line)
        if m:
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if m and name is not None:
            indent, value = len(m.group(1)), m.group(2).strip()
            if value in (">-", ">", "|", "|-"):
                parts = []
                while i + 1 < len(lines) and (not lines[i + 1].strip() or _indent(lines[i + 1]) > indent):
                    i += 1
                    parts.append(lines[i].strip())
                value = " ".join(p for p in parts if p)
            rules[name] = value
            name = None
        i += 1
    return rules


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)", (RULES_DIR / "alerts.yml").read_text(encoding="utf-8"), re.M)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (label names, functions, durations,
    strings and Grafana variables left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range / subquery durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables ($__rate_interval, ${job})
    e = re.sub(r"\boffset\s+\S+", " ", e)
    names = set()
    for m in _IDENT.finditer(e):
        word = m.group(0)
        if word in _KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]?", word) or word in ("Inf", "NaN", "inf", "nan"):
            continue
        names.add(word)
    return names


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(f"promtool not found: {NO_PROMETHEUS}")
    return path


def test_promtool_check_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", *RULE_FILES], cwd=RULES_DIR, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(RULE_FILES), proc.stdout
    # the example scrape configuration loads the same files
    proc = subprocess.run(
        [_promtool(), "check", "config", "prometheus.example.yml"],
        cwd=RULES_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_of_the_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", "tests.yml"], cwd=RULES_DIR, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_runbook_and_every_recording_rule_reads_orderq_series() -> None:
    alerts = (RULES_DIR / "alerts.yml").read_text(encoding="utf-8")
    names = alert_names()
    assert len(names) >= 10
    blocks = re.split(r"^\s*- alert:", alerts, flags=re.M)[1:]
    for name, block in zip(names, blocks, strict=True):
        assert re.search(r"^\s+runbook:\s*\S", block, re.M), f"{name} has no runbook annotation"
        assert re.search(r"^\s+severity:\s*(warning|critical)$", block, re.M), f"{name} has no severity"
    rules = recording_rules()
    assert len(rules) >= 10
    for name, expr in rules.items():
        used = metric_names(expr)
        assert used and all(n.startswith("orderq_") for n in used), (name, used)


# --- a real Prometheus against a running orderq -----------------------------------------


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Start Debian's prometheus scraping ``target`` (host:port) every second, with the
    rules of deploy/prometheus evaluated every second; returns its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(f"prometheus not found: {NO_PROMETHEUS}")
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []

    def start(target: str) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        rule_files = "\n".join(f"  - {RULES_DIR / f}" for f in RULE_FILES)
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n{rule_files}\n"
            f"scrape_configs:\n  - job_name: orderq\n    static_configs:\n      - targets: ['{target}']\n",
            encoding="utf-8",
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for log in logs:
        log.close()


async def test_a_real_prometheus_evaluates_every_recording_rule(ingress, stages, prometheus, tmp_path) -> None:
    rules = recording_rules()
    base = await ingress()
    stages("validate")
    stages("execute")
    prom = prometheus(base.removeprefix("http://"))
    values: dict[str, list[float]] = {}
    health: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=10) as c, httpx.AsyncClient(timeout=5) as p:
        # Until its storage and rules are loaded, Prometheus answers its API with a plain-text 503
        # ("Service Unavailable"), not JSON: wait for /-/ready first.
        ready_by = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await p.get(f"{prom}/-/ready")).status_code == 200:
                    break
            assert time.monotonic() < ready_by, (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 25
        while True:
            # orders keep coming (vip and new), so rates and latency quantiles have something to show
            orders = [make_order(unique()) for _ in range(3)]
            orders.append(make_order(unique(), customer={"id": unique("v"), "tier": "vip"}))
            resp = await c.post("/v1/orders/batch", json={"orders": orders})
            assert resp.status_code == 202, resp.text
            with contextlib.suppress(httpx.HTTPError):
                for name in rules:
                    res = (await p.get(f"{prom}/api/v1/query", params={"query": name})).json()
                    values[name] = [float(s["value"][1]) for s in res["data"]["result"]]
                groups = (await p.get(f"{prom}/api/v1/rules")).json()["data"]["groups"]
                health = [r for g in groups for r in g["rules"]]
            done = values.keys() == rules.keys() and all(v and all(map(math.isfinite, v)) for v in values.values())
            if done and health and all(r["health"] == "ok" for r in health):
                break
            if time.monotonic() > deadline:
                log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
                missing = {n: v for n, v in values.items() if not v or not all(map(math.isfinite, v))}
                bad = [(r["name"], r["health"], r.get("lastError")) for r in health if r["health"] != "ok"]
                pytest.fail(f"rules without a value: {missing}; unhealthy: {bad}; prometheus log:\n{log}")
            await asyncio.sleep(0.4)
    # every recording and alerting rule was loaded, and each evaluated without an error
    assert sorted(r["name"] for r in health) == sorted([*rules, *alert_names()])
    assert values["job:orderq_accepted:rate1m"][0] > 0
    assert values["job:orderq_breaker_stage:level"] == [0.0]
    assert all(v > 0 for v in values["job_priority:orderq_e2e_latency_seconds:p99_5m"])
