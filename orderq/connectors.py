"""The state of each pull connector as operators see it (``GET /v1/admin/connectors``): written
by the ``orderq connect`` process that holds the connector's lease, read by the ingress. Here in
``orderq/`` because the ingress never imports the connect stage.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from orderq import keys
from orderq.schema import utc_iso

# Fields of the state hash (keys.connector_key(name, "state")); counters are "n:<what>".
PLATFORM, SHOP, CHANNEL, OWNER = "platform", "shop", "channel", "owner"
POLLED_MS = "polled_ms"  # when the last window was read whole
ERROR, ERROR_MS = "error", "error_ms"  # the last error, and when (kept after it clears, for the record)
CLEAR_MS = "ok_ms"  # when a call last succeeded: an error older than this is over
COUNT_PREFIX = "n:"
COUNTS = ("accepted", "duplicate", "invalid", "closed", "windows", "pages", "retries", "errors")


class ConnectorView(msgspec.Struct):
    name: str
    platform: str
    shop: str
    channel: str
    cursor: str | None  # every order modified before this is queued (UTC)
    lag_s: float | None  # how far the cursor is behind now
    polled_at: str | None
    owner: str | None  # the process polling it (host:pid), None when no process holds its lease
    last_error: str | None
    last_error_at: str | None
    failing: bool  # the last error is newer than the last success
    counts: dict[str, int]


def _s(h: dict[bytes, bytes], name: str) -> str | None:
    v = h.get(name.encode())
    return v.decode() if v is not None else None


def _ms(h: dict[bytes, bytes], name: str) -> int | None:
    v = h.get(name.encode())
    return int(v) if v is not None else None


def view(name: str, h: dict[bytes, bytes], cursor: bytes | None, lease: bytes | None, now_ms: int) -> ConnectorView:
    cursor_ms = int(cursor) if cursor else None
    error_ms, ok_ms = _ms(h, ERROR_MS), _ms(h, CLEAR_MS)
    polled = _ms(h, POLLED_MS)
    return ConnectorView(
        name=name,
        platform=_s(h, PLATFORM) or "",
        shop=_s(h, SHOP) or "",
        channel=_s(h, CHANNEL) or "",
        cursor=utc_iso(cursor_ms * 1000) if cursor_ms is not None else None,
        lag_s=round(max(0, now_ms - cursor_ms) / 1000, 3) if cursor_ms is not None else None,
        polled_at=utc_iso(polled * 1000) if polled is not None else None,
        owner=lease.decode().rpartition("|")[0] if lease else None,
        last_error=_s(h, ERROR),
        last_error_at=utc_iso(error_ms * 1000) if error_ms is not None else None,
        failing=error_ms is not None and (ok_ms is None or error_ms > ok_ms),
        counts={k: int(_s(h, COUNT_PREFIX + k) or 0) for k in COUNTS},
    )


async def read_all(client: Any) -> list[ConnectorView]:
    """Every configured connector, by name. A few commands per connector: a handful exist."""
    names = sorted(n.decode() for n in await client.smembers(keys.CONNECTORS_KEY))
    out = []
    for name in names:
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(keys.connector_key(name, "state"))
        pipe.get(keys.connector_key(name, "cursor"))
        pipe.get(keys.connector_key(name, "lease"))
        h, cursor, lease = await pipe.execute()
        out.append(view(name, h, cursor, lease, int(time.time() * 1000)))
    return out
