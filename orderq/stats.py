"""``/v1/stats`` and ``orderq status``: one computation from the counters and stream lengths.

Backlog needs no scan: processed entries are deleted in the same script that moves
an order on, so the lengths of the intake and ready streams are exactly the orders
still owed (pending entries included).
"""

from __future__ import annotations

import time
from typing import Any, TypedDict

import msgspec

from orderq import keys
from orderq.client import Redis
from orderq.keys import HOLDS_KEY

TOTALS = (
    "accepted",
    "duplicates",
    "invalid",
    "shed",
    "validated",
    "rejected",
    "review",
    "held",
    "executed",
    "dead_letters",
)
EXTRA_COUNTERS = ("executed_vip", "executed_new", "executed_regular", "deferred", "dropped", "replayed")
RATE_WINDOW_S = 5.0  # rates are averaged over this window


class Depth(TypedDict):
    """Entries waiting in each stage, summed over the partitions."""

    intake: int
    ready: dict[str, int]  # per priority lane (keys.PRIORITIES)
    review: int
    deferred: int
    held: int


class Heartbeat(msgspec.Struct):
    """A worker's entry in ``keys.WORKERS_KEY``, refreshed by its :class:`~orderq.control.Control`."""

    stage: str
    pid: int
    host: str
    ts: float = 0.0


_decode_heartbeat = msgspec.json.Decoder(Heartbeat).decode


async def backlog(r: Redis) -> tuple[int, Depth]:
    """Backlog and depth per stage in one pipelined round trip."""
    return _backlog_of(await r.run(lambda pipe: _ask_backlog(pipe, r)))


async def totals(r: Redis) -> dict[str, int]:
    pipe = r.client.pipeline(transaction=False)
    _ask_totals(pipe, r)
    return _totals_of(await pipe.execute())


async def snapshot(r: Redis) -> tuple[int, Depth, dict[str, int]]:
    """Backlog, depth and totals read in one round trip: read in two, a batch executed between
    them showed up in the totals and still in the backlog (or, the other way round, in neither)."""

    def build(pipe: Any) -> None:
        _ask_backlog(pipe, r)
        _ask_totals(pipe, r)

    res = await r.run(build)
    n = len(r.partitions)
    total, depth = _backlog_of(res[:n])
    return total, depth, _totals_of(res[n:])


def _ask_backlog(pipe: Any, r: Redis) -> None:
    """One ``backlog.lua`` call per partition (its seven lengths): one command each, where seven
    cost the breaker's and the bench's samplers seven commands' worth of Python."""
    for p in r.partitions:
        r.script(pipe, "backlog", [p.intake, *p.lanes, p.review, p.deferred, p.held], [])


def _backlog_of(res: list[Any]) -> tuple[int, Depth]:
    """From ``backlog.lua``'s replies, one per partition."""
    depth = Depth(intake=0, ready={"vip": 0, "new": 0, "regular": 0}, review=0, deferred=0, held=0)
    for lengths in res:
        intake, vip, new, regular, review, deferred, held = lengths
        depth["intake"] += intake
        depth["ready"]["vip"] += vip
        depth["ready"]["new"] += new
        depth["ready"]["regular"] += regular
        depth["review"] += review
        depth["deferred"] += deferred
        depth["held"] += held
    total = depth["intake"] + sum(depth["ready"].values())
    return total, depth


def _ask_totals(pipe: Any, r: Redis) -> None:
    for p in r.partitions:
        pipe.hgetall(p.counters)
    pipe.hgetall(keys.COUNTERS_GLOBAL)


def _totals_of(res: list[Any]) -> dict[str, int]:
    out = dict.fromkeys(TOTALS + EXTRA_COUNTERS, 0)
    for h in res:
        for k, v in h.items():
            name = k.decode()
            out[name] = out.get(name, 0) + int(v)
    return out


class RateMeter:
    """Per-second rates from counter samples kept over a short window."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, dict[str, int]]] = []

    def rates(self, now: float, t: dict[str, int]) -> dict[str, float]:
        self.samples.append((now, t))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.pop(0)
        t0, first = self.samples[0]
        dt = now - t0

        def rate(name: str) -> float:
            return round((t.get(name, 0) - first.get(name, 0)) / dt, 1) if dt > 0 else 0.0

        return {
            "accepted_per_s": rate("accepted"),
            "validated_per_s": rate("validated"),
            "executed_per_s": rate("executed"),
        }


async def compute(r: Redis, meter: RateMeter) -> dict[str, Any]:
    """The ``/v1/stats`` document (contract §4)."""
    total, depth, t = await snapshot(r)
    pipe = r.client.pipeline(transaction=False)
    pipe.hgetall(keys.BREAKER_KEY)
    pipe.hgetall(keys.WORKERS_KEY)
    pipe.smembers(keys.PAUSED_KEY)
    pipe.hgetall(HOLDS_KEY)
    breaker, workers_raw, paused, holds = await pipe.execute()
    now = time.time()
    live: list[Heartbeat] = []
    gone = []
    for wid, raw in workers_raw.items():
        w = _decode_heartbeat(raw)
        age = now - w.ts
        if age <= keys.WORKER_TTL_S:
            live.append(w)
        elif age > 60 * keys.WORKER_TTL_S:
            gone.append(wid)
    if gone:  # heartbeats of processes long dead
        await r.client.hdel(keys.WORKERS_KEY, *gone)
    live.sort(key=lambda w: (w.stage, w.host, w.pid))
    workers = [{"stage": w.stage, "pid": w.pid, "host": w.host} for w in live]
    return {
        "stage": (breaker.get(b"stage") or b"normal").decode(),
        "backlog": total,
        "depth": {
            "intake": depth["intake"],
            "ready": depth["ready"],
            "review": depth["review"],
            "deferred": depth["deferred"],
        },
        "rates": meter.rates(time.monotonic(), t),
        "totals": {k: t[k] for k in TOTALS},
        "executed_by_priority": {p: t[f"executed_{p}"] for p in keys.PRIORITIES},
        "syncs": {"deferred": t["deferred"], "dropped": t["dropped"], "replayed": t["replayed"]},
        "held": depth["held"],
        "holds": sorted(h.decode() for h in holds),
        "workers": workers,
        "paused": sorted(m.decode() for m in paused),
    }
