"""Hostile input against a real ingress process: malformed JSON (the JSONTestSuite ``n_*``
categories), pathological documents (100,000-deep nesting, invalid UTF-8, NaN/Infinity,
huge numbers), wrong content types, empty bodies, slow bodies and generated orders
around every schema constraint.

What must hold for all of it: a 4xx with the contract's error body, never a 500; nothing
written to any stream (intake lengths, status records and the accepted total unchanged);
the ingress process's memory stays bounded; and every answer carries an ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderq.client import Redis
from orderq.errors import ConfigError
from orderq.server import free_port
from orderq.settings import Settings
from tests.conftest import ADMIN, StageProcess, auth, make_order
from tests.data.malformed_json import MALFORMED
from tests.test_faults import record
from tests.test_ingress_api import assert_error, keyspace

LONG = os.environ.get("ORDERQ_RELIABILITY_LONG") == "1"
JSON = {"Content-Type": "application/json"}
BODY_CAP = 1 << 20  # 1 MiB single-order cap: the parser, not the 413, meets the big documents
READ_DEADLINE_S = 1.0
WRITE_PATHS = ("/v1/orders", "/v1/orders/batch", "/v1/channels/tmall/orders")


class Ingress:
    def __init__(self, base: str, proc: StageProcess, client: httpx.AsyncClient) -> None:
        self.base, self.proc, self.c = base, proc, client

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def rss_kb(self) -> int:
        assert self.proc.proc is not None
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


@pytest.fixture
async def api(stages: Any, r: Redis) -> AsyncIterator[Ingress]:
    port = free_port()
    proc = stages(
        "ingress", ORDERQ_HTTP_PORT=port, ORDERQ_MAX_BODY_BYTES=BODY_CAP, ORDERQ_READ_DEADLINE_S=READ_DEADLINE_S
    )
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        deadline = time.monotonic() + 20
        while True:
            assert proc.proc is not None and proc.proc.poll() is None, proc.log()
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get("/healthz")).status_code == 200:
                    break
            assert time.monotonic() < deadline, proc.log()
            await asyncio.sleep(0.05)
        yield Ingress(base, proc, c)
    assert "Traceback" not in proc.log(), proc.log()[-3000:]


def refused(resp: httpx.Response) -> dict[str, Any]:
    """A 4xx with the contract's error body and a request id."""
    assert 400 <= resp.status_code < 500, f"{resp.status_code}: {resp.text[:300]}"
    assert resp.headers.get("x-request-id"), resp.headers
    return assert_error(resp, resp.status_code)


async def batch_of_one(api: Ingress, name: str, doc: bytes) -> None:
    """``doc`` as the one order of a batch: the whole body refused (it does not parse), or,
    when the batch parses, its one order reported invalid and nothing accepted."""
    resp = await api.c.post("/v1/orders/batch", content=b'{"orders": [' + doc + b"]}", headers={**auth(), **JSON})
    if resp.status_code == 202:
        body = resp.json()
        assert body["accepted"] == 0 and body["invalid"] == 1, (name, body)
        assert resp.headers.get("x-request-id")
    else:
        refused(resp)


# --- malformed JSON -------------------------------------------------------------------


async def test_malformed_json_corpus_is_refused_on_every_write_path(api: Ingress, r: Redis) -> None:
    assert len(MALFORMED) >= 60
    before = await keyspace(r)
    rss0 = api.rss_kb()
    for name, doc in MALFORMED.items():
        for path in WRITE_PATHS:
            resp = await api.c.post(path, content=doc, headers={**auth(), **JSON})
            err = refused(resp)
            assert resp.status_code in (400, 422), (name, path, resp.status_code, err)
        # the same document as one order inside a batch
        await batch_of_one(api, name, doc)
    assert await keyspace(r) == before
    assert api.rss_kb() < rss0 + 100_000


# --- the JSONTestSuite corpus (nst/JSONTestSuite test_parsing/, vendored byte-exact) ----

CORPUS = Path(__file__).resolve().parent / "data" / "jsontestsuite"
CORPUS_COUNTS = {"n": 188, "y": 95, "i": 35}  # upstream's test_parsing/ (tests/data/jsontestsuite/README.md)


def jsontestsuite() -> dict[str, bytes]:
    """Every file of the vendored ``test_parsing/``, name -> exact bytes."""
    return {p.name: p.read_bytes() for p in sorted((CORPUS / "test_parsing").glob("*.json"))}


def test_jsontestsuite_is_vendored_whole_and_byte_exact() -> None:
    """The files are the corpus, not a checkout's rewrite of it (line endings, BOMs, NULs)."""
    corpus = jsontestsuite()
    sums = dict(reversed(line.split(maxsplit=1)) for line in (CORPUS / "SHA256SUMS").read_text().splitlines())
    assert set(corpus) == set(sums)
    for name, doc in corpus.items():
        assert hashlib.sha256(doc).hexdigest() == sums[name], name
    assert dict(Counter(name[0] for name in corpus)) == CORPUS_COUNTS
    assert (CORPUS / "LICENSE").read_text().startswith("MIT License")


async def streams(r: Redis) -> dict[bytes, tuple[int, bytes]]:
    """Every stream in the keyspace: its length and last generated id (an entry added and
    deleted again still moves the id)."""
    out = {}
    async for k in r.client.scan_iter(count=1000, _type="stream"):
        info = await r.client.xinfo_stream(k)
        last = info["last-generated-id"]
        out[k] = (info["length"], last if isinstance(last, bytes) else str(last).encode())
    return out


async def test_jsontestsuite_every_file_gets_4xx_and_writes_nothing(api: Ingress, r: Redis) -> None:
    """Every ``test_parsing/`` file as the body of every write path and as the one order of a
    batch. ``n_`` (not JSON): 400 ``invalid_json``. ``y_`` (JSON, but no order): 4xx, never
    ``invalid_json``. ``i_`` (either): 400 or 422. Never a 2xx or 500, nothing written."""
    corpus = jsontestsuite()
    assert dict(Counter(name[0] for name in corpus)) == CORPUS_COUNTS
    before, streams0 = await keyspace(r), await streams(r)
    rss0 = api.rss_kb()
    answers: Counter[str] = Counter()
    wrong: list[str] = []
    for name, doc in corpus.items():
        kind = name[0]
        for path in WRITE_PATHS:
            resp = await api.c.post(path, content=doc, headers={**auth(), **JSON})
            assert resp.status_code < 500 and not 200 <= resp.status_code < 300, (name, path, resp.text[:300])
            err = refused(resp)
            answers[f"{kind} {path} {resp.status_code} {err['code']}"] += 1
            ok = {
                "n": resp.status_code == 400 and err["code"] == "invalid_json",
                "y": resp.status_code in (400, 422) and err["code"] != "invalid_json",
                "i": resp.status_code in (400, 422),
            }[kind]
            if not ok:
                wrong.append(f"{name} {path}: {resp.status_code} {err['code']}: {err['message'][:120]}")
        # the same document as the one order of a batch: the body does not parse (400), or
        # it does and its one order is reported invalid
        resp = await api.c.post("/v1/orders/batch", content=b'{"orders": [' + doc + b"]}", headers={**auth(), **JSON})
        if resp.status_code == 202:
            body = resp.json()
            assert body["accepted"] == 0 and body["invalid"] == 1, (name, body)
            answers[f"{kind} batch-of-one 202 invalid=1"] += 1
        else:
            err = refused(resp)
            answers[f"{kind} batch-of-one {resp.status_code} {err['code']}"] += 1
            if kind == "y":
                wrong.append(f"{name} batch-of-one: {resp.status_code} {err['code']}: {err['message'][:120]}")
    assert not wrong, "\n".join(wrong)
    assert await keyspace(r) == before
    assert await streams(r) == streams0
    assert (await api.c.get("/healthz")).status_code == 200
    assert api.rss_kb() < rss0 + 100_000, (rss0, api.rss_kb())
    record(
        "jsontestsuite",
        {"files": dict(Counter(name[0] for name in corpus)), "requests": sum(answers.values()), "answers": answers},
    )


# --- pathological documents -----------------------------------------------------------


def deep_documents() -> dict[str, bytes]:
    depth = 100_000
    return {
        "deep_arrays": b"[" * depth + b"]" * depth,
        "deep_objects": b'{"a":' * depth + b"1" + b"}" * depth,
        "deep_in_extra": msgspec.json.encode(make_order("D1"))[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}",
        "deep_unclosed": b"[" * depth,
        "deep_in_lines": msgspec.json.encode(make_order("D2"))[:-1] + b',"lines":' + b"[" * depth + b"]" * depth + b"}",
    }


def odd_values() -> dict[str, bytes]:
    base = msgspec.json.encode(make_order("V1"))

    def with_(field: bytes, raw: bytes) -> bytes:
        return base[:-1] + b',"' + field + b'":' + raw + b"}"

    return {
        "nan_money": with_(b"paid_amount", b"NaN"),
        "infinity_money": with_(b"paid_amount", b"Infinity"),
        "minus_infinity": with_(b"paid_amount", b"-Infinity"),
        "huge_exponent": with_(b"paid_amount", b"1e999999"),
        "huge_integer_money": with_(b"paid_amount", b"9" * 5000),
        "huge_integer_qty": base.replace(b'"qty":1', b'"qty":' + b"9" * 5000),
        "negative_huge_qty": base.replace(b'"qty":1', b'"qty":-' + b"9" * 400),
        "float_qty": base.replace(b'"qty":1', b'"qty":1.5'),
        "qty_as_string": base.replace(b'"qty":1', b'"qty":"1"'),
        "invalid_utf8_in_name": base.replace("王芳".encode(), b"\xff\xfe\xfd"),
        "lone_surrogate_escape": base.replace("王芳".encode(), b"\\ud800"),
        "null_root": b"null",
        "number_root": b"12345",
        "string_root": b'"an order"',
        "array_root": b"[" + base + b"]",
        "empty_object": b"{}",
        "whitespace_only": b" \n\t ",
        "bom_then_order": b"\xef\xbb\xbf" + base,
        "nul_bytes": b"\x00" * 1000,
        "trailing_garbage": base + b"garbage",
        "two_documents": base + base,
        "lines_not_a_list": with_(b"lines", b'{"sku": "X"}'),
        "customer_as_array": with_(b"customer", b"[1, 2]"),
        "wide_object": b"{" + b",".join(b'"k%d":%d' % (i, i) for i in range(50_000)) + b"}",
        "many_lines": with_(b"lines", b"[" + b",".join([b'{"sku":"A","qty":1}'] * 20_000) + b"]"),
    }


async def test_pathological_documents_get_4xx_and_write_nothing(api: Ingress, r: Redis) -> None:
    before = await keyspace(r)
    rss0 = api.rss_kb()
    docs = {**deep_documents(), **odd_values()}
    for name, doc in docs.items():
        for path in WRITE_PATHS:
            resp = await api.c.post(path, content=doc, headers={**auth(), **JSON})
            refused(resp)
        await batch_of_one(api, name, doc)
    # a batch of the maximum size where every order is invalid: all reported, none queued
    bad = [make_order(i, lines=[{"sku": "A", "qty": 0}]) for i in range(1000)]
    resp = await api.c.post("/v1/orders/batch", json={"orders": bad}, headers=auth())
    assert resp.status_code == 202, resp.text
    assert resp.json()["invalid"] == 1000
    assert await keyspace(r) == before
    # the process is still healthy and its memory bounded (generous slack: allocator arenas)
    assert (await api.c.get("/healthz")).status_code == 200
    assert api.rss_kb() < rss0 + 150_000, (rss0, api.rss_kb())


async def test_admin_bodies_get_4xx(api: Ingress, r: Redis) -> None:
    """The admin and review endpoints that take a body: the same documents (and the corpus's
    ``n_`` files), the admin token."""
    corpus_n = {name: doc for name, doc in jsontestsuite().items() if name.startswith("n_")}
    docs = {**MALFORMED, **corpus_n, **deep_documents(), **odd_values()}
    paths = [
        ("PUT", "/v1/admin/stock"),
        ("PUT", "/v1/admin/warehouses"),
        ("PUT", "/v1/admin/coupons"),
        ("POST", "/v1/admin/holds"),
        ("POST", "/v1/admin/pause"),
        ("POST", "/v1/review/tmall/X/approve"),
    ]
    before = await keyspace(r)
    for name, doc in docs.items():
        for method, path in paths:
            resp = await api.c.request(method, path, content=doc, headers={**ADMIN, **JSON})
            assert 400 <= resp.status_code < 500, (name, method, path, resp.status_code, resp.text[:200])
            if name in corpus_n and "review" not in path:  # not JSON: 400, whatever its first value
                assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json", (name, path)
    assert await keyspace(r) == before
    assert (await api.c.get("/v1/admin/holds", headers=ADMIN)).json() == {"holds": []}
    assert (await api.c.get("/v1/stats", headers=ADMIN)).json()["paused"] == []


async def test_wrong_content_types_and_empty_bodies(api: Ingress, r: Redis) -> None:
    before = await keyspace(r)
    good = msgspec.json.encode(make_order("C1"))
    for path in WRITE_PATHS:
        for ctype in (None, "text/plain", "text/json", "application/jsonx", "multipart/form-data; boundary=x", ""):
            headers = auth() if ctype is None else {**auth(), "Content-Type": ctype}
            err = refused(await api.c.post(path, content=good, headers=headers))
            assert err["code"] == "unsupported_media_type", (path, ctype, err)
        for body in (b"", b" ", b"\n"):
            resp = await api.c.post(path, content=body, headers={**auth(), **JSON})
            assert refused(resp) and resp.status_code in (400, 422)
    assert await keyspace(r) == before


# --- slow and odd clients -------------------------------------------------------------


async def raw_request(port: int, head: bytes, body_parts: list[bytes], pause: float) -> bytes:
    """Send a request by hand, ``pause`` seconds between body parts; the whole answer (read
    to EOF: a refused slow body closes the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        with contextlib.suppress(ConnectionError):  # the server may answer and close first
            for part in body_parts:
                await writer.drain()
                writer.write(part)
                await asyncio.sleep(pause)
        data = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 15):
                data += chunk
        return data
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await writer.wait_closed()


async def test_slow_body_gets_408_and_does_not_hold_the_ingress(api: Ingress, r: Redis) -> None:
    token = auth()["Authorization"].encode()
    order = msgspec.json.encode(make_order("SLOW1"))
    head = (
        b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + token + b"\r\nContent-Length: %d\r\n\r\n" % len(order)
    )
    chunked_head = (
        b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: " + token + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    # two pieces 0.4 s apart, then silence: not whole by the 1 s deadline (writing on after
    # the server has answered and closed would only get the answer reset)
    trickle = [order[:10], order[10:20]]
    chunks = [b"%x\r\n%s\r\n" % (len(p), p) for p in trickle]
    slow = [
        asyncio.create_task(raw_request(api.port, head, trickle, 0.4)),
        asyncio.create_task(raw_request(api.port, chunked_head, chunks, 0.4)),
    ]
    await asyncio.sleep(0.2)
    # meanwhile the ingress serves everyone else
    resp = await api.c.post("/v1/orders", json=make_order("FAST1"), headers=auth())
    assert resp.status_code == 202, resp.text
    for answer in await asyncio.gather(*slow):
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), answer[:300]
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"x-request-id:" in headers.lower()
        assert b"connection: close" in headers.lower()
        assert msgspec.json.decode(body)["error"]["code"] == "request_timeout"
    after = await keyspace(r)
    assert after["intake"] == 1 and after["accepted"] == 1  # FAST1 only
    # a body that arrives in pieces but within the deadline is fine
    parts = [order[: len(order) // 2], order[len(order) // 2 :]]
    head_ok = head.replace(b"SLOW1", b"SLOW2")
    answer = await raw_request(
        api.port, head_ok.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1), parts, 0.2
    )
    assert answer.startswith(b"HTTP/1.1 202"), answer[:300]


def test_read_deadline_setting_is_checked() -> None:
    assert Settings.from_mapping({}).read_deadline_s == 10.0
    assert Settings.from_mapping({"ORDERQ_READ_DEADLINE_S": "2.5"}).read_deadline_s == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(ConfigError) as info:
            Settings.from_mapping({"ORDERQ_READ_DEADLINE_S": bad})
        assert info.value.variable == "ORDERQ_READ_DEADLINE_S"


async def test_every_response_carries_a_request_id(api: Ingress) -> None:
    seen = set()
    for _ in range(5):
        resp = await api.c.get("/healthz")
        rid = resp.headers["x-request-id"]
        assert rid not in seen
        seen.add(rid)
    # a sane id from the client is echoed, anything else replaced
    resp = await api.c.get("/healthz", headers={"X-Request-Id": "lb-1234.abc_DEF-9"})
    assert resp.headers["x-request-id"] == "lb-1234.abc_DEF-9"
    for insane in ("a" * 65, "has space", "semi;colon", "ünï", ""):
        resp = await api.c.get("/healthz", headers={"X-Request-Id": insane.encode()})
        got = resp.headers["x-request-id"]
        assert got != insane and got and len(got) <= 64
    # errors too: 401, 404, 413, 415, 405
    answers = [
        await api.c.post("/v1/orders", json=make_order(1)),
        await api.c.get("/v1/orders/tmall/NOPE", headers=auth()),
        await api.c.post("/v1/orders", content=b"{}", headers={**auth(), "Content-Type": "text/plain"}),
        await api.c.get("/v1/orders"),
        await api.c.get("/no/such/path"),
    ]
    for resp in answers:
        assert resp.status_code >= 400
        assert resp.headers.get("x-request-id"), (resp.status_code, resp.headers)
    # a 413 from the body limit itself, before any body is read
    head = b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (BODY_CAP + 1)
    answer = await raw_request(api.port, head, [], 0)
    assert answer.startswith(b"HTTP/1.1 413") and b"x-request-id:" in answer.lower(), answer[:300]
    resp = await api.c.post("/v1/orders", json=make_order(2), headers={**auth(), "X-Request-Id": "client-7"})
    assert resp.status_code == 202 and resp.headers["x-request-id"] == "client-7"


# --- generated orders around every constraint -----------------------------------------

REQUIRED = (
    ("channel",),
    ("order_id",),
    ("created_at",),
    ("customer", "id"),
    ("ship_to", "name"),
    ("ship_to", "phone"),
    ("ship_to", "province"),
    ("ship_to", "address"),
    ("lines",),
    ("paid_amount",),
)

bad_money = st.one_of(
    st.decimals(min_value=0, max_value=10**6, places=3).map(lambda d: f"{d:.3f}").filter(lambda s: s[-1] != "0"),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(),
    st.sampled_from(["", "1,00", "1.", ".5", "-1.00", "01.00", "1e3", "NaN", "Infinity", "１.00", " 1.00"]),
    st.text(max_size=5).filter(lambda s: not s.replace(".", "").isdigit()),
)
bad_qty = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=10_000),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.none(),
)


def _mutations() -> st.SearchStrategy[tuple[str, Any]]:
    return st.one_of(
        st.tuples(st.just("money"), st.tuples(st.sampled_from(["paid_amount", "unit_price", "coupon"]), bad_money)),
        st.tuples(st.just("qty"), bad_qty),
        st.tuples(st.just("lines"), st.sampled_from([0, 201, 250])),
        st.tuples(st.just("missing"), st.sampled_from(REQUIRED)),
        st.tuples(
            st.just("created_at"), st.sampled_from(["2026-11-11T00:00:01", "2026-13-01T00:00:00Z", "yesterday", ""])
        ),
        st.tuples(
            st.just("order_id"),
            st.one_of(st.just(""), st.text(min_size=65, max_size=70), st.sampled_from(["a b", "-x", "x/y", "é"])),
        ),
        st.tuples(st.just("tier"), st.text(max_size=8).filter(lambda s: s not in ("vip", "regular"))),
        st.tuples(st.just("channel"), st.sampled_from(["ebay", "TMALL", "", "tmall ", "a" * 33])),
        st.tuples(st.just("currency"), st.sampled_from(["cny", "CN", "CNYY", "", "1NY"])),
        st.tuples(st.just("sku"), st.sampled_from(["", "-A", "a b", "x" * 65, "ü"])),
    )


def mutate(order: dict[str, Any], kind: str, value: Any) -> dict[str, Any]:
    if kind == "money":
        where, v = value
        if where == "paid_amount":
            order["paid_amount"] = v
        elif where == "unit_price":
            order["lines"][0]["unit_price"] = v
        else:
            order["coupons"] = [{"code": "C", "platform": "tmall", "amount": v}]
    elif kind == "qty":
        order["lines"][0]["qty"] = value
    elif kind == "lines":
        order["lines"] = [{"sku": f"S{i}", "qty": 1} for i in range(value)]
    elif kind == "missing":
        target = order
        for part in value[:-1]:
            target = target[part]
        del target[value[-1]]
    elif kind == "tier":
        order["customer"]["tier"] = value
    elif kind == "sku":
        order["lines"][0]["sku"] = value
    else:
        order[kind] = value
    return order


@pytest.mark.long
async def test_generated_invalid_orders_are_422_and_write_nothing(api: Ingress, r: Redis) -> None:
    before = await keyspace(r)
    rss0 = api.rss_kb()
    counter = iter(range(10**9))

    @settings(max_examples=1000 if LONG else 150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_mutations())
    def one(mutation: tuple[str, Any]) -> None:
        kind, value = mutation
        order = mutate(make_order(f"H{next(counter)}"), kind, value)
        with httpx.Client(base_url=api.base, timeout=10) as c:
            resp = c.post("/v1/orders", json=order, headers=auth())
            err = refused(resp)
            assert resp.status_code == 422, (mutation, resp.text)
            assert err["details"], err
            resp = c.post("/v1/orders/batch", json={"orders": [order]}, headers=auth())
            assert resp.status_code == 202, resp.text
            assert resp.json()["invalid"] == 1, (mutation, resp.text)

    await asyncio.to_thread(one)
    assert await keyspace(r) == before
    assert api.rss_kb() < rss0 + 100_000


async def test_orders_on_the_boundaries_are_accepted(api: Ingress, r: Redis) -> None:
    """The other side of each constraint: the limits themselves are valid (so the refusals
    above are about the constraint, not about something else in the order)."""
    edge = [
        make_order("E1", lines=[{"sku": "A", "qty": 10, "unit_price": "10000000.00"}], paid_amount="100000000.00"),
        make_order("E2", lines=[{"sku": f"S{i}", "qty": 1} for i in range(200)]),
        make_order("E3", paid_amount="0"),
        make_order("E4", paid_amount="0.01"),
        make_order(
            "E5", customer={"id": "u", "tier": "vip"}, coupons=[{"code": "C", "platform": "tmall", "amount": "1.5"}]
        ),
    ]
    edge[3]["order_id"] = "E4" + "x" * 62
    for o in edge:
        resp = await api.c.post("/v1/orders", json=o, headers=auth())
        assert resp.status_code == 202, resp.text
    assert (await keyspace(r))["intake"] == len(edge)
