"""The connector's lease and cursor on a real Valkey: one holder at a time, renewal by its holder
only, takeover after expiry, and a cursor that only the holder moves, and only forward."""

from __future__ import annotations

import asyncio
from typing import Any

from connect.state import ConnectorState, Lease
from orderq import keys


async def test_lease_and_fenced_cursor(r: Any) -> None:
    c = r.client
    key = keys.connector_key("tb", "lease")
    a, b = Lease(c, key, 1.0), Lease(c, key, 1.0)
    assert await a.take() and a.held
    assert not await b.take() and not b.held
    assert await a.take()  # renewal by the holder
    state = ConnectorState(c, "tb")
    assert await state.advance(a, 5000) and await state.cursor() == 5000
    assert await state.advance(a, 4000) and await state.cursor() == 5000  # never back
    assert not await state.advance(b, 9000) and await state.cursor() == 5000  # not the holder: refused
    await asyncio.sleep(1.2)  # a's holder died: the lease runs out
    assert await b.take() and b.held
    assert not await a.take() and not a.held
    assert not await state.advance(a, 9000)  # a late writer from the old holder changes nothing
    assert await state.advance(b, 9000) and await state.cursor() == 9000
    await b.release()
    assert await c.get(key) is None
    await a.release()  # not held: deletes nothing
    assert await a.take()
    await a.release()


async def test_closed_orders_recorded_once(r: Any) -> None:
    state = ConnectorState(r.client, "tb")
    assert await state.closed({"tmall:1": "TRADE_CLOSED", "tmall:2": "TRADE_CLOSED"}) == 2
    assert await state.closed({"tmall:1": "TRADE_CLOSED", "tmall:3": "TRADE_CLOSED_BY_TAOBAO"}) == 1
    assert await r.client.hget(keys.connector_key("tb", "closed"), "tmall:3") == b"TRADE_CLOSED_BY_TAOBAO"
