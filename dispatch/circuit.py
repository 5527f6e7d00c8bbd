"""A circuit breaker per downstream target: closed / open / half-open.

Closed: requests flow; ``failures`` consecutive failures open it. Open: nothing is sent
(the target's actions wait in Redis, none is lost) until the open time passes; each time
a probe fails the open time doubles, up to ``MAX_OPEN_FACTOR`` times the first. Half-open:
exactly one probe request, with its own short timeout; success closes the circuit,
failure opens it again. Pure and clock-driven, so it is tested without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
MAX_OPEN_FACTOR = 12  # ORDERQ_DISPATCH_OPEN_S=5: probes at 5, 10, 20, 40, then every 60 s
HISTORY = 64  # transitions kept for logs and tests


class Circuit:
    def __init__(self, name: str, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.threshold = failures
        self.base_open_s = open_s
        self.clock = clock
        self.state: CircuitState = CLOSED
        self.failures = 0  # consecutive, while closed
        self.open_s = open_s  # the current open period (doubles on a failed probe)
        self.open_until = 0.0
        self.probing = False
        self.opens = 0  # times it opened (a failed probe too), for /metrics
        self.history: deque[tuple[CircuitState, float]] = deque([(CLOSED, clock())], maxlen=HISTORY)

    def _move(self, state: CircuitState) -> None:
        if state != self.state:
            self.state = state
            self.history.append((state, self.clock()))

    def allowed(self, want: int) -> int:
        """How many requests may start now (of ``want``): all when closed, none when open,
        one probe when half-open. An open circuit whose time is up turns half-open here."""
        if self.state == OPEN and self.clock() >= self.open_until:
            self._move(HALF_OPEN)
            self.probing = False
        if self.state == CLOSED:
            return want
        if self.state == HALF_OPEN and not self.probing and want > 0:
            self.probing = True
            return 1
        return 0

    @property
    def half_open(self) -> bool:
        return self.state == HALF_OPEN

    def wait_s(self) -> float:
        """Seconds until a probe may go (0 unless open)."""
        return max(0.0, self.open_until - self.clock()) if self.state == OPEN else 0.0

    def success(self) -> None:
        self.failures = 0
        self.probing = False
        self.open_s = self.base_open_s
        self._move(CLOSED)

    def failure(self) -> None:
        if self.state == HALF_OPEN:  # the probe failed: open again, for longer
            self.probing = False
            self.open_s = min(self.open_s * 2, self.base_open_s * MAX_OPEN_FACTOR)
            self._open()
        elif self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open()
        # already open: requests sent before it opened report late; nothing changes

    def _open(self) -> None:
        self.failures = 0
        self.opens += 1
        self.open_until = self.clock() + self.open_s
        self._move(OPEN)

    def states(self) -> list[CircuitState]:
        """The states visited, oldest first (consecutive repeats collapsed)."""
        return [s for s, _ in self.history]
