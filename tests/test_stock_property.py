"""Property tests of the stock scripts on a real Valkey: for random interleavings of
reservations (all lines or none, replayed ones included), releases, executions and
warehouse counts, no reservation ever takes ``reserved`` past the buffered physical
stock, and ``reserved`` is always exactly what live orders hold."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderq import keys, wire
from orderq.client import load_lua
from orderq.ledger import stock
from orderq.server import EmbeddedServer
from orderq.settings import Settings
from validate import checks

SKUS = ("A", "B", "C")
ORDERS = 12

reserve = st.tuples(
    st.just("reserve"),
    st.integers(0, ORDERS - 1),
    st.lists(st.tuples(st.sampled_from(SKUS), st.integers(1, 6)), min_size=1, max_size=3),
)
release = st.tuples(st.just("release"), st.integers(0, ORDERS - 1))
execute = st.tuples(st.just("execute"), st.integers(0, ORDERS - 1))
count = st.tuples(st.just("count"), st.sampled_from(SKUS), st.integers(0, 40))
ops = st.lists(st.one_of(reserve, reserve, release, execute, count), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def sync(valkey: EmbeddedServer) -> Any:
    c = redis.Redis.from_url(valkey.url)
    shas = {name: c.script_load(load_lua(name)) for name in ("checks", "release", "restock")}
    yield c, shas
    c.close()


def _reserved(c: Any, sku: str) -> int:
    return int(c.hget(keys.stock_key(sku), "r") or 0)


def _cap(physical: int, buffer: str) -> int:
    return int(Fraction(physical) * Fraction(buffer))  # floor, exactly


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, buffer=st.sampled_from(["0.95", "1", "0.5", "0.333"]))
def test_reserved_never_exceeds_buffered_physical(sync: Any, ops: list[Any], buffer: str) -> None:
    c, shas = sync
    c.flushall()
    settings_ = Settings(stock_buffer=float(buffer), unknown_sku="reject", dup_window_s=0)
    head = checks.ledger_args(settings_)
    physical: dict[str, int] = {}
    decided: dict[str, bool] = {}  # order key -> it holds (not rejected)
    holds: dict[str, dict[str, int]] = {}  # live holdings: order key -> sku -> units
    executed: set[str] = set()
    released: set[str] = set()
    for op in ops:
        kind = op[0]
        if kind == "reserve":
            key = f"t:O{op[1]}"
            want: dict[str, int] = {}
            for sku, qty in op[2]:
                want[sku] = want.get(sku, 0) + qty
            before = {sku: _reserved(c, sku) for sku in SKUS}
            # base score 80: each order goes to review, which keeps its stock and may release it
            ks = checks.LedgerKeys()
            lines = [x for sku, qty in want.items() for x in (sku, qty, ks.sku(sku))]
            row = wire.DecisionRow(
                *(key, "t", "t:c", 1, 80, 0, "", "", 0, 0, 0, lines, [], "1", 0),
                decided_key=ks.of(keys.decided_key(0)),
                customer_key=ks.of(keys.customer_key("t", "c")),
                hold_key=ks.of(keys.ledger_key(key)),
                ip_key=0,
                ip_prev_key=0,
                dup_key=0,
                dup_prev_key=0,
                subsidy_key=ks.of(keys.subsidy_key(0)),
            )
            batch = wire.decision_rows([row])
            reply = c.evalsha(shas["checks"], len(ks.names), *ks.names, *head, batch)
            ((outcome, *_),) = msgspec.msgpack.decode(reply)
            if key in decided:  # a replay: nothing changes
                assert {sku: _reserved(c, sku) for sku in SKUS} == before
                continue
            fits = all(sku in physical and q <= _cap(physical[sku], buffer) - before[sku] for sku, q in want.items())
            assert outcome == ("w" if fits else "r"), (want, physical, before)
            decided[key] = fits
            if fits:
                holds[key] = dict(want)
                for sku in want:  # the property: a reservation never passes the buffered stock
                    assert _reserved(c, sku) <= _cap(physical[sku], buffer)
        elif kind == "release":
            key = f"t:O{op[1]}"
            if key in executed:
                continue  # an executed order is never released (the review API refuses it)
            ks, args = stock.release_call([(key, c.get(keys.ledger_key(key)))])
            n = c.evalsha(shas["release"], len(ks), *ks, *args) if args else 0
            first = decided.get(key) is True and key not in released
            assert n == (1 if first else 0)
            if first:
                released.add(key)
                holds.pop(key, None)
        elif kind == "execute":
            key = f"t:O{op[1]}"
            if decided.get(key) and key not in released:
                executed.add(key)
        else:
            _, sku, units = op
            settle = [k for k in executed if sku in holds.get(k, {})]
            ks, args = stock.restock_call([[sku, "", units, len(settle), *settle]])
            c.evalsha(shas["restock"], len(ks), *ks, *args)
            physical[sku] = units
            for k in settle:
                del holds[k][sku]
        for sku in SKUS:
            owed = sum(h.get(sku, 0) for h in holds.values())
            assert _reserved(c, sku) == owed >= 0
