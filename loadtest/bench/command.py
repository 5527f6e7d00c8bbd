"""``orderq bench`` (contract §8): find or start the instance, run the phases, write the report.

It runs against a running instance (Redis from ``ORDERQ_REDIS_URL`` or the embedded
server under ``ORDERQ_DATA_DIR``, the ingress at ``--url`` or ``ORDERQ_HTTP_HOST``/``PORT``)
or, when nothing runs (or with ``--start``), starts a private one in a temporary data
dir, stopped at the end (:mod:`loadtest.bench.instance`). The phases
(:mod:`loadtest.bench.phases`, BENCHMARKS.md explains each figure):

- ``single`` / ``batch``: the most orders/s the ingress accepts, workers paused (so the
  ingress is measured alone, like the reference it is compared with).
- ``burst``: what single/batch queued is the burst: Redis memory per queued order, then
  the workers resume and the time to drain it to backlog 0 gives executed orders/s; Redis
  memory per order once it is drained (what an executed order keeps: status record, outbox).
- ``e2e``: a fixed offered rate with every stage running: ack and end-to-end latency,
  executed orders/s, time to drain after the last order.
- ``spike`` (``--spike``): the 618 midnight surge, then an audit for lost orders.
- ``reference`` (``--reference``): the same single/batch load against
  :mod:`loadtest.benchref` on the same Redis, and the ratios ours / reference.
- ``peers`` (``--peers``): the best peer queue's no-op jobs/s on the same Redis.

Every order sent to orderq and its answer are recorded in the client-side oracle
(``loadtest/oracle.py``); after the last phase each key is looked up in Redis and the report
gives lost (acknowledged, no record), duplicated (an action applied twice, by the effect
ledger), unexpected (a refused order that was written) and recovered (an answer in doubt,
yet the order is there). With ``--cancel-share`` the e2e and spike phases also cancel a share of
their orders at random moments, and the report adds each cancel's outcome, whether every
cancelled order ended ``cancelled`` with no core action after its cancel, and whether the stock is
exactly what the orders not cancelled hold (:mod:`loadtest.bench.cancels`).

Each phase shows its progress on stderr (:mod:`orderq.progress`); stdout carries the report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec

from loadtest import series
from loadtest.bench import arguments, cancels, report
from loadtest.bench.console import say
from loadtest.bench.instance import OwnInstance, find_running
from loadtest.bench.phases import Bench
from loadtest.bench.sampler import Sampler
from orderq import audit, logs
from orderq import client as oq_client
from orderq.settings import Settings

QUIET_LOG_LEVELS = ("debug", "info")  # raised to warning while the bench runs: see main()


def main(args: argparse.Namespace, settings: Settings) -> int:
    phases = arguments.selected(args)
    arguments.check(args, settings)
    target = find_running(settings, args)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so a private instance is stopped.
    # Outside the event loop a handler raising is enough; inside it, see run().
    signal.signal(signal.SIGTERM, _interrupt)
    if settings.log_level in QUIET_LOG_LEVELS:
        # stderr is the bench's progress; the private instance's lifecycle lines (stage
        # started) would only break it up
        logs.configure(settings.log_format, "warning")
    own: OwnInstance | None = None
    if target is None:
        own = OwnInstance(settings, keep=args.keep, instructions=args.valkey_instructions)
        say(f"no running instance: starting a private one in {own.data_dir}")
        try:
            target = own.start(breaker=not ({"single", "batch", "burst"} & set(phases)))
        except BaseException:
            own.stop()
            raise
    try:
        import uvloop

        rep = uvloop.run(run(Bench(args, target, own, phases)))
    except asyncio.CancelledError:  # SIGTERM while the loop ran
        raise KeyboardInterrupt from None
    finally:
        if own is not None:
            say("stopping the private instance")
            own.stop()
    print(report.render(rep), flush=True)
    if args.json:
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(rep), indent=2) + b"\n")
        print(f"report written to {args.json}", flush=True)
    if args.html:
        from loadtest import report_html

        report_html.write(rep, args.html)
        print(f"report written to {args.html}", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def run(bench: Bench) -> dict[str, Any]:
    """Every phase of ``bench`` in the documented order, then the oracle and the audit: the report."""
    a = bench.args
    # A signal handler that raises inside a protocol callback would only kill that
    # connection: cancel the whole run instead (what asyncio.Runner does for Ctrl-C).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    bench.r = await oq_client.connect(bench.t.settings)
    bench.http = httpx.AsyncClient(base_url=bench.t.base_url, timeout=30)
    trace = series.begin(Sampler(bench.r).probe)  # backlog, stage and answers over the run, for --html
    started = time.time()
    rep: dict[str, Any] = {
        "schema": report.SCHEMA,
        "run_id": bench.run_id,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "phases_run": bench.phases,
        "config": {
            "duration_s": a.duration,
            "connections": a.connections,
            "open_connections": a.open_connections,
            "batch_size": a.batch_size,
            "batch_connections": a.batch_connections,
            "rate": a.rate,
            "spike_orders": a.spike_orders,
            "spike_seconds": a.spike_seconds,
            "max_orders": a.max_orders,
            "sample_every": a.sample_every,
            "cancel_share": a.cancel_share,
        },
        "phases": {},
    }
    try:
        rep["machine"] = await machine(bench.r)
        rep["instance"] = instance(bench)
        rep["instance"]["stock_set"] = await bench.set_stock()
        rep["instance"]["warehouses"] = a.warehouses
        before = await bench.settle("start")
        rep["instance"]["settled_at_start"] = before["settled"]
        if a.cancel_share:
            bench.stock_before = await bench.read_stock()
        if {"single", "batch", "burst"} & set(bench.phases):
            await bench.ingress_phases(rep)
        if "reference" in bench.phases:
            await bench.reference(rep)
        if "peers" in bench.phases:
            await bench.peers(rep)
        if "e2e" in bench.phases:
            await bench.e2e(rep)
        if "spike" in bench.phases:
            await bench.spike(rep)
        say(f"oracle: looking up the {len(bench.oracle.answers):,} orders sent")
        verdict = await bench.oracle.check_redis(bench.r)
        rep["oracle"] = verdict.as_dict()
        if a.cancel_share:
            say(f"cancels: checking the {len(bench.cancel_answers):,} orders cancelled, and the stock")
            rep["cancels"] = await cancels.check(
                bench.r,
                bench.cancel_answers,
                verdict.statuses,
                bench.factory.units,
                bench.stock_before,
                bench.read_stock,
            )
        say("audit")
        au = await audit.run(bench.r)
        rep["audit"] = {k: v for k, v in au.items() if not k.endswith("_keys")}
        rep["audit"]["lost_keys"] = au["lost_keys"][:20]
        if "spike" in rep["phases"]:
            rep["phases"]["spike"]["lost"] = au["lost"]
            rep["phases"]["spike"]["duplicate_effects"] = au["duplicate_effects"]
    finally:
        await trace.stop()
        await bench.http.aclose()
        await bench.r.close()
    ref = rep["phases"].get("reference") or {}
    named = [*rep["phases"].items(), *((f"reference {k}", v) for k, v in ref.items())]
    for name, d in named:
        if isinstance(d, dict) and (d.get("refused") or d.get("connection_errors")):
            bench.notes.append(
                f"{name}: {d.get('refused')} orders refused, {d.get('connection_errors')} connection errors "
                f"(statuses {d.get('statuses')}): shedding or overload, see stages_visited"
            )
    rep["series"] = trace.export()
    rep["elapsed_s"] = round(time.time() - started, 1)
    rep["summary"] = report.summary(rep)
    rep["targets"] = report.targets(rep)
    rep["notes"] = bench.notes
    return rep


def instance(bench: Bench) -> dict[str, Any]:
    """The report's ``instance``: what was measured and how it was configured."""
    s = bench.t.settings
    return {
        "mode": "started" if bench.t.own else "running",
        "ingress_url": bench.t.base_url,
        "redis_url": _safe_url(bench.r.url),
        "durability": s.durability,
        "partitions": s.partitions,
        "processes": {
            "ingress": s.ingress_processes,
            "validate": s.validate_processes,
            "execute": s.execute_processes,
        },
        "worker_batch": s.worker_batch,
        "breaker_open_depth": s.breaker_open_depth,
        "shed_depth": s.shed_depth,
    }


async def machine(r: oq_client.Redis) -> dict[str, Any]:
    """The report's ``machine``: CPU, memory, Python and the Redis server it ran on."""
    info = await r.client.info("server")
    server = "valkey" if "valkey_version" in info else "redis"
    version = info.get("valkey_version") or info.get("redis_version")
    cpu = platform.processor() or platform.machine()
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    import uvloop

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "uvloop": uvloop.__version__,
        "server": server,
        "server_version": str(version),
    }


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
