"""HTTP handlers of the ingress (contract §4)."""

from __future__ import annotations

import asyncio
import hmac
import random
import time
from typing import Any

import msgspec
import structlog
from starlette.requests import Request
from starlette.responses import Response

from ingress import responses
from ingress.admission import ERROR as OVERLOAD_ERROR
from ingress.admission import MESSAGE as OVERLOAD_MESSAGE
from ingress.admission import NOBODY, VIP_ONLY, peek, tiers_of_batch
from orderq import control as ctl
from orderq import keys, metrics, stats
from orderq.client import UNAVAILABLE
from orderq.errors import ServerUnavailable
from orderq.schema import (
    ErrorDetail,
    Order,
    any_json_decoder,
    batch_decoder,
    normalise,
    order_decoder,
    pack,
    validation_details,
)
from orderq.settings import STAGE_NAMES
from orderq.status import render

log = structlog.get_logger("orderq.ingress")

READY_TIMEOUT_S = 1.0  # /readyz: Redis must answer a PING within this
# What msgspec raises on a body that is not JSON we take: malformed, not UTF-8 (a
# UnicodeDecodeError, not a DecodeError) or nested past the recursion limit.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _reason(exc: Exception) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _require_json_syntax(body: bytes | msgspec.Raw) -> None:
    """400 if ``body`` is not JSON at all. A typed decode stops at the first value of the
    wrong type, before it has read the rest: ``[1 true]`` as an order fails as "expected
    object, got array", which alone would be a 422. Called on that error path only."""
    try:
        any_json_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise Refusal(400, "invalid_json", f"body is not valid JSON: {_reason(exc)}") from None


class Refusal(Exception):
    """Control flow: answer with this error."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[ErrorDetail] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers

    def response(self) -> Response:
        return responses.error(self.status, self.code, self.message, self.details, self.headers)


def _bearer(request: Request) -> str | None:
    h = request.headers.get("authorization")
    if not h or h[:7].lower() != "bearer ":
        return None
    return h[7:].strip() or None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Auth:
    """Token checks, constant-time. ``channel_of`` maps a token to its channel."""

    def __init__(self, settings: Any) -> None:
        self.enabled = settings.auth
        self.channel_tokens: dict[str, str] = dict(settings.channel_tokens)
        self.admin = settings.admin_token or ""
        # encoded once: channel_of runs on every order write, refusals included
        self._channel_bytes = [(c, t.encode()) for c, t in self.channel_tokens.items()]

    def channel_of(self, request: Request) -> str | None:
        """The channel whose token the request carries; 401 when none matches."""
        if not self.enabled:
            return None
        token = _bearer(request)
        if token is None:
            raise Refusal(401, "unauthorized", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        found = None
        presented = token.encode()
        for channel, t in self._channel_bytes:
            if hmac.compare_digest(presented, t):  # no early exit: time does not tell which channel matched
                found = channel
        if found is None:
            if self.admin and _same(token, self.admin):
                raise Refusal(403, "forbidden", "order writes take a channel token, not the admin token")
            raise Refusal(401, "unauthorized", "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def admin_only(self, request: Request) -> None:
        if not self.enabled:
            return
        token = _bearer(request)
        if token is None:
            raise Refusal(401, "unauthorized", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not (self.admin and _same(token, self.admin)):
            if any(_same(token, t) for t in self.channel_tokens.values()):
                raise Refusal(403, "forbidden", "this endpoint takes the admin token")
            raise Refusal(401, "unauthorized", "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def channel_or_admin(self, request: Request, channel: str) -> None:
        if not self.enabled:
            return
        token = _bearer(request)
        if token is None:
            raise Refusal(401, "unauthorized", "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if self.admin and _same(token, self.admin):
            return
        own = self.channel_tokens.get(channel)
        if own and _same(token, own):
            return
        if any(_same(token, t) for t in self.channel_tokens.values()):
            raise Refusal(403, "forbidden", f"token of another channel than {channel!r}")
        raise Refusal(401, "unauthorized", "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})


async def _body(request: Request) -> bytes:
    """The request body. ``BodyLimit`` (the outermost middleware) has read it and hands it
    over whole in one message, so one ``receive()`` is all it takes (cheaper than
    ``Request.body()``, which matters on the hot path: refusals read it too)."""
    message = await request.receive()
    body: bytes = message.get("body", b"") if message["type"] == "http.request" else b""
    return body


def _require_json(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise Refusal(415, "unsupported_media_type", "Content-Type must be application/json")


def _retry_after(base: int = 1) -> dict[str, str]:
    return {"Retry-After": str(base + random.randint(0, 2))}  # jitter: clients do not return in step


class Handlers:
    def __init__(self, state: Any) -> None:
        self.s = state  # app.state: settings, redis, committer, control, auth, meter

    # --- parsing --------------------------------------------------------------------
    def _decode_order(self, body: bytes | msgspec.Raw) -> Order:
        try:
            try:
                order = order_decoder.decode(body)
            except msgspec.ValidationError as exc:
                _require_json_syntax(body)
                details = validation_details(body, exc)  # re-reads the body: may meet what decode skipped
                raise Refusal(422, "invalid_order", "the order fails the schema", details) from None
        except DECODE_ERRORS as exc:
            raise Refusal(400, "invalid_json", f"body is not valid JSON: {_reason(exc)}") from None
        if order.channel not in self.s.settings.channels:
            raise Refusal(
                422,
                "invalid_order",
                "the order fails the schema",
                [ErrorDetail(path="channel", message=f"unknown channel {order.channel!r}")],
            )
        return normalise(order, body)

    def _shed(self, order: Order) -> bool:
        c = self.s.control
        if c.stage != "shedding":
            return False
        return order.customer.tier != "vip" or c.backlog >= self.s.settings.shed_vip_depth

    async def _rate(self, channel: str, n: int) -> None:
        """429 + Retry-After when ``channel`` is over its ORDERQ_CHANNEL_RATE."""
        limiter = self.s.limiter
        if not limiter.limited(channel):
            return
        try:
            wait = await limiter.take(channel, n)
        except UNAVAILABLE as exc:
            raise ServerUnavailable(f"Redis: {exc}") from None
        if wait:
            raise Refusal(
                429,
                "rate_limited",
                f"channel {channel!r} is over its rate; retry later",
                headers={"Retry-After": str(wait)},
            )

    async def _count(self, field: str, n: int = 1) -> None:
        try:
            await self.s.redis.client.hincrby(keys.COUNTERS_GLOBAL, field, n)
        except UNAVAILABLE:
            pass  # a counter is not worth failing a request for

    # --- orders ---------------------------------------------------------------------
    async def post_order(self, request: Request) -> Response:
        t0 = time.perf_counter()
        adm = self.s.admission
        ticket = None
        try:
            token_channel = self.s.auth.channel_of(request)
            _require_json(request)
            body = await _body(request)
            if not body:
                raise Refusal(400, "invalid_json", "empty body")
            ticket = adm.admit(body)  # overload (contract §6): decided before any decode or Redis call
            if ticket is None:
                return adm.refusal()
            try:
                order = self._decode_order(body)
            except Refusal as r:
                if r.status == 422:
                    await self._count("invalid")
                raise
            if token_channel is not None and order.channel != token_channel:
                raise Refusal(
                    403, "forbidden", f"token of channel {token_channel!r} cannot write {order.channel!r} orders"
                )
            if self._shed(order):
                await self._count("shed")
                raise Refusal(503, "shedding", "backlog too high; retry later", headers=_retry_after(2))
            await self._rate(order.channel, 1)
            key = order.key
            committer = self.s.committer
            (flag,) = await committer.wait([committer.submit(key, pack(order), order.customer.tier)])
        except Refusal as r:
            return r.response()
        except ServerUnavailable as exc:
            return responses.error(503, "unavailable", str(exc), headers=_retry_after(exc.retry_after))
        finally:
            if ticket is not None:
                adm.leave(ticket)
        body_out = {"order_key": key, "status": "accepted", "duplicate": not flag, "stage": self.s.control.stage}
        metrics.ACK_LATENCY.observe(time.perf_counter() - t0)
        return responses.json(body_out, 202 if flag else 200)

    async def post_batch(self, request: Request) -> Response:
        t0 = time.perf_counter()
        adm = self.s.admission
        ticket = None
        try:
            token_channel = self.s.auth.channel_of(request)
            _require_json(request)
            body = await _body(request)
            if not body:
                raise Refusal(400, "invalid_json", "empty body")
            # Overload (contract §6): no room at all refuses the request; room for VIP orders
            # only sheds the others (peeked at, never decoded). The request is one unit in flight.
            room = adm.room()
            if room == NOBODY:
                vip, other = tiers_of_batch(body)
                adm.count(True, vip)
                adm.count(False, other)
                return adm.refusal()
            ticket = adm.enter(vip=room == VIP_ONLY)
            try:
                batch = batch_decoder.decode(body)
            except msgspec.ValidationError as exc:
                _require_json_syntax(body)
                raise Refusal(
                    422, "invalid_batch", 'body must be {"orders": [...]}', validation_details_batch(exc)
                ) from None
            except DECODE_ERRORS as exc:
                raise Refusal(400, "invalid_json", f"body is not valid JSON: {_reason(exc)}") from None
            limit = self.s.settings.batch_max
            if not batch.orders or len(batch.orders) > limit:
                raise Refusal(
                    422,
                    "invalid_batch",
                    f"a batch holds 1 to {limit} orders",
                    [ErrorDetail(path="orders", message=f"expected 1 to {limit} orders, got {len(batch.orders)}")],
                )
            if token_channel is not None:
                await self._rate(token_channel, len(batch.orders))
            items: list[Order | tuple[str | None, Refusal]] = []
            for raw in batch.orders:
                if room == VIP_ONLY:
                    vip, hint = peek(raw)
                    if not vip:
                        adm.count(False)
                        items.append((hint, OVERLOADED))
                        continue
                try:
                    order = self._decode_order(raw)
                except Refusal as r:
                    items.append((_key_hint(raw), r))
                    continue
                if token_channel is not None and order.channel != token_channel:
                    message = f"token of channel {token_channel!r} cannot write {order.channel!r} orders"
                    detail = ErrorDetail(path="channel", message="not this token's channel")
                    items.append((order.key, Refusal(403, "forbidden", message, [detail])))
                    continue
                items.append(order)
            return await self.queue_batch(items, t0)
        except Refusal as r:
            return r.response()
        except ServerUnavailable as exc:
            return responses.error(503, "unavailable", str(exc), headers=_retry_after(exc.retry_after))
        finally:
            if ticket is not None:
                adm.leave(ticket)

    async def queue_batch(self, items: list[Order | tuple[str | None, Refusal]], t0: float) -> Response:
        """Queue a decoded batch (an ``Order``, or the key hint and refusal of an invalid one, per
        item) in one group commit; answer the contract's batch body in request order. A key
        repeated inside the batch is a duplicate of its first occurrence. An item refused with
        :data:`OVERLOADED` is ``shed`` and the answer carries ``Retry-After``."""
        results: list[dict[str, Any]] = []
        pending: list[tuple[int, asyncio_future]] = []
        seen: set[str] = set()
        committer = self.s.committer
        n_invalid = n_shed = n_dup = n_overload = 0
        for item in items:
            if isinstance(item, tuple):
                hint, r = item
                if r is OVERLOADED:
                    n_shed += 1
                    n_overload += 1
                    results.append({"order_key": hint, "status": "shed", "error": OVERLOAD_ERROR})
                    continue
                n_invalid += 1
                error = {"code": r.code, "message": r.message, "details": r.details or []}
                results.append({"order_key": hint, "status": "invalid", "error": error})
                continue
            key = item.key
            if key in seen:
                n_dup += 1
                results.append({"order_key": key, "status": "duplicate", "error": None})
                continue
            seen.add(key)
            if self._shed(item):
                n_shed += 1
                error = {"code": "shedding", "message": "backlog too high; retry later", "details": []}
                results.append({"order_key": key, "status": "shed", "error": error})
                continue
            results.append({"order_key": key, "status": "accepted", "error": None})
            pending.append((len(results) - 1, committer.submit(key, pack(item), item.customer.tier)))
        try:
            flags = await committer.wait([f for _, f in pending]) if pending else []
        except ServerUnavailable as exc:
            return responses.error(503, "unavailable", str(exc), headers=_retry_after(exc.retry_after))
        n_acc = 0
        for (i, _), flag in zip(pending, flags, strict=True):
            if flag:
                n_acc += 1
            else:
                n_dup += 1
                results[i]["status"] = "duplicate"
        # Intra-batch duplicates never reach Redis (the intake script counts the others); orders
        # shed for overload are counted by admission control, not with the breaker's shedding.
        extra = {"invalid": n_invalid, "shed": n_shed - n_overload}
        intra_dups = n_dup - (len(pending) - n_acc)
        if intra_dups:
            extra["duplicates"] = intra_dups
        await self._count_many({k: v for k, v in extra.items() if v})
        metrics.ACK_LATENCY.observe(time.perf_counter() - t0)
        return responses.json(
            {"results": results, "accepted": n_acc, "duplicates": n_dup, "invalid": n_invalid, "shed": n_shed},
            202,
            self.s.admission.retry_after() if n_overload else None,
        )

    async def _count_many(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        try:
            pipe = self.s.redis.client.pipeline(transaction=False)
            for k, v in counts.items():
                pipe.hincrby(keys.COUNTERS_GLOBAL, k, v)
            await pipe.execute()
        except UNAVAILABLE:
            pass

    async def get_order(self, request: Request) -> Response:
        channel = request.path_params["channel"]
        order_id = request.path_params["order_id"]
        try:
            self.s.auth.channel_or_admin(request, channel)
            key = f"{channel}:{order_id}"
            h = await self.s.redis.client.hgetall(self.s.redis.partition_of(key).status(key))
        except Refusal as r:
            return r.response()
        except UNAVAILABLE as exc:
            return responses.error(503, "unavailable", f"Redis: {exc}", headers=_retry_after())
        if not h:
            return responses.error(404, "not_found", f"no order {key!r}")
        return responses.json(render(key, h))

    # --- operators ------------------------------------------------------------------
    async def get_stats(self, request: Request) -> Response:
        try:
            self.s.auth.admin_only(request)
            doc = await stats.compute(self.s.redis, self.s.meter)
        except Refusal as r:
            return r.response()
        except UNAVAILABLE as exc:
            return responses.error(503, "unavailable", f"Redis: {exc}", headers=_retry_after())
        return responses.json(doc)

    async def pause(self, request: Request) -> Response:
        return await self._pause(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._pause(request, False)

    async def _pause(self, request: Request, paused: bool) -> Response:
        try:
            self.s.auth.admin_only(request)
            _require_json(request)
            raw = await request.body()
            try:
                doc = msgspec.json.decode(raw, type=PauseBody)
            except DECODE_ERRORS as exc:
                if not isinstance(exc, msgspec.ValidationError):
                    raise Refusal(400, "invalid_json", f"body is not valid JSON: {_reason(exc)}") from None
                _require_json_syntax(raw)
                raise Refusal(
                    422,
                    "invalid_request",
                    str(exc),
                    [ErrorDetail(path="stage", message=f"one of {', '.join(STAGE_NAMES)}")],
                ) from None
            await ctl.set_paused(self.s.redis, doc.stage, paused)
        except Refusal as r:
            return r.response()
        log.info("admin.paused" if paused else "admin.resumed", stage=doc.stage)
        return responses.json({"stage": doc.stage, "paused": paused})

    async def metrics(self, request: Request) -> Response:
        try:
            text = await metrics.render(self.s.redis)
        except UNAVAILABLE as exc:
            return responses.error(503, "unavailable", f"Redis: {exc}", headers=_retry_after())
        return Response(text, 200, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        return responses.json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            # a probe wants an answer within its own timeout, not the client's socket timeout
            await asyncio.wait_for(self.s.redis.client.ping(), READY_TIMEOUT_S)
        except (*UNAVAILABLE, TimeoutError) as exc:
            return responses.error(503, "unavailable", f"Redis unreachable: {exc!r}")
        # Contract §4: unready only when this process refuses every order. Shedding regular and
        # new orders is not that: every ingress sheds alike, and a load balancer that took them
        # all out would refuse the VIP orders they still take.
        if self.s.admission.refusing_all:  # this process is overloaded past its VIP room (§6)
            return responses.error(503, "overloaded", "ingress refuses every order, VIP too", headers=_retry_after(1))
        c = self.s.control
        if c.stage == "shedding" and c.backlog >= self.s.settings.shed_vip_depth:
            return responses.error(503, "shedding", "ingress refuses every order, VIP too", headers=_retry_after(2))
        return responses.json({"status": "ready", "stage": c.stage})


# A batch item refused by admission control (marker; never raised): answered "shed", code overloaded.
OVERLOADED = Refusal(503, "overloaded", OVERLOAD_MESSAGE)


class PauseBody(msgspec.Struct):
    stage: Any

    def __post_init__(self) -> None:
        if self.stage not in STAGE_NAMES:
            raise ValueError(f"stage must be one of {', '.join(STAGE_NAMES)}")


asyncio_future = Any


def _key_hint(raw: msgspec.Raw) -> str | None:
    """Best-effort order key of an invalid order, so a client can match the result."""
    try:
        d = msgspec.json.decode(raw)
    except DECODE_ERRORS:
        return None
    if isinstance(d, dict) and isinstance(d.get("channel"), str) and isinstance(d.get("order_id"), str):
        return f"{d['channel']}:{d['order_id']}"
    return None


def validation_details_batch(exc: msgspec.ValidationError) -> list[ErrorDetail]:
    msg = str(exc)
    message, sep, path = msg.rpartition(" - at `")
    return [ErrorDetail(path=path.rstrip("`").removeprefix("$.") if sep else "$", message=message if sep else msg)]
