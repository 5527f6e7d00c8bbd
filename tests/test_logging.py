"""Logs: one canonical JSON line per batch at INFO; per-order lines only at DEBUG; stage and
worker carried as context on every line of a stage process."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest

from tests.conftest import auth, make_order, unique


async def _run(ingress, stages, level: str) -> list[dict]:
    base = await ingress()
    orders = [make_order(unique()) for _ in range(12)]
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        assert (await c.post("/v1/orders/batch", json={"orders": orders})).json()["accepted"] == 12
        v = stages("validate", ORDERQ_LOG_LEVEL=level)
        for _ in range(200):
            recs = [(await c.get(f"/v1/orders/tmall/{o['order_id']}")).json()["status"] for o in orders]
            if all(s == "validated" for s in recs):
                break
            await asyncio.sleep(0.05)
        assert all(s == "validated" for s in recs)
    v.stop()
    return [msgspec.json.decode(line) for line in v.log().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("level", ["info", "debug"])
async def test_batch_lines_at_info_order_lines_only_at_debug(ingress, stages, level):
    lines = await _run(ingress, stages, level)
    batches = [x for x in lines if x["event"] == "validate.batch"]
    assert batches and sum(b["count"] for b in batches) == 12
    assert all({"count", "duration_ms", "validated", "stage", "worker"} <= set(b) for b in batches)
    per_order = [x for x in lines if x["event"] == "validate.order"]
    if level == "info":
        assert per_order == []
    else:
        assert len(per_order) == 12
        assert all(x["order_key"].startswith("tmall:") and x["outcome"] == "done" for x in per_order)
    started = [x for x in lines if x["event"] == "validate.started"]
    assert started and started[0]["stage"] == "validate"  # bound as context for the whole process
