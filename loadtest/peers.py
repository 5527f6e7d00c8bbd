"""The best peer queue's no-op rate, on the same Redis: the bar orderq's end-to-end rate is set
against ("faster than any Python job queue on the same Redis").

taskiq (the fastest Python queue measured here) with ``taskiq-redis``: ``--jobs`` no-op tasks are
queued first, then one ``taskiq worker`` process drains them; the rate is jobs ÷ time from the
first job taken to the queue empty (the worker's start-up is not counted). Two brokers: ``list``
(``ListQueueBroker``: BRPOP, at-most-once) and ``stream`` (``RedisStreamBroker``: consumer group,
acknowledged after the task ran — the delivery guarantee closest to orderq's). Optional: needs the
``peers`` extra (``pip install -e '.[peers]'``); ``orderq bench`` reports it when installed.

    python -m loadtest.peers --url redis://127.0.0.1:6379 --jobs 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

from orderq.server import jemalloc_env
from orderq.settings import Malloc, Settings

QUEUE = "orderq-peer-bench"  # list / stream name, deleted before and after a run
URL_ENV, BROKER_ENV = "ORDERQ_PEER_REDIS_URL", "ORDERQ_PEER_BROKER"


def make_broker(kind: str, url: str) -> Any:
    from taskiq_redis import ListQueueBroker, RedisStreamBroker

    if kind == "stream":
        return RedisStreamBroker(url, queue_name=QUEUE, consumer_group_name=QUEUE)
    return ListQueueBroker(url, queue_name=QUEUE)


def _worker_broker() -> Any:
    """The broker ``taskiq worker loadtest.peers:broker`` imports (its task registered on it)."""
    b = make_broker(os.environ.get(BROKER_ENV, "list"), os.environ.get(URL_ENV, "redis://127.0.0.1:6379"))
    b.register_task(noop, task_name="noop")
    return b


async def noop() -> None:
    return None


def __getattr__(name: str) -> Any:  # the worker's broker only when the worker asks for it
    if name == "broker":
        return _worker_broker()
    raise AttributeError(name)


async def _remaining(r: Any, kind: str) -> int:
    if kind == "list":
        return int(await r.llen(QUEUE))
    groups = await r.xinfo_groups(QUEUE)
    return sum(int(g.get("lag") or 0) + int(g.get("pending") or 0) for g in groups) if groups else 0


async def run(url: str, kind: str, jobs: int, malloc: Malloc, timeout: float = 300.0) -> dict[str, Any]:
    import redis.asyncio as aioredis

    r = aioredis.from_url(url)
    broker = make_broker(kind, url)
    task = broker.register_task(noop, task_name="noop")
    try:
        await r.delete(QUEUE)
        await broker.startup()
        for start in range(0, jobs, 500):
            await asyncio.gather(*(task.kiq() for _ in range(min(500, jobs - start))))
        queued = await _remaining(r, kind)
        # the worker on the allocator orderq's own stages run on (ORDERQ_MALLOC): the same footing
        env = {**jemalloc_env(malloc, os.environ), URL_ENV: url, BROKER_ENV: kind}
        cmd = [sys.executable, "-m", "taskiq", "worker", "loadtest.peers:broker", "--workers", "1"]
        cmd += ["--log-level", "WARNING"]
        worker = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + timeout
            while await _remaining(r, kind) >= queued:  # start-up: nothing taken yet
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"taskiq worker did not start: {worker.stderr.read().decode()[-500:]}")
                await asyncio.sleep(0.005)
            t0 = time.monotonic()
            while (left := await _remaining(r, kind)) > 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"taskiq worker still has {left} jobs after {timeout} s")
                await asyncio.sleep(0.005)
            elapsed = time.monotonic() - t0
        finally:
            worker.terminate()
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
            if worker.stderr is not None:
                worker.stderr.close()
        return {"queue": "taskiq", "broker": kind, "jobs": queued, "jobs_per_s": round(queued / elapsed, 1)}
    finally:
        await broker.shutdown()
        await r.delete(QUEUE)
        await r.aclose()


async def best(url: str, jobs: int, malloc: Malloc) -> dict[str, Any]:
    """Both brokers, one after the other; the faster is the bar."""
    runs = [await run(url, kind, jobs, malloc=malloc) for kind in ("list", "stream")]
    return {"runs": runs, "best_jobs_per_s": max(x["jobs_per_s"] for x in runs)}


def available() -> bool:
    try:
        import taskiq  # noqa: F401
        import taskiq_redis  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=os.environ.get("ORDERQ_REDIS_URL", "redis://127.0.0.1:6379"))
    ap.add_argument("--jobs", type=int, default=20000)
    args = ap.parse_args()
    if not available():
        sys.exit("taskiq is not installed: pip install -e '.[peers]'")
    print(json.dumps(asyncio.run(best(args.url, args.jobs, Settings.from_env().malloc))))


if __name__ == "__main__":
    main()
