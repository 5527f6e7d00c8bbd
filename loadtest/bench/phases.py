"""The phases of ``orderq bench`` (BENCHMARKS.md explains each figure), each a method of
:class:`Bench` that adds its section to the report, with what they share: pausing the
workers, reading counters and memory, waiting for the instance to settle."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import time
from typing import Any

import httpx

from loadtest import loadgen, series
from loadtest.bench.arguments import BENCH_WAREHOUSES
from loadtest.bench.cancels import Canceller, read_stock
from loadtest.bench.console import say, step
from loadtest.bench.instance import OwnInstance, ReferenceEndpoint, Target
from loadtest.bench.sampler import DRAIN_SAMPLE_S, Sampler
from loadtest.factory import GIFT_SKU, SKUS, OrderFactory
from loadtest.oracle import Oracle
from loadtest.recorder import Recorder, percentiles_ms, resend_report
from orderq import client as oq_client
from orderq import keys, stats
from orderq.errors import OrderqError

PAUSE_SETTLE_S = 0.7  # a worker blocked in XREADGROUP (500 ms) may still take one batch after a pause
BENCH_STOCK = 10**9  # physical stock of every bench SKU: never the reason an order waits
PRIORITIES = keys.PRIORITIES


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _closed_result(rec: Recorder, elapsed: float, connections: int, batch_size: int) -> dict[str, Any]:
    return {
        "duration_s": round(elapsed, 2),
        "connections": connections,
        "batch_size": batch_size,
        "requests": rec.requests,
        "requests_per_s": _rate(rec.requests, elapsed),
        "orders_accepted": rec.accepted,
        "orders_per_s": _rate(rec.accepted, elapsed),
        "duplicates": rec.duplicates,
        "refused": rec.refused,
        "connection_errors": rec.errors,
        "statuses": {str(k): v for k, v in sorted(rec.statuses.items())},
        "ack_ms": percentiles_ms(rec.latencies),
    }


class Bench:
    """One run: the instance under test, the orders it was sent, the notes for the report."""

    def __init__(self, args: argparse.Namespace, target: Target, own: OwnInstance | None, phases: list[str]) -> None:
        self.args = args
        self.t = target
        self.own = own
        self.phases = phases
        self.run_id = f"{int(time.time()) % 100000:05d}{secrets.token_hex(2)}"
        self.factory = OrderFactory(
            self.run_id, f"{target.host}:{target.port}", target.tokens, target.settings.channels
        )
        self.notes: list[str] = []
        self.oracle = Oracle()  # every order sent to orderq and its answer, checked at the end
        self.cancel_answers: dict[str, tuple[str, str]] = {}  # --cancel-share: key -> (moment, outcome)
        self.stock_before: dict[str, int] | None = None  # sellable per bench SKU once the start settled
        self.r: oq_client.Redis
        self.http: httpx.AsyncClient

    # --- plumbing --------------------------------------------------------------------
    async def admin(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.t.admin_token}"} if self.t.admin_token else {}
        return await self.http.request(method, path, json=body, headers=headers)

    async def pause(self, paused: bool) -> None:
        for stage in ("validate", "execute"):
            resp = await self.admin("POST", "/v1/admin/pause" if paused else "/v1/admin/resume", {"stage": stage})
            if resp.status_code != 200:
                raise OrderqError(f"{'pause' if paused else 'resume'} {stage}: HTTP {resp.status_code} {resp.text}")

    async def executed(self) -> int:
        return (await stats.totals(self.r))["executed"]

    async def used_memory(self) -> int:
        if self.t.settings.redis_cluster:  # the queue is spread over the masters: their sum
            per_node = await self.r.client.info("memory", target_nodes=self.r.client.PRIMARIES)
            return sum(int(i["used_memory"]) for i in per_node.values())
        info = await self.r.client.info("memory")
        return int(info["used_memory"])

    async def outbox_memory(self) -> int:
        """Bytes of every outbox stream and of the order copies its entries reference, with their
        counts (MEMORY USAGE, every node of each stream counted)."""
        streams = [
            name
            for p in self.r.partitions
            for name in (*(p.outbox(a) for a in keys.ACTIONS), p.order_copies, p.copy_refs)
        ]
        sizes = await self.r.run(lambda pipe: [pipe.memory_usage(s, samples=0) for s in streams])
        return sum(int(n or 0) for n in sizes)

    async def settle(self, what: str) -> dict[str, Any]:
        """Wait for backlog 0, stage normal and no deferred syncs left: the next phase starts clean."""
        t0 = time.perf_counter()
        deadline = t0 + self.args.drain_timeout
        sampler = Sampler(self.r)
        while True:
            backlog, deferred, stage = await sampler.probe()
            if backlog == 0 and deferred == 0 and stage == "normal":
                return {"settled": True, "waited_s": round(time.perf_counter() - t0, 2)}
            if time.perf_counter() > deadline:
                note = (
                    f"{what}: not settled after {self.args.drain_timeout:.0f}s "
                    f"(backlog {backlog}, deferred {deferred}, stage {stage})"
                )
                self.notes.append(note)
                say(note)
                return {"settled": False, "waited_s": round(time.perf_counter() - t0, 2)}
            await asyncio.sleep(0.2)

    async def set_stock(self) -> bool:
        skus = (*SKUS, GIFT_SKU)
        whs = BENCH_WAREHOUSES[: self.args.warehouses]
        if whs:
            resp = await self.admin("PUT", "/v1/admin/warehouses", {"warehouses": list(whs)})
            if resp.status_code != 200:
                raise OrderqError(f"PUT /v1/admin/warehouses: HTTP {resp.status_code} {resp.text}")
            await asyncio.sleep(1.5)  # every executor has the set (control state re-read each second)
            share = BENCH_STOCK // len(whs)
            items = [{"sku": s, "physical": share, "warehouse": w["id"]} for s in skus for w in whs]
        else:
            items = [{"sku": s, "physical": BENCH_STOCK} for s in skus]
        try:
            resp = await self.admin("PUT", "/v1/admin/stock", {"items": items})
        except httpx.HTTPError as exc:
            resp = None
            self.notes.append(f"stock not set: {exc}")
        if resp is not None and resp.status_code in (200, 201, 202, 204):
            return True
        if resp is not None:
            self.notes.append(
                f"PUT /v1/admin/stock answered {resp.status_code}: bench SKUs have no stock record "
                "(their orders follow ORDERQ_UNKNOWN_SKU)"
            )
        return False

    async def read_stock(self) -> dict[str, int] | None:
        """Sellable units of every bench SKU, through the contract."""
        return await read_stock(self.http, self.t.admin_token, [*SKUS, GIFT_SKU])

    async def end_to_end_ms(self, sample: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
        """End-to-end latency (executed - accepted) per priority from the sampled status records."""
        per: dict[str, list[float]] = {p: [] for p in PRIORITIES}
        outcomes: dict[str, int] = {}
        for i in range(0, len(sample), 1000):
            chunk = sample[i : i + 1000]
            pipe = self.r.client.pipeline(transaction=False)
            for key in chunk:
                pipe.hmget(self.r.partition_of(key).status(key), "s", "p", "ta", "te")
            for s, p, ta, te in await pipe.execute():
                status = (s or b"missing").decode()
                outcomes[status] = outcomes.get(status, 0) + 1
                if status == "executed" and ta and te and p:
                    per.setdefault(p.decode(), []).append((int(te) - int(ta)) / 1_000_000)
        out: dict[str, Any] = {}
        for prio, values in per.items():
            q = percentiles_ms(values)
            out[prio] = {"n": len(values), "p50": q["p50"], "p99": q["p99"], "max": q["max"]}
            out[prio]["hist"] = series.log_hist(values)  # the distribution --html plots
        return out, outcomes

    # --- phases ----------------------------------------------------------------------
    async def closed(self, label: str, batch: bool, host: str, port: int, checked: bool = True) -> dict[str, Any]:
        """A closed-loop phase; ``checked``: its orders go to orderq, into the oracle."""
        a = self.args
        size = a.batch_size if batch else 1
        conns = a.batch_connections if batch else a.connections
        rec = Recorder(per_request=size, oracle=self.oracle if checked else None)
        make = (lambda: self.factory.batch(size)) if batch else self.factory.single
        max_requests = math.ceil(a.max_orders / size) if a.max_orders else 0
        self.factory.track = checked
        try:
            with step(label, total=max_requests * size or None) as progress:
                rec.progress = progress
                elapsed = await loadgen.closed_loop(
                    host, port, conns, make, a.duration, rec, max_requests, self.factory.take_keys if checked else None
                )
        finally:
            self.factory.track = False
        return _closed_result(rec, elapsed, conns, size)

    async def offered(self, name: str, label: str, offsets: list[float], span_s: float) -> dict[str, Any]:
        """Offer ``offsets`` with every stage running; ack, drain and end-to-end figures."""
        a = self.args
        self.factory.sample = []
        self.factory.sample_every = max(1, a.sample_every)
        sampler = Sampler(self.r).start()
        executed0 = await self.executed()
        rec = Recorder(oracle=self.oracle)
        canceller = self.canceller() if a.cancel_share else None
        if canceller is not None:
            await canceller.open()
            rec.on_ack = canceller.on_ack
        self.factory.track = True
        with step(label, total=len(offsets)) as progress:
            rec.progress = progress
            try:
                elapsed = await loadgen.open_loop(
                    self.t.host,
                    self.t.port,
                    a.open_connections,
                    self.factory.single,
                    offsets,
                    rec,
                    self.factory.take_keys,
                    classify=lambda: self.factory.last_class,
                )
            finally:
                self.factory.track = False
            executed1 = await self.executed()
            t_zero = await sampler.until_zero(
                rec.last_ack, a.drain_timeout, lambda backlog: progress.note(f"backlog {backlog:,}")
            )
        executed2 = await self.executed()
        await sampler.stop()
        self.factory.sample_every = 0
        if t_zero is None:
            self.notes.append(f"{name}: backlog not 0 within {a.drain_timeout:.0f}s of the last order")
        cancels = None if canceller is None else await canceller.finish()
        e2e, outcomes = await self.end_to_end_ms(self.factory.sample)
        drain_s = None if t_zero is None else max(0.0, t_zero - rec.last_ack)
        if cancels is not None:
            # what the pipeline brought to an end, executed or cancelled before executing: the
            # throughput comparable with a run without cancels
            ended = executed2 - executed0 + cancels["outcomes"]["cancelled"] + cancels["outcomes"]["pending"]
            cancels["ended_per_s_incl_drain"] = _rate(ended, elapsed + (drain_s or 0.0))
        out = {
            "duration_s": round(elapsed, 2),
            "offered": len(offsets),
            "offered_per_s": _rate(len(offsets), span_s),
            "connections": rec.connections,
            "requests": rec.requests,
            "orders_accepted": rec.accepted,
            "accepted_per_s": _rate(rec.accepted, elapsed),
            "duplicates": rec.duplicates,
            "refused": rec.refused,
            "connection_errors": rec.errors,
            "statuses": {str(k): v for k, v in sorted(rec.statuses.items())},
            "ack_ms": percentiles_ms(rec.ack_latencies),  # 202 / 200 only
            **resend_report(rec),  # every answer, first tries, resends, per class
            "executed_per_s": _rate(executed1 - executed0, elapsed),
            "executed_total": executed2 - executed0,
            "executed_per_s_incl_drain": _rate(executed2 - executed0, elapsed + (drain_s or 0.0)),
            "drain_s": None if drain_s is None else round(drain_s, 2),
            "peak_backlog": sampler.peak(),
            "stages_visited": sampler.stages(),
            "e2e_ms": e2e,
            "sampled_outcomes": outcomes,
        }
        if cancels is not None:
            out["cancels"] = cancels
        return out

    def canceller(self) -> Canceller:
        """The cancels of one phase (``--cancel-share``); their answers go into ``cancel_answers``."""
        t = self.t
        return Canceller(self.args.cancel_share, t.host, t.port, t.tokens, t.admin_token, self.cancel_answers)

    async def ingress_phases(self, report: dict[str, Any]) -> None:
        """single + batch with the workers paused, then the burst they queued drains."""
        a = self.args
        ph = report["phases"]
        await self.pause(True)
        await asyncio.sleep(PAUSE_SETTLE_S)
        sampler = Sampler(self.r)
        backlog0, _, _ = await sampler.probe()
        mem0 = await self.used_memory()
        outbox0 = await self.outbox_memory()
        watch = Sampler(self.r).start()  # stages the breaker went through while the workers were paused
        if "single" in self.phases:
            label = f"single: {a.connections} connections for {a.duration:g}s (workers paused)"
            ph["single"] = await self.closed(label, False, self.t.host, self.t.port)
        if "batch" in self.phases:
            label = f"batch: {a.batch_size} orders per request for {a.duration:g}s (workers paused)"
            ph["batch"] = await self.closed(label, True, self.t.host, self.t.port)
        if "burst" not in self.phases:
            await watch.stop()
            if self.own is not None:
                self.own.start_breaker()
            await self.pause(False)
            await self.settle("ingress phases")
            return
        backlog1, _, _ = await sampler.probe()
        if backlog1 - backlog0 <= 0:
            await self.queue_burst()
            backlog1, _, _ = await sampler.probe()
        await watch.stop()
        mem1 = await self.used_memory()
        queued = backlog1 - backlog0
        if self.own is not None:
            self.own.start_breaker()  # not before: a paused backlog must not shed the ingress phases
        drain = Sampler(self.r, period_s=DRAIN_SAMPLE_S).start()
        executed0 = await self.executed()
        label = f"burst: {queued} orders queued; workers resumed, draining"
        count = self.own.instructions if self.own is not None else None
        if count is not None:
            assert self.own is not None and self.own.supervisor.server is not None
            assert self.own.supervisor.server.proc is not None
            await asyncio.to_thread(count.start, self.own.supervisor.server.proc.pid)
        with step(label, total=max(queued, 0), unit="orders drained") as progress:
            t0 = time.perf_counter()
            await self.pause(False)
            t_zero = await drain.until_zero(
                t0, a.drain_timeout, lambda backlog: progress.update(max(0, backlog1 - backlog))
            )
        executed1 = await self.executed()
        instructions = await asyncio.to_thread(count.stop) if count is not None else None
        await drain.stop()
        drain_s = None if t_zero is None else t_zero - t0
        if t_zero is None:
            self.notes.append(f"burst: backlog not 0 within {a.drain_timeout:.0f}s")
        ph["burst"] = {
            "orders_queued": queued,
            "redis_memory_bytes": mem1 - mem0,
            "memory_per_queued_order_bytes": round((mem1 - mem0) / queued) if queued > 0 else None,
            "drain_s": None if drain_s is None else round(drain_s, 2),
            "executed": executed1 - executed0,
            "executed_per_s": _rate(executed1 - executed0, drain_s) if drain_s else None,
            "peak_backlog": max(drain.peak(), backlog1),
            "stages_visited": list(dict.fromkeys(watch.stages() + drain.stages())),
            "stages_while_paused": watch.stages(),
        }
        if instructions is not None and executed1 > executed0:
            ph["burst"]["valkey_instructions_per_order"] = instructions // (executed1 - executed0)
        ph["burst"]["settle"] = await self.settle("burst")
        # What the drained burst still holds: every order is executed, nothing is queued; an
        # executed order keeps its status record (until its TTL) and its outbox entries (until
        # dispatched, or trimmed at ORDERQ_OUTBOX_MAXLEN).
        after = await self.used_memory() - mem0
        outbox = await self.outbox_memory() - outbox0
        ph["burst"]["memory_after_drain"] = {
            "redis_memory_bytes": after,
            "per_order_bytes": round(after / queued) if queued > 0 else None,
            "outbox_per_order_bytes": round(outbox / queued) if queued > 0 else None,
            "settled": ph["burst"]["settle"]["settled"],
        }

    async def queue_burst(self) -> None:
        """``--burst-orders`` in batches, workers paused: when single and batch queued none."""
        n, size = self.args.burst_orders, self.args.batch_size
        rec = Recorder(per_request=size, oracle=self.oracle)
        self.factory.track = True
        try:
            with step(f"burst: queueing {n} orders (workers paused)", total=math.ceil(n / size) * size) as progress:
                rec.progress = progress
                await loadgen.closed_loop(
                    self.t.host,
                    self.t.port,
                    self.args.batch_connections,
                    lambda: self.factory.batch(size),
                    3600.0,
                    rec,
                    math.ceil(n / size),
                    self.factory.take_keys,
                )
        finally:
            self.factory.track = False

    async def reference(self, report: dict[str, Any]) -> None:
        a = self.args
        ph = report["phases"]
        if self.t.settings.redis_cluster:
            ph["reference"] = {"skipped": "the reference endpoint does not speak Redis Cluster"}
            return
        stream = keys.benchref_stream(self.run_id)
        env = dict(os.environ) if self.own is None else dict(self.own.env)
        endpoint = ReferenceEndpoint(env, self.r.url, stream, self.run_id)
        try:
            await endpoint.wait_ready()
            out: dict[str, Any] = {"stream": stream}
            if "single" in self.phases:
                label = f"reference single: {a.connections} connections for {a.duration:g}s"
                out["single"] = await self.closed(label, False, "127.0.0.1", endpoint.port, checked=False)
            if "batch" in self.phases or "single" not in self.phases:
                label = f"reference batch: {a.batch_size} orders per request for {a.duration:g}s"
                out["batch"] = await self.closed(label, True, "127.0.0.1", endpoint.port, checked=False)
        finally:
            endpoint.stop()
            await self.r.client.delete(stream)
        out["cleaned"] = await self.r.client.exists(stream) == 0
        endpoint.remove_log()
        ratios: dict[str, float | None] = {}
        for kind in ("single", "batch"):
            ours, ref = ph.get(kind), out.get(kind)
            ratios[kind] = (
                round(ours["orders_per_s"] / ref["orders_per_s"], 3)
                if ours and ref and ref["orders_per_s"] > 0
                else None
            )
        out["ratios"] = ratios
        ph["reference"] = out

    async def peers(self, report: dict[str, Any]) -> None:
        """The best peer queue's no-op rate on the same Redis (loadtest/peers.py), and ours ÷ it."""
        from loadtest import peers

        ph = report["phases"]
        if self.t.settings.redis_cluster or not peers.available():
            missing = "taskiq not installed (pip install -e '.[peers]')"
            ph["peers"] = {"skipped": "Redis Cluster" if self.t.settings.redis_cluster else missing}
            return
        with step(f"peers: taskiq drains {self.args.peer_jobs:,} no-op jobs (list and stream brokers)", unit=""):
            out = await peers.best(self.r.url, self.args.peer_jobs, malloc=self.t.settings.malloc)
        cap = (ph.get("burst") or {}).get("executed_per_s")
        out["ratio_burst_executed"] = round(cap / out["best_jobs_per_s"], 2) if cap and out["best_jobs_per_s"] else None
        ph["peers"] = out

    async def e2e(self, report: dict[str, Any]) -> None:
        """A constant offered rate with every stage running."""
        a = self.args
        label = f"e2e: {a.rate:g} orders/s offered for {a.duration:g}s, every stage running"
        offsets = loadgen.constant_schedule(a.rate, a.duration)
        ph = report["phases"]["e2e"] = await self.offered("e2e", label, offsets, a.duration)
        ph["settle"] = await self.settle("e2e")

    async def spike(self, report: dict[str, Any]) -> None:
        """The 618 midnight surge; the audit at the end of the run adds its lost orders."""
        a = self.args
        label = f"spike: {a.spike_orders} orders in {a.spike_seconds:g}s, shaped as the midnight surge"
        offsets = loadgen.surge_schedule(a.spike_orders, a.spike_seconds)
        ph = report["phases"]["spike"] = await self.offered("spike", label, offsets, a.spike_seconds)
        ph["offered_peak_per_s"] = round(loadgen.surge_peak_rate(a.spike_orders, a.spike_seconds), 1)
        ph["settle"] = await self.settle("spike")
