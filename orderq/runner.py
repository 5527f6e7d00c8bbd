"""The process lifecycle every stage shares, in one place.

A stage is one object (a :class:`Stage` subclass: the validate and execute workers, the
dispatcher, the breaker controller) that :func:`serve` runs in its own process:

1. start: check the settings the stage needs, connect, start the process's control mirror
   (which also registers the process in the worker registry and keeps its heartbeat), build
   the stage, log ``<stage>.started``;
2. signals: SIGTERM/SIGINT stop the stage gracefully (its batches finish or stay pending for
   redelivery), SIGHUP asks it to re-read what it reads from files;
3. work: ``run()`` until stopped; pause/resume reach the stage through the control mirror
   (:attr:`Stage.paused`);
4. graceful stop: log ``<stage>.stopped``, release the stage's own resources, leave the
   registry, close the connection, and make sure the process exits.

Tests run a stage object directly with ``run(drain=True)``: it returns once no work is left.
The ingress runs under uvicorn, which owns its loop and signals; its lifespan takes its
connection and control mirror from :func:`attached`, as :func:`serve` does.

The command line (orderq/cli.py) imports the stage classes and hands them in here, so this
package never imports a stage package.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, ClassVar, TypeVar

import structlog

from orderq import client as oq_client
from orderq import metrics
from orderq.client import Redis
from orderq.control import Control, cancel_and_wait
from orderq.settings import Settings

log = structlog.get_logger("orderq.runner")

NICE_STAGES = frozenset({"validate", "execute", "dispatch", "connect"})  # run at ORDERQ_WORKER_NICE
STOP_REPORT_S = 10.0  # a stage still running this long after SIGTERM logs where it waits
EXIT_GRACE_S = 5.0  # a stage that has stopped and still has not exited after this is made to

# Young collections every this many container allocations (CPython's default: 700). A request or
# a batch allocates thousands that reference counting frees again; a young pass only walks what
# is still alive, so rarer passes cost less in all (measured in the ingress under single orders:
# the collector 3.7 % of its samples at the default).
GC_YOUNG = 10_000
T = TypeVar("T")


class Stage:
    """One stage's work in one process: what :func:`serve` starts, signals and stops.

    A subclass names its pipeline step in ``stage``, works in :meth:`run`, and may override
    :meth:`check`, :meth:`reload`, :meth:`close` and the fields of its start and stop log lines.
    """

    stage: ClassVar[str] = ""  # the pipeline step: log event prefix, registry entry, pause target

    def __init__(self, r: Redis, control: Control | None = None, consumer: str | None = None) -> None:
        self.r = r
        self.settings = r.settings
        self.control = control
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = asyncio.Event()

    @classmethod
    def check(cls, settings: Settings) -> None:
        """Raise ConfigError when ``settings`` cannot run this stage, before it connects."""

    async def run(self, drain: bool = False) -> int:
        """Work until stopped; with ``drain``, until no work is left. Returns the work done."""
        raise NotImplementedError

    @property
    def paused(self) -> bool:
        """An operator paused this stage (POST /v1/admin/pause): take no new work."""
        return self.control is not None and self.stage in self.control.paused

    def stop(self) -> None:
        """Finish what is in hand and return from :meth:`run`."""
        self.stopping.set()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the stage is told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(0.0, seconds))

    def reload(self) -> None:
        """SIGHUP: re-read what the stage reads from files. Never the default action (which
        terminates the process) for a stray hangup."""
        log.info(f"{self.stage}.sighup_ignored")

    async def close(self) -> None:
        """Release what the stage holds beyond its connection (HTTP pools), after :meth:`run`."""

    def started_fields(self) -> dict[str, Any]:
        """Extra fields of the ``<stage>.started`` log line."""
        return {}

    def stopped_fields(self) -> dict[str, Any]:
        """Extra fields of the ``<stage>.stopped`` log line (what the process did)."""
        return {}


@contextlib.asynccontextmanager
async def attached(settings: Settings, stage: str) -> AsyncIterator[tuple[Redis, Control]]:
    """A stage process's connection and control mirror (registered as ``stage``), with its
    metrics flushed once a second; on the way out, the last metrics flushed, the registry
    entry removed and the connection closed."""
    r = await oq_client.connect(settings)
    try:
        control = await Control(r, stage).start()
    except BaseException:
        await r.close()
        raise
    flusher = metrics.start_flusher(r)
    try:
        yield r, control
    finally:
        await metrics.stop_flusher(flusher, r)
        await control.stop()
        await r.close()


async def serve(settings: Settings, stage_cls: type[Stage]) -> None:
    """``orderq <stage>``: run one stage until SIGTERM/SIGINT (exit 0), or until it fails (exit 1)."""
    name = stage_cls.stage
    stage_cls.check(settings)
    if name in NICE_STAGES and settings.worker_nice:
        # Under CPU contention (a spike on a small machine) the ingress acknowledges first: an
        # order waits in a stream for its validation far more cheaply than a channel waits for
        # its 202 (contract §6; measured in BENCHMARKS.md, "Session 6"). The breaker is not
        # among them: it must see the backlog in time.
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), settings.worker_nice))
    async with attached(settings, name) as (r, control):
        stage = stage_cls(r, control)
        structlog.contextvars.bind_contextvars(stage=name, worker=stage.consumer)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            stage.stop()
            loop.call_later(STOP_REPORT_S, _report_slow_stop, name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, stage.reload)
        log.info(f"{name}.started", worker=stage.consumer, **stage.started_fields())
        out_of_collectors_way()
        clean = False
        try:
            await stage.run()
            clean = True
        finally:
            log.info(f"{name}.stopped", worker=stage.consumer, **stage.stopped_fields())
            exit_watchdog(name, 0 if clean else 1)
            await stage.close()


def out_of_collectors_way() -> None:
    """Once a process has started: what start-up built lives as long as the process, frozen out
    of the collector's way, so its passes scan only what batches and requests allocate (measured:
    GC 4-7 -> 1.5-2.5 us per order); and young passes every :data:`GC_YOUNG` allocations."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def exit_watchdog(stage: str, code: int = 0) -> None:
    """Once a stage has stopped (its batches acknowledged or left pending for redelivery),
    nothing may keep its process alive: a teardown that waits on something (a connection, a
    thread) would hold a deploy or `orderq up`'s restart until SIGKILL. A daemon thread, so
    it works even if the event loop itself is blocked: after EXIT_GRACE_S it writes every
    thread's stack to stderr (what the next diagnosis needs) and exits with ``code`` (0 after
    a clean stop, 1 after a failure)."""

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


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a stage process's coroutine on uvloop."""
    import uvloop

    return uvloop.run(_then_end_leftovers(coro))


async def _then_end_leftovers(coro: Coroutine[Any, Any, T]) -> T:
    """Run a stage's coroutine, then end every task it left running (a library's background
    task: a connection release, a cluster topology refresh). asyncio.run would cancel each
    once and wait for it; on Python 3.11 a task in the middle of a Redis command can swallow
    that one cancel (gh-86296, see control.cancel_and_wait) and run on, holding a process
    whose stage has stopped. Here they are cancelled until they end."""
    try:
        return await coro
    finally:
        await cancel_and_wait([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])
