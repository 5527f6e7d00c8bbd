"""``GET /v1/admin/connectors`` (contract §7): each pull connector's cursor, lag behind now,
last error and counts, as the ``orderq connect`` process holding its lease last wrote them
(:mod:`orderq.connectors`). Takes the admin token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress import responses
from ingress.http import needs_redis
from ingress.state import IngressState
from orderq import connectors


def routes(state: IngressState) -> list[Route]:
    async def get_connectors(request: Request) -> Response:
        state.auth.admin_only(request)
        return responses.json({"connectors": await connectors.read_all(state.redis.client)})

    return [Route("/v1/admin/connectors", needs_redis(get_connectors), methods=["GET"])]
