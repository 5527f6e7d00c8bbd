"""Prometheus metrics, aggregated across every process and host.

Counters and gauges are read at scrape time from the totals the stage scripts keep
in Redis (exact, shared). Latency histograms are observed in process memory and
added to Redis once a second (one pipelined round trip), so ``/metrics`` on any
ingress shows the sum over all processes — not one process's view.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Callable, Iterable

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from orderq import circuits, connectors, keys, stats
from orderq.client import Redis
from orderq.commands import Pipe
from orderq.control import cancel_and_wait

log = structlog.get_logger("orderq.metrics")

FLUSH_S = 1.0  # how often a process adds its observations to Redis

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """Local buckets, flushed to Redis; ``label`` is one label value (e.g. a priority)."""

    def __init__(self, name: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.buckets = buckets
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, value: float, label: str = "") -> None:
        c = self.counts.get(label)
        if c is None:
            c = self.counts[label] = [0] * (len(self.buckets) + 1)
            self.sums[label] = 0.0
        c[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[label] += value

    def reset(self) -> None:
        """Forget unflushed observations (tests share one process across many runs)."""
        self.counts, self.sums = {}, {}

    def drain_into(self, pipe: Pipe) -> bool:
        if not self.counts:
            return False
        key = keys.hist_key(self.name)
        for label, counts in self.counts.items():
            for i, n in enumerate(counts):
                if n:
                    pipe.hincrby(key, f"{label}|{i}", n)
            pipe.hincrbyfloat(key, f"{label}|sum", self.sums[label])
        self.counts, self.sums = {}, {}
        return True


ACK_LATENCY = Histogram("ack_latency", ACK_BUCKETS)
E2E_LATENCY = Histogram("e2e_latency", E2E_BUCKETS)


class Counter:
    """Counts by label in process memory, added to a Redis hash with the histograms (no
    round trip where they are counted)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.counts: dict[str, int] = {}

    def inc(self, label: str, n: int = 1) -> None:
        self.counts[label] = self.counts.get(label, 0) + n

    def drain_into(self, pipe: Pipe) -> bool:
        if not self.counts:
            return False
        for label, n in self.counts.items():
            pipe.hincrby(self.key, label, n)
        self.counts = {}
        return True


OVERLOAD_REFUSED = Counter(keys.OVERLOAD_REFUSED_KEY)  # ingress admission control's 503s, by tier
CHANNEL_OUTCOMES = ("accepted", "duplicate", "shed")  # counted per channel; listed at 0 in /metrics


class ChannelCounts:
    """Orders per channel and outcome, counted in the memory of the process that takes them (an
    ingress, a connector, an import: a dict increment per order) and added to Redis with the
    histograms."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def inc(self, channel: str, outcome: str, n: int = 1) -> None:
        k = (channel, outcome)
        self.counts[k] = self.counts.get(k, 0) + n

    def drain_into(self, pipe: Pipe) -> bool:
        if not self.counts:
            return False
        for (channel, outcome), n in self.counts.items():
            pipe.hincrby(keys.CHANNEL_ORDERS_KEY, f"{channel}|{outcome}", n)
        self.counts = {}
        return True


CHANNEL_ORDERS = ChannelCounts()
PROCESS = f"{socket.gethostname()}:{os.getpid()}"
STATE_FRESH_S = 5.0  # an ingress's published state older than this is a process that is gone
_state: list[Callable[[], dict[str, float]]] = []  # this process's admission state, if an ingress


def publish_state(fn: Callable[[], dict[str, float]] | None) -> None:
    """Publish ``fn()`` (the ingress admission controller's state) with every flush."""
    _state[:] = [fn] if fn is not None else []


async def flush(r: Redis, hists: Iterable[Histogram] = (ACK_LATENCY, E2E_LATENCY)) -> None:
    pipe = r.client.pipeline(transaction=False)
    wrote = any([h.drain_into(pipe) for h in hists])
    wrote = OVERLOAD_REFUSED.drain_into(pipe) or wrote
    wrote = CHANNEL_ORDERS.drain_into(pipe) or wrote
    for fn in _state:
        doc = {**fn(), "at": time.time()}
        pipe.hset(keys.INGRESS_STATE_KEY, PROCESS, json.dumps(doc))
        wrote = True
    if wrote:
        await pipe.execute()


async def flush_forever(r: Redis) -> None:
    while True:
        await asyncio.sleep(FLUSH_S)
        try:
            await flush(r)
        except Exception as exc:  # metrics never take a stage down
            log.warning("metrics.flush_failed", error=repr(exc))


def start_flusher(r: Redis) -> asyncio.Task[None]:
    return asyncio.create_task(flush_forever(r))


async def stop_flusher(task: asyncio.Task[None], r: Redis) -> None:
    await cancel_and_wait([task])  # not one cancel: a flush in flight can swallow it (3.11)
    with contextlib.suppress(Exception):
        await flush(r)


class _Snapshot(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _histogram(
    name: str, doc: str, raw: dict[bytes, bytes], buckets: tuple[float, ...], label: str | None
) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=[label] if label else [])
    per: dict[str, dict[str, float]] = {}
    for k, v in raw.items():
        lab, _, idx = k.decode().rpartition("|")
        per.setdefault(lab, {})[idx] = float(v)
    for lab, vals in sorted(per.items()):
        cum = 0.0
        bs = []
        for i, le in enumerate((*buckets, float("inf"))):
            cum += vals.get(str(i), 0.0)
            bs.append(("+Inf" if le == float("inf") else str(le), cum))
        fam.add_metric([lab] if label else [], bs, vals.get("sum", 0.0))
    return fam


async def render(r: Redis) -> bytes:
    """The Prometheus text exposition of everything orderq knows, for any process to serve."""
    backlog, depth, t = await stats.snapshot(r)
    pipe = r.client.pipeline(transaction=False)
    pipe.hget(keys.BREAKER_KEY, "stage")
    pipe.hgetall(keys.hist_key("ack_latency"))
    pipe.hgetall(keys.hist_key("e2e_latency"))
    pipe.hgetall(keys.REASONS_KEY)
    pipe.hgetall(keys.ALERTS_COUNT_KEY)
    pipe.hgetall(keys.GIFT_OOS_KEY)
    pipe.hgetall(keys.OVERLOAD_REFUSED_KEY)
    pipe.hgetall(keys.INGRESS_STATE_KEY)
    pipe.hgetall(keys.CHANNEL_ORDERS_KEY)
    pipe.hgetall(keys.CIRCUITS_KEY)
    pipe.hgetall(keys.CIRCUIT_OPENS_KEY)
    stage_raw, ack, e2e, reasons, alerts, gifts_short, overload, ingress_state, *ops = await pipe.execute()
    by_channel, circuit_states, circuit_opens = ops
    stage = (stage_raw or b"normal").decode()
    fams: list[Metric] = []

    def counter(name: str, doc: str, value: float) -> None:
        fams.append(CounterMetricFamily(f"orderq_{name}", doc, value=value))

    counter("accepted", "Orders accepted (202)", t["accepted"])
    counter("duplicates", "Idempotent replays of a known order key", t["duplicates"])
    counter("invalid", "Orders refused by the schema (422 / invalid in a batch)", t["invalid"])
    counter("shed", "Orders refused while shedding (503)", t["shed"])
    counter("validated", "Orders validated and sent to execution", t["validated"])
    counter("rejected", "Orders rejected by validation or a reviewer", t["rejected"])
    counter("review", "Orders sent to manual review", t["review"])
    counter("held", "Orders held by a region hold", t["held"])
    counter("dead_letters", "Entries dead-lettered after too many deliveries", t["dead_letters"])
    by_reason = CounterMetricFamily("orderq_reasons", "Rejection and review reasons", labels=["reason"])
    for k, v in sorted(reasons.items()):
        by_reason.add_metric([k.decode()], float(v))
    fams.append(by_reason)
    gifts = CounterMetricFamily(
        "orderq_gift_out_of_stock",
        "Orders shipped without their gift, out of stock (a promotion running dry)",
        labels=["sku"],
    )
    for k, v in sorted(gifts_short.items()):
        gifts.add_metric([k.decode()], float(v))
    fams.append(gifts)
    executed = CounterMetricFamily("orderq_executed", "Orders executed", labels=["priority"])
    for p in keys.PRIORITIES:
        executed.add_metric([p], t[f"executed_{p}"])
    fams.append(executed)
    syncs = CounterMetricFamily("orderq_syncs", "Non-core syncs skipped or replayed by the breaker", labels=["state"])
    for state in ("deferred", "dropped", "replayed"):
        syncs.add_metric([state], t[state])
    fams.append(syncs)
    fams.append(GaugeMetricFamily("orderq_backlog", "Accepted orders not yet executed/settled", value=backlog))
    depth_g = GaugeMetricFamily("orderq_depth", "Entries per stage", labels=["stage"])
    depth_g.add_metric(["intake"], depth["intake"])
    for p in keys.PRIORITIES:
        depth_g.add_metric([f"ready_{p}"], depth["ready"][p])
    for name in ("review", "deferred", "held"):
        depth_g.add_metric([name], depth[name])
    fams.append(depth_g)
    stage_g = GaugeMetricFamily("orderq_breaker_stage", "1 for the breaker's current stage", labels=["stage"])
    for s in ("normal", "degraded", "shedding"):
        stage_g.add_metric([s], 1.0 if s == stage else 0.0)
    fams.append(stage_g)
    fired = {k.decode(): float(v) for k, v in alerts.items()}
    alerts_c = CounterMetricFamily("orderq_alerts", "Alerts fired (onsets), by kind", labels=["kind"])
    for kind in sorted(set(keys.ALERT_KINDS) | set(fired)):
        alerts_c.add_metric([kind], fired.get(kind, 0.0))
    fams.append(alerts_c)
    _lifecycle(fams, t)
    gone = _admission(fams, overload, ingress_state)
    if gone:  # processes that stopped publishing a minute ago: forget them
        await r.client.hdel(keys.INGRESS_STATE_KEY, *gone)
    _channels(fams, by_channel, r.settings.channels)
    gone = _circuits(fams, circuit_states, circuit_opens, r.settings.webhooks)
    if gone:  # dispatchers that stopped publishing a minute ago
        await r.client.hdel(keys.CIRCUITS_KEY, *gone)
    _connectors(fams, await connectors.read_all(r.client))
    fams.append(_histogram("orderq_ack_latency_seconds", "Ingress request to acknowledgement", ack, ACK_BUCKETS, None))
    fams.append(
        _histogram("orderq_e2e_latency_seconds", "Accepted to executed, by priority", e2e, E2E_BUCKETS, "priority")
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(fams))
    return generate_latest(registry)


# The order's life after execution (contract §5), counted by the scripts that move it (cancel.lua,
# event.lua): orders entering each state.
LIFECYCLE_STATES = (
    "cancelled",
    "intercepting",
    "intercepted",
    "intercept_failed",
    "shipped",
    "delivered",
    "return_requested",
    "returned",
)


def lifecycle_counts(t: dict[str, int]) -> dict[str, int]:
    """The operators' view of the life after acceptance (the dashboard's card), from the totals."""
    out = {state: t.get(state, 0) for state in LIFECYCLE_STATES}
    out["intercepts_in_flight"] = max(
        0, t.get("intercepting", 0) - t.get("intercepted", 0) - t.get("intercept_failed", 0)
    )
    out["source_conflicts"] = t.get("event_conflicts", 0)
    return out


def _lifecycle(fams: list[Metric], t: dict[str, int]) -> None:
    """Cancellations, interceptions, shipments and returns; the events reported and the ones a
    source's word contradicted; the interceptions still waiting for the warehouse's answer."""
    life = CounterMetricFamily("orderq_lifecycle", "Orders entering a state after acceptance", labels=["state"])
    for state in LIFECYCLE_STATES:
        life.add_metric([state], t.get(state, 0))
    fams.append(life)
    fams.append(
        CounterMetricFamily("orderq_order_events", "Order events applied (replays excluded)", value=t.get("events", 0))
    )
    fams.append(
        CounterMetricFamily(
            "orderq_source_conflicts",
            "Order events whose source disagreed with the public status",
            value=t.get("event_conflicts", 0),
        )
    )
    waiting = lifecycle_counts(t)["intercepts_in_flight"]
    fams.append(GaugeMetricFamily("orderq_intercepts_in_flight", "Interceptions awaiting the warehouse", value=waiting))


def _admission(fams: list[Metric], overload: dict[bytes, bytes], ingress_state: dict[bytes, bytes]) -> list[bytes]:
    """Ingress admission control (contract §6): refusals by tier, and each live ingress
    process's state as it published it at its last flush. Returns the entries of processes
    gone for a minute."""
    refused = {k.decode(): float(v) for k, v in overload.items()}
    c = CounterMetricFamily(
        "orderq_overload_refused",
        "Orders an overloaded ingress process refused (503 overloaded), by customer tier",
        labels=["tier"],
    )
    for tier in sorted({"vip", "regular"} | set(refused)):
        c.add_metric([tier], refused.get(tier, 0.0))
    fams.append(c)
    state = GaugeMetricFamily(
        "orderq_ingress_overload",
        "Per ingress process over its last second: 0 took every order, 1 refused regular/new, 2 refused VIP too",
        labels=["process"],
    )
    limit = GaugeMetricFamily(
        "orderq_ingress_inflight_limit", "Per ingress process: orders it admits in flight", labels=["process"]
    )
    capacity = GaugeMetricFamily(
        "orderq_ingress_capacity",
        "Per ingress process: orders/s it estimates it can take, what its Retry-After calendar books against",
        labels=["process"],
    )
    now = time.time()
    gone: list[bytes] = []
    for proc, raw in sorted(ingress_state.items()):
        try:
            doc = json.loads(raw)
            age = now - float(doc["at"])
            if age <= STATE_FRESH_S:
                state.add_metric([proc.decode()], float(doc["state"]))
                limit.add_metric([proc.decode()], float(doc["limit"]))
                if "capacity" in doc:
                    capacity.add_metric([proc.decode()], float(doc["capacity"]))
        except (ValueError, TypeError, KeyError):
            age = float("inf")
        if age > 60:
            gone.append(proc)
    fams += [state, limit, capacity]
    return gone


def _channels(fams: list[Metric], raw: dict[bytes, bytes], channels: Iterable[str]) -> None:
    """Orders per channel: accepted, duplicates (a known order key) and shed (503 shedding), summed
    over every process that takes orders (HTTP, connectors, file import)."""
    counts = {k.decode(): float(v) for k, v in raw.items()}
    names = set(channels) | {k.rpartition("|")[0] for k in counts}
    fam = CounterMetricFamily(
        "orderq_channel_orders", "Orders taken per channel, by outcome", labels=["channel", "outcome"]
    )
    for channel in sorted(names):
        for outcome in CHANNEL_OUTCOMES:
            fam.add_metric([channel, outcome], counts.get(f"{channel}|{outcome}", 0.0))
    fams.append(fam)


def _circuits(
    fams: list[Metric], states: dict[bytes, bytes], opens: dict[bytes, bytes], actions: Iterable[str]
) -> list[bytes]:
    """Each dispatch target's circuit: the worst state among the live dispatchers, and the times it
    opened. Returns the fields of dispatchers gone for a minute."""
    worst, gone = circuits.read(states, time.time())
    state = GaugeMetricFamily(
        "orderq_dispatch_circuit_state",
        "Per downstream action, the worst circuit among live dispatchers: 0 closed, 1 half-open, 2 open",
        labels=["action"],
    )
    for action, level in sorted(worst.items()):
        state.add_metric([action], float(level))
    opened = {k.decode(): float(v) for k, v in opens.items()}
    count = CounterMetricFamily(
        "orderq_dispatch_circuit_opens", "Times a dispatch target's circuit opened", labels=["action"]
    )
    for action in sorted(set(actions) | set(opened)):
        count.add_metric([action], opened.get(action, 0.0))
    fams += [state, count]
    return gone


def _connectors(fams: list[Metric], views: list[connectors.ConnectorView]) -> None:
    """Each pull connector (contract §7) as ``GET /v1/admin/connectors`` shows it."""
    label = ["connector"]
    lag = GaugeMetricFamily("orderq_connector_lag_seconds", "How far a connector's cursor is behind now", labels=label)
    orders = CounterMetricFamily(
        "orderq_connector_orders", "Orders a connector read, by outcome", labels=["connector", "outcome"]
    )
    errors = CounterMetricFamily("orderq_connector_errors", "Failed polls and unmappable orders", labels=label)
    success = GaugeMetricFamily(
        "orderq_connector_last_success_timestamp_seconds", "When a connector last read a window whole", labels=label
    )
    failing = GaugeMetricFamily(
        "orderq_connector_failing", "1 while a connector's last error is newer than its last success", labels=label
    )
    for v in views:
        if v.lag_s is not None:
            lag.add_metric([v.name], v.lag_s)
        for outcome in ("accepted", "duplicate", "invalid", "closed"):
            orders.add_metric([v.name, outcome], float(v.counts.get(outcome, 0)))
        errors.add_metric([v.name], float(v.counts.get("errors", 0)))
        if v.polled_at is not None:
            success.add_metric([v.name], dt.datetime.fromisoformat(v.polled_at).timestamp())
        failing.add_metric([v.name], 1.0 if v.failing else 0.0)
    fams += [lag, orders, errors, success, failing]
