"""The ingress HTTP API (contract §4) against a real ingress process and a real Valkey.

Every refused request is checked twice: the answer (status and error body) and the
keyspace (no intake entry, no status record, no ``accepted`` count) — a refusal that
still wrote something would be a silent duplicate or a lost order later.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from orderq import keys, stats
from orderq.client import Redis
from orderq.schema import unpack_order
from tests.conftest import ADMIN, CHANNEL_TOKENS, auth, drain, make_order

UTC_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SMALL_BODY = 2048  # ORDERQ_MAX_BODY_BYTES for the 413 tests (batch limit: x100)


async def keyspace(r: Redis) -> dict[str, Any]:
    """What an accepted order writes: intake entries, status records, the accepted total."""
    intake = sum([await r.client.xlen(p.intake) for p in r.partitions])
    status = sorted([k async for k in r.client.scan_iter(match=f"{keys.PREFIX}:*:o:*", count=1000)])
    t = await stats.totals(r)
    return {"intake": intake, "status": status, "accepted": t["accepted"]}


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The contract's error body: {"error": {"code", "message", "details": [{"path", "message"}]}}."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"code", "message", "details"}
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], list)
    for d in err["details"]:
        assert set(d) == {"path", "message"}
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture
async def api(ingress: Any, r: Redis) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a fresh ingress (no default auth header)."""
    base = await ingress(ORDERQ_MAX_BODY_BYTES=SMALL_BODY)
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        yield c


# --- refusals write nothing -------------------------------------------------------------


async def test_bad_requests_are_refused_and_write_nothing(api: httpx.AsyncClient, r: Redis) -> None:
    good = make_order(1)
    raw = msgspec.json.encode(good)
    json_ct = {"Content-Type": "application/json"}
    before = await keyspace(r)

    # 400: not JSON, truncated JSON, empty body
    for body in (b"not json", raw[:-5], b""):
        resp = await api.post("/v1/orders", content=body, headers={**auth(), **json_ct})
        assert_error(resp, 400)
    # 401: no token, wrong token, a non-bearer scheme
    assert_error(await api.post("/v1/orders", json=good), 401)
    assert_error(await api.post("/v1/orders", json=good, headers={"Authorization": "Bearer nope"}), 401)
    basic = {"Authorization": "Basic " + CHANNEL_TOKENS["tmall"]}
    assert_error(await api.post("/v1/orders", json=good, headers=basic), 401)
    # 403: a token of another channel; the admin token does not write orders
    assert_error(await api.post("/v1/orders", json=good, headers=auth("jd")), 403)
    assert_error(await api.post("/v1/orders", json=good, headers=ADMIN), 403)
    # 415: not a JSON content type
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        resp = await api.post("/v1/orders", content=raw, headers={**auth(), "Content-Type": ctype})
        assert_error(resp, 415)
    resp = await api.post("/v1/orders/batch", content=raw, headers={**auth(), "Content-Type": "text/plain"})
    assert_error(resp, 415)
    # the batch endpoint: same auth rules, 400 for garbage, 422 for a wrong shape
    assert_error(await api.post("/v1/orders/batch", json={"orders": [good]}), 401)
    assert_error(await api.post("/v1/orders/batch", json={"orders": [good]}, headers=ADMIN), 403)
    resp = await api.post("/v1/orders/batch", content=b"{", headers={**auth(), **json_ct})
    assert_error(resp, 400)
    assert_error(await api.post("/v1/orders/batch", json={"orders": []}, headers=auth()), 422)
    assert_error(await api.post("/v1/orders/batch", json=[good], headers=auth()), 422)

    assert await keyspace(r) == before


async def test_too_large_by_content_length_and_by_chunks(api: httpx.AsyncClient, r: Redis) -> None:
    before = await keyspace(r)
    big = make_order(1, remark="x" * (SMALL_BODY + 100))
    resp = await api.post("/v1/orders", json=big, headers=auth())
    assert_error(resp, 413)

    async def chunks(total: int) -> AsyncIterator[bytes]:
        # no Content-Length: the server must count while reading and stop at the cap
        yield b'{"channel": "tmall", "order_id": "T1", "remark": "'
        sent = 0
        while sent < total:
            yield b"x" * 512
            sent += 512
        yield b'"}'

    resp = await api.post(
        "/v1/orders", content=chunks(SMALL_BODY * 4), headers={**auth(), "Content-Type": "application/json"}
    )
    assert "content-length" not in resp.request.headers
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert_error(resp, 413)

    # the batch cap is 100x the single cap, also without a Content-Length
    resp = await api.post(
        "/v1/orders/batch", content=chunks(SMALL_BODY * 101), headers={**auth(), "Content-Type": "application/json"}
    )
    assert_error(resp, 413)
    # a batch body under its own cap but over the single cap is fine
    orders = [make_order(i) for i in range(10)]
    resp = await api.post("/v1/orders/batch", json={"orders": orders}, headers=auth())
    assert len(resp.request.content) > SMALL_BODY
    assert resp.status_code == 202, resp.text
    after = await keyspace(r)
    assert after["intake"] == before["intake"] + 10
    assert after["accepted"] == before["accepted"] + 10


async def test_schema_failure_lists_every_failing_path(api: httpx.AsyncClient, r: Redis) -> None:
    before = await keyspace(r)
    bad = make_order(
        1,
        paid_amount=2899.0,
        lines=[
            {"sku": "SOFA-OAK-3", "qty": 0, "unit_price": "2999.00"},
            {"sku": "LAMP", "qty": 1, "unit_price": "1.999"},
        ],
        customer={"tier": "gold"},
    )
    del bad["ship_to"]["province"]
    err = assert_error(await api.post("/v1/orders", json=bad, headers=auth()), 422)
    paths = {d["path"] for d in err["details"]}
    assert {
        "paid_amount",
        "lines[0].qty",
        "lines[1].unit_price",
        "customer.id",
        "customer.tier",
        "ship_to.province",
    } <= paths, err["details"]
    by_path = {d["path"]: d["message"] for d in err["details"]}
    assert "float" in by_path["paid_amount"]

    # created_at without an offset is refused; money as a number is refused
    for field, value in (("created_at", "2026-11-11T00:00:01"), ("paid_amount", 100)):
        err = assert_error(await api.post("/v1/orders", json=make_order(2, **{field: value}), headers=auth()), 422)
        assert [d["path"] for d in err["details"]] == [field]
    # an unknown channel is a schema failure too (with a token of it, there is none)
    err = assert_error(await api.post("/v1/orders", json=make_order(3, channel="ebay"), headers=auth()), 422)
    assert err["details"][0]["path"] == "channel"
    after = await keyspace(r)
    assert after == before
    assert (await stats.totals(r))["invalid"] >= 3


# --- replays --------------------------------------------------------------------------


async def test_replay_of_a_known_key_is_a_duplicate(api: httpx.AsyncClient, r: Redis) -> None:
    order = make_order(7)
    first = await api.post("/v1/orders", json=order, headers=auth())
    assert first.status_code == 202, first.text
    assert first.json() == {"order_key": "tmall:T7", "status": "accepted", "duplicate": False, "stage": "normal"}
    before = await keyspace(r)
    # same key, even with a different body, is a replay
    again = await api.post("/v1/orders", json=make_order(7, paid_amount="1.00"), headers=auth())
    assert again.status_code == 200, again.text
    assert again.json() == {"order_key": "tmall:T7", "status": "accepted", "duplicate": True, "stage": "normal"}
    after = await keyspace(r)
    assert after == before
    assert (await stats.totals(r))["duplicates"] == 1
    # a replay after the order has moved on is still a replay, not a second order
    await drain(r)
    again = await api.post("/v1/orders", json=order, headers=auth())
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert sum([await r.client.xlen(p.intake) for p in r.partitions]) == 0
    assert sum([await r.client.xlen(p.outbox("wms.pick")) for p in r.partitions]) == 1


async def test_concurrent_replays_of_one_key_queue_it_once(api: httpx.AsyncClient, r: Redis) -> None:
    order = make_order(42)
    singles = [api.post("/v1/orders", json=order, headers=auth()) for _ in range(30)]
    batches = [
        api.post("/v1/orders/batch", json={"orders": [order, make_order(f"B{i}")]}, headers=auth()) for i in range(20)
    ]
    answers = await asyncio.gather(*singles, *batches)
    statuses = []
    for resp in answers[:30]:
        assert resp.status_code in (200, 202), resp.text
        statuses.append("accepted" if resp.status_code == 202 else "duplicate")
        assert resp.json()["duplicate"] is (resp.status_code == 200)
    for resp in answers[30:]:
        assert resp.status_code == 202, resp.text
        body = resp.json()
        statuses.append(body["results"][0]["status"])
        assert body["results"][1]["status"] == "accepted"
    assert statuses.count("accepted") == 1, statuses
    assert statuses.count("duplicate") == 49
    entries = [e for p in r.partitions for e in await r.client.xrange(p.intake)]
    keys_in = [e[1][b"k"] for e in entries]
    assert keys_in.count(b"tmall:T42") == 1
    assert len(keys_in) == 21
    t = await stats.totals(r)
    assert t["accepted"] == 21 and t["duplicates"] == 49


async def test_batch_with_bad_orders_inside(api: httpx.AsyncClient, r: Redis) -> None:
    known = make_order("K")
    assert (await api.post("/v1/orders", json=known, headers=auth())).status_code == 202
    before = await keyspace(r)
    orders: list[Any] = [
        make_order("A"),  # accepted
        make_order("B", lines=[{"sku": "X", "qty": 10000}]),  # invalid: qty
        make_order("A"),  # duplicate of the first occurrence in this batch
        known,  # duplicate of an order queued before
        make_order("C", channel="jd"),  # invalid: not this token's channel
        "not an order",  # invalid: not an object
        make_order("D", paid_amount=5.5),  # invalid: float money
        make_order("E", customer={"id": "u-e", "tier": "vip"}),  # accepted
    ]
    resp = await api.post("/v1/orders/batch", json={"orders": orders}, headers=auth())
    assert resp.status_code == 202, resp.text
    body = resp.json()
    got = [(x["order_key"], x["status"]) for x in body["results"]]
    assert got == [
        ("tmall:TA", "accepted"),
        ("tmall:TB", "invalid"),
        ("tmall:TA", "duplicate"),
        ("tmall:TK", "duplicate"),
        ("jd:TC", "invalid"),
        (None, "invalid"),
        ("tmall:TD", "invalid"),
        ("tmall:TE", "accepted"),
    ]
    assert (body["accepted"], body["duplicates"], body["invalid"], body["shed"]) == (2, 2, 4, 0)
    assert body["results"][1]["error"]["details"][0]["path"] == "lines[0].qty"
    assert body["results"][6]["error"]["details"][0]["path"] == "paid_amount"
    assert body["results"][0]["error"] is None
    after = await keyspace(r)
    assert after["intake"] == before["intake"] + 2
    assert after["accepted"] == before["accepted"] + 2
    queued = {e[1][b"k"] for p in r.partitions for e in await r.client.xrange(p.intake)}
    assert queued == {b"tmall:TK", b"tmall:TA", b"tmall:TE"}
    t = await stats.totals(r)
    assert (t["duplicates"], t["invalid"]) == (2, 4)


# --- the status record ----------------------------------------------------------------


async def test_status_record_access_and_times(api: httpx.AsyncClient, r: Redis) -> None:
    assert_error(await api.get("/v1/orders/tmall/NOPE", headers=auth()), 404)
    assert_error(await api.get("/v1/orders/tmall/NOPE", headers=ADMIN), 404)
    resp = await api.post("/v1/orders", json=make_order(5, customer={"id": "u-5", "tier": "vip"}), headers=auth())
    assert resp.status_code == 202
    rec = (await api.get("/v1/orders/tmall/T5", headers=auth())).json()
    assert rec["order_key"] == "tmall:T5" and rec["status"] == "accepted"
    assert UTC_MICROS.match(rec["times"]["accepted"]), rec
    assert_error(await api.get("/v1/orders/tmall/T5", headers=auth("jd")), 403)
    assert_error(await api.get("/v1/orders/tmall/T5"), 401)
    assert_error(await api.get("/v1/orders/tmall/T5", headers={"Authorization": "Bearer nope"}), 401)
    await drain(r)
    for headers in (auth(), ADMIN):
        resp = await api.get("/v1/orders/tmall/T5", headers=headers)
        assert resp.status_code == 200
        rec = resp.json()
        assert rec["status"] == "executed" and rec["priority"] == "vip"
        assert set(rec["times"]) == {"accepted", "validated", "executed"}
        assert all(UTC_MICROS.match(t) for t in rec["times"].values()), rec["times"]
        assert rec["times"]["accepted"] <= rec["times"]["validated"] <= rec["times"]["executed"]


async def test_unknown_fields_are_kept_in_extra(api: httpx.AsyncClient, r: Redis) -> None:
    order = make_order(9, buyer_message="请尽快", platform_flags={"presale": True}, extra={"source": "live"})
    resp = await api.post("/v1/orders", json=order, headers=auth())
    assert resp.status_code == 202, resp.text
    entries = [e for p in r.partitions for e in await r.client.xrange(p.intake)]
    assert len(entries) == 1
    stored = unpack_order(entries[0][1][b"d"])
    assert stored.extra == {"source": "live", "buyer_message": "请尽快", "platform_flags": {"presale": True}}
    # created_at is kept in UTC between stages
    assert stored.created_at.isoformat() == "2026-11-10T16:00:01+00:00"


# --- operators ------------------------------------------------------------------------


async def test_stats_needs_admin_and_has_the_contract_fields(api: httpx.AsyncClient, r: Redis) -> None:
    assert_error(await api.get("/v1/stats"), 401)
    assert_error(await api.get("/v1/stats", headers={"Authorization": "Bearer nope"}), 401)
    assert_error(await api.get("/v1/stats", headers=auth()), 403)
    await api.post("/v1/orders/batch", json={"orders": [make_order(i) for i in range(3)]}, headers=auth())
    resp = await api.get("/v1/stats", headers=ADMIN)
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["stage"] in ("normal", "degraded", "shedding")
    assert doc["backlog"] == 3
    assert set(doc["depth"]) >= {"intake", "ready", "review", "deferred"}
    assert doc["depth"]["intake"] == 3
    assert set(doc["depth"]["ready"]) == {"vip", "new", "regular"}
    assert set(doc["rates"]) == {"accepted_per_s", "validated_per_s", "executed_per_s"}
    assert set(doc["totals"]) >= {
        "accepted",
        "duplicates",
        "invalid",
        "shed",
        "validated",
        "rejected",
        "review",
        "held",
        "executed",
        "dead_letters",
    }
    assert doc["totals"]["accepted"] == 3
    assert isinstance(doc["workers"], list) and isinstance(doc["paused"], list)
    assert all(set(w) >= {"stage", "pid", "host"} for w in doc["workers"])
    assert any(w["stage"] == "ingress" for w in doc["workers"])


async def test_probes_are_open(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).status_code == 200
    resp = await api.get("/readyz")
    assert resp.status_code == 200 and resp.json()["stage"] == "normal"


async def test_pause_and_resume_execute(api: httpx.AsyncClient, r: Redis, stages: Any) -> None:
    from validate.worker import ValidateWorker

    worker = stages("execute")

    async def execute_workers() -> list[dict[str, Any]]:
        doc = (await api.get("/v1/stats", headers=ADMIN)).json()
        return [w for w in doc["workers"] if w["stage"] == "execute"]

    for _ in range(200):
        if await execute_workers():
            break
        await asyncio.sleep(0.05)
    assert [w["pid"] for w in await execute_workers()] == [worker.proc.pid]

    for body in ({"stage": "ingress"}, {"stage": "nope"}, {}):
        assert_error(await api.post("/v1/admin/pause", json=body, headers=ADMIN), 422)
    assert_error(await api.post("/v1/admin/pause", json={"stage": "execute"}, headers=auth()), 403)
    assert_error(await api.post("/v1/admin/pause", json={"stage": "execute"}), 401)

    resp = await api.post("/v1/admin/pause", json={"stage": "execute"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert (await api.get("/v1/stats", headers=ADMIN)).json()["paused"] == ["execute"]
    await asyncio.sleep(1.2)  # past the control refresh period, even if pub/sub were missed

    orders = [make_order(i) for i in range(20)]
    assert (await api.post("/v1/orders/batch", json={"orders": orders}, headers=auth())).status_code == 202
    await ValidateWorker(r, None, consumer="test-v").run(drain=True)
    await asyncio.sleep(1.5)  # a worker that ignored the pause would have executed them by now
    doc = (await api.get("/v1/stats", headers=ADMIN)).json()
    assert sum(doc["depth"]["ready"].values()) == 20
    assert doc["totals"]["executed"] == 0
    assert (await api.get("/v1/orders/tmall/T0", headers=auth())).json()["status"] == "validated"

    resp = await api.post("/v1/admin/resume", json={"stage": "execute"}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    for _ in range(300):
        doc = (await api.get("/v1/stats", headers=ADMIN)).json()
        if doc["totals"]["executed"] == 20:
            break
        await asyncio.sleep(0.05)
    assert doc["totals"]["executed"] == 20, worker.log()
    assert doc["paused"] == [] and doc["backlog"] == 0


async def test_stalled_redis_gets_503_not_a_hang(ingress: Any, r: Redis, valkey: Any) -> None:
    """Redis stops answering (SIGSTOP): order writes and readiness answer 503 with
    Retry-After instead of hanging; once it is back, a retry is a replay or a new order."""
    base = await ingress(ORDERQ_ACK_DEADLINE_MS=500)
    async with httpx.AsyncClient(base_url=base, timeout=15) as c:
        valkey.pause()
        try:
            resp = await c.post("/v1/orders", json=make_order(1), headers=auth())
            assert_error(resp, 503)
            assert int(resp.headers["retry-after"]) >= 1
            resp = await c.get("/readyz")
            assert_error(resp, 503)
            assert (await c.get("/healthz")).status_code == 200  # alive, just not ready
        finally:
            valkey.resume()
        # the first write may have landed once Redis woke up: a retry is then a replay
        resp = await c.post("/v1/orders", json=make_order(1), headers=auth())
        assert resp.status_code in (200, 202), resp.text
        for _ in range(100):
            if (await c.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert (await c.get("/readyz")).status_code == 200
    entries = [e for p in r.partitions for e in await r.client.xrange(p.intake)]
    assert [e[1][b"k"] for e in entries] == [b"tmall:T1"]
