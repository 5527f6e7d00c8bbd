"""Security basics against real processes: the admin surface is never reachable with a
channel token (every admin, review, stats and dashboard route of the app, every method,
every channel's token, as a header and as the dashboard's query parameter), and no token
or secret ever reaches a log line of any stage."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from ingress.app import build_app
from orderq.client import Redis
from orderq.settings import Settings
from tests.conftest import ADMIN, ADMIN_TOKEN, CHANNEL_TOKENS, auth, make_order

ADMIN_PREFIXES = ("/v1/admin", "/v1/review", "/v1/stats", "/dashboard")


def admin_routes(settings: Settings) -> list[tuple[str, str]]:
    """(method, path) of every admin-only route the app has, path parameters filled in."""
    app: Any = build_app(settings)
    while not isinstance(app, Starlette):  # BodyLimit -> FastPaths -> Starlette
        app = app.app
    out = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith(ADMIN_PREFIXES):
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        out += [(m, concrete) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


@pytest.fixture
async def api(ingress: Any, r: Redis) -> AsyncIterator[httpx.AsyncClient]:
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        yield c


async def test_admin_surface_never_answers_a_channel_token(api: httpx.AsyncClient, settings_for: Any, r: Redis) -> None:
    routes = admin_routes(settings_for())
    # the loop covers the whole admin surface the contract names
    paths = {p for _, p in routes}
    assert {"/v1/admin/stock", "/v1/admin/holds", "/v1/admin/pause", "/v1/review", "/v1/stats"} <= paths, paths
    assert len(routes) >= 14, routes
    body = {"stage": "execute", "items": [], "coupons": [], "province": "江苏省", "reason": "t"}
    for method, path in routes:
        for channel, token in CHANNEL_TOKENS.items():
            for headers, params in (
                ({"Authorization": f"Bearer {token}"}, {}),
                ({}, {"token": token}),  # the dashboard's query parameter takes the admin token only
                ({"Authorization": f"Bearer {token}"}, {"token": token}),
            ):
                api.cookies.clear()  # the admin's dashboard cookie from an earlier route must not help
                resp = await api.request(method, path, headers=headers, params=params, json=body)
                assert resp.status_code in (401, 403), (method, path, channel, resp.status_code, resp.text[:200])
                assert "set-cookie" not in resp.headers, (method, path)
        # no token at all: 401
        api.cookies.clear()
        resp = await api.request(method, path, json=body)
        assert resp.status_code == 401, (method, path, resp.status_code)
        # the admin token gets past the check (so the refusals above are the check's)
        resp = await api.request(method, path, headers=ADMIN, json=body)
        assert resp.status_code not in (401, 403), (method, path, resp.status_code, resp.text[:200])


async def test_no_token_or_secret_reaches_any_log(ingress: Any, stages: Any, r: Redis, tmp_path: Any) -> None:
    secret = "shpss-" + "s3cr3t" * 5
    env = {"ORDERQ_LOG_LEVEL": "debug", "ORDERQ_SHOPIFY_SECRET": secret}
    workers = [stages("validate", **env), stages("execute", **env)]
    base = await ingress(**env)
    guess = "tok-tmall-" + "x" * 15 + "Z"  # a mistyped real token: no more loggable than the real one
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        for i in range(5):
            assert (await c.post("/v1/orders", json=make_order(i), headers=auth())).status_code == 202
        await c.post("/v1/orders", json=make_order(9), headers=auth("jd"))  # 403
        await c.post("/v1/orders", json=make_order(9), headers={"Authorization": f"Bearer {guess}"})  # 401
        await c.post("/v1/orders", json=make_order(9), headers=ADMIN)  # 403
        await c.post("/v1/orders", content=b"{", headers={**auth(), "Content-Type": "application/json"})
        await c.get("/v1/stats", headers=auth())
        await c.get("/v1/stats", headers=ADMIN)
        await c.get("/dashboard", params={"token": ADMIN_TOKEN})
        await c.get("/dashboard", params={"token": CHANNEL_TOKENS["jd"]})
        await c.post("/v1/admin/pause", json={"stage": "execute"}, headers=ADMIN)
        await c.post("/v1/admin/resume", json={"stage": "execute"}, headers=ADMIN)
        await c.post(
            "/v1/webhooks/shopify",
            content=b'{"id": 1}',
            headers={"Content-Type": "application/json", "X-Shopify-Hmac-Sha256": "bm9wZQ=="},
        )
        for _ in range(100):
            if (await c.get("/v1/stats", headers=ADMIN)).json()["totals"]["executed"] >= 5:
                break
            await asyncio.sleep(0.05)
    logs = {p.stage: p.log() for p in workers}
    logs["ingress"] = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ingress-*.log"))
    assert logs["ingress"] and logs["validate"] and logs["execute"]
    secrets = [*CHANNEL_TOKENS.values(), ADMIN_TOKEN, secret, guess]
    for stage, text in logs.items():
        for s in secrets:
            assert s not in text, f"{stage} logged a secret ({s[:8]}...)"
