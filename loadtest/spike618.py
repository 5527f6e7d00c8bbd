"""The 618 midnight spike as a locust LoadTestShape: a quiet warm-up, then 21,000 orders
in one minute (350 buyer streams of one order a second), then a quiet tail in which the
backlog drains. The shape drives users and time, so ``-u``, ``-r`` and ``-t`` are ignored:

    locust -f loadtest/spike618.py --headless --host http://127.0.0.1:8080 --csv out/spike618

It lives in its own file because locust applies a shape to every user class of the file
it is in. Tunable through the environment: ORDERQ_SPIKE_ORDERS (21000),
ORDERQ_SPIKE_SECONDS (60), ORDERQ_SPIKE_WARMUP_S (10), ORDERQ_SPIKE_TAIL_S (30),
ORDERQ_SPIKE_BASE_USERS (20, the orders per second outside the spike).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from locust import LoadTestShape

try:
    from loadtest.locustfile import Spike618, _env_float
except ImportError:  # run from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest.locustfile import Spike618, _env_float

SPIKE_ORDERS = _env_float("ORDERQ_SPIKE_ORDERS", 21_000)
SPIKE_S = _env_float("ORDERQ_SPIKE_SECONDS", 60)
WARMUP_S = _env_float("ORDERQ_SPIKE_WARMUP_S", 10)
TAIL_S = _env_float("ORDERQ_SPIKE_TAIL_S", 30)
BASE_USERS = int(_env_float("ORDERQ_SPIKE_BASE_USERS", 20))
SPIKE_USERS = max(1, math.ceil(SPIKE_ORDERS / SPIKE_S))  # each Spike618 user sends one order a second


class Spike618Shape(LoadTestShape):
    """23:59:50 warm-up; 00:00:00 every buyer at once for a minute; then the tail."""

    def tick(self) -> tuple[int, float, list[type]] | None:
        t = self.get_run_time()
        if t < WARMUP_S:
            return BASE_USERS, max(BASE_USERS, 1), [Spike618]
        if t < WARMUP_S + SPIKE_S:
            return SPIKE_USERS, SPIKE_USERS, [Spike618]  # all of them within about a second
        if t < WARMUP_S + SPIKE_S + TAIL_S:
            return BASE_USERS, SPIKE_USERS, [Spike618]
        return None


__all__ = ["Spike618", "Spike618Shape"]
