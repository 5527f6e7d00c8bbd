"""A connector's state in Redis: its lease (at most one poller across processes and hosts),
its cursor (moved only by the lease holder, in one script that checks the lease: a process that
lost its lease while it read a window can never move the cursor of the one that took over), and
the counters operators read (:mod:`orderq.connectors`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from typing import Any

import structlog

from orderq import connectors as view
from orderq import keys
from orderq.client import load_lua

log = structlog.get_logger("orderq.connect")

# The scripts are orderq/lua/connect_*.lua, loaded with every other script at connect
# (orderq.client.SCRIPT_NAMES); redis-py's Script runs them by EVALSHA and loads one again
# when a restarted or promoted server lost its script cache.
TAKE, RELEASE, ADVANCE, CONFIGURED = (
    "connect_lease_take",
    "connect_lease_release",
    "connect_advance",
    "connect_configured",
)


def now_ms() -> int:
    return int(time.time() * 1000)


class Lease:
    """``SET NX PX`` with renewal by compare-and-set. ``held`` turns False as soon as a renewal
    finds the lease taken or cannot reach Redis for longer than the lease lasts."""

    def __init__(self, client: Any, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}|{uuid.uuid4().hex[:12]}"
        self.held = False
        self._valid_until = 0.0
        self._take = client.register_script(load_lua(TAKE))
        self._release = client.register_script(load_lua(RELEASE))

    async def take(self) -> bool:
        """Take or renew; False when another process holds it."""
        t0 = time.monotonic()
        try:
            ok = int(await self._take(keys=[self.key], args=[self.token, self.ttl_ms])) == 1
        except Exception as exc:  # unreachable: ours only while the last renewal lasts
            log.warning("connect.lease_unreachable", key=self.key, error=repr(exc)[:200])
            self.held = self.held and time.monotonic() < self._valid_until
            return self.held
        if ok and not self.held:
            log.info("connect.lease_taken", key=self.key, token=self.token)
        elif not ok and self.held:
            log.warning("connect.lease_lost", key=self.key)
        self.held = ok
        # Measured from before the call: the lease may have been set at any moment during it.
        self._valid_until = t0 + self.ttl_ms / 1000 * 0.9 if ok else 0.0
        return ok

    async def keep(self, stopping: asyncio.Event) -> None:
        """Renew every third of the lease until ``stopping``."""
        while not stopping.is_set():
            await self.take()
            try:
                await asyncio.wait_for(stopping.wait(), self.ttl_ms / 3000)
            except TimeoutError:
                pass

    async def release(self) -> None:
        if self.held:
            try:
                await self._release(keys=[self.key], args=[self.token])
            except Exception as exc:
                log.warning("connect.lease_release_failed", key=self.key, error=repr(exc)[:200])
        self.held = False


class ConnectorState:
    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = name
        self.lease_key = keys.connector_key(name, "lease")
        self.cursor_key = keys.connector_key(name, "cursor")
        self.state_key = keys.connector_key(name, "state")
        self.closed_key = keys.connector_key(name, "closed")
        self._advance = client.register_script(load_lua(ADVANCE))

    async def register(self, platform: str, shop: str, channel: str) -> None:
        await self.client.hset(
            self.state_key, mapping={view.PLATFORM: platform, view.SHOP: shop, view.CHANNEL: channel}
        )
        await self.listed()

    async def listed(self) -> None:
        """Keep this connector in the operators' list: repeated while it runs, so a process
        started with other connector files (:func:`configured`) does not hide one still polled."""
        await self.client.sadd(keys.CONNECTORS_KEY, self.name)

    async def cursor(self) -> int | None:
        raw = await self.client.get(self.cursor_key)
        return int(raw) if raw is not None else None

    async def advance(self, lease: Lease, cursor_ms: int) -> bool:
        """Move the cursor to ``cursor_ms`` (never back); False when the lease is no longer ours."""
        keys_ = [self.lease_key, self.cursor_key, self.state_key]
        args = [lease.token, cursor_ms, now_ms(), view.POLLED_MS, view.CLEAR_MS]
        return int(await self._advance(keys=keys_, args=args)) == 1

    async def count(self, **counts: int) -> None:
        counts = {k: v for k, v in counts.items() if v}
        if counts:
            pipe = self.client.pipeline(transaction=False)
            for k, v in counts.items():
                pipe.hincrby(self.state_key, view.COUNT_PREFIX + k, v)
            await pipe.execute()

    async def error(self, reason: str) -> None:
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.state_key, mapping={view.ERROR: reason[:500], view.ERROR_MS: now_ms()})
            pipe.hincrby(self.state_key, view.COUNT_PREFIX + "errors", 1)
            await pipe.execute()
        except Exception as exc:  # the error is logged anyway; Redis may be what failed
            log.warning("connect.state_unwritable", connector=self.name, error=repr(exc)[:200])

    async def closed(self, statuses: dict[str, str]) -> int:
        """Record orders seen cancelled, refunded or closed (order key -> platform status); the
        number not recorded before."""
        if not statuses:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for key, status in statuses.items():
            pipe.hset(self.closed_key, key, status)
        return sum(int(n) for n in await pipe.execute())


async def configured(client: Any, names: list[str]) -> int:
    """At a connect process's start: list exactly its connector files' connectors, so a removed
    or renamed one leaves ``GET /v1/admin/connectors``, the dashboard and ``/metrics``. Its
    cursor stays in Redis: added back under its name, it resumes there. Returns how many names
    left the list."""
    script = client.register_script(load_lua(CONFIGURED))
    return int(await script(keys=[keys.CONNECTORS_KEY], args=names))
