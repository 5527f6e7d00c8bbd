"""History for the dashboard's chart: the breaker process appends one compact sample a
second (stage, backlog, depth per stage, totals) to a capped Redis list.

Every ingress then serves the last ten minutes without keeping a sampler of its own,
a restarted ingress shows the whole chart at once, and the chart costs one LPUSH a
second however many pages watch it. Rates are not stored: they are the deltas of the
totals between two samples (:func:`with_rates`), so a missed second costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import NotRequired, TypedDict

import msgspec
import structlog

from orderq import keys, stats
from orderq.client import Redis

log = structlog.get_logger("orderq.history")

SAMPLE_S = 1.0  # one chart point a second: smooth at a glance, 600 points for ten minutes
LOCK_MS = 900  # a little under the period, so the next second's sample is never refused
TOTALS = ("accepted", "validated", "executed", "rejected", "review", "dead_letters")
RATES = ("accepted", "validated", "executed", "rejected")  # per-second rates the chart draws


class SampleDepth(TypedDict):
    intake: int
    vip: int
    new: int
    regular: int
    review: int
    deferred: int


class Sample(TypedDict):
    """One chart point as stored (JSON, newest first in ``keys.HISTORY_KEY``) and served."""

    ts: float
    stage: str
    backlog: int
    depth: SampleDepth
    totals: dict[str, int]  # the TOTALS counters
    rates: NotRequired[dict[str, float]]  # added when served (:func:`with_rates`), never stored


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Sample).decode


async def take(r: Redis, now: float | None = None) -> Sample:
    """One sample of the stage, the backlog, the depth per stage and the totals."""
    total, depth, t = await stats.snapshot(r)
    stage = await r.client.hget(keys.BREAKER_KEY, "stage")
    ready = depth["ready"]
    return Sample(
        ts=round(time.time() if now is None else now, 3),
        stage=(stage or b"normal").decode(),
        backlog=total,
        depth=SampleDepth(
            intake=depth["intake"],
            vip=ready["vip"],
            new=ready["new"],
            regular=ready["regular"],
            review=depth["review"],
            deferred=depth["deferred"],
        ),
        totals={k: t[k] for k in TOTALS},
    )


async def record(r: Redis, sample: Sample) -> bool:
    """Append ``sample`` unless another process sampled less than ``LOCK_MS`` ago."""
    if not await r.client.set(keys.HISTORY_LOCK, b"1", nx=True, px=LOCK_MS):
        return False  # a second breaker process (another host) already sampled this second
    pipe = r.client.pipeline(transaction=False)
    pipe.lpush(keys.HISTORY_KEY, _encode(sample))
    pipe.ltrim(keys.HISTORY_KEY, 0, keys.HISTORY_LEN - 1)
    await pipe.execute()
    return True


def decode(raw: bytes) -> Sample:
    return _decode(raw)


def with_rates(prev: Sample | None, sample: Sample) -> Sample:
    """``sample`` plus ``rates`` per second from the totals' deltas since ``prev``."""
    rates = dict.fromkeys(RATES, 0.0)
    if prev is not None:
        dt = sample["ts"] - prev["ts"]
        if dt > 0:
            a, b = prev["totals"], sample["totals"]
            for k in RATES:
                # A counter that went down was reset (keyspace flushed): no rate, not a negative one.
                rates[k] = round(max(0, b.get(k, 0) - a.get(k, 0)) / dt, 1)
    sample["rates"] = rates
    return sample


async def run(r: Redis, stopping: asyncio.Event) -> None:
    """Sample once a second until ``stopping`` is set; Redis errors skip a sample, never stop it."""
    while not stopping.is_set():
        t0 = time.monotonic()
        try:
            await record(r, await take(r))
        except Exception as exc:
            log.warning("history.sample_failed", error=repr(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), max(0.0, SAMPLE_S - (time.monotonic() - t0)))
