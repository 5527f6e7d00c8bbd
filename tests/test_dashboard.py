"""The operators' views over HTTP: /dashboard and its data (admin token or its cookie,
stats + history from the real breaker process, one computation for many viewers),
``orderq status --json`` equal to /v1/stats, and /openapi.json matching what the
service really answers.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from ingress import bodies
from ingress.dashboard import COOKIE
from orderq.keys import REASONS_KEY
from tests.conftest import ADMIN, ADMIN_TOKEN, ROOT, auth, drain, make_order, unique


async def poll(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_dashboard_takes_the_admin_token_or_its_cookie(ingress):
    base = await ingress()
    async with httpx.AsyncClient(base_url=base) as c:
        resp = await c.get("/dashboard")
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "unauthorized"
        assert "token" in resp.json()["error"]["message"]
        resp = await c.get("/dashboard", headers={"Accept": "text/html"})  # a browser gets a page saying how
        assert resp.status_code == 401 and resp.headers["content-type"].startswith("text/html")
        assert "/dashboard?token=" in resp.text
        assert (await c.get("/dashboard/data")).status_code == 401
        assert (await c.get("/dashboard", headers=auth())).status_code == 403  # a channel token is not enough
        assert (await c.get("/dashboard", headers={"Authorization": "Bearer nope"})).status_code == 401

        resp = await c.get("/dashboard", headers=ADMIN)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
        assert 'id="stage"' in resp.text and 'id="chart-depth"' in resp.text
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp  # nothing from elsewhere
        assert "http://" not in resp.text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in resp.text
        assert resp.headers["cache-control"] == "no-store"

    async with httpx.AsyncClient(base_url=base) as c:
        resp = await c.get("/dashboard", params={"token": "wrong"}, headers={"Accept": "text/html"})
        assert resp.status_code == 401 and COOKIE not in resp.cookies
        resp = await c.get("/dashboard", params={"token": ADMIN_TOKEN})
        assert resp.status_code == 303
        assert resp.headers["location"] == "/dashboard"  # the token leaves the address bar
        set_cookie = resp.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie and "Path=/dashboard" in set_cookie
        assert ADMIN_TOKEN not in set_cookie  # the cookie is not the token itself
        assert c.cookies.get(COOKIE)
        resp = await c.get("/dashboard")
        assert resp.status_code == 200 and 'id="stage"' in resp.text
        resp = await c.get("/dashboard/data")
        assert resp.status_code == 200, resp.text
        assert resp.json()["stats"]["stage"] == "normal"
        # The cookie opens the dashboard and nothing else.
        cookie = {COOKIE: c.cookies[COOKIE]}
    async with httpx.AsyncClient(base_url=base, cookies=cookie) as c:
        assert (await c.get("/dashboard/data")).status_code == 200
        assert (await c.get("/v1/stats")).status_code == 401
    async with httpx.AsyncClient(base_url=base, cookies={COOKIE: "0" * 64}) as c:
        assert (await c.get("/dashboard/data")).status_code == 401


async def test_dashboard_data_is_the_stats_plus_the_breakers_history(ingress, stages, r):
    base = await ingress()
    stages("breaker")
    async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=10) as c:

        async def samples(n: int) -> list[dict[str, Any]] | None:
            doc = (await c.get("/dashboard/data")).json()
            return doc["history"] if len(doc["history"]) >= n else None

        await poll(lambda: samples(1), "a first history sample")
        orders = [make_order(unique()) for _ in range(7)]
        resp = await c.post("/v1/orders/batch", json={"orders": orders}, headers=auth())
        assert resp.json()["accepted"] == 7
        await r.client.hincrby(REASONS_KEY, "out_of_stock", 3)

        async def seen() -> dict[str, Any] | None:
            doc = (await c.get("/dashboard/data")).json()
            last = doc["history"][-1]
            return doc if last["totals"]["accepted"] == 7 and len(doc["history"]) >= 3 else None

        doc = await poll(seen, "a sample with the 7 orders")
        stats = (await c.get("/v1/stats")).json()
        assert doc["stats"].keys() == stats.keys()
        assert doc["stats"]["totals"]["accepted"] == 7
        assert doc["reasons"] == {"out_of_stock": 3}
        assert doc["thresholds"]["open_depth"] == 5000
        hist = doc["history"]
        last = hist[-1]
        assert last["backlog"] == 7 and last["depth"]["intake"] == 7 and last["stage"] == "normal"
        assert [s["ts"] for s in hist] == sorted(s["ts"] for s in hist)
        # Rates are the totals' deltas: added up over the samples they give the 7 orders back.
        added = sum(b["rates"]["accepted"] * (b["ts"] - a["ts"]) for a, b in itertools.pairwise(hist))
        assert abs(added - 7) < 0.5
        assert max(s["rates"]["accepted"] for s in hist) > 0
        # A page asks only for what it has not seen.
        newer = (await c.get("/dashboard/data", params={"since": last["ts"]})).json()["history"]
        assert all(s["ts"] > last["ts"] for s in newer)
        assert (await c.get("/dashboard/data", params={"since": "soon"})).status_code == 422

        # The breaker's alerts show on the page while they hold.
        await r.client.hincrby(r.partitions[0].counters, "dead_letters", 1)

        async def alerting() -> list[dict[str, Any]]:
            doc = (await c.get("/dashboard/data")).json()
            return [a for a in doc["alerts"] if a["kind"] == "dead_letters"]

        (alert,) = await poll(alerting, "the dead-letter alert on the dashboard")
        assert alert["since"].endswith("Z") and "dead letters" in alert["text"]
        msgspec.convert(doc, bodies.DashboardData)  # the documented shape


async def test_concurrent_viewers_share_one_computation(ingress):
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, headers=ADMIN, timeout=10) as c:
        docs = await asyncio.gather(*[c.get("/dashboard/data") for _ in range(30)])
    assert all(d.status_code == 200 for d in docs)
    computed = {d.json()["computed_at"] for d in docs}
    assert len(computed) <= 3, f"{len(computed)} computations for 30 viewers"


async def test_status_json_is_the_stats_document(ingress, make_env, r):
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        orders = [make_order(unique()) for _ in range(5)]
        assert (await c.post("/v1/orders/batch", json={"orders": orders}, headers=auth())).status_code == 202
        await drain(r)
        await c.post("/v1/orders", json=orders[0], headers=auth())  # a duplicate
        env = {**os.environ, **make_env(), "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-m", "orderq", "status", "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr.decode()
        status = json.loads(out.stdout)
        stats = (await c.get("/v1/stats", headers=ADMIN)).json()
    assert status.keys() == stats.keys()
    for name in ("depth", "rates", "totals", "syncs", "executed_by_priority"):
        assert status[name].keys() == stats[name].keys(), name
    assert status["totals"] == stats["totals"]
    assert status["totals"]["executed"] == 5 and status["totals"]["duplicates"] == 1
    assert (status["stage"], status["backlog"], status["depth"]) == (stats["stage"], stats["backlog"], stats["depth"])
    msgspec.convert(status, bodies.Stats)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _fields(t: Any) -> set[str]:
    return set(t.__struct_fields__)


async def test_openapi_lists_the_routes_with_schemas_that_match_the_answers(ingress, r):
    base = await ingress(ORDERQ_BATCH_MAX=500)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        resp = await c.get("/openapi.json")  # open: no token
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
        doc = json.loads(resp.content)
        assert doc["openapi"].startswith("3.1")
        paths = doc["paths"]
        for path, method in [
            ("/v1/orders", "post"),
            ("/v1/orders/batch", "post"),
            ("/v1/orders/{channel}/{order_id}", "get"),
            ("/v1/stats", "get"),
            ("/v1/admin/pause", "post"),
            ("/v1/admin/resume", "post"),
            ("/metrics", "get"),
            ("/healthz", "get"),
            ("/readyz", "get"),
            ("/dashboard", "get"),
            ("/openapi.json", "get"),
        ]:
            assert method in paths.get(path, {}), (path, method)
        schemas = doc["components"]["schemas"]
        for ref in _refs(doc):
            assert ref.removeprefix("#/components/schemas/") in schemas, ref
        order = schemas["Order"]
        assert (order["properties"]["lines"]["minItems"], order["properties"]["lines"]["maxItems"]) == (1, 200)
        assert {"channel", "order_id", "created_at", "customer", "ship_to", "lines", "paid_amount"} <= set(
            order["required"]
        )
        assert schemas["BatchRequest"]["properties"]["orders"]["maxItems"] == 500  # ORDERQ_BATCH_MAX
        post = paths["/v1/orders"]["post"]
        assert post["security"] == [{"channelToken": []}]
        assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Order")
        assert post["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        assert "Retry-After" in post["responses"]["503"]["headers"]
        assert paths["/v1/stats"]["get"]["security"] == [{"adminToken": []}]
        assert paths["/healthz"]["get"]["security"] == []
        assert doc["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"

        # The documented bodies are what the service answers: same fields, valid types.
        o = make_order(unique())
        answers = [
            (await c.post("/v1/orders", json=o, headers=auth()), bodies.Accepted),
            (await c.post("/v1/orders/batch", json={"orders": [o, {"x": 1}]}, headers=auth()), bodies.BatchResponse),
            (await c.get(f"/v1/orders/tmall/{o['order_id']}", headers=ADMIN), bodies.StatusRecord),
            (await c.get("/v1/stats", headers=ADMIN), bodies.Stats),
            (await c.post("/v1/orders", json={**o, "lines": []}, headers=auth()), bodies.ErrorBody),
            (await c.get("/healthz"), bodies.Health),
            (await c.get("/readyz"), bodies.Ready),
        ]
        for resp, t in answers:
            body = resp.json()
            msgspec.convert(body, t)
            assert _fields(t) - _optional(t) <= set(body) <= _fields(t), (t.__name__, body)
        assert paths["/v1/orders"]["post"]["responses"].keys() >= {"202", "200", "400", "401", "403", "413", "415"}


def _optional(t: Any) -> set[str]:
    """Fields a Struct may omit (those with a default)."""
    names = t.__struct_fields__
    return set(names[len(names) - len(t.__struct_defaults__) :])
