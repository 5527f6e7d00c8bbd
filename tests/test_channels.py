"""Channel mappings (contract §7): every shipped mapping's sample lands through a real
ingress with its remark, UTC times and tier; mapping and schema errors name the channel's
own field; a broken mapping file stops start-up with its file and line."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from orderq import keys, stats
from orderq.client import Redis
from orderq.errors import ConfigError
from orderq.mapping import CancelMessage, MappingError, compile_mapping, load_dir, load_file
from orderq.schema import order_decoder, unpack_order
from orderq.settings import DEFAULT_CHANNELS, SHIPPED_MAPPINGS
from tests.conftest import ADMIN, ROOT, auth, drain
from tests.test_cancel import validate_only

SAMPLES = SHIPPED_MAPPINGS / "samples"
UTC = dt.UTC

# channel -> (order id, remark, created_at in UTC, tier) of mappings/samples/<channel>.json
EXPECTED = {
    "tmall": ("4023517781234567890", "周末送货, 电梯房", dt.datetime(2026, 11, 10, 16, 0, 1, tzinfo=UTC), "vip"),
    "jd": ("281234567890", "请用顺丰, 工作日下午送", dt.datetime(2026, 11, 10, 16, 0, 3, tzinfo=UTC), "regular"),
    "douyin": (
        "6921578436271234567",
        "晚上七点后送; 刻字: 平安喜乐",  # order remark + the item's customisation text, joined
        dt.datetime(2026, 11, 10, 16, 0, 5, tzinfo=UTC),  # Unix seconds
        "vip",
    ),
    "pdd": ("261111-082345678901234", "不要放快递柜", dt.datetime(2026, 11, 10, 16, 0, 7, tzinfo=UTC), "regular"),
    "miniapp": ("MP20261111000042", "礼物包装, 附贺卡", dt.datetime(2026, 11, 10, 16, 0, 2, tzinfo=UTC), "vip"),
}


def sample(channel: str) -> dict[str, Any]:
    return json.loads((SAMPLES / f"{channel}.json").read_text(encoding="utf-8"))


async def queued_orders(r: Redis) -> dict[str, Any]:
    """Every order waiting in the intake streams, decoded, by order key."""
    out = {}
    for p in r.partitions:
        for _id, fields in await r.client.xrange(p.intake):
            o = unpack_order(fields[b"d"])
            out[o.key] = o
    return out


def mapped(channel: str, payload: dict[str, Any]) -> Any:
    m = load_file(SHIPPED_MAPPINGS / f"{channel}.toml", DEFAULT_CHANNELS)
    doc, _ctx = m.apply(payload)
    return order_decoder.decode(json.dumps(doc))


# --- through the real ingress ----------------------------------------------------------------
async def test_sample_of_every_shipped_mapping_lands_with_remark_utc_time_and_tier(ingress, r):
    assert set(EXPECTED) <= {p.stem for p in SHIPPED_MAPPINGS.glob("*.toml")}
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        for channel, (order_id, _remark, _created, _tier) in EXPECTED.items():
            resp = await c.post(f"/v1/channels/{channel}/orders", json=sample(channel), headers=auth(channel))
            assert resp.status_code == 202, resp.text
            body = resp.json()
            assert body == {
                "order_key": f"{channel}:{order_id}",
                "status": "accepted",
                "duplicate": False,
                "stage": "normal",
            }
            again = await c.post(f"/v1/channels/{channel}/orders", json=sample(channel), headers=auth(channel))
            assert again.status_code == 200 and again.json() == {**body, "duplicate": True}

        queued = await queued_orders(r)
        assert len(queued) == len(EXPECTED)  # the replays queued nothing
        for channel, (order_id, remark, created, tier) in EXPECTED.items():
            o = queued[f"{channel}:{order_id}"]
            assert o.channel == channel
            assert o.remark == remark
            assert o.created_at == created and o.created_at.utcoffset() == dt.timedelta(0)
            assert o.customer.tier == tier
        douyin = queued["douyin:6921578436271234567"]
        assert [(x.sku, x.qty, x.unit_price, x.paid_price) for x in douyin.lines] == [
            ("NIGHT-WAL-2", 2, "229.00", "219.00")
        ]
        assert [(g.sku, g.qty) for g in douyin.gifts] == [("GIFT-COASTER", 1)]  # the FREE item is a gift
        assert douyin.paid_amount == "438.00"  # integer fen -> yuan string
        assert queued["pdd:261111-082345678901234"].paid_amount == "89.90"  # JSON number of yuan, exactly
        assert queued["tmall:4023517781234567890"].coupons[0].platform == "tmall"

        await drain(r)  # validated and executed like any order
        for channel, (order_id, _remark, _created, tier) in EXPECTED.items():
            rec = (await c.get(f"/v1/orders/{channel}/{order_id}", headers=auth(channel))).json()
            assert rec["status"] == "executed", rec
            assert rec["priority"] == ("vip" if tier == "vip" else "new")
            assert {"name": "crm.remark_sync", "state": "done"} in rec["actions"]


async def test_batch_maps_each_order_on_its_own(ingress, r):
    base = await ingress()
    good = sample("jd")
    other = {**sample("jd"), "orderId": 281234567891}
    bad = {**sample("jd"), "orderId": 281234567892}
    bad["itemInfoList"] = [{**bad["itemInfoList"][0], "itemTotal": "0"}]
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=auth("jd")) as c:
        resp = await c.post("/v1/channels/jd/orders/batch", json={"orders": [good, bad, other, good]})
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert (body["accepted"], body["invalid"], body["duplicates"], body["shed"]) == (2, 1, 1, 0)
        assert [x["status"] for x in body["results"]] == ["accepted", "invalid", "accepted", "duplicate"]
        assert body["results"][1]["order_key"] == "jd:281234567892"
        [detail] = body["results"][1]["error"]["details"]
        assert detail["path"] == "itemInfoList[0].itemTotal"  # JD's field, not lines[0].qty
        assert "lines[0].qty" in detail["message"]
    assert set(await queued_orders(r)) == {"jd:281234567890", "jd:281234567891"}


async def test_errors_name_the_channel_field_and_auth_is_the_channels(ingress, r):
    base = await ingress()
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        # a conversion the mapping cannot do: a fen amount that is not an integer
        payload = {**sample("douyin"), "pay_amount": "43800.5"}
        resp = await c.post("/v1/channels/douyin/orders", json=payload, headers=auth("douyin"))
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_order"
        assert [d["path"] for d in err["details"]] == ["pay_amount"]
        # the mapped order fails the schema: the channel's field is named, with the order field
        payload = sample("jd")
        payload["consigneeInfo"] = {**payload["consigneeInfo"], "fullname": ""}
        payload["orderRemark"] = "x" * 2001
        resp = await c.post("/v1/channels/jd/orders", json=payload, headers=auth("jd"))
        assert resp.status_code == 422
        details = {d["path"]: d["message"] for d in resp.json()["error"]["details"]}
        assert set(details) == {"consigneeInfo.fullname", "orderRemark"}
        assert "ship_to.name" in details["consigneeInfo.fullname"]
        # same auth as order writes
        url = "/v1/channels/tmall/orders"
        assert (await c.post(url, json=sample("tmall"))).status_code == 401
        assert (await c.post(url, json=sample("tmall"), headers=auth("jd"))).status_code == 403
        assert (await c.post(url, json=sample("tmall"), headers=ADMIN)).status_code == 403
        assert (await c.post("/v1/channels/kuaishou/orders", json={}, headers=auth("kuaishou"))).status_code == 404
        assert (
            await c.post(url, content=b"{", headers={**auth("tmall"), "content-type": "application/json"})
        ).status_code == 400
        assert (
            await c.post(url, content=b"{}", headers={**auth("tmall"), "content-type": "text/plain"})
        ).status_code == 415
    assert await queued_orders(r) == {}
    assert (await stats.totals(r))["invalid"] == 2


# --- a channel's own cancel and refund messages (contract §5) ----------------------------------
# channel -> (order id, reason) of mappings/samples/<channel>.cancel.json
CANCELS = {
    "douyin": ("6921578436271234567", "buyer_cancelled"),  # doudian_trade_TradeCanceled (tag 106)
    "tmall": ("4023517781234567890", "refund"),  # TMC taobao_trade_TradeClose, closed after payment
    "pdd": ("261111-082345678901234", "refund"),  # pdd_refund_RefundAgreeAgreement, refund only
    "jd": ("281234567890", "buyer_cancelled"),  # the order itself, orderState TRADE_CANCELED
    "miniapp": ("MP20261111000042", "refund"),  # WeChat Pay REFUND.SUCCESS, as our backend forwards it
}


def cancel_sample(channel: str, order_id: str | None = None) -> dict[str, Any]:
    """The channel's sample cancel message, for ``order_id`` if given (Douyin's)."""
    doc = json.loads((SAMPLES / f"{channel}.cancel.json").read_text(encoding="utf-8"))
    if order_id is not None:
        assert channel == "douyin"
        data = json.loads(doc["data"])
        data["p_id"] = int(order_id)
        doc["data"] = json.dumps(data, ensure_ascii=False)
    return doc


async def sellable(c: httpx.AsyncClient, sku: str) -> tuple[int, int]:
    doc = (await c.get(f"/v1/admin/stock/{sku}", headers=ADMIN)).json()
    return doc["sellable"], doc["reserved"]


async def test_a_channel_cancel_message_takes_the_cancel_path(ingress, r):
    base = await ingress()
    order_id, _reason = CANCELS["douyin"]
    key = f"douyin:{order_id}"
    url = "/v1/channels/douyin/orders"
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        items = [{"sku": "NIGHT-WAL-2", "physical": 10}, {"sku": "GIFT-COASTER", "physical": 10}]
        assert (await c.put("/v1/admin/stock", json={"items": items}, headers=ADMIN)).status_code == 200
        start, gifts = (await sellable(c, "NIGHT-WAL-2"))[0], (await sellable(c, "GIFT-COASTER"))[0]
        assert (await c.post(url, json=sample("douyin"), headers=auth("douyin"))).status_code == 202
        await validate_only(r)  # the order holds its stock now
        assert await sellable(c, "NIGHT-WAL-2") == (start - 2, 2)

        # Douyin's cancel message, at the channel's own endpoint: cancelled like the cancel endpoint
        for _ in range(2):  # a repeat answers the same
            resp = await c.post(url, json=cancel_sample("douyin"), headers=auth("douyin"))
            assert resp.status_code == 200, resp.text
            assert resp.json() == {"order_key": key, "status": "cancelled"}
        await drain(r)
        rec = (await c.get(f"/v1/orders/douyin/{order_id}", headers=ADMIN)).json()
        assert rec["status"] == "cancelled" and rec["cancel"]["reason"] == "buyer_cancelled", rec
        assert not any(a["name"] == "wms.pick" for a in rec.get("actions", []))
        assert await sellable(c, "NIGHT-WAL-2") == (start, 0)  # released once
        assert await sellable(c, "GIFT-COASTER") == (gifts, 0)

        # a cancel that overtakes its order is kept; the order, when it comes, ends cancelled
        resp = await c.post(url, json=cancel_sample("douyin", "6921578436270000001"), headers=auth("douyin"))
        assert resp.status_code == 202 and resp.json() == {
            "order_key": "douyin:6921578436270000001",
            "status": "cancel_pending",
        }
        late = {**sample("douyin"), "order_id": "6921578436270000001"}
        assert (await c.post(url, json=late, headers=auth("douyin"))).status_code == 202
        await drain(r)
        rec = (await c.get("/v1/orders/douyin/6921578436270000001", headers=ADMIN)).json()
        assert rec["status"] == "cancelled"

        # the same auth as order writes: another channel's token, the admin token, none
        assert (await c.post(url, json=cancel_sample("douyin"), headers=auth("jd"))).status_code == 403
        assert (await c.post(url, json=cancel_sample("douyin"), headers=ADMIN)).status_code == 403
        assert (await c.post(url, json=cancel_sample("douyin"))).status_code == 401

        # an ordinary order message is still an order
        fresh = {**sample("douyin"), "order_id": "6921578436279999999"}
        resp = await c.post(url, json=fresh, headers=auth("douyin"))
        assert resp.status_code == 202 and resp.json()["status"] == "accepted", resp.text

        # a cancel message is not an order: refused in a batch, with the order id as its key
        batch = {"orders": [cancel_sample("douyin"), {**sample("douyin"), "order_id": "6921578436279999998"}]}
        resp = await c.post("/v1/channels/douyin/orders/batch", json=batch, headers=auth("douyin"))
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert [x["status"] for x in body["results"]] == ["invalid", "accepted"]
        assert body["results"][0]["order_key"] == key
        assert "POST /v1/channels/douyin/orders" in body["results"][0]["error"]["message"]

        # Taobao's TMC trade-close message, its body JSON text: a refund
        tid, reason = CANCELS["tmall"]
        assert (
            await c.post("/v1/channels/tmall/orders", json=sample("tmall"), headers=auth("tmall"))
        ).status_code == 202
        resp = await c.post("/v1/channels/tmall/orders", json=cancel_sample("tmall"), headers=auth("tmall"))
        assert resp.status_code == 200 and resp.json() == {"order_key": f"tmall:{tid}", "status": "cancelled"}
        rec = (await c.get(f"/v1/orders/tmall/{tid}", headers=ADMIN)).json()
        assert rec["cancel"]["reason"] == reason

        # a message recognised as a cancel but without a usable order id: 422 naming the channel's field
        bad = cancel_sample("douyin")
        bad["data"] = json.dumps({**json.loads(bad["data"]), "p_id": None})
        resp = await c.post(url, json=bad, headers=auth("douyin"))
        assert resp.status_code == 422, resp.text
        assert [d["path"] for d in resp.json()["error"]["details"]] == ["data.p_id"]


async def test_an_executed_order_cancelled_by_its_channel_is_intercepted(ingress, r):
    base = await ingress()
    order_id, _reason = CANCELS["jd"]
    async with httpx.AsyncClient(base_url=base, timeout=10, headers=auth("jd")) as c:
        assert (await c.post("/v1/channels/jd/orders", json=sample("jd"))).status_code == 202
        await drain(r)
        for _ in range(2):
            resp = await c.post("/v1/channels/jd/orders", json=cancel_sample("jd"))
            assert resp.status_code == 202 and resp.json() == {"order_key": f"jd:{order_id}", "status": "intercepting"}


def test_every_shipped_cancel_message_maps_to_its_order_and_reason():
    mappings = load_dir(SHIPPED_MAPPINGS, DEFAULT_CHANNELS)
    assert {ch for ch, m in mappings.items() if m.cancels} == set(CANCELS)
    for channel, (order_id, reason) in CANCELS.items():
        m = mappings[channel]
        msg = m.cancel_of(cancel_sample(channel))
        assert msg is not None and (msg.order_id, msg.reason) == (order_id, reason), channel
        assert m.cancel_of(sample(channel)) is None  # the order sample is an order
    assert mappings["douyin"].cancel_of(cancel_sample("douyin")).note == "买家不想要了"
    # Douyin's refund of the whole order before shipping (tag 206, aftersale_type 2) cancels too;
    # a refund of one item after shipping (aftersale_type 1) does not
    data = {"p_id": 6921578436271234567, "s_id": 6921578436271234568, "aftersale_type": 2, "reason_code": 14}
    refund = {"tag": "206", "msg_id": "1", "data": json.dumps(data)}
    assert mappings["douyin"].cancel_of(refund) == CancelMessage("6921578436271234567", "out_of_stock", "")
    refund["data"] = json.dumps({**data, "aftersale_type": 1})
    assert mappings["douyin"].cancel_of(refund) is None
    assert mappings["shopify"].cancel_of(sample("shopify")) is None  # its orders/cancelled webhook does it


def test_cancel_rules_read_json_text_check_every_condition_and_name_the_field():
    doc = {
        "order_id": "no",
        "cancel": [
            {
                "json": ["body"],
                "when": {"kind": ["closed", 7], "body.state": ["gone"]},
                "order_id": {"path": "body.no", "type": "str"},
                "reason": {"path": "body.why", "enum": {"stock": "out_of_stock"}, "default": "other"},
                "note": "body.text",
            }
        ],
    }
    m = compile_mapping("pos", doc, Path("pos.toml"))
    msg = {"kind": 7, "body": json.dumps({"state": "gone", "no": 42, "why": "stock", "text": "sold out"})}
    assert m.cancel_of(msg) == CancelMessage("42", "out_of_stock", "sold out")
    assert m.cancel_of({**msg, "body": {"state": "gone", "no": "A1"}}) == CancelMessage("A1", "other", "")
    assert m.cancel_of({**msg, "kind": "open"}) is None
    assert m.cancel_of({"kind": "closed", "body": json.dumps({"state": "here", "no": 1})}) is None
    assert m.cancel_of({"no": "x1"}) is None and m.cancel_of([1, 2]) is None
    for bad, field in [({"body": "{not json"}, "body"), ({"body": json.dumps({"state": "gone"})}, "body.no")]:
        with pytest.raises(MappingError) as exc:
            m.cancel_of({**msg, **bad})
        assert exc.value.field == field
    strict = compile_mapping(
        "pos", {"cancel": [{"when": {"k": ["x"]}, "order_id": "no", "reason": "why"}]}, Path("pos.toml")
    )
    with pytest.raises(MappingError, match="reason") as exc:
        strict.cancel_of({"k": "x", "no": "1", "why": "changed_mind"})
    assert exc.value.field == "why"
    assert strict.cancel_of({"k": "x", "no": "1", "why": "fraud"}) == CancelMessage("1", "fraud", "")


# --- the mapping compiler ---------------------------------------------------------------------
def test_conversions_money_time_enum_join_and_list_indices():
    doc = {
        "order_id": {"path": "no", "type": "str"},
        "created_at": {"path": "t", "time": "+08:00"},
        "paid_amount": {"path": "paid", "money": "fen"},
        "remark": {"join": ["note", "items[].note"], "sep": " / "},
        "customer": {
            "id": "buyer",
            "tier": {"path": "tags", "split": ",", "enum": {"VIP": "vip"}, "default": "regular"},
        },
        "ship_to": {"name": "n", "phone": {"path": ["m", "tel"]}, "province": "p", "address": "a"},
        "lines": {
            "path": "items",
            "fields": {"sku": "sku", "qty": "n", "unit_price": {"path": "total", "money": "yuan", "per": "n"}},
            "drop_if": {"path": "kind", "in": ["gift"]},
        },
    }
    m = compile_mapping("pos", doc, Path("pos.toml"))
    payload = {
        "no": 42,
        "t": "2026-01-01 07:30:00",
        "paid": 1999,
        "note": "fragile",
        "buyer": "b1",
        "tags": "new, VIP",
        "n": "Li",
        "tel": "139",
        "p": "江苏省",
        "a": "somewhere 1",
        "items": [
            {"sku": "G-1", "n": 1, "total": 0, "kind": "gift", "note": ""},
            {"sku": "A-1", "n": 3, "total": 10.0, "note": "blue"},
        ],
    }
    out, ctx = m.apply(payload)
    o = order_decoder.decode(json.dumps(out))
    assert (o.key, o.paid_amount, o.remark, o.customer.tier) == ("pos:42", "19.99", "fragile / blue", "vip")
    assert o.created_at == dt.datetime(2025, 12, 31, 23, 30, tzinfo=UTC)
    assert [(x.sku, x.qty, x.unit_price) for x in o.lines] == [("A-1", 3, "3.33")]  # 10 / 3, half up to the fen
    assert ctx["lines"] == [1]
    assert m.channel_field("lines[0].qty", ctx) == "items[1].n"  # the dropped gift shifts the index back
    assert m.channel_field("ship_to.phone", ctx) == "m | tel"
    assert m.channel_field("customer.ip", ctx) == "customer.ip (not mapped)"
    for bad, field in [
        ({"paid": 19.5}, "paid"),
        ({"paid": "abc"}, "paid"),
        ({"t": "yesterday"}, "t"),
        ({"t": 1700000000}, "t"),
        ({"items": [{"sku": "A", "n": "two", "total": 1}]}, "items[0].n"),
        ({"items": "nope"}, "items"),
    ]:
        with pytest.raises(MappingError) as exc:
            m.apply({**payload, **bad})
        assert exc.value.field == field
    # an enum without default refuses what it does not know, naming the field
    strict = compile_mapping("pos", {"customer": {"tier": {"path": "lv", "enum": {"9": "vip"}}}}, Path("pos.toml"))
    with pytest.raises(MappingError, match="unknown value") as exc:
        strict.apply({"lv": 3})
    assert exc.value.field == "lv"
    # yuan floats are read through their shortest repr, and more than 2 decimals are refused
    money = compile_mapping("pos", {"paid_amount": {"path": "v", "money": "yuan"}}, Path("pos.toml"))
    assert money.apply({"v": 0.1 + 0.2 - 0.3 + 19.9})[0]["paid_amount"] == "19.90"
    with pytest.raises(MappingError, match="2 decimals"):
        money.apply({"v": "1.999"})


def test_every_shipped_mapping_compiles_and_its_sample_decodes():
    mappings = load_dir(SHIPPED_MAPPINGS, DEFAULT_CHANNELS)
    assert set(mappings) == {"tmall", "jd", "douyin", "pdd", "miniapp", "shopify"}
    for channel in mappings:
        o = mapped(channel, sample(channel))
        assert o.channel == channel and o.created_at.utcoffset() == dt.timedelta(0)
        assert o.lines and o.remark


BROKEN = [
    # (file text, line of the error, words the message must contain)
    ('order_id = "tid"\nremark = "buyer_message\n', 2, ["not valid TOML"]),
    ('order_id = "tid"\n\n[ship_to]\nname = "n"\nadress = "a"\n', 5, ["ship_to.adress", "unknown field"]),
    ('order_id = "tid"\n[lines]\npath = "orders"\n[lines.fields]\nqty = { path = "num", mony = "fen" }\n', 5, ["mony"]),
    ('order_id = "tid"\npaid_amount = { path = "p", money = "cents" }\n', 2, ["money"]),
    ('order_id = "tid"\ncreated_at = { path = "c", time = "Mars/Olympus" }\n', 2, ["time"]),
    ('order_id = "tid"\n\n\nchannel = "jd"\n', 4, ["channel"]),
    # cancel messages: a reason outside the contract's (second entry), an unknown key, no condition, no order id
    (
        'order_id = "tid"\n[[cancel]]\nwhen = { topic = ["a"] }\norder_id = "tid"\nreason = { const = "refund" }\n'
        '[[cancel]]\nwhen = { topic = ["b"] }\norder_id = "tid"\nreason = { const = "changed_mind" }\n',
        9,
        ["cancel[1].reason", "changed_mind", "buyer_cancelled"],
    ),
    ('[[cancel]]\nwhen = { topic = ["a"] }\norder_id = "tid"\nreason = "r"\nwhn = 1\n', 5, ["cancel[0].whn"]),
    ('[[cancel]]\nwhen = {}\norder_id = "tid"\nreason = "r"\n', 2, ["cancel[0].when"]),
    ('[[cancel]]\nwhen = { topic = ["a"] }\nreason = "r"\n', 1, ["cancel[0]", "order_id"]),
]


@pytest.mark.parametrize(("text", "line", "words"), BROKEN)
def test_a_broken_mapping_names_its_file_and_line(tmp_path, text, line, words):
    path = tmp_path / "tmall.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_file(path, DEFAULT_CHANNELS)
    assert exc.value.variable == f"{path}:{line}", str(exc.value)
    for w in words:
        assert w in str(exc.value)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ORDERQ_")}
    full.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "orderq", *args], env=full, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", ["ingress", "up"])
def test_a_broken_mapping_file_stops_start_up_with_file_and_line(make_env, tmp_path, command):
    mappings = tmp_path / "mappings"
    shutil.copytree(SHIPPED_MAPPINGS, mappings)
    broken = mappings / "jd.toml"
    lines = broken.read_text(encoding="utf-8").splitlines()
    at = next(i for i, t in enumerate(lines) if t.startswith("[ship_to]")) + 2  # the line after the header
    lines.insert(at - 1, 'street = "consigneeInfo.town"')
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = _run([command], make_env(ORDERQ_MAPPINGS_DIR=str(mappings), ORDERQ_HTTP_PORT="0"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert f"{broken}:{at}" in line and "ship_to.street" in line, line


def test_mappings_dir_must_exist(make_env, tmp_path):
    proc = _run(["ingress"], make_env(ORDERQ_MAPPINGS_DIR=str(tmp_path / "nowhere")))
    assert proc.returncode == 2 and "ORDERQ_MAPPINGS_DIR" in proc.stderr


def test_the_shipped_mappings_are_found_from_any_working_directory():
    assert SHIPPED_MAPPINGS == ROOT / "mappings"
    assert keys.GROUP_DISPATCH == "dispatch"
