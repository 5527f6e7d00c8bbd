"""``orderq audit`` can fail (contract §1): each test breaks the state on purpose, the way a
bug or an operator's slip would, and watches the command exit 1 with the right category;
the clean run beside them exits 0. The audit is run as a user runs it: the CLI, ``--json``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from orderq import keys
from orderq.client import Redis
from orderq.control import Control
from orderq.keys import HOLDS_KEY
from tests.conftest import ROOT, drain, make_order
from tests.test_recovery import push


def audit(make_env: Callable[..., dict[str, str]], **over: Any) -> tuple[int, dict[str, Any], str]:
    """``orderq audit --json`` against the test server: (exit code, report, stderr)."""
    env = {**make_env(**over), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "orderq", "audit", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def approval_line(price: str) -> dict[str, Any]:
    """One line paying at least ORDERQ_APPROVAL_AMOUNT (5000): the order waits for approval."""
    return {"sku": "SOFA", "qty": 1, "unit_price": price, "paid_price": price}


def status(r: Redis, key: str) -> str:
    return r.partition_of(key).status(key)


async def validate_only(r: Redis) -> None:
    """Validate what is queued, execute nothing: the orders wait in their ready lanes."""
    from validate.worker import ValidateWorker

    control = await Control(r).start()
    try:
        await ValidateWorker(r, control, consumer="audit-v").run(drain=True)
    finally:
        await control.stop()


async def dead_letter(r: Redis, p: keys.Partition, stream: str, group: str, dead: str) -> str:
    """Deliver the oldest entry of ``stream``, record an error for it, and let the recovery
    script (reclaim.lua, as every worker runs it) move it to ``dead``; its order key."""
    if group == keys.GROUP_DISPATCH:  # the dispatcher's group on an outbox (created when it first runs)
        await r.client.xgroup_create(stream, group, id="0", mkstream=True)
    (_, entries), *_ = await r.client.xreadgroup(group, "audit-t", {stream: ">"}, count=1)
    entry_id, fields = entries[0]
    await r.client.hset(p.errors, f"{stream}|{entry_id.decode()}", "boom")
    res = await r.run(
        lambda pipe: r.script(pipe, "reclaim", [stream, dead, p.counters, p.errors], [group, "audit-t", 0, 0, 10, 10])
    )
    assert res[0][1] == 1, res
    return fields[b"k"].decode()


def category(report: dict[str, Any], group: str) -> dict[str, int]:
    return report[f"{group}_by"]


# --- the clean run -----------------------------------------------------------------------


async def test_clean_state_in_every_place_exits_0(r: Redis, make_env: Any) -> None:
    """Orders in every place an order can be (executed, queued for validation, in a ready lane,
    in review for approval, held by a region hold, one fresh dead letter): nothing is wrong."""
    await push(r, [make_order(f"X{i}") for i in range(20)])
    await drain(r)  # 20 executed
    await push(r, [make_order("REVIEW", lines=[approval_line("6000.00")], paid_amount="6000.00")])
    await drain(r)  # waits for approval (ORDERQ_APPROVAL_AMOUNT 5000)
    await r.client.hset(HOLDS_KEY, "江苏省", json.dumps({"reason": "typhoon", "since": "2026-11-11T00:00:00Z"}))
    await push(r, [make_order("HELD")])
    await drain(r)  # held while the hold lasts
    await push(r, [make_order(f"V{i}") for i in range(3)])
    await validate_only(r)  # 3 validated, in their lanes
    await push(r, [make_order(f"Q{i}") for i in range(4)])  # 4 accepted, queued
    p = r.partition_of("tmall:TQ0")
    await dead_letter(r, p, p.intake, keys.GROUP_VALIDATE, p.dead)

    code, rep, err = audit(make_env)
    assert code == 0, (rep, err)
    assert rep["failed"] == []
    assert rep["accepted"] == rep["records"] == 29
    assert (rep["executed"], rep["review"], rep["held"], rep["in_flight"], rep["dead_letters"]) == (20, 1, 1, 6, 1)
    assert rep["dead_letters_unresolved"] == 1 and rep["stale_dead_letters"] == 0
    assert rep["lost"] == rep["duplicate_effects"] == rep["counter_mismatch"] == rep["expired"] == 0


# --- where each order must be ------------------------------------------------------------


async def test_queued_order_whose_stream_entry_vanished_is_lost(r: Redis, make_env: Any) -> None:
    await push(r, [make_order(f"A{i}") for i in range(5)])
    key = "tmall:TA3"
    p = r.partition_of(key)
    await r.client.xdel(p.intake, *[i for i, f in await r.client.xrange(p.intake) if f[b"k"] == key.encode()])
    code, rep, _ = audit(make_env)
    assert code == 1 and "lost" in rep["failed"]
    assert category(rep, "lost") == {"accepted_not_queued": 1} and rep["lost_keys"] == [key]

    await validate_only(r)  # the other four move on to their lanes; one loses its lane entry
    key = "tmall:TA1"
    p = r.partition_of(key)
    for lane in p.lanes:
        await r.client.xdel(lane, *[i for i, f in await r.client.xrange(lane) if f[b"k"] == key.encode()] or ["0-1"])
    code, rep, _ = audit(make_env)
    assert code == 1
    assert category(rep, "lost") == {"accepted_not_queued": 1, "validated_not_queued": 1}
    assert sorted(rep["lost_keys"]) == ["tmall:TA1", "tmall:TA3"]


async def test_deleted_status_record_is_lost(r: Redis, make_env: Any) -> None:
    """A waiting order's record gone: the counters still say it was accepted and is not final."""
    await push(r, [make_order(f"D{i}") for i in range(6)])
    await drain(r)
    await push(r, [make_order(f"W{i}") for i in range(3)])  # queued
    await r.client.delete(status(r, "tmall:TW1"))
    code, rep, _ = audit(make_env)
    assert code == 1 and rep["failed"] == ["lost"]
    assert category(rep, "lost") == {"record_missing": 1}
    assert rep["accepted"] == 9 and rep["records"] == 8
    # The check's limit: a final record deleted by hand looks like one its TTL expired.
    await r.client.delete(status(r, "tmall:TD2"))
    code, rep, _ = audit(make_env)
    assert category(rep, "lost") == {"record_missing": 1} and rep["expired"] == 1


async def test_held_or_review_order_without_its_place_is_lost(r: Redis, make_env: Any) -> None:
    await r.client.hset(HOLDS_KEY, "江苏省", json.dumps({"reason": "typhoon", "since": "2026-11-11T00:00:00Z"}))
    await push(r, [make_order(f"H{i}") for i in range(3)])
    await push(r, [make_order(f"R{i}", lines=[approval_line("9000.00")], paid_amount="9000.00") for i in range(2)])
    await drain(r)
    assert audit(make_env)[0] == 0
    held, review = "tmall:TH1", "tmall:TR0"
    p = r.partition_of(held)
    await r.client.hdel(p.parked, held)  # the payload an unhold would put back in its lane
    q = r.partition_of(review)
    await r.client.zrem(q.review, review)  # no reviewer will ever see it
    code, rep, _ = audit(make_env)
    assert code == 1 and rep["failed"] == ["lost"]
    assert category(rep, "lost") == {"held_payload_missing": 1, "review_not_listed": 1}
    assert sorted(rep["lost_keys"]) == sorted([held, review])


# --- dead letters ------------------------------------------------------------------------


async def test_dead_letter_older_than_the_grace_fails_and_one_gone_unresolved_is_lost(r: Redis, make_env: Any) -> None:
    await push(r, [make_order(f"P{i}") for i in range(4)])
    p = r.partition_of("tmall:TP0")
    await dead_letter(r, p, p.intake, keys.GROUP_VALIDATE, p.dead)  # an order no validator could take
    await drain(r)
    q = r.partitions[[await r.client.xlen(x.outbox("wms.pick")) > 0 for x in r.partitions].index(True)]
    await dead_letter(r, q, q.outbox("wms.pick"), keys.GROUP_DISPATCH, keys.dispatch_dead(q))  # a refused pick
    code, rep, _ = audit(make_env)
    assert code == 0, rep
    assert rep["dead_letters_unresolved"] == 2 and rep["dead_letters"] == 1 and rep["stale_dead_letters"] == 0

    time.sleep(1.1)
    code, rep, _ = audit(make_env, ORDERQ_DEAD_LETTER_GRACE_S=1)
    assert code == 1 and rep["failed"] == ["stale_dead_letters"]
    assert rep["stale_dead_letters"] == 2 and rep["dead_letter_grace_s"] == 1
    assert any(" wms.pick" in k for k in rep["stale_dead_letter_keys"])

    # the refused pick's dead letter deleted without replay or discard (which count it
    # resolved): that pick will never happen, and nothing else says so
    (entry_id, _), *_ = await r.client.xrange(keys.dispatch_dead(q))
    await r.client.xdel(keys.dispatch_dead(q), entry_id)
    code, rep, _ = audit(make_env)
    # (and the order copy that dead letter referenced is now counted once too often)
    assert code == 1 and rep["failed"] == ["lost", "copy_mismatch"]
    assert category(rep, "lost") == {"dead_letter_missing": 1}
    assert rep["copy_mismatch_by"] == {"copy_count": 1}


# --- effects applied twice ---------------------------------------------------------------


async def test_an_effect_appended_again_is_counted_by_the_execute_script(r: Redis, make_env: Any) -> None:
    """The apply count is kept by execute.lua itself, beside each outbox append: an effect whose
    ledger guard was lost and that is appended a second time fails the audit."""
    key = "tmall:TEA0"
    await push(r, [make_order("EA0")])
    await drain(r)
    st = status(r, key)
    h = await r.client.hgetall(st)
    assert h[b"xn:notify.sms"] == b"1" and h[b"xn:wms.pick"] == b"1"
    assert audit(make_env)[0] == 0
    p = r.partition_of(key)
    payload = await r.client.hget(p.order_copies, key)  # the order its outbox entries reference
    await r.client.hdel(st, "x:notify.sms")  # the guard lost, the order delivered once more
    await r.client.hset(st, "s", "validated")
    await r.client.xadd(p.lanes[2], {"k": key, "d": payload, "ta": h[b"ta"]})
    await drain(r)
    assert await r.client.hget(st, "xn:notify.sms") == b"2"
    code, rep, _ = audit(make_env)
    assert code == 1 and category(rep, "duplicate_effects") == {"applied_twice": 1}


async def test_effect_applied_twice_in_the_ledger_fails(r: Redis, make_env: Any) -> None:
    """The effect ledger in the status record survives delivery and outbox trimming; outbox
    entries do not (the dispatcher deletes them), so the audit reads the ledger."""
    await push(r, [make_order(f"E{i}") for i in range(5)])
    await drain(r)
    for p in r.partitions:  # every outbox delivered and gone, as the dispatcher leaves them
        for action in keys.ACTIONS:
            await r.client.delete(p.outbox(action))
        await r.client.delete(p.order_copies, p.copy_refs)  # (the last delivery of an order takes its copy)
    assert audit(make_env)[0] == 0
    # an apply count of 2 (xn:<action>: what the scripts that append an outbox entry count)
    await r.client.hincrby(status(r, "tmall:TE0"), "xn:notify.sms", 1)
    # picked unrouted and routed: two parcels of the same goods
    await r.client.hset(status(r, "tmall:TE1"), "x:wms.pick@SH", "done")
    # routed to SH, also picked in GZ
    routed = status(r, "tmall:TE2")
    await r.client.hdel(routed, "x:wms.pick")
    await r.client.hset(
        routed,
        mapping={"rt": "SH|sf|nearest|own|25.0|1200|SOFA-OAK-3:1|", "x:wms.pick@SH": "done", "x:wms.pick@GZ": "done"},
    )
    code, rep, _ = audit(make_env)
    assert code == 1 and rep["failed"] == ["duplicate_effects"]
    assert category(rep, "duplicate_effects") == {"applied_twice": 1, "pick_twice": 1, "pick_off_route": 1}
    assert sorted(rep["duplicate_effect_keys"]) == [
        "tmall:TE0:notify.sms",
        "tmall:TE1:wms.pick",
        "tmall:TE2:wms.pick@GZ",
    ]


# --- the counters ------------------------------------------------------------------------


async def test_counters_that_disagree_with_the_records_fail(r: Redis, make_env: Any) -> None:
    await push(r, [make_order(f"C{i}") for i in range(8)])
    await drain(r)
    await push(r, [make_order(f"N{i}") for i in range(4)])
    assert audit(make_env)[0] == 0
    p = r.partition_of("tmall:TN0")
    # a record nobody counted as accepted (written outside the intake script)
    await r.client.hincrby(p.counters, "accepted", -1)
    code, rep, _ = audit(make_env)
    assert code == 1 and rep["failed"] == ["counter_mismatch"]
    assert category(rep, "counter_mismatch") == {"records_uncounted": 1}
    await r.client.hincrby(p.counters, "accepted", 1)
    # more orders counted final than were ever accepted
    await r.client.hincrby(p.counters, "executed", 20)
    code, rep, _ = audit(make_env)
    assert code == 1 and "counter_mismatch" in rep["failed"]
    assert category(rep, "counter_mismatch")["finals_over_accepted"] > 0


async def test_audit_reads_records_a_thousand_at_a_time(r: Redis) -> None:
    """Cheap enough for hundreds of thousands of orders: one SCAN step and one read-only script
    call per thousand records, never a command per order from the client."""
    from orderq import audit as audit_mod

    await push(r, [make_order(f"S{i}") for i in range(3000)])
    await drain(r)

    async def calls() -> dict[str, int]:
        stats = await r.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    before = await calls()
    rep = await audit_mod.run(r)
    after = await calls()
    used = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert rep["executed"] == 3000 and rep["failed"] == []
    steps = used["scan"]  # SCAN walks the whole keyspace (status records are half of it here)
    assert steps <= await r.client.dbsize() // audit_mod.SCAN_COUNT + 3, used
    assert used["evalsha"] <= steps * len(r.partitions), used  # one call per partition per step, at most
    assert used.get("hgetall", 0) <= 3000 + 2 * len(r.partitions), used  # in the script; the counters twice
