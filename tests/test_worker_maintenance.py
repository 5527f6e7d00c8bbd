"""Worker upkeep a long-running deployment relies on, and the fsync durability mode."""

from __future__ import annotations

import httpx
import pytest

import orderq.worker as worker_mod
from orderq import client as oq_client
from orderq import keys
from tests.conftest import auth, drain, make_order, unique
from validate.worker import ValidateWorker


async def test_consumers_of_dead_processes_are_pruned(r, monkeypatch):
    for p in r.partitions:  # a process that read once and died: one consumer per stream
        await r.client.xreadgroup(keys.GROUP_VALIDATE, "dead-host:123", {p.intake: ">"}, count=1)
    monkeypatch.setattr(worker_mod, "PRUNE_IDLE_MS", -1)
    assert await ValidateWorker(r, None, consumer="me").prune_consumers() == len(r.partitions)
    for p in r.partitions:
        names = [c["name"] for c in await r.client.xinfo_consumers(p.intake, keys.GROUP_VALIDATE)]
        assert b"dead-host:123" not in names


async def test_deleted_group_is_recreated_at_zero_and_nothing_is_skipped(ingress, flushed, settings_for):
    base = await ingress()
    r = await oq_client.connect(settings_for(ORDERQ_UNKNOWN_SKU="allow"))
    p0 = r.partitions[0]
    await r.client.xgroup_destroy(p0.intake, keys.GROUP_VALIDATE)
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        orders = [make_order(unique()) for _ in range(40)]
        assert (await c.post("/v1/orders/batch", json={"orders": orders})).json()["accepted"] == 40
        await drain(r)
        await drain(r)  # the first drain hit NOGROUP and recreated the group at id 0
        states = [(await c.get(f"/v1/orders/tmall/{o['order_id']}")).json()["status"] for o in orders]
    await r.close()
    assert states == ["executed"] * 40


@pytest.mark.parametrize("mode", ["fsync"])
async def test_fsync_durability_acknowledges_after_the_aof_write(ingress, r, mode):
    base = await ingress(ORDERQ_DURABILITY=mode)
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        one = await c.post("/v1/orders", json=make_order(unique()))
        assert one.status_code == 202, one.text
        batch = await c.post("/v1/orders/batch", json={"orders": [make_order(unique()) for _ in range(20)]})
        assert batch.json()["accepted"] == 20
    info = await r.client.info("persistence")
    assert info["aof_enabled"] == 1


async def test_outbox_of_an_action_with_a_webhook_is_never_trimmed(ingress, flushed, settings_for):
    """Trimming keeps outbox memory bounded, but must never drop what a dispatcher has not delivered."""
    base = await ingress(ORDERQ_PARTITIONS=1)
    r = await oq_client.connect(
        settings_for(ORDERQ_PARTITIONS=1, ORDERQ_OUTBOX_MAXLEN=1000, ORDERQ_WEBHOOK_WMS_PICK="http://127.0.0.1:9/wms")
    )
    async with httpx.AsyncClient(base_url=base, headers=auth()) as c:
        for _ in range(3):
            orders = [make_order(unique()) for _ in range(600)]
            assert (await c.post("/v1/orders/batch", json={"orders": orders})).json()["accepted"] == 600
            await drain(r)
    picks = sum([await r.client.xlen(p.outbox("wms.pick")) for p in r.partitions])
    sms = [await r.client.xlen(p.outbox("notify.sms")) for p in r.partitions]
    await r.close()
    assert picks == 1800  # the webhook's action: every entry kept for the dispatcher
    assert sum(sms) < 1800 and max(sms) <= 1000 + 200  # the others: trimmed (approximately) per stream
