"""The order copies of the outbox (orderq/ordercopies.py): an executed order is stored once, its
outbox and deferred entries reference it, and the copy goes with the last entry referencing it,
whichever way that entry leaves (delivered, dead-lettered then resolved, replayed, trimmed)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from orderq import audit, client, deadletters, keys, ordercopies
from orderq.client import Redis
from orderq.control import Control
from orderq.schema import unpack_order
from tests.conftest import dispatch_all, drain, make_order
from tests.test_dispatch import PATHS, VARIABLE, Sink
from tests.test_recovery import push


def orders(n: int, prefix: str = "C") -> list[dict[str, Any]]:
    """Orders owing 2 to 5 actions each (remarks, gifts, invoices on some)."""
    out = []
    for i in range(n):
        o = make_order(
            f"{prefix}{i}",
            remark="请周末送" if i % 2 else None,
            gifts=[{"sku": "GIFT-1", "qty": 1}] if i % 3 == 0 else [],
            paid_amount="2899.00" if i % 4 else "99.00",
        )
        if o["remark"] is None:
            del o["remark"]
        out.append(o)
    return out


async def referencing(r: Redis) -> Counter[str]:
    """Order key -> entries referencing its copy (outboxes, deferred, dispatch dead letters)."""
    out: Counter[str] = Counter()
    for p in r.partitions:
        streams = [*(p.outbox(a) for a in keys.OUTBOX_ACTIONS), p.deferred, keys.dispatch_dead(p)]
        for stream in streams:
            for _id, f in await r.client.xrange(stream):
                assert b"d" not in f or b"o" not in f  # a payload or a reference, never both
                if b"o" in f:
                    out[f[b"k"].decode()] += 1
    return out


async def copies(r: Redis) -> dict[str, tuple[bytes, int]]:
    """Order key -> (its copy, its reference count)."""
    out: dict[str, tuple[bytes, int]] = {}
    for p in r.partitions:
        refs = await r.client.hgetall(p.copy_refs)
        for k, v in (await r.client.hgetall(p.order_copies)).items():
            out[k.decode()] = (v, int(refs.get(k, b"0")))
        assert set(refs) <= set(await r.client.hgetall(p.order_copies)), "a count without its copy"
    return out


async def memory(r: Redis) -> int:
    """Bytes of every outbox stream, order copy and count (MEMORY USAGE, every node counted)."""
    names = [n for p in r.partitions for n in (*(p.outbox(a) for a in keys.ACTIONS), p.order_copies, p.copy_refs)]
    sizes = await r.run(lambda pipe: [pipe.memory_usage(n, samples=0) for n in names])
    return sum(int(s or 0) for s in sizes)


async def test_without_a_dispatcher_each_order_is_stored_once(flushed: Any, settings_for: Callable[..., Any]) -> None:
    r = await client.connect(settings_for(ORDERQ_PARTITIONS=1))  # (one set of streams: little fixed overhead)
    try:
        await stored_once(r, 300)
    finally:
        await r.close()


async def stored_once(r: Redis, n: int) -> None:
    sent = orders(n)
    await push(r, sent)
    payloads = {f[b"k"].decode(): f[b"d"] for p in r.partitions for _id, f in await r.client.xrange(p.intake)}
    await drain(r)
    refs = await referencing(r)
    have = await copies(r)
    assert set(have) == set(payloads) and sum(refs.values()) >= 2 * n
    for key, (copy, count) in have.items():
        assert copy == payloads[key] and unpack_order(copy).key == key
        assert count == refs[key]  # one count per entry referencing it
    assert (await ordercopies.check(r))["keys"] == []
    # The order once, plus small entries, where each of its 2 to 5 entries carried it before
    avg_payload = sum(len(v) for v in payloads.values()) / n
    per_order = await memory(r) / n
    print(
        f"outbox + copies: {per_order:.0f} B/order, payload {avg_payload:.0f} B, {sum(refs.values()) / n:.1f} entries"
    )
    assert per_order < 1.3 * avg_payload + 100 * sum(refs.values()) / n


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = await Sink().start()
    yield s
    await s.stop()


async def dispatch_to(settings_for: Callable[..., Any], sink: Sink, consumer: str) -> None:
    """Deliver everything to ``sink``, every action's webhook pointing at it."""
    env = {VARIABLE[a]: sink.url + path for a, path in PATHS.items()}
    await dispatch_all(settings_for(**env, ORDERQ_DISPATCH_BACKOFF_S=0.02), consumer)


async def test_after_a_full_drain_with_a_dispatcher_every_copy_is_gone(
    r: Redis, sink: Sink, settings_for: Callable[..., Any]
) -> None:
    await push(r, orders(30))
    await drain(r)
    assert len(await copies(r)) == 30
    owed = sum((await referencing(r)).values())
    await dispatch_to(settings_for, sink, "c1")
    assert await copies(r) == {} and await referencing(r) == Counter()
    bodies = [q["body"] for q in sink.requests]
    assert len(bodies) == owed
    assert all(b["order"]["order_id"] == b["order_key"].split(":", 1)[1] for b in bodies)  # the whole order, as before
    assert (await ordercopies.check(r))["keys"] == []


async def test_dead_letters_keep_the_copy_until_resolved(
    r: Redis, sink: Sink, settings_for: Callable[..., Any]
) -> None:
    await push(r, orders(2, "DL"))
    await drain(r)
    ka, kb = "tmall:TDL0", "tmall:TDL1"
    sink.status_of[ka] = sink.status_of[kb] = 422  # refused for good: dead letters at once
    await dispatch_to(settings_for, sink, "c1")
    refs = await referencing(r)
    have = await copies(r)
    assert refs[ka] >= 2 and have[ka][1] == refs[ka] and have[kb][1] == refs[kb]
    letters, _ = await deadletters.list_dead(r, stage="dispatch")
    assert {d.order_key for d in letters} == {ka, kb}
    for d in letters:
        if d.order_key == kb:
            await deadletters.discard(r, d.id, "refused")
    assert kb not in await copies(r)  # its last dead letter discarded: the copy went with it
    del sink.status_of[ka]
    for d in letters:
        if d.order_key == ka:
            await deadletters.replay(r, d.id)
    assert (await copies(r))[ka][1] == refs[ka]  # handed on to the entries put back
    await dispatch_to(settings_for, sink, "c2")
    assert await copies(r) == {}
    assert all(q["body"]["order"]["order_id"] == "TDL0" for q in sink.requests if q["status"] == 200)
    assert (await ordercopies.check(r))["keys"] == []


async def test_deferred_syncs_hold_the_copy_until_replayed(r: Redis) -> None:
    from breaker.controller import Breaker

    await r.client.hset(keys.BREAKER_KEY, "stage", "degraded")  # non-core syncs are deferred
    await push(r, orders(6, "DF"))
    await drain(r)
    deferred = sum([await r.client.xlen(p.deferred) for p in r.partitions])
    assert deferred > 0
    assert {k: c for k, (_v, c) in (await copies(r)).items()} == dict(await referencing(r))
    await r.client.hset(keys.BREAKER_KEY, "stage", "normal")
    control = await Control(r).start()
    try:
        assert await Breaker(r, control).replay_deferred() == deferred
        assert await Breaker(r, control).replay_deferred() == 0  # once in effect
    finally:
        await control.stop()
    assert {k: c for k, (_v, c) in (await copies(r)).items()} == dict(await referencing(r))
    assert (await ordercopies.check(r))["keys"] == []


async def test_a_trimmed_outbox_counts_down_the_copies_it_drops(
    flushed: Any, settings_for: Callable[..., Any], make_env: Callable[..., dict[str, str]]
) -> None:
    r = await client.connect(settings_for(ORDERQ_PARTITIONS=1, ORDERQ_OUTBOX_MAXLEN=1000))
    try:
        await push(r, [make_order(f"TR{i}") for i in range(1300)])
        await drain(r)
        (p,) = r.partitions
        assert await r.client.xlen(p.outbox("wms.pick")) <= 1000 + 100
        refs = await referencing(r)
        have = await copies(r)
        assert len(have) < 1300 and {k: c for k, (_v, c) in have.items()} == dict(refs)
        assert (await ordercopies.check(r))["keys"] == []
    finally:
        await r.close()


async def test_the_audit_fails_on_a_copy_leaked_lost_or_miscounted(r: Redis) -> None:
    await push(r, orders(3, "AU"))
    await drain(r)
    assert (await audit.run(r))["failed"] == []
    p = r.partition_of("tmall:TAU0")
    await r.client.hdel(p.order_copies, "tmall:TAU0")  # entries reference a copy that is gone
    q = r.partition_of("tmall:TAU1")
    await r.client.hincrby(q.copy_refs, "tmall:TAU1", 1)  # counted once too often
    s = r.partition_of("tmall:XX")
    await r.client.hset(s.order_copies, "tmall:XX", b"\x80")  # a copy nothing references
    rep = await audit.run(r)
    assert rep["failed"] == ["copy_mismatch"]
    assert rep["copy_mismatch_by"] == {"copy_missing": 1, "copy_count": 1, "copy_unreferenced": 1}
    assert "copy_missing" in audit.render(rep)
