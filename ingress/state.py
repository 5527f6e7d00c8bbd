"""What the handlers of one ingress process share: built with the app, its Redis clients
opened by the lifespan (the connection and control mirror every stage process gets from
:func:`orderq.runner.attached`, then :meth:`IngressState.start`) and closed at its end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog

from ingress.admission import Admission
from ingress.auth import Auth
from ingress.ratelimit import Limiter
from orderq import runner
from orderq.client import Redis
from orderq.committer import Committer
from orderq.control import Control
from orderq.intake import Intake
from orderq.mapping import Mapping
from orderq.settings import Settings
from orderq.stats import RateMeter

log = structlog.get_logger("orderq.ingress")


class IngressState:
    """Settings, tokens, overload control and channel mappings from the start; the Redis
    client, the breaker's view (``control``), the intake and the rate limiter once
    :meth:`start` has run (every request comes after it)."""

    redis: Redis
    control: Control
    intake: Intake
    limiter: Limiter

    def __init__(self, settings: Settings, mappings: dict[str, Mapping]) -> None:
        self.settings = settings
        self.auth = Auth(settings)
        self.meter = RateMeter()
        self.admission = Admission(settings.ack_target_ms)  # overload control (contract §6)
        self.mappings = mappings

    async def start(self) -> None:
        settings = self.settings
        self.intake = Intake(self.redis, Committer(self.redis), self.control)
        self.limiter = Limiter(self.redis)
        self.admission.start()
        if not settings.auth:
            log.warning("ingress.auth_off", message="ORDERQ_AUTH=off: every request is accepted without a token")
        log.info("ingress.started", redis=_safe_url(self.redis.url), durability=settings.durability)

    async def stop(self) -> None:
        await self.intake.close()
        self.admission.stop()

    async def count(self, field: str) -> None:
        """Add one to a global counter (a refusal's ``invalid``, ``shed``)."""
        await self.intake.count(field)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Starlette's lifespan: the clients are open while the app serves."""
        async with runner.attached(self.settings, "ingress") as (self.redis, self.control):
            await self.start()
            runner.out_of_collectors_way()
            try:
                yield
            finally:
                await self.stop()


def _safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
