"""The ingress application and its server (uvicorn, uvloop, httptools)."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from ingress import admin, dashboard, openapi, responses
from ingress.admission import Admission
from ingress.channels import ChannelHandlers, load_mappings
from ingress.committer import Committer
from ingress.limits import BodyLimit
from ingress.ratelimit import Limiter
from ingress.routes import Auth, Handlers
from ingress.shopify import ShopifyHandler
from orderq import client as oq_client
from orderq import metrics
from orderq.control import Control
from orderq.settings import Settings
from orderq.stats import RateMeter

log = structlog.get_logger("orderq.ingress")


def build_app(settings: Settings) -> Any:
    state = SimpleNamespace(settings=settings, auth=Auth(settings), meter=RateMeter())
    state.admission = Admission(settings.ack_target_ms)  # overload control (contract §6), started below
    h = Handlers(state)
    mappings = load_mappings(settings)  # compiled once; a broken file stops start-up (ConfigError)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.redis = await oq_client.connect(settings)
        state.control = await Control(state.redis, "ingress").start()
        state.committer = Committer(state.redis)
        state.limiter = Limiter(state.redis)
        state.admission.start()
        flusher = metrics.start_flusher(state.redis)
        if not settings.auth:
            log.warning("ingress.auth_off", message="ORDERQ_AUTH=off: every request is accepted without a token")
        log.info("ingress.started", redis=_safe_url(state.redis.url), durability=settings.durability)
        try:
            yield
        finally:
            await state.committer.close()
            state.admission.stop()
            await metrics.stop_flusher(flusher, state.redis)
            await state.control.stop()
            await state.redis.close()

    routes = [
        Route("/v1/orders", h.post_order, methods=["POST"]),
        Route("/v1/orders/batch", h.post_batch, methods=["POST"]),
        Route("/v1/orders/{channel}/{order_id}", h.get_order, methods=["GET"]),
        Route("/v1/stats", h.get_stats, methods=["GET"]),
        Route("/v1/admin/pause", h.pause, methods=["POST"]),
        Route("/v1/admin/resume", h.resume, methods=["POST"]),
        Route("/metrics", h.metrics, methods=["GET"]),
        Route("/healthz", h.healthz, methods=["GET"]),
        Route("/readyz", h.readyz, methods=["GET"]),
        *admin.routes(state),
        *dashboard.routes(state),
        *ChannelHandlers(h, mappings).routes(),
        *ShopifyHandler(h, mappings.get("shopify")).routes(),
    ]
    routes.append(openapi.route(routes, settings))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.orderq = state
    fast = FastPaths(app, {"/v1/orders": h.post_order, "/v1/orders/batch": h.post_batch})
    return BodyLimit(fast, settings.max_body_bytes, settings.batch_body_bytes, settings.read_deadline_s)


class FastPaths:
    """Pure ASGI dispatch of the two hot endpoints straight to their handlers, past the
    router and Starlette's middleware stack (same handlers, same responses); everything
    else goes to the Starlette app."""

    def __init__(self, app: Any, routes: dict[str, Any]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except Exception:
            log.exception("ingress.unhandled", path=scope["path"])
            response = responses.error(500, "internal", "unexpected error; the order may not be queued")
        await response(scope, receive, send)


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def bind(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so several ingress processes share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> None:
    import uvicorn

    app = build_app(settings)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
        backlog=2048,
    )
    server = uvicorn.Server(config)
    sock = bind(settings.http_host, settings.http_port)
    # uvicorn re-raises the SIGTERM/SIGINT it shut down for, under the handler it found at
    # start: with the default one the process dies "killed by signal" after a graceful stop.
    # A graceful stop exits 0 (contract §1); before uvicorn takes over, this asks it to stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
