"""deploy/grafana/orderq.json: a provisionable board whose every query names series orderq
really exports — checked against a live ``/metrics`` after orders went through (recording
rule names resolve through deploy/prometheus/recording.yml) — and which shows every metric
family orderq exports somewhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from dispatch.circuit import Circuit
from orderq.circuits import CircuitBoard
from tests.conftest import ROOT, auth, make_order, unique
from tests.test_metrics_operators import write_connector
from tests.test_prometheus_rules import metric_names, recording_rules

BOARD = ROOT / "deploy" / "grafana" / "orderq.json"
DS_UID = "${DS_PROMETHEUS}"
NO_QUERY = {"row", "text", "alertlist", "dashlist", "news"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def board() -> dict[str, Any]:
    return json.loads(BOARD.read_text(encoding="utf-8"))


def panels(b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in b["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # the panels of a collapsed row
    return out


def queries(b: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    out = []
    for p in panels(b):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t.get('refId')}", t["expr"]))
    for v in b["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)  # label_values(selector, label)
            out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def exported(text: str) -> dict[str, set[str]]:
    """Family name -> its series names, of a Prometheus text exposition. A family declared
    without samples yet (a labelled counter nothing has counted) still names its series."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        names = out.setdefault(fam.name, set())
        names.update(s.name for s in fam.samples)
        names.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
    return out


def test_the_board_is_provisionable() -> None:
    b = board()
    assert b["uid"] == "orderq" and b["title"] and b["id"] is None
    variables = {v["name"]: v for v in b["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"  # resolves under file provisioning
    assert variables["job"]["datasource"]["uid"] == DS_UID
    ids = [p["id"] for p in panels(b)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels(b):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] in NO_QUERY:
            continue
        assert p["datasource"]["uid"] == DS_UID, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == DS_UID, p["title"]
            assert t["expr"].strip(), p["title"]
    assert DS_UID in BOARD.read_text(encoding="utf-8")
    assert 'uid": "prometheus' not in BOARD.read_text(encoding="utf-8")  # no data source hard-wired


async def test_every_query_names_series_orderq_exports(ingress, stages, r) -> None:
    base = await ingress()
    stages("validate")
    stages("execute")
    # a dispatcher's open circuit and a pull connector, as their processes publish them
    circuit = Circuit("wms.pick", 1, 60.0)
    circuit.failure()
    await CircuitBoard(r.client, {"wms.pick": circuit}, "test-grafana").publish()
    await write_connector(r.client, "jd-main", int(time.time() * 1000) - 60_000, error="HTTP 503")
    async with httpx.AsyncClient(base_url=base, headers=auth(), timeout=10) as c:
        orders = [make_order(unique()) for _ in range(4)]
        orders.append(make_order(unique(), customer={"id": unique("v"), "tier": "vip"}))
        assert (await c.post("/v1/orders/batch", json={"orders": orders})).json()["accepted"] == 5
        assert (await c.post("/v1/orders", json=orders[0])).status_code == 200  # a duplicate
        text = ""
        for _ in range(100):  # executed, and the latencies flushed to Redis (once a second)
            text = (await c.get("/metrics")).text
            if (
                "orderq_e2e_latency_seconds_count" in text
                and 'orderq_executed_total{priority="vip"} 1.0' in text
                and 'orderq_channel_orders_total{channel="tmall",outcome="duplicate"} 1.0' in text
            ):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"orders did not go through:\n{text}")
    for series in (
        'orderq_dispatch_circuit_state{action="wms.pick"} 2.0',
        'orderq_connector_lag_seconds{connector="jd-main"}',
    ):
        assert series in text, series
    families = exported(text)
    series = set().union(*families.values())
    rules = recording_rules()
    problems = []
    shown: set[str] = set()
    for where, expr in queries(board()):
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: names no metric: {expr}")
        for name in names:
            if name in rules:
                inner = metric_names(rules[name])
                shown.update(inner)
                problems += [f"{where}: {name} reads {n}, which /metrics lacks" for n in inner - series]
            elif name in series:
                shown.add(name)
            else:
                problems.append(f"{where}: {name} is neither exported by /metrics nor a recording rule")
    assert problems == []
    # the board shows every family orderq exports (a new metric wants a panel)
    hidden = sorted(f for f, names in families.items() if not names & shown)
    assert hidden == [], f"metric families with no panel in deploy/grafana/orderq.json: {hidden}"
