"""One HTTP client per connector, and the reading of transport-level failures every platform
shares: a network fault, a 5xx or a 429 is retried (honouring ``Retry-After``); any other 4xx
gives up. Each adapter then reads its platform's own error codes inside a 200."""

from __future__ import annotations

from typing import Any

import httpx

from connect.errors import GiveUp, Retry

TIMEOUT_S = 15.0  # one platform call; a slow page is retried, not waited on for ever


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=TIMEOUT_S, headers={"User-Agent": "orderq-connect"})


def _retry_after(resp: httpx.Response) -> float | None:
    raw = resp.headers.get("Retry-After")
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


async def call(c: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    try:
        resp = await c.request(method, url, **kw)
    except httpx.HTTPError as exc:  # refused, reset, timed out: nothing was learnt, try again
        raise Retry(f"{type(exc).__name__}: {exc}", "network") from None
    if resp.status_code == 429:
        raise Retry("throttled (HTTP 429)", "429", _retry_after(resp))
    if resp.status_code >= 500:
        raise Retry(f"HTTP {resp.status_code}", str(resp.status_code), _retry_after(resp))
    if resp.status_code >= 400:
        raise GiveUp(f"HTTP {resp.status_code}: {resp.text[:200]}", str(resp.status_code))
    return resp


def json_of(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:  # a proxy's HTML error page with a 200: transient
        raise Retry(f"not JSON: {resp.text[:100]!r}", "body") from None
