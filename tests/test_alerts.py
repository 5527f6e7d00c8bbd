"""Alerts (DOMAIN "What operators watch"): each condition fires once at its onset and
clears once, against the real private Valkey; the webhook reaches a real local HTTP
server; a real breaker process runs the evaluator. Conditions are staged by writing
the keys the stages keep (counters, ready lanes, the out-of-stock streak hash); the
surge scenario passes its own clock to ``tick`` so windows of 10 s need no waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from breaker.alerts import DEAD_LETTER_QUIET_S, Alerts
from orderq import client as oq_client
from orderq import keys, metrics
from orderq.errors import ConfigError
from orderq.server import free_port
from orderq.settings import Settings


class Sink:
    """A tiny real HTTP server on a free loopback port that records the JSON it is POSTed."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks/orderq"
        return self.url

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            self.received.append((lines[0], json.loads(body)))
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def events(self, event: str, kind: str) -> list[dict[str, Any]]:
        return [b for _, b in self.received if b.get("event") == event and b.get("kind") == kind]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def connect(flushed: Any, settings_for: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """Connections with their own settings (alert thresholds), closed at the end."""
    made: list[oq_client.Redis] = []

    async def make(**env: Any) -> oq_client.Redis:
        conn = await oq_client.connect(settings_for(**env))
        made.append(conn)
        return conn

    yield make
    for conn in made:
        await conn.close()


def fired(events: list[dict[str, Any]], kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "alert.fired" and (kind is None or e["kind"] == kind)]


def cleared(events: list[dict[str, Any]], kind: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "alert.cleared" and (kind is None or e["kind"] == kind)]


async def alerts_total(r: oq_client.Redis, kind: str) -> float:
    text = (await metrics.render(r)).decode()
    for line in text.splitlines():
        if line.startswith(f'orderq_alerts_total{{kind="{kind}"}} '):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"orderq_alerts_total for {kind} missing from /metrics")


async def test_dead_letters_fire_once_then_clear_after_a_quiet_period(connect):
    r = await connect()
    a = Alerts(r)
    now = time.time()
    assert await a.tick(now) == []
    assert await alerts_total(r, "dead_letters") == 0
    await r.client.hincrby(r.partitions[0].counters, "dead_letters", 2)
    events = await a.tick(now + 1)
    assert [(e["event"], e["kind"]) for e in events] == [("alert.fired", "dead_letters")]
    assert events[0]["dead_letters"] == 2 and events[0]["new"] == 2
    assert await a.tick(now + 2) == []  # still the same onset: not every second
    await r.client.hincrby(r.partitions[1].counters, "dead_letters", 1)
    assert await a.tick(now + 3) == []  # more dead letters while it is active: no second page
    assert await a.tick(now + 3 + DEAD_LETTER_QUIET_S - 1) == []
    events = await a.tick(now + 3 + DEAD_LETTER_QUIET_S + 1)
    assert [(e["event"], e["kind"]) for e in events] == [("alert.cleared", "dead_letters")]
    assert await a.tick(now + 200) == []
    # A new dead letter after it cleared is a new onset.
    await r.client.hincrby(r.partitions[0].counters, "dead_letters", 1)
    assert len(fired(await a.tick(now + 201), "dead_letters")) == 1
    assert await alerts_total(r, "dead_letters") == 2
    assert await alerts_total(r, "execution_lag") == 0  # every kind is listed, at 0 until it fires


async def test_execution_lag_fires_for_an_old_ready_entry_and_clears_when_it_is_gone(connect):
    r = await connect(ORDERQ_ALERT_LAG_S=5)
    a = Alerts(r)
    lane = r.partitions[1].ready("new")
    await r.client.xadd(lane, {"k": "tmall:fresh"})  # a fresh entry is no lag
    assert fired(await a.tick()) == []
    old_id = f"{int((time.time() - 30) * 1000)}-0"
    await r.client.xadd(r.partitions[2].ready("regular"), {"k": "tmall:old"}, id=old_id)
    events = fired(await a.tick(), "execution_lag")
    assert len(events) == 1
    assert events[0]["priority"] == "regular" and events[0]["lag_s"] >= 29 and events[0]["threshold_s"] == 5
    assert await a.tick() == []
    await r.client.xdel(r.partitions[2].ready("regular"), old_id)
    assert [e["kind"] for e in cleared(await a.tick())] == ["execution_lag"]
    assert await alerts_total(r, "execution_lag") == 1


async def test_one_sku_out_of_stock_five_times_in_a_row(connect):
    r = await connect()
    a = Alerts(r)
    await r.client.hset(keys.OOS_STREAK_KEY, mapping={"SOFA-OAK-3": 4, "LAMP-1": 1})
    assert await a.tick() == []
    await r.client.hset(keys.OOS_STREAK_KEY, "SOFA-OAK-3", 5)
    events = fired(await a.tick(), "sku_out_of_stock")
    assert [(e["sku"], e["streak"]) for e in events] == [("SOFA-OAK-3", 5)]
    await r.client.hset(keys.OOS_STREAK_KEY, mapping={"SOFA-OAK-3": 6, "LAMP-1": 9})
    events = await a.tick()  # the same SKU again is not news; another SKU is
    assert [(e["event"], e["sku"]) for e in events] == [("alert.fired", "LAMP-1")]
    await r.client.hdel(keys.OOS_STREAK_KEY, "SOFA-OAK-3")  # validate reserved it again
    events = await a.tick()
    assert [(e["event"], e["alert"]) for e in events] == [("alert.cleared", "sku_out_of_stock:SOFA-OAK-3")]
    assert await alerts_total(r, "sku_out_of_stock") == 2


async def test_hourly_orders_over_300_percent_of_the_trailing_mean(connect):
    r = await connect(ORDERQ_ALERT_WINDOW_S=10)
    a = Alerts(r)
    counters = r.partitions[0].counters

    async def at(t: float, accepted_total: int) -> list[dict[str, Any]]:
        now_total = int(await r.client.hget(counters, "accepted") or 0)
        await r.client.hincrby(counters, "accepted", accepted_total - now_total)
        return await a.tick(t)

    t0 = 1_000_000.0  # a window boundary; the evaluator is given its clock
    assert await at(t0, 0) == []
    assert await at(t0 + 10, 20) == []  # window 1: 20 orders
    assert await at(t0 + 20, 40) == []  # window 2: 20 orders; mean 20
    assert await at(t0 + 25, 100) == []  # 60 so far in window 3: 300 %, not over it
    events = await at(t0 + 26, 101)  # 61: over 300 %
    assert [(e["event"], e["kind"]) for e in events] == [("alert.fired", "order_surge")]
    assert events[0]["count"] == 61 and events[0]["mean"] == 20 and events[0]["window_s"] == 10
    assert await at(t0 + 29, 200) == []  # once per onset
    events = await at(t0 + 30, 200)  # a new window starts at 0
    assert [(e["event"], e["kind"]) for e in events] == [("alert.cleared", "order_surge")]
    # Window 3 had 160 orders: the mean (20, 20, 160) is 66.7, so 100 in window 4 is no surge.
    assert await at(t0 + 39, 300) == []
    assert await alerts_total(r, "order_surge") == 1


async def test_a_second_evaluator_does_not_fire_the_same_onset(connect):
    r1, r2 = await connect(), await connect()
    a, b = Alerts(r1), Alerts(r2)
    await r1.client.hset(keys.OOS_STREAK_KEY, "SKU-X", 5)
    events = await a.tick() + await b.tick()
    assert len(fired(events)) == 1
    await r1.client.hdel(keys.OOS_STREAK_KEY, "SKU-X")
    events = await b.tick() + await a.tick()
    assert len(cleared(events)) == 1


async def test_webhook_receives_fired_and_cleared(connect, sink):
    r = await connect(ORDERQ_ALERT_WEBHOOK=sink.url)
    a = Alerts(r)
    try:
        await r.client.hset(keys.OOS_STREAK_KEY, "SOFA-OAK-3", 5)
        await a.tick()
        await r.client.hdel(keys.OOS_STREAK_KEY, "SOFA-OAK-3")
        await a.tick()
    finally:
        await a.close()  # waits for the POSTs in flight
    assert [line.split(" ")[:2] for line, _ in sink.received] == [["POST", "/hooks/orderq"]] * 2
    (on,) = sink.events("alert.fired", "sku_out_of_stock")
    assert on["sku"] == "SOFA-OAK-3" and "SOFA-OAK-3" in on["text"] and on["ts"].endswith("Z")
    assert sink.events("alert.cleared", "sku_out_of_stock")[0]["alert"] == "sku_out_of_stock:SOFA-OAK-3"


async def test_an_unreachable_webhook_is_logged_not_raised(connect):
    r = await connect(ORDERQ_ALERT_WEBHOOK=f"http://127.0.0.1:{free_port()}/nobody")
    a = Alerts(r)
    try:
        await r.client.hset(keys.OOS_STREAK_KEY, "SKU-Y", 5)
        assert len(fired(await a.tick(), "sku_out_of_stock")) == 1
        posts = set(a.sending)
        assert len(posts) == 1
        await asyncio.wait(posts, timeout=5)
        assert [t.exception() for t in posts] == [None]  # the connection error was caught
        assert await a.tick() == []  # the evaluator goes on
    finally:
        await a.close()


def test_alert_settings_are_checked_at_start():
    s = Settings.from_mapping({})
    assert (s.alert_webhook, s.alert_window_s, s.alert_lag_s) == (None, 3600, 60.0)
    with pytest.raises(ConfigError, match="ORDERQ_ALERT_WEBHOOK"):
        Settings.from_mapping({"ORDERQ_ALERT_WEBHOOK": "ftp://example.invalid/x"})
    with pytest.raises(ConfigError, match="ORDERQ_ALERT_WINDOW_S"):
        Settings.from_mapping({"ORDERQ_ALERT_WINDOW_S": "0"})
    with pytest.raises(ConfigError, match="ORDERQ_ALERT_LAG_S"):
        Settings.from_mapping({"ORDERQ_ALERT_LAG_S": "soon"})


async def test_breaker_process_runs_the_evaluator_and_posts_the_webhook(stages, connect, sink):
    r = await connect()
    breaker = stages("breaker", ORDERQ_ALERT_WEBHOOK=sink.url)
    # The breaker samples the history once a second: once it has, the evaluator runs too.
    deadline = time.monotonic() + 20
    while not await r.client.llen(keys.HISTORY_KEY):
        assert time.monotonic() < deadline, breaker.log()
        await asyncio.sleep(0.1)
    await r.client.hincrby(r.partitions[0].counters, "dead_letters", 1)
    while not sink.events("alert.fired", "dead_letters"):
        assert time.monotonic() < deadline + 10, breaker.log()
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)  # two more evaluations: an onset is reported once, not every second
    assert breaker.stop() == 0
    logged = [json.loads(line) for line in breaker.log().splitlines() if line.startswith("{")]
    onsets = [e for e in logged if e.get("event") == "alert.fired"]
    assert [(e["kind"], e["dead_letters"]) for e in onsets] == [("dead_letters", 1)]
    assert onsets[0]["level"] == "warning"
    assert len(sink.events("alert.fired", "dead_letters")) == 1
    assert await alerts_total(r, "dead_letters") == 1
