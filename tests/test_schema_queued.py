"""unpack_queued (the execute stage's decoder: the edge's and validation's checks trusted)
decodes every valid order's payload to the same order as unpack_order; the money bounds are
still checked. Its speed is measured in BENCHMARKS.md, not here."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given

from orderq.schema import Customer, Line, Order, pack, unconstrained, unpack_order, unpack_queued
from tests.conftest import make_order
from tests.test_schema import FAST, decode, order_doc


def same(a: Any, b: Any) -> bool:
    """Field by field, recursively, types aside (a mirror Struct never == its original)."""
    if isinstance(a, msgspec.Struct):
        return isinstance(b, type(a)) and all(same(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@FAST
@given(order_doc)
def test_a_queued_order_decodes_to_the_same_order(doc: dict[str, Any]) -> None:
    payload = pack(decode(doc))
    full, fast = unpack_order(payload), unpack_queued(payload)
    assert same(full, fast) and isinstance(fast, Order) and isinstance(fast.customer, Customer)
    assert msgspec.to_builtins(full) == msgspec.to_builtins(fast)
    assert pack(fast) == payload and fast.key == full.key


def test_the_mirror_has_the_fields_and_config_but_no_constraints() -> None:
    M = unconstrained(Order)
    assert M.__struct_fields__ == Order.__struct_fields__ and issubclass(M, Order)
    assert [f.default for f in msgspec.structs.fields(M)] == [f.default for f in msgspec.structs.fields(Order)]
    assert M.__struct_config__.omit_defaults
    # a constraint the edge checks is not checked again (qty 0), the money bounds are
    bad = pack(msgspec.convert(make_order(1), Order)).replace(b"\xa3qty\x01", b"\xa3qty\x00")
    with pytest.raises(msgspec.ValidationError):
        unpack_order(bad)
    assert unpack_queued(bad).lines[0].qty == 0
    absurd = make_order("ABSURD", lines=[{"sku": "A", "qty": 9999, "unit_price": "9999999.99"}] * 20)
    with pytest.raises(msgspec.ValidationError, match=r"more than 100000000\.00"):
        unpack_queued(msgspec.msgpack.encode({**absurd, "created_at": "2026-11-10T16:00:01Z"}))
    assert isinstance(unconstrained(Line)(sku="", qty=0), Line)
