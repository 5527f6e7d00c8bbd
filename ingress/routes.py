"""HTTP handlers of the ingress's own routes (contract §4). A refusal is raised
(:class:`ingress.responses.Refusal`, :class:`orderq.errors.ServerUnavailable`) and answered
in one place (:mod:`ingress.http`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from ingress import responses
from ingress.admission import NOBODY, VIP_ONLY, peek
from ingress.http import DECODE_ERRORS, read_body, reason, require_json, require_json_syntax
from ingress.orders import OVERLOADED, Item, Orders, Refused
from ingress.state import IngressState
from orderq import control as ctl
from orderq import metrics, stats
from orderq.client import UNAVAILABLE
from orderq.schema import ErrorDetail, batch_decoder
from orderq.settings import STAGE_NAMES
from orderq.status import render

log = structlog.get_logger("orderq.ingress")

READY_TIMEOUT_S = 1.0  # /readyz: Redis must answer a PING within this
NOT_READY: tuple[type[BaseException], ...] = (*UNAVAILABLE, TimeoutError)  # /readyz: Redis is not there


class Handlers:
    def __init__(self, state: IngressState, orders: Orders) -> None:
        self.s = state
        self.orders = orders

    # --- orders -----------------------------------------------------------------------------
    async def post_order(self, request: Request) -> Response:
        t0 = time.perf_counter()
        token_channel = self.s.auth.channel_of(request)
        require_json(request)
        body = await read_body(request)
        if not body:
            raise responses.empty_body()
        adm = self.s.admission
        ticket = adm.admit(body)  # overload (contract §6): decided before any decode or Redis call
        if ticket is None:
            return adm.refusal()
        orders = self.orders
        try:
            order = orders.decode(body)
            if token_channel is not None and order.channel != token_channel:
                raise responses.wrong_channel(token_channel, order.channel)
            queued = await orders.accept(order)
        finally:
            adm.leave(ticket)
        return orders.answer(order.key, queued, t0)

    async def post_batch(self, request: Request) -> Response:
        t0 = time.perf_counter()
        token_channel = self.s.auth.channel_of(request)
        require_json(request)
        body = await read_body(request)
        if not body:
            raise responses.empty_body()
        # Overload (contract §6): no room at all refuses the request; room for VIP orders
        # only sheds the others (peeked at, never decoded). The request is one unit in flight.
        adm = self.s.admission
        room = adm.room()
        if room == NOBODY:
            return adm.refusal(n=adm.count_batch(body))
        ticket = adm.enter(vip=room == VIP_ONLY)
        try:
            try:
                batch = batch_decoder.decode(body)
            except msgspec.ValidationError as exc:
                require_json_syntax(body)
                raise responses.invalid_batch('body must be {"orders": [...]}', batch_details(exc)) from None
            except DECODE_ERRORS as exc:
                raise responses.invalid_json(reason(exc)) from None
            self.orders.check_batch_size(len(batch.orders))
            if token_channel is not None:
                await self.orders.rate(token_channel, len(batch.orders))
            items: list[Item] = []
            for raw in batch.orders:
                if room == VIP_ONLY:
                    vip, hint = peek(raw)
                    if not vip:
                        adm.count(False)
                        items.append(Refused(hint, OVERLOADED))
                        continue
                items.append(self.orders.decode_item(raw, token_channel))
            return await self.orders.accept_batch(items, t0)
        finally:
            adm.leave(ticket)

    async def get_order(self, request: Request) -> Response:
        channel = request.path_params["channel"]
        order_id = request.path_params["order_id"]
        self.s.auth.channel_or_admin(request, channel)
        key = f"{channel}:{order_id}"
        h = await self.s.redis.client.hgetall(self.s.redis.partition_of(key).status(key))
        if not h:
            raise responses.not_found(f"no order {key!r}")
        return responses.json(render(key, h))

    # --- operators --------------------------------------------------------------------------
    async def get_stats(self, request: Request) -> Response:
        self.s.auth.admin_only(request)
        return responses.json(await stats.compute(self.s.redis, self.s.meter))

    async def pause(self, request: Request) -> Response:
        return await self._pause(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._pause(request, False)

    async def _pause(self, request: Request, paused: bool) -> Response:
        self.s.auth.admin_only(request)
        require_json(request)
        raw = await request.body()
        try:
            doc = msgspec.json.decode(raw, type=PauseBody)
        except DECODE_ERRORS as exc:
            if not isinstance(exc, msgspec.ValidationError):
                raise responses.invalid_json(reason(exc)) from None
            require_json_syntax(raw)
            raise responses.Refusal(
                422,
                "invalid_request",
                str(exc),
                [ErrorDetail(path="stage", message=f"one of {', '.join(STAGE_NAMES)}")],
            ) from None
        await ctl.set_paused(self.s.redis, doc.stage, paused)
        log.info("admin.paused" if paused else "admin.resumed", stage=doc.stage)
        return responses.json({"stage": doc.stage, "paused": paused})

    async def metrics(self, request: Request) -> Response:
        text = await metrics.render(self.s.redis)
        return Response(text, 200, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        return responses.json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            # a probe wants an answer within its own timeout, not the client's socket timeout
            await asyncio.wait_for(self.s.redis.client.ping(), READY_TIMEOUT_S)
        except NOT_READY as exc:
            return responses.not_ready("unavailable", f"Redis unreachable: {exc!r}")
        # Contract §4: unready only when this process refuses every order. Shedding regular and
        # new orders is not that: every ingress sheds alike, and a load balancer that took them
        # all out would refuse the VIP orders they still take.
        if self.s.admission.refusing_all:  # this process is overloaded past its VIP room (§6)
            return responses.not_ready("overloaded", "ingress refuses every order, VIP too", 1)
        c = self.s.control
        if c.stage == "shedding" and c.backlog >= self.s.settings.shed_vip_depth:
            return responses.not_ready("shedding", "ingress refuses every order, VIP too", 2)
        return responses.json({"status": "ready", "stage": c.stage})


class PauseBody(msgspec.Struct):
    stage: Any

    def __post_init__(self) -> None:
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"stage must be one of {', '.join(STAGE_NAMES)}")


def batch_details(exc: msgspec.ValidationError) -> list[ErrorDetail]:
    """The one path msgspec names in a batch body's validation error."""
    msg = str(exc)
    message, sep, path = msg.rpartition(" - at `")
    return [ErrorDetail(path=path.rstrip("`").removeprefix("$.") if sep else "$", message=message if sep else msg)]
