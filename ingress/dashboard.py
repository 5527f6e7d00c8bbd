"""``GET /dashboard``: the operators' live page (contract §4), and its data endpoint.

One page of static files (``ingress/static/``: ``dashboard.html``, ``.css``, ``.js``),
charts drawn as SVG by the page itself, nothing fetched from the internet, no build
step. It polls ``/dashboard/data`` once a second. The stylesheet and the script are
open (``/static/dashboard.css``, ``.js``: no secret in them); the page and its data
take the admin token.

Cheap at any load and any number of viewers: the data document is computed at most
once per ``CACHE_S`` per ingress process, and concurrent viewers await the same
computation. The chart's history is sampled once a second by the breaker process
(:mod:`orderq.history`); this process keeps a copy and reads only the newest samples
on each refresh, and a page asks only for the samples it has not seen (``?since=``).

Auth: ``Authorization: Bearer $ORDERQ_ADMIN_TOKEN``, or once ``?token=…`` which sets an
HttpOnly, SameSite=Strict cookie and redirects to ``/dashboard`` (the token leaves the
address bar and the history). The cookie holds an HMAC of the admin token, not the
token: it opens the dashboard and nothing else.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ingress import responses
from ingress.http import bearer as _bearer
from ingress.responses import Refusal
from ingress.responses import retry_after as _retry_after
from orderq import connectors, deadletters, history, keys, metrics, stats
from orderq.client import UNAVAILABLE
from orderq.keys import HOLDS_KEY, REASONS_KEY

CACHE_S = 0.5  # one computation per half second per process, however many pages poll
HEAD_READ = 10  # newest samples read per refresh; more new ones than this means a gap: read all
COOKIE = "orderq_dashboard"
COOKIE_MAX_AGE_S = 12 * 3600  # one shift; then the token is asked for again
NO_STORE = {"Cache-Control": "no-store"}
STATIC = Path(__file__).resolve().parent / "static"
PAGE = (STATIC / "dashboard.html").read_text(encoding="utf-8")
DENIED = (STATIC / "denied.html").read_text(encoding="utf-8")  # {status} and {message} filled in
# Only this page's own script and style run: nothing else, from anywhere.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
ASSETS = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}  # served at /static/<name>
ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}  # revalidated: a new version shows


class Dashboard:
    def __init__(self, state: Any) -> None:
        self.s = state  # app.state: settings, redis, auth
        self.meter = stats.RateMeter()
        self.history: deque[history.Sample] = deque(maxlen=keys.HISTORY_LEN)
        self._doc: dict[str, Any] | None = None
        self._at = 0.0
        self._task: asyncio.Task[dict[str, Any]] | None = None
        admin = (state.settings.admin_token or "").encode()
        self._session = hmac.new(admin, b"orderq-dashboard-session", hashlib.sha256).hexdigest()

    # --- auth -----------------------------------------------------------------------
    def _check(self, request: Request) -> None:
        """Admin bearer token or the dashboard cookie; raises :class:`Refusal`."""
        auth = self.s.auth
        if not auth.enabled:
            return
        if _bearer(request) is not None:
            auth.admin_only(request)
            return
        cookie = request.cookies.get(COOKIE)
        if cookie and auth.admin and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return
        raise Refusal(
            401,
            "unauthorized",
            "the dashboard takes the admin token: open /dashboard?token=<ORDERQ_ADMIN_TOKEN> once, "
            "or send Authorization: Bearer <ORDERQ_ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _set_cookie(self, request: Request, response: Response) -> None:
        if self.s.auth.enabled and self.s.auth.admin:
            response.set_cookie(
                COOKIE,
                self._session,
                max_age=COOKIE_MAX_AGE_S,
                path="/dashboard",
                secure=request.url.scheme == "https",
                httponly=True,
                samesite="strict",
            )

    # --- handlers -------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        token = request.query_params.get("token")
        if token is not None:
            auth = self.s.auth
            if auth.enabled and not (auth.admin and hmac.compare_digest(token.encode(), auth.admin.encode())):
                return _denied(request, Refusal(401, "unauthorized", "the token in the address is not the admin token"))
            redirect = RedirectResponse("/dashboard", 303, headers=NO_STORE)
            self._set_cookie(request, redirect)
            return redirect
        try:
            self._check(request)
        except Refusal as r:
            return _denied(request, r)
        resp = HTMLResponse(PAGE, headers={**NO_STORE, **PAGE_HEADERS})
        if _bearer(request) is not None:
            self._set_cookie(request, resp)  # the page's own polls carry no header
        return resp

    async def data(self, request: Request) -> Response:
        try:
            self._check(request)
            since = _since(request.query_params.get("since"))
            doc = await self.document()
        except Refusal as r:
            return r.response()
        except UNAVAILABLE as exc:
            return responses.error(503, "unavailable", f"Redis: {exc}", headers=_retry_after())
        samples: list[history.Sample] = []
        for s in reversed(self.history):
            if since is not None and s["ts"] <= since:
                break
            samples.append(s)
        samples.reverse()
        newest = self.history[-1]["ts"] if self.history else None
        return responses.json({**doc, "history": samples, "history_newest": newest}, headers=NO_STORE)

    # --- the shared computation -----------------------------------------------------
    async def document(self) -> dict[str, Any]:
        """The cached document; at most one computation in flight, every caller awaits it."""
        if self._doc is not None and time.monotonic() - self._at < CACHE_S:
            return self._doc
        task = self._task
        if task is None:
            task = self._task = asyncio.create_task(self._refresh())
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)  # a viewer that goes away does not cancel the others' work

    async def _refresh(self) -> dict[str, Any]:
        try:
            doc = await self._compute()
            self._doc, self._at = doc, time.monotonic()
            return doc
        finally:
            self._task = None

    async def _compute(self) -> dict[str, Any]:
        r = self.s.redis
        doc = await stats.compute(r, self.meter)
        pipe = r.client.pipeline(transaction=False)
        pipe.lrange(keys.HISTORY_KEY, 0, (HEAD_READ if self.history else keys.HISTORY_LEN) - 1)
        pipe.hgetall(REASONS_KEY)
        pipe.hgetall(keys.ALERTS_STATE_KEY)
        pipe.hgetall(HOLDS_KEY)
        raw, reasons, alerts, holds = await pipe.execute()
        dead = await deadletters.summary(r)  # unresolved: count and the oldest few, with their error
        if not self._merge(raw, complete=len(raw) < HEAD_READ or not self.history):
            self._merge(await r.client.lrange(keys.HISTORY_KEY, 0, keys.HISTORY_LEN - 1), complete=True)
        active = []
        for k, v in sorted(alerts.items()):
            if not k.startswith(b"_"):
                active.append({"alert": k.decode(), **msgspec.json.decode(v)})
        settings = self.s.settings
        return {
            "stats": doc,
            "reasons": {k.decode(): int(v) for k, v in sorted(reasons.items(), key=lambda kv: -int(kv[1]))},
            "alerts": active,
            "holds": sorted(
                ({"province": k.decode(), **msgspec.json.decode(v)} for k, v in holds.items()),
                key=lambda h: (str(h.get("since", "")), h["province"]),
            ),
            "dead_letters": dead,
            "thresholds": {
                "open_depth": settings.breaker_open_depth,
                "close_depth": settings.breaker_close_depth,
                "shed_depth": settings.shed_depth,
                "shed_vip_depth": settings.shed_vip_depth,
            },
            "connectors": await connectors.read_all(r.client),
            "lifecycle": metrics.lifecycle_counts(await stats.totals(r)),  # cancels, shipments, returns
            "computed_at": time.time(),
        }

    def _merge(self, raw: list[bytes], complete: bool) -> bool:
        """Add the samples of ``raw`` (newest first) not seen yet; False when all must be read.

        ``complete``: ``raw`` is the whole list, so it replaces what is kept.
        """
        if not raw:
            self.history.clear()  # nothing sampled yet, or the keyspace was reset
            return True
        samples = [history.decode(x) for x in reversed(raw)]
        if complete:
            self.history.clear()
            new = samples
        else:
            last = self.history[-1]["ts"]
            if samples[-1]["ts"] < last or samples[0]["ts"] > last:
                return False  # the list went back (reset, another clock) or ran ahead of HEAD_READ
            new = [s for s in samples if s["ts"] > last]
        prev: history.Sample | None = self.history[-1] if self.history else None
        for s in new:
            self.history.append(history.with_rates(prev, s))
            prev = s
        return True


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a failure as seen: every waiter may have gone before it came."""
    if not task.cancelled():
        task.exception()


def _since(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if value != value or value in (float("inf"), float("-inf")):
        raise Refusal(422, "invalid_request", "since must be a sample time in seconds since the epoch")
    return value


def _denied(request: Request, refusal: Refusal) -> Response:
    """HTML for a browser, the contract's JSON error for anything else."""
    if "text/html" not in request.headers.get("accept", ""):
        return refusal.response()
    html = DENIED.replace("{status}", str(refusal.status)).replace("{message}", _escape(refusal.message))
    return HTMLResponse(html, refusal.status, headers={**NO_STORE, **(refusal.headers or {})})


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _asset(name: str) -> Callable[[Request], Awaitable[Response]]:
    path, media_type = STATIC / name, ASSETS[name]

    async def asset(request: Request) -> Response:
        return FileResponse(path, headers=ASSET_HEADERS, media_type=media_type)

    return asset


def routes(state: Any) -> list[Route]:
    d = Dashboard(state)
    return [
        Route("/dashboard", d.page, methods=["GET"]),
        Route("/dashboard/data", d.data, methods=["GET"]),
        *(Route(f"/static/{name}", _asset(name), methods=["GET"]) for name in ASSETS),
    ]
