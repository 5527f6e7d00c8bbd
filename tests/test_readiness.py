"""Readiness (contract §4): ``GET /readyz`` is 200 while this ingress can take orders, and 503
only when it can take none, VIP included. Shedding regular and new orders is not unreadiness:
every ingress sheds alike, and a load balancer that took them all out would refuse VIP too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderq.server import EmbeddedServer, free_port
from tests.conftest import ADMIN, auth, make_order

# Small thresholds, so a few hundred orders and no workers reach each stage.
SHED = {
    "ORDERQ_BREAKER_OPEN_DEPTH": 20,
    "ORDERQ_BREAKER_CLOSE_DEPTH": 5,
    "ORDERQ_SHED_DEPTH": 60,
    "ORDERQ_SHED_VIP_DEPTH": 150,
}


def order(tag: str, i: int, tier: str = "regular") -> dict[str, Any]:
    return make_order(f"{tag}{i}", customer={"id": f"u-{tag}{i}", "tier": tier, "phone": "13812345678"})


async def until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)
    return value


async def push(c: httpx.AsyncClient, orders: list[dict[str, Any]]) -> dict[str, Any]:
    resp = await c.post("/v1/orders/batch", json={"orders": orders}, headers=auth())
    assert resp.status_code == 202, resp.text
    return resp.json()


async def test_shedding_regular_orders_is_ready_refusing_vip_too_is_not(ingress: Any, stages: Any) -> None:
    base = await ingress(**SHED)
    stages("breaker", **SHED)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        await push(c, [order("S", i) for i in range(60)])  # no workers: the backlog stays

        async def shedding_regular() -> bool:
            resp = await c.post("/v1/orders", json=order("R", 0), headers=auth())
            return resp.status_code == 503 and resp.json()["error"]["code"] == "shedding"

        await until(shedding_regular, "this ingress to shed regular orders")
        ready = await c.get("/readyz")
        assert ready.status_code == 200, ready.text  # a load balancer keeps it: VIP orders still go in
        assert ready.json() == {"status": "ready", "stage": "shedding"}
        resp = await c.post("/v1/orders", json=order("V", 0, "vip"), headers=auth())
        assert resp.status_code == 202, resp.text

        # Past the VIP shed depth this ingress refuses every order: now it is not ready.
        assert (await push(c, [order("W", i, "vip") for i in range(100)]))["accepted"] == 100

        async def unready() -> httpx.Response | None:
            resp = await c.get("/readyz")
            return resp if resp.status_code == 503 else None

        resp = await until(unready, "readiness to go once VIP orders are refused too")
        assert resp.json()["error"]["code"] == "shedding" and int(resp.headers["Retry-After"]) >= 1
        resp = await c.post("/v1/orders", json=order("V", 1, "vip"), headers=auth())
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "shedding", resp.text
        assert (await c.get("/healthz")).status_code == 200  # alive, just not ready
        assert (await c.get("/v1/stats", headers=ADMIN)).json()["backlog"] >= 150


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A private Valkey this test may kill."""
    s = EmbeddedServer(tmp_path / "own-valkey", port=free_port()).start()
    yield s
    s.kill()


async def test_redis_unreachable_is_not_ready(ingress: Any, own_server: EmbeddedServer) -> None:
    base = await ingress(ORDERQ_REDIS_URL=own_server.url)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        assert (await c.get("/readyz")).status_code == 200
        own_server.kill()
        t0 = time.monotonic()
        resp = await c.get("/readyz")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "unavailable", resp.text
        assert time.monotonic() - t0 < 5  # within a probe's timeout, not a hang
        assert (await c.get("/healthz")).status_code == 200
