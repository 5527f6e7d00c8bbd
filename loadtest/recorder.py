"""What one phase of the load generator saw: every answer's latency and outcome, the open
loop's resends, and (with an oracle, ``loadtest/oracle.py``) every order key sent and its answer,
a batch's per-order results decoded for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from loadtest.oracle import BATCH_STATUS, UNKNOWN, Oracle
from orderq.progress import Progress


class BatchAck(msgspec.Struct):
    """The counts of a batch answer (the per-order ``results`` are skipped)."""

    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0
    shed: int = 0


_batch_ack = msgspec.json.Decoder(BatchAck)


class BatchResult(msgspec.Struct):
    status: str = ""


class BatchAnswer(BatchAck):
    """A batch answer with its per-order results (decoded only when an oracle records them)."""

    results: list[BatchResult] = []


_batch_answer = msgspec.json.Decoder(BatchAnswer)


@dataclass
class Recorder:
    """Latencies (seconds) and outcome counts of one phase."""

    per_request: int = 1  # orders per request (batch size)
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    requests: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused: int = 0  # shed (503) or invalid orders: a benchmark order should never be
    errors: int = 0  # connection errors
    first_send: float = 0.0
    last_ack: float = 0.0
    acks: list[tuple[float, float]] = field(default_factory=list)  # (ack time, latency), when kept
    keep_acks: bool = False

    oracle: Oracle | None = None  # every key sent and its answer, when the run is checked afterwards
    ack_latencies: list[float] = field(default_factory=list)  # 202 / 200 only (latencies: every answer)
    # open loop (resends): every answer by class as (scheduled send, latency); orders offered,
    # taken at their first try, sends again after a Retry-After, never taken (gave up)
    by_class: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    offered: int = 0
    taken_first_try: int = 0
    resent: int = 0
    not_taken: int = 0
    last_taken: float = 0.0  # when the last order was taken (perf_counter)
    refused_since: list[float] = field(default_factory=list)  # scheduled sends that were refused
    connections: int = 0  # most connections the open loop held
    progress: Progress | None = None  # counts the orders sent, when a person watches
    on_ack: Callable[[str], None] | None = None  # told each order key sent alone and acknowledged

    def add(self, latency: float, status: int, body: bytes, now: float, keys: list[str] | None = None) -> None:
        self.requests += 1
        self.latencies.append(latency)
        if status in (200, 202):
            self.ack_latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.last_ack = now
        if self.keep_acks:
            self.acks.append((now, latency))
        if self.per_request == 1:
            if status == 202:
                self.accepted += 1
            elif status == 200:
                self.duplicates += 1
            else:
                self.refused += 1
            if keys and self.oracle is not None:
                self.oracle.record_answer(keys[0], status, body)
            if keys and self.on_ack is not None and status in (200, 202):
                self.on_ack(keys[0])
        elif status == 202:
            if keys and self.oracle is not None:
                ans = _batch_answer.decode(body)
                record = self.oracle.record
                if len(ans.results) == len(keys):
                    for k, res in zip(keys, ans.results, strict=True):
                        record(k, BATCH_STATUS.get(res.status, UNKNOWN))
                else:
                    for k in keys:
                        record(k, UNKNOWN)
            else:
                ans = _batch_ack.decode(body)
            self.accepted += ans.accepted
            self.duplicates += ans.duplicates
            self.refused += ans.invalid + ans.shed
        else:
            self.refused += self.per_request
            if keys and self.oracle is not None:
                self.oracle.record_batch(keys, status, body)

    def lost_answer(self, keys: list[str] | None) -> None:
        """A request that got no answer (connection error): its orders are in doubt."""
        self.errors += 1
        if keys and self.oracle is not None:
            for k in keys:
                self.oracle.record(k, UNKNOWN)


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies in seconds, as milliseconds."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[max(0, math.ceil(p * len(s)) - 1)] * 1000, 2)

    return {
        "p50": q(0.50),
        "p95": q(0.95),
        "p99": q(0.99),
        "max": round(s[-1] * 1000, 2),
        "mean": round(sum(s) / len(s) * 1000, 2),
    }


def resend_report(rec: Recorder) -> dict[str, Any]:
    """What an open loop with resends saw (contract §8): every answer's latency (202
    and 503 alike), the share of orders taken at their first try, the resends, how long until
    every offered order was taken (from the first scheduled send; None while any was not),
    and the answer latency per class while the server refused (the window from the first to
    the last refused send; the whole phase when nothing was refused)."""
    out: dict[str, Any] = {
        "answer_ms": percentiles_ms(rec.latencies),
        "orders_offered": rec.offered,
        "taken_first_try_share": round(rec.taken_first_try / rec.offered, 4) if rec.offered else None,
        "resends": rec.resent,
        "not_taken": rec.not_taken + rec.errors,
        "all_taken_s": (
            round(rec.last_taken - rec.first_send, 2)
            if rec.offered and rec.last_taken and not rec.not_taken and not rec.errors
            else None
        ),
    }
    window = (min(rec.refused_since), max(rec.refused_since)) if rec.refused_since else None
    out["refusing_s"] = None if window is None else [round(t - rec.first_send, 2) for t in window]
    by: dict[str, Any] = {}
    for cls, pairs in sorted(rec.by_class.items()):
        values = [lat for since, lat in pairs if window is None or window[0] <= since <= window[1]]
        if values:
            q = percentiles_ms(values)
            by[cls or "-"] = {"n": len(values), "p50": q["p50"], "p99": q["p99"], "max": q["max"]}
    out["answer_ms_by_class"] = by
    return out
