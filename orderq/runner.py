"""Run one stage process: connect, watch control state, stop gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import threading
from typing import Any

import structlog

from orderq import client as oq_client
from orderq import metrics
from orderq.control import Control, cancel_and_wait
from orderq.settings import Settings

log = structlog.get_logger("orderq.runner")

STOP_REPORT_S = 10.0  # a stage still running this long after SIGTERM logs where it waits
EXIT_GRACE_S = 5.0  # a stage that has stopped and still has not exited after this is made to


def exit_watchdog(stage: str, code: int = 0) -> None:
    """Once a stage has stopped (its batches acknowledged or left pending for redelivery),
    nothing may keep its process alive: a teardown that waits on something (a connection, a
    thread) would hold a deploy or `orderq up`'s restart until SIGKILL. Seen about once in ten
    test runs. A daemon thread, so it works even if the event loop itself is blocked: after
    EXIT_GRACE_S it writes every thread's stack to stderr (the next diagnosis) and exits with
    ``code`` (0 after a clean stop, 1 after a failure)."""

    def fire() -> None:
        sys.stderr.write(f"orderq: {stage} stopped but its process did not exit in {EXIT_GRACE_S:g}s; stacks:\n")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(EXIT_GRACE_S, fire)
    timer.daemon = True
    timer.start()


def _report_slow_stop(stage: str) -> None:
    """Name what a stage is waiting on when it does not stop in time (for the next diagnosis)."""
    stacks = {}
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        stacks[task.get_name()] = [f"{f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in frames]
    log.warning(f"{stage}.stop_slow", waited_s=STOP_REPORT_S, tasks=stacks)


async def run_worker(worker_cls: Any, settings: Settings, stage: str) -> None:
    r = await oq_client.connect(settings)
    control = await Control(r, stage).start()
    try:
        worker = worker_cls(r, control)
    except BaseException:
        await control.stop()
        await r.close()
        raise
    structlog.contextvars.bind_contextvars(stage=stage, worker=worker.consumer)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        worker.stop()
        loop.call_later(STOP_REPORT_S, _report_slow_stop, stage)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    reload = getattr(worker, "reload", None)
    if reload is not None:  # SIGHUP: re-read what the stage reads from files
        loop.add_signal_handler(signal.SIGHUP, reload)
    else:  # never the default action (terminate) for a stray hangup
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info(f"{stage}.sighup_ignored"))
    log.info(f"{stage}.started", worker=worker.consumer, partitions=settings.partitions)
    flusher = metrics.start_flusher(r)
    clean = False
    try:
        await worker.run()
        clean = True
    finally:
        await metrics.stop_flusher(flusher, r)
        log.info(f"{stage}.stopped", worker=worker.consumer, processed=worker.processed)
        exit_watchdog(stage, 0 if clean else 1)
        await control.stop()
        await r.close()


async def run_breaker(settings: Settings) -> None:
    from breaker.alerts import Alerts
    from breaker.controller import Breaker
    from orderq import history

    r = await oq_client.connect(settings)
    control = await Control(r, "breaker").start()
    b = Breaker(r)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, b.stopping.set)
    log.info("breaker.started", open_depth=settings.breaker_open_depth, shed_depth=settings.shed_depth)
    # The dashboard's history and the alerts: once a second each, beside the 10/s sampler.
    side = [asyncio.create_task(history.run(r, b.stopping)), asyncio.create_task(Alerts(r).run(b.stopping))]
    clean = False
    try:
        await b.run()
        clean = True
    finally:
        b.stopping.set()
        await asyncio.gather(*side, return_exceptions=True)
        exit_watchdog("breaker", 0 if clean else 1)
        await control.stop()
        await r.close()


def run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(_then_end_leftovers(coro))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_then_end_leftovers(coro))


async def _then_end_leftovers(coro: Any) -> Any:
    """Run a stage's coroutine, then end every task it left running (a library's background
    task: a connection release, a cluster topology refresh). asyncio.run would cancel each
    once and wait for it; on Python 3.11 a task in the middle of a Redis command can swallow
    that one cancel (gh-86296, see control.cancel_and_wait) and run on, holding a process
    whose stage has stopped. Here they are cancelled until they end."""
    try:
        return await coro
    finally:
        await cancel_and_wait([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
