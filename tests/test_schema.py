"""Property tests of the order schema (contract §3): what is valid decodes and survives
the trip between stages unchanged; what is not is refused with the path of every fault."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderq.schema import (
    ORDER_MAX_CENTS,
    PRICE_MAX_CENTS,
    ErrorDetail,
    Order,
    json_encoder,
    normalise,
    order_decoder,
    pack,
    unpack_order,
    validation_details,
)
from orderq.settings import DEFAULT_CHANNELS
from tests.conftest import make_order

FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
short_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
sku = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._/-]{0,20}\Z")
order_id = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,30}\Z")
FRACS = st.sampled_from(["", ".5", ".50", ".05", ".99", ".0"])


def money_below(yuan: int) -> st.SearchStrategy[str]:
    return st.builds(lambda whole, frac: f"{whole}{frac}", st.integers(0, yuan - 1), FRACS)


money = money_below(ORDER_MAX_CENTS // 200)  # paid_amount, and 3 coupons at most of a sixth each:
coupon_money = money_below(ORDER_MAX_CENTS // 600)  # their sum stays within the order bound
qty = st.integers(1, 9999)
offset = st.integers(-14 * 60, 14 * 60).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
created_at = st.builds(
    lambda t, tz: t.replace(tzinfo=tz),
    st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2099, 12, 30)),
    offset,
)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | short_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(short_text, inner, max_size=3),
    max_leaves=6,
)


def optional(d: dict[str, Any], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``d`` plus any subset of ``fields``."""
    return st.fixed_dictionaries(d, optional=fields)


@st.composite
def lines_within_bounds(draw: st.DrawFn) -> list[dict[str, Any]]:
    """1 to 5 lines whose prices stay within the money bounds (each price, each sum of qty x
    price), large ones included."""
    budget = ORDER_MAX_CENTS // 100  # yuan left, for every price drawn (so both sums stay within)
    out = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(qty)
        line: dict[str, Any] = {"sku": draw(sku), "qty": n}
        for name in ("unit_price", "paid_price"):
            if draw(st.booleans()):
                top = min(PRICE_MAX_CENTS // 100, budget // n)  # yuan per unit still allowed
                whole = draw(st.integers(0, max(0, top - 1)))
                line[name] = f"{whole}{draw(FRACS)}" if top > 0 else "0"
                budget -= (whole + 1) * n if top > 0 else 0
        out.append(line)
    return out


order_doc = optional(
    {
        "channel": st.sampled_from(DEFAULT_CHANNELS),
        "order_id": order_id,
        "created_at": created_at.map(lambda t: t.isoformat()),
        "customer": optional(
            {"id": text},
            tier=st.sampled_from(["vip", "regular"]),
            phone=st.from_regex(r"\A1[3-9][0-9]{9}\Z"),
            ip=st.ip_addresses().map(str),
        ),
        "ship_to": optional(
            {"name": text, "phone": st.from_regex(r"\A1[3-9][0-9]{9}\Z"), "province": text, "address": text},
            city=text,
            district=text,
        ),
        "lines": lines_within_bounds(),
        "paid_amount": money,
    },
    coupons=st.lists(
        st.fixed_dictionaries({"code": text, "platform": text, "amount": coupon_money}),
        max_size=3,
    ),
    currency=st.from_regex(r"\A[A-Z]{3}\Z"),
    remark=short_text,
    gifts=st.lists(optional({"sku": sku}, qty=qty), max_size=3),
    extra=st.dictionaries(short_text, json_value, max_size=3),
)


def decode(doc: Any) -> Order:
    body = msgspec.json.encode(doc)
    return normalise(order_decoder.decode(body), body)


def refusal_paths(doc: Any) -> list[str]:
    """Decode ``doc``; it must be refused. Returns the paths of every fault reported."""
    body = msgspec.json.encode(doc)
    with pytest.raises(msgspec.ValidationError) as err:
        order_decoder.decode(body)
    details = validation_details(body, err.value)
    assert all(isinstance(d, ErrorDetail) and d.message for d in details)
    return [d.path for d in details]


# --- valid orders ---------------------------------------------------------------------


@FAST
@given(order_doc)
def test_valid_orders_decode_and_round_trip(doc: dict[str, Any]) -> None:
    order = decode(doc)
    assert order.key == f"{doc['channel']}:{doc['order_id']}"
    # created_at is the same instant, now in UTC
    assert order.created_at == dt.datetime.fromisoformat(doc["created_at"])
    assert order.created_at.utcoffset() == dt.timedelta(0)
    assert order.customer.tier == doc["customer"].get("tier", "regular")
    assert [ln.qty for ln in order.lines] == [ln["qty"] for ln in doc["lines"]]
    assert order.paid_amount == doc["paid_amount"]
    assert order.extra == doc.get("extra", {})
    # between stages: msgpack, decoded by the next stage into the same order
    again = unpack_order(pack(order))
    assert again == order
    # and the JSON form decodes to the same order as well
    assert order_decoder.decode(json_encoder.encode(order)) == order


@FAST
@given(order_doc, st.dictionaries(st.from_regex(r"\Ax_[a-z]{1,8}\Z"), json_value, min_size=1, max_size=3))
def test_unknown_fields_are_kept_in_extra(doc: dict[str, Any], unknown: dict[str, Any]) -> None:
    order = decode({**doc, **unknown})
    assert order.extra == {**doc.get("extra", {}), **unknown}
    assert unpack_order(pack(order)).extra == order.extra


def test_limits_themselves_are_valid() -> None:
    order = decode(make_order(1, lines=[{"sku": f"S{i}", "qty": 9999} for i in range(200)], paid_amount="0"))
    assert len(order.lines) == 200
    top = [{"sku": "S", "qty": 10, "unit_price": "10000000.00", "paid_price": "10000000"}]
    order = decode(make_order(2, lines=top, paid_amount="90000000.00", coupons=[coupon("10000000")]))
    assert order.paid_amount == "90000000.00"
    assert decode(make_order(3, paid_amount="100000000.00")).paid_amount == "100000000.00"
    # between stages too (every stage decodes the payload with the same bounds)
    assert unpack_order(pack(order)) == order


def coupon(amount: str) -> dict[str, str]:
    return {"code": "C", "platform": "tmall", "amount": amount}


# --- money bounds: what would break the stages' arithmetic is refused at the door --------


def test_the_absurd_order_of_issue_13_is_refused_with_its_paths() -> None:
    """200 lines x 9999 x "999999999999.99": its goods total overflowed the validation stage."""
    lines = [{"sku": f"S{i}", "qty": 9999, "unit_price": "999999999999.99"} for i in range(200)]
    paths = refusal_paths(make_order(1, lines=lines))
    assert paths == [f"lines[{i}].unit_price" for i in range(200)] + ["lines"]


@pytest.mark.parametrize(
    ("over", "paths"),
    [
        ({"lines": [{"sku": "A", "qty": 1, "unit_price": "10000000.01"}]}, ["lines[0].unit_price"]),
        ({"lines": [{"sku": "A", "qty": 1, "paid_price": "10000001"}]}, ["lines[0].paid_price"]),
        # every price within its bound, their sum over the order's
        ({"lines": [{"sku": "A", "qty": 11, "unit_price": "9999999.99"}]}, ["lines"]),
        ({"lines": [{"sku": f"S{i}", "qty": 9999, "paid_price": "100"} for i in range(101)]}, ["lines"]),
        ({"paid_amount": "100000000.01"}, ["paid_amount"]),
        ({"paid_amount": "999999999999.99"}, ["paid_amount"]),
        ({"coupons": [coupon("60000000"), coupon("39997101.01")]}, ["coupons"]),  # paid_amount 2899.00
        (
            {
                "lines": [
                    {"sku": "A", "qty": 6, "unit_price": "9000000"},
                    {"sku": "B", "qty": 6, "paid_price": "9000000"},
                ]
            },
            ["lines"],
        ),
    ],
)
def test_money_over_its_bound_is_refused_with_the_path(over: dict[str, Any], paths: list[str]) -> None:
    doc = make_order(1, **over)
    assert refusal_paths(doc) == paths
    # a stage meets the same bounds: such a payload does not decode there either
    with pytest.raises(msgspec.ValidationError):
        unpack_order(msgspec.msgpack.encode(msgspec.json.decode(msgspec.json.encode(doc))))


@FAST
@given(lines_within_bounds(), money)
def test_sums_within_the_bounds_are_kept_exactly(lines: list[dict[str, Any]], paid: str) -> None:
    from orderq.schema import goods_cents

    order = decode(make_order(1, lines=lines, paid_amount=paid))
    assert goods_cents(order) <= ORDER_MAX_CENTS
    # ... and a day of 90 such orders per customer, times the subsidy cap in basis points,
    # stays within what Lua numbers (doubles) hold exactly
    assert 90 * ORDER_MAX_CENTS * 10_000 < 2**53


# --- refusals -------------------------------------------------------------------------


@FAST
@given(
    st.integers(0, 10**6),
    st.from_regex(r"\A[0-9]{3,6}\Z"),
    st.sampled_from(["paid_amount", "unit_price", "paid_price", "coupon"]),
)
def test_money_with_more_than_two_decimals_is_refused(whole: int, frac: str, where: str) -> None:
    value = f"{whole}.{frac}"
    doc = make_order(1)
    if where == "paid_amount":
        doc["paid_amount"], path = value, "paid_amount"
    elif where == "coupon":
        doc["coupons"], path = [{"code": "C", "platform": "tmall", "amount": value}], "coupons[0].amount"
    else:
        doc["lines"] = [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 1, where: value}]
        path = f"lines[1].{where}"
    assert refusal_paths(doc) == [path]


@FAST
@given(
    st.floats(allow_nan=False, allow_infinity=False) | st.integers(0, 10**6),
    st.sampled_from(["paid_amount", "unit_price"]),
)
def test_money_as_a_number_is_refused(value: float, where: str) -> None:
    doc = make_order(1)
    if where == "paid_amount":
        doc["paid_amount"], path = value, "paid_amount"
    else:
        doc["lines"] = [{"sku": "A", "qty": 1, "unit_price": value}]
        path = "lines[0].unit_price"
    assert refusal_paths(doc) == [path]


@FAST
@given(
    st.integers(max_value=0) | st.integers(min_value=10000),
    st.integers(0, 9),
    st.integers(1, 10),
)
def test_quantity_outside_1_to_9999_is_refused(bad_qty: int, index: int, n_lines: int) -> None:
    index = index % n_lines
    lines = [{"sku": f"S{i}", "qty": 1} for i in range(n_lines)]
    lines[index]["qty"] = bad_qty
    assert refusal_paths(make_order(1, lines=lines)) == [f"lines[{index}].qty"]


@pytest.mark.parametrize("n", [0, 201, 250])
def test_line_count_outside_1_to_200_is_refused(n: int) -> None:
    lines = [{"sku": f"S{i}", "qty": 1} for i in range(n)]
    assert refusal_paths(make_order(1, lines=lines)) == ["lines"]


@FAST
@given(st.sets(st.sampled_from(["paid", "qty", "price", "created", "tier", "missing", "gift"]), min_size=2))
def test_every_failing_path_is_reported(faults: set[str]) -> None:
    doc = make_order(1, lines=[{"sku": "A", "qty": 1}, {"sku": "B", "qty": 1}], gifts=[{"sku": "G"}])
    expected = set()
    if "paid" in faults:
        doc["paid_amount"] = 12.5
        expected.add("paid_amount")
    if "qty" in faults:
        doc["lines"][0]["qty"] = 0
        expected.add("lines[0].qty")
    if "price" in faults:
        doc["lines"][1]["unit_price"] = "1.001"
        expected.add("lines[1].unit_price")
    if "created" in faults:
        doc["created_at"] = "2026-11-11T00:00:01"  # no offset
        expected.add("created_at")
    if "tier" in faults:
        doc["customer"] = {**doc["customer"], "tier": "gold"}
        expected.add("customer.tier")
    if "missing" in faults:
        del doc["ship_to"]["address"]
        expected.add("ship_to.address")
    if "gift" in faults:
        doc["gifts"] = [{"sku": "G", "qty": 10000}]
        expected.add("gifts[0].qty")
    assert set(refusal_paths(doc)) == expected
