"""Alerts operators ask for (DOMAIN "What operators watch"), evaluated once a second in
the breaker process:

- ``order_surge``: orders accepted in the current window (an hour by default,
  ``ORDERQ_ALERT_WINDOW_S``) over 300 % of the mean of the previous windows;
- ``execution_lag``: the oldest entry of a ready lane is older than ``ORDERQ_ALERT_LAG_S``
  (stream ids are millisecond timestamps, so this costs one ``XRANGE … COUNT 1`` per lane);
- ``dead_letters``: the dead-letter total went up;
- ``sku_out_of_stock``: one SKU refused for lack of stock 5 times in a row (a hash the
  validate stage keeps, :data:`orderq.keys.OOS_STREAK_KEY`);
- ``ship_lag``: an executed order with no shipment ``ORDERQ_ALERT_SHIP_LAG_S`` after its
  execution (:func:`orderq.lifecycle.unshipped_late`);
- ``connector_lag``: a pull connector's cursor is more than ``ORDERQ_ALERT_CONNECTOR_LAG_S``
  behind now (:mod:`orderq.connectors`), one alert per connector.

Each condition fires once at its onset (log event ``alert.fired``, a counter for
``orderq_alerts_total{kind}``, the ``ORDERQ_ALERT_WEBHOOK`` POST) and once when it
clears (``alert.cleared``). The active set lives in Redis and changes through
HSETNX / HDEL, so a restarted breaker, or a second one on another host, never fires
an onset twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import structlog

from orderq import connectors, keys, lifecycle, stats
from orderq.client import Redis
from orderq.schema import utc_iso

log = structlog.get_logger("orderq.alerts")

EVAL_S = 1.0  # how often conditions are evaluated
SURGE_FACTOR = 3.0  # "hourly orders jump over 300 % of the mean"
SURGE_WINDOWS = 24  # previous windows averaged: a day of hours
SURGE_MIN_ORDERS = 10  # a window with fewer orders is never a surge (2 -> 7 orders at 4 a.m. is noise)
OOS_STREAK = 5  # "one SKU out of stock 5 times in a row"
DEAD_LETTER_QUIET_S = 60.0  # the dead-letter alert clears after this long without a new one
WEBHOOK_TIMEOUT_S = 2.0  # a slow receiver must not hold alerts back; failures are logged
DEAD_FIELD = "_dead_letters"  # state field (not an alert): "<total seen>,<ts of its last rise>"


@dataclass(slots=True)
class Condition:
    """One alert condition that holds now. ``id`` is unique per subject (one per SKU)."""

    id: str
    kind: str
    text: str
    details: dict[str, Any] = field(default_factory=dict)


def surge(hourly: dict[int, tuple[int, float]], current: int, accepted: int, window: int) -> Condition | None:
    """``hourly``: window index -> (accepted total, time) at the window's first sample.

    The count of a past window is the total's rise between two consecutive snapshots,
    scaled to one window (so a window the breaker missed half of still counts right).
    """
    start = hourly.get(current)
    if start is None:
        return None
    idx = sorted(i for i in hourly if i <= current)
    per_window = []
    for a, b in itertools.pairwise(idx):
        (na, ta), (nb, tb) = hourly[a], hourly[b]
        if tb > ta and nb >= na:
            per_window.append((nb - na) / (tb - ta) * window)
    per_window = per_window[-SURGE_WINDOWS:]
    if not per_window:
        return None
    mean = sum(per_window) / len(per_window)
    count = accepted - start[0]
    if mean <= 0 or count < SURGE_MIN_ORDERS or count <= SURGE_FACTOR * mean:
        return None
    pct = round(100 * count / mean)
    return Condition(
        "order_surge",
        "order_surge",
        f"{count} orders in the current {window} s window, {pct} % of the trailing mean {mean:.1f}",
        {"count": count, "mean": round(mean, 1), "percent": pct, "window_s": window, "windows": len(per_window)},
    )


class Alerts:
    """The evaluator. ``tick(now)`` evaluates once; ``run(stopping)`` loops once a second."""

    def __init__(self, r: Redis) -> None:
        self.r = r
        s = r.settings
        self.window = s.alert_window_s
        self.lag_s = s.alert_lag_s
        self.ship_lag_s = s.alert_ship_lag_s
        self.connector_lag_s = s.alert_connector_lag_s
        self.webhook = s.alert_webhook
        self.http = httpx.AsyncClient(timeout=WEBHOOK_TIMEOUT_S) if self.webhook else None
        self.sending: set[asyncio.Task[None]] = set()

    async def tick(self, now: float | None = None) -> list[dict[str, Any]]:
        """Evaluate every condition; returns the events fired and cleared this time."""
        now = time.time() if now is None else now
        t = await stats.totals(self.r)
        bucket = int(now // self.window)
        lanes = [(p, lane) for p in self.r.partitions for lane in p.lanes]
        pipe = self.r.client.pipeline(transaction=False)
        for _p, lane in lanes:
            pipe.xrange(lane, count=1)
        pipe.hgetall(keys.OOS_STREAK_KEY)
        pipe.hsetnx(keys.ALERTS_HOURLY_KEY, str(bucket), f"{t['accepted']},{now}")
        pipe.hgetall(keys.ALERTS_HOURLY_KEY)
        pipe.hgetall(keys.ALERTS_STATE_KEY)
        res = await pipe.execute()
        heads, (oos, _set, hourly_raw, state_raw) = res[: len(lanes)], res[len(lanes) :]
        state = {k.decode(): v for k, v in state_raw.items()}
        conditions: list[Condition] = []

        hourly = {}
        for k, v in hourly_raw.items():
            n, _, ts = v.decode().partition(",")
            hourly[int(k)] = (int(n), float(ts))
        c = surge(hourly, bucket, t["accepted"], self.window)
        if c:
            conditions.append(c)
        old = [str(i) for i in hourly if i < bucket - SURGE_WINDOWS - 1]

        oldest: tuple[float, str] | None = None
        for (_p, lane), entries in zip(lanes, heads, strict=True):
            if entries:
                ms = int(entries[0][0].split(b"-", 1)[0])
                age = now - ms / 1000
                if oldest is None or age > oldest[0]:
                    oldest = (age, lane.rsplit(":", 1)[1])
        if oldest is not None and oldest[0] > self.lag_s:
            age, prio = oldest
            conditions.append(
                Condition(
                    "execution_lag",
                    "execution_lag",
                    f"the oldest ready order ({prio}) has waited {age:.0f} s (threshold {self.lag_s:g} s)",
                    {"lag_s": round(age, 1), "threshold_s": self.lag_s, "priority": prio},
                )
            )

        dead = t["dead_letters"]
        seen_raw = state.pop(DEAD_FIELD, None)
        seen, rose_at = 0, 0.0
        if seen_raw:
            a, _, b = seen_raw.decode().partition(",")
            seen, rose_at = int(a), float(b)
        new_dead = max(0, dead - seen)  # a lower total means the keyspace was reset: start from it
        if new_dead:
            rose_at = now
        if new_dead or (rose_at and now - rose_at < DEAD_LETTER_QUIET_S):
            conditions.append(
                Condition(
                    "dead_letters",
                    "dead_letters",
                    f"{dead} dead letters in total ({new_dead} new): orders that failed every delivery",
                    {"dead_letters": dead, "new": new_dead},
                )
            )

        for sku_raw, n_raw in oos.items():
            n = int(n_raw)
            if n >= OOS_STREAK:
                sku = sku_raw.decode()
                conditions.append(
                    Condition(
                        f"sku_out_of_stock:{sku}",
                        "sku_out_of_stock",
                        f"SKU {sku} was out of stock {n} times in a row",
                        {"sku": sku, "streak": n},
                    )
                )

        late, oldest_s = await lifecycle.unshipped_late(self.r, now, self.ship_lag_s)
        if late:
            conditions.append(
                Condition(
                    "ship_lag",
                    "ship_lag",
                    f"{late} executed orders not shipped after {self.ship_lag_s:g} s (oldest {oldest_s:.0f} s)",
                    {"orders": late, "oldest_s": round(oldest_s, 1), "threshold_s": self.ship_lag_s},
                )
            )

        for view in await connectors.read_all(self.r.client):
            if view.lag_s is not None and view.lag_s > self.connector_lag_s:
                conditions.append(
                    Condition(
                        f"connector_lag:{view.name}",
                        "connector_lag",
                        f"connector {view.name} is {view.lag_s:.0f} s behind (threshold {self.connector_lag_s:g} s)"
                        + (f"; last error: {view.last_error}" if view.failing and view.last_error else ""),
                        {"connector": view.name, "lag_s": view.lag_s, "threshold_s": self.connector_lag_s},
                    )
                )

        events = await self._apply(conditions, state, now)
        pipe = self.r.client.pipeline(transaction=False)
        if dead != seen:
            pipe.hset(keys.ALERTS_STATE_KEY, DEAD_FIELD, f"{dead},{rose_at}")
        if old:
            pipe.hdel(keys.ALERTS_HOURLY_KEY, *old)
        if len(pipe):
            await pipe.execute()
        return events

    async def _apply(self, conditions: list[Condition], state: dict[str, bytes], now: float) -> list[dict[str, Any]]:
        """Fire the onsets, clear what no longer holds; HSETNX/HDEL decide who reports it."""
        holding = {c.id: c for c in conditions}
        onsets = [c for c in conditions if c.id not in state]
        gone = [i for i in state if i not in holding and not i.startswith("_")]
        if not onsets and not gone:
            return []
        ts = utc_iso(int(now * 1_000_000))
        pipe = self.r.client.pipeline(transaction=False)
        for c in onsets:
            doc = {"kind": c.kind, "since": ts, "text": c.text, **c.details}
            pipe.hsetnx(keys.ALERTS_STATE_KEY, c.id, msgspec.json.encode(doc))
        for i in gone:
            pipe.hdel(keys.ALERTS_STATE_KEY, i)
        res = await pipe.execute()
        events: list[dict[str, Any]] = []
        fired = [c for c, won in zip(onsets, res[: len(onsets)], strict=True) if won]
        if fired:
            pipe = self.r.client.pipeline(transaction=False)
            for c in fired:
                pipe.hincrby(keys.ALERTS_COUNT_KEY, c.kind, 1)
            await pipe.execute()
        for c in fired:
            log.warning("alert.fired", kind=c.kind, alert=c.id, text=c.text, **c.details)
            events.append(
                {"event": "alert.fired", "kind": c.kind, "alert": c.id, "ts": ts, "text": c.text, **c.details}
            )
        for i, won in zip(gone, res[len(onsets) :], strict=True):
            if not won:
                continue  # another evaluator cleared it
            kind = msgspec.json.decode(state[i]).get("kind", i.split(":", 1)[0])
            log.info("alert.cleared", kind=kind, alert=i)
            events.append({"event": "alert.cleared", "kind": kind, "alert": i, "ts": ts})
        for e in events:
            self._post(e)
        return events

    def _post(self, event: dict[str, Any]) -> None:
        if self.http is None:
            return
        task = asyncio.create_task(self._send(event))
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    async def _send(self, event: dict[str, Any]) -> None:
        assert self.http is not None and self.webhook is not None
        try:
            resp = await self.http.post(self.webhook, json=event)
            if resp.status_code >= 300:
                log.warning("alert.webhook_failed", alert=event["alert"], status=resp.status_code)
        except httpx.HTTPError as exc:
            log.warning("alert.webhook_failed", alert=event["alert"], error=repr(exc))

    async def close(self) -> None:
        """Give webhooks in flight their timeout, then close the client."""
        if self.sending:
            await asyncio.wait(set(self.sending), timeout=WEBHOOK_TIMEOUT_S + 0.5)
        if self.http is not None:
            await self.http.aclose()

    async def run(self, stopping: asyncio.Event) -> None:
        try:
            while not stopping.is_set():
                t0 = time.monotonic()
                try:
                    await self.tick()
                except Exception as exc:  # Redis away: try again next second
                    log.warning("alert.evaluate_failed", error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), max(0.0, EVAL_S - (time.monotonic() - t0)))
        finally:
            await self.close()
