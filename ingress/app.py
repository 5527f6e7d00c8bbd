"""The ingress application and its server (uvicorn, uvloop, httptools)."""

from __future__ import annotations

import signal
import socket
from collections.abc import Awaitable, Callable

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ingress import admin, connectors, dashboard, openapi, responses
from ingress.channels import ChannelHandlers, load_mappings
from ingress.http import REFUSALS, answer_refusal, exception_handlers, needs_redis
from ingress.lifecycle import LifecycleHandlers
from ingress.limits import BodyLimit
from ingress.orders import Orders
from ingress.routes import Handlers
from ingress.shed import ShedProtocol
from ingress.shopify import ShopifyHandler
from ingress.state import IngressState
from orderq.settings import Settings

log = structlog.get_logger("orderq.ingress")


def build_app(settings: Settings, state: IngressState | None = None) -> ASGIApp:
    # Mappings compiled once; a broken file stops start-up (ConfigError).
    state = state or IngressState(settings, load_mappings(settings))
    orders = Orders(state)
    h = Handlers(state, orders)
    routes: list[BaseRoute] = [
        Route("/v1/orders", h.post_order, methods=["POST"]),
        Route("/v1/orders/batch", h.post_batch, methods=["POST"]),
        Route("/v1/orders/{channel}/{order_id}", needs_redis(h.get_order), methods=["GET"]),
        Route("/v1/stats", needs_redis(h.get_stats), methods=["GET"]),
        Route("/v1/admin/pause", h.pause, methods=["POST"]),
        Route("/v1/admin/resume", h.resume, methods=["POST"]),
        Route("/metrics", needs_redis(h.metrics), methods=["GET"]),
        Route("/healthz", h.healthz, methods=["GET"]),
        Route("/readyz", h.readyz, methods=["GET"]),
        *admin.routes(state),
        *connectors.routes(state),
        *dashboard.routes(state),
        *ChannelHandlers(state, orders).routes(),
        *ShopifyHandler(state, orders).routes(),
        *LifecycleHandlers(state).routes(),
    ]
    routes.append(openapi.route(routes, settings))
    app = Starlette(routes=routes, lifespan=state.lifespan, exception_handlers=exception_handlers(state.count))
    fast = FastPaths(app, {"/v1/orders": h.post_order, "/v1/orders/batch": h.post_batch}, state.count)
    return BodyLimit(fast, settings.max_body_bytes, settings.batch_body_bytes, settings.read_deadline_s)


class FastPaths:
    """Pure ASGI dispatch of the two hot endpoints straight to their handlers, past the
    router and Starlette's middleware stack (same handlers, same responses); everything
    else goes to the Starlette app."""

    def __init__(
        self,
        app: ASGIApp,
        routes: dict[str, Callable[[Request], Awaitable[Response]]],
        count: Callable[[str], Awaitable[None]],
    ) -> None:
        self.app = app
        self.routes = routes
        self.count = count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except REFUSALS as exc:
            response = await answer_refusal(exc, self.count)
        except Exception:
            log.exception("ingress.unhandled", path=scope["path"])
            response = responses.internal()
        await response(scope, receive, send)


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

    state = IngressState(settings, load_mappings(settings))
    app = build_app(settings, state)
    ShedProtocol.admission = state.admission  # overload refusals below the framework (ingress/shed.py)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http=ShedProtocol,
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
