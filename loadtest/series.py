"""The time series of an ``orderq bench`` run that its HTML report plots
(:mod:`loadtest.report_html`), recorded while the bench runs:

- the backlog, deferred syncs and breaker stage, sampled every :data:`SAMPLE_S` by a probe the
  bench passes in (its ``Sampler.probe``: one pipelined round trip);
- every answer the load generator got, by second of the run and HTTP status (``0``: no
  answer, a connection error);
- ack latency per load (one :class:`loadtest.recorder.Recorder`, i.e. one phase) and per customer
  class as sent (``vip`` / ``new`` / ``regular``; ``batch`` for a batch request), as counts per
  logarithmic latency bin (:data:`BINS_PER_DECADE` bins per decade of seconds).

The bench opens a :class:`Trace` with :func:`begin`; the load generator finds it through a
context variable (no argument threaded through every phase) and calls :meth:`Trace.answer`
once per answer: a few dictionary increments, no allocation per request beyond them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import math
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

SAMPLE_S = 0.25  # backlog / stage sampling period of the whole run
BINS_PER_DECADE = 20  # latency histogram resolution: bin k holds [10^(k/20), 10^((k+1)/20)) seconds
MIN_LATENCY_S = 1e-6
# Bin edges from 1 µs to 1000 s, for a bisect per answer (cheaper than a logarithm in the
# load generator's loop): index i of bisect_right holds bin FIRST_BIN + i - 1.
FIRST_BIN = -6 * BINS_PER_DECADE
EDGES = [10 ** (k / BINS_PER_DECADE) for k in range(FIRST_BIN, 3 * BINS_PER_DECADE + 1)]
CLASSES = ("vip", "new", "regular", "batch")

TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("orderq_bench_trace", default=None)

Probe = Callable[[], Awaitable[tuple[int, int, str]]]  # -> (backlog, deferred syncs, breaker stage)


def latency_bin(seconds: float) -> int:
    return math.floor(math.log10(max(seconds, MIN_LATENCY_S)) * BINS_PER_DECADE)


def log_hist(values: list[float]) -> dict[str, int]:
    """Latencies in seconds as counts per logarithmic bin (keys are bin numbers, as text for JSON)."""
    out: dict[str, int] = {}
    for v in values:
        k = str(latency_bin(v))
        out[k] = out.get(k, 0) + 1
    return out


# A single-order request of :class:`loadtest.factory.OrderFactory` names its customer as
# ``"customer":{"id":"v…`` (VIP), ``n…`` (a new customer) or ``c…`` (a returning one): the
# byte after this prefix is the class.
_CUSTOMER = b'"customer":{"id":"'
_AT = len(_CUSTOMER)
_CLASS_OF = {ord("v"): "vip", ord("n"): "new", ord("c"): "regular"}


def request_class(request: bytes) -> str:
    """The customer class of a single-order request built by the bench's order factory."""
    i = request.find(_CUSTOMER)
    return _CLASS_OF.get(request[i + _AT], "regular") if i >= 0 else "regular"


class _Load:
    """The answers one recorder (one phase) got: ack latency counts per class and bin index."""

    __slots__ = ("answered", "batch", "by_byte", "end", "hists", "per_request", "start")

    def __init__(self, start: float, per_request: int) -> None:
        self.start = self.end = start
        self.per_request = per_request
        self.batch = per_request > 1
        self.answered = 0
        self.hists: dict[str, list[int]] = {c: [0] * (len(EDGES) + 1) for c in CLASSES}
        # each class's counts by the byte that names it (request_class inlined in Trace.answer)
        self.by_byte = {b: self.hists[c] for b, c in _CLASS_OF.items()}


class Trace:
    def __init__(self, probe: Probe | None = None, period_s: float = SAMPLE_S) -> None:
        self.t0 = time.perf_counter()
        self.probe = probe
        self.period_s = period_s
        self.samples: list[tuple[float, int, int, str]] = []  # (t, backlog, deferred, stage)
        self.answers: dict[int, list[int]] = {}  # status -> answers in each second of the run
        self.loads: list[_Load] = []
        self._recorders: dict[int, tuple[weakref.ref[Any], _Load]] = {}
        self._recorder: Any = None  # the recorder of the last answer, and its load
        self._load: _Load | None = None
        self._task: asyncio.Task[None] | None = None
        self._token: contextvars.Token[Trace | None] | None = None
        self.error: str | None = None

    def answer(self, recorder: Any, now: float, status: int, latency: float, request: bytes) -> None:
        """One answer (``status`` 0: none) to ``request``, recorded by ``recorder``. Called by
        the load generator for every answer: kept to a few dictionary and list operations."""
        load = self._load if recorder is self._recorder else self._switch(recorder, now)
        assert load is not None
        load.end = now
        counts = self.answers.get(status)
        if counts is None:
            counts = self.answers[status] = []
        sec = max(0, int(now - self.t0))
        if sec >= len(counts):
            counts.extend([0] * (sec + 1 - len(counts)))
        counts[sec] += 1
        if status:
            load.answered += 1
            if load.batch:
                hist = load.hists["batch"]
            else:
                i = request.find(_CUSTOMER)
                hist = load.by_byte.get(request[i + _AT]) if i >= 0 else None
                if hist is None:
                    hist = load.hists["regular"]
            hist[bisect.bisect_right(EDGES, latency)] += 1

    def _switch(self, recorder: Any, now: float) -> _Load:
        """The load of ``recorder``: a new one unless it answered before (ids are reused
        once a recorder is gone, hence the weak reference)."""
        entry = self._recorders.get(id(recorder))
        if entry is not None and entry[0]() is recorder:
            load = entry[1]
        else:
            load = _Load(now, getattr(recorder, "per_request", 1))
            self.loads.append(load)
            self._recorders[id(recorder)] = (weakref.ref(recorder), load)
        self._recorder, self._load = recorder, load
        return load

    async def _sample(self) -> None:
        assert self.probe is not None
        while True:
            t = time.perf_counter()
            try:
                backlog, deferred, stage = await self.probe()
                self.samples.append((t, backlog, deferred, stage))
            except Exception as exc:  # a lost sample is not worth the run
                self.error = repr(exc)
            await asyncio.sleep(max(0.0, self.period_s - (time.perf_counter() - t)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._token is not None:
            with contextlib.suppress(ValueError):  # stopped from another context
                TRACE.reset(self._token)
            self._token = None

    def export(self) -> dict[str, Any]:
        """The report's ``series``: times in seconds from the start of the run."""
        t0 = self.t0
        seconds = max((len(c) for c in self.answers.values()), default=0)
        return {
            "sample_s": self.period_s,
            "bins_per_decade": BINS_PER_DECADE,
            "timeline": {
                "t": [round(t - t0, 3) for t, _b, _d, _s in self.samples],
                "backlog": [b for _t, b, _d, _s in self.samples],
                "deferred": [d for _t, _b, d, _s in self.samples],
                "stage": [s for _t, _b, _d, s in self.samples],
            },
            "answers_per_s": {str(s): c + [0] * (seconds - len(c)) for s, c in sorted(self.answers.items())},
            "loads": [
                {
                    "start": round(ld.start - t0, 3),
                    "end": round(ld.end - t0, 3),
                    "per_request": ld.per_request,
                    "requests": ld.answered,
                    "ack_hist": {
                        c: {str(FIRST_BIN + i - 1): n for i, n in enumerate(h) if n}
                        for c, h in ld.hists.items()
                        if any(h)
                    },
                }
                for ld in self.loads
            ],
        }


def begin(probe: Probe | None = None, period_s: float = SAMPLE_S) -> Trace:
    """Open a trace for the current task (and the tasks it starts) and start sampling ``probe``."""
    trace = Trace(probe, period_s)
    trace._token = TRACE.set(trace)
    if probe is not None:
        trace._task = asyncio.create_task(trace._sample())
    return trace
