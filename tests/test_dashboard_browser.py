"""The dashboard in a real headless Chromium (Debian's ``chromium``) during a load:
orders pile up behind paused executors, the real breaker process moves the stage,
and the page shows it — the stage badge changes colour and the backlog chart's data
points move. A screenshot is left in ``test-artifacts/`` for a person to look at.

Skips (with the reason) only where Chromium is not installed or cannot start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from tests.conftest import ADMIN, ADMIN_TOKEN, ROOT, auth, make_order, unique

ENV: dict[str, Any] = {
    "ORDERQ_BREAKER_OPEN_DEPTH": 20,
    "ORDERQ_BREAKER_CLOSE_DEPTH": 5,
    "ORDERQ_BREAKER_COOLDOWN_S": 0.5,
    "ORDERQ_SHED_DEPTH": 60,
    "ORDERQ_SHED_VIP_DEPTH": 200,
    # every order validates: this test is about the page, not the business rules
    "ORDERQ_UNKNOWN_SKU": "allow",
    "ORDERQ_RISK_REVIEW_SCORE": 1000,
    "ORDERQ_DUP_WINDOW_S": 0,
    "ORDERQ_IP_ORDERS_PER_HOUR": 1_000_000,
}
COLOURS = {"normal": "rgb(30, 142, 62)", "degraded": "rgb(232, 160, 0)", "shedding": "rgb(217, 48, 37)"}
ARTIFACTS = ROOT / "test-artifacts"


def order(i: int, tag: str) -> dict[str, Any]:
    o = make_order(unique(tag), customer={"id": unique("u"), "tier": "regular", "phone": f"139{i:08d}"})
    o["ship_to"] = {**o["ship_to"], "phone": f"138{i:08d}"}
    return o


async def test_dashboard_shows_the_breaker_stage_and_the_backlog_moving(ingress, stages, browser):
    base = await ingress(**ENV)
    stages("breaker", **ENV)
    stages("validate", **ENV)
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    stage = page.locator("#stage")
    backlog_line = page.locator('#chart-depth polyline[data-series="backlog"]')

    async def colour() -> str:
        return await stage.evaluate("e => getComputedStyle(e).backgroundColor")

    async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
        # Polled from here: the page's CSP forbids the eval that wait_for_function needs.
        deadline = time.monotonic() + 20
        while not await check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)

    async def wait_stage(name: str) -> None:
        async def shown() -> bool:
            return await stage.get_attribute("data-stage") == name

        await until(shown, f"stage {name} on the page")

    async def backlog_at_least(n: int) -> None:
        async def shown() -> bool:
            return await backlog_line.count() == 1 and float(await backlog_line.get_attribute("data-last") or 0) >= n

        await until(shown, f"the backlog chart at {n}")

    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await c.post("/v1/admin/pause", json={"stage": "execute"}, headers=ADMIN)).status_code == 200

        await page.goto(f"{base}/dashboard?token={ADMIN_TOKEN}")
        assert page.url == f"{base}/dashboard"  # the token was traded for a cookie
        await wait_stage("normal")
        assert await colour() == COLOURS["normal"]

        async def two_points() -> bool:
            return (
                await backlog_line.count() == 1 and len((await backlog_line.get_attribute("points") or "").split()) >= 2
            )

        await until(two_points, "two points on the backlog chart")
        points_before = await backlog_line.get_attribute("points")
        assert await backlog_line.get_attribute("data-last") == "0"

        resp = await c.post("/v1/orders/batch", json={"orders": [order(i, "A") for i in range(30)]}, headers=auth())
        assert resp.json()["accepted"] == 30
        await wait_stage("degraded")
        assert await colour() == COLOURS["degraded"]
        assert (await stage.text_content() or "").strip() == "DEGRADED"
        await backlog_at_least(30)
        assert await backlog_line.get_attribute("points") != points_before

        resp = await c.post("/v1/orders/batch", json={"orders": [order(i, "B") for i in range(40)]}, headers=auth())
        assert resp.json()["accepted"] == 40
        await wait_stage("shedding")
        assert await colour() == COLOURS["shedding"]
        await backlog_at_least(70)
        assert (await page.locator("#backlog").text_content() or "").strip() == "70"
        assert "execute" in (await page.locator("#paused").text_content() or "")
        assert "validate" in (await page.locator("#workers").text_content() or "")
        assert await page.locator("#conn").get_attribute("class") == "conn ok"

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert problems == []  # no script error, no blocked inline script or style (CSP)
