"""Each dispatch target's circuit (dispatch/circuit.py) as operators see it in ``/metrics``.

Every dispatcher process has its own circuit per action; it writes their states to one hash,
a field per action and process, at once when one changes and once a second besides (so a
process that is gone stops counting after :data:`FRESH_S`), and adds the times each opened to
a shared counter. Any ingress reads them. Here in ``orderq/`` because the ingress never imports
the dispatch stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol

import structlog

from orderq import keys

log = structlog.get_logger("orderq.dispatch")

PUBLISH_S = 1.0  # how often a dispatcher rewrites its circuits' states, changed or not
FRESH_S = 5.0  # a state older than this is a dispatcher that is gone: not shown
FORGET_S = 60.0  # ... and older than this, deleted by the reader
LEVELS = {"closed": 0, "half_open": 1, "open": 2}  # the gauge's value per state: worse is higher


class Watched(Protocol):
    """What is published of a circuit: its state and how many times it opened."""

    @property
    def state(self) -> str: ...

    @property
    def opens(self) -> int: ...


class CircuitBoard:
    """One dispatcher process's circuits, by action, published by :meth:`run`."""

    def __init__(self, client: Any, circuits: Mapping[str, Watched], process: str | None = None) -> None:
        self.client = client
        self.circuits = circuits
        self.process = process or f"{socket.gethostname()}:{os.getpid()}"
        self.changed = asyncio.Event()  # set by the dispatcher when a circuit moves: published at once
        self._opens = dict.fromkeys(circuits, 0)  # opens already added to the shared counter

    async def publish(self) -> None:
        now = f"{time.time():.3f}"
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(
            keys.CIRCUITS_KEY,
            mapping={f"{a}|{self.process}": f"{c.state}|{now}" for a, c in self.circuits.items()},
        )
        opened = {a: c.opens - self._opens[a] for a, c in self.circuits.items() if c.opens > self._opens[a]}
        for action, n in opened.items():
            pipe.hincrby(keys.CIRCUIT_OPENS_KEY, action, n)
        await pipe.execute()
        for action, n in opened.items():
            self._opens[action] += n

    async def run(self) -> None:
        """Publish on every change and once a second, until cancelled; Redis away is logged, not fatal."""
        while True:
            self.changed.clear()
            try:
                await self.publish()
            except Exception as exc:
                log.warning("dispatch.circuits_unpublished", error=repr(exc)[:200])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), PUBLISH_S)

    async def retire(self) -> None:
        """On the way out: the last opens counted, this process's states removed (its circuits
        end with it; a successor starts closed)."""
        try:
            await self.publish()
            await self.client.hdel(keys.CIRCUITS_KEY, *(f"{a}|{self.process}" for a in self.circuits))
        except Exception as exc:
            log.warning("dispatch.circuits_unpublished", error=repr(exc)[:200])


def read(raw: Mapping[bytes, bytes], now: float) -> tuple[dict[str, int], list[bytes]]:
    """Per action, the worst :data:`LEVELS` among the processes that published within
    :data:`FRESH_S`; and the fields of processes gone for :data:`FORGET_S`, to delete."""
    worst: dict[str, int] = {}
    gone: list[bytes] = []
    for field, value in raw.items():
        action = field.decode().rpartition("|")[0]
        state, _, at = value.decode().partition("|")
        try:
            age = now - float(at)
        except ValueError:
            age = float("inf")
        if age > FORGET_S:
            gone.append(field)
        if age <= FRESH_S and state in LEVELS and action:
            worst[action] = max(worst.get(action, 0), LEVELS[state])
    return worst, gone
