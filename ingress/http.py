"""Request helpers every route shares: reading and checking a JSON body, the bearer token,
and the one place a refused request is answered (:func:`answer_refusal`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ingress import responses
from ingress.responses import Refusal
from orderq.client import UNAVAILABLE
from orderq.errors import ServerUnavailable
from orderq.schema import any_json_decoder

# What msgspec raises on a body that is not JSON we take: malformed, not UTF-8 (a
# UnicodeDecodeError, not a DecodeError) or nested past the recursion limit.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

Endpoint = Callable[[Request], Awaitable[Response]]
Count = Callable[[str], Awaitable[None]]  # adds one to a global counter


def reason(exc: Exception) -> str:
    """Why a body did not decode, for the 400's message."""
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def bearer(request: Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``, or None."""
    h = request.headers.get("authorization")
    if not h or h[:7].lower() != "bearer ":
        return None
    return h[7:].strip() or None


def require_json(request: Request) -> None:
    """415 unless the Content-Type is JSON (``application/json`` or ``application/*+json``)."""
    ctype = request.headers.get("content-type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise responses.unsupported_media_type()


def require_json_syntax(body: bytes | msgspec.Raw) -> None:
    """400 if ``body`` is not JSON at all. A typed decode stops at the first value of the
    wrong type, before it has read the rest: ``[1 true]`` as an order fails as "expected
    object, got array", which alone would be a 422. Called on that error path only."""
    try:
        any_json_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise responses.invalid_json(reason(exc)) from None


async def read_body(request: Request) -> bytes:
    """The request body. ``BodyLimit`` (the outermost middleware) has read it and hands it
    over whole in one message, so one ``receive()`` is all it takes (cheaper than
    ``Request.body()``, which matters on the hot path: refusals read it too)."""
    message = await request.receive()
    body: bytes = message.get("body", b"") if message["type"] == "http.request" else b""
    return body


async def read_json(request: Request) -> Any:
    """The body as generic JSON: 415 not a JSON content type, 400 empty or not JSON."""
    require_json(request)
    body = await request.body()
    if not body:
        raise responses.empty_body()
    try:
        return any_json_decoder.decode(body)
    except DECODE_ERRORS as exc:
        raise responses.invalid_json(reason(exc)) from None


async def answer_refusal(exc: Exception, count: Count) -> Response:
    """The answer to a request a handler refused by raising: a :class:`Refusal` (after adding
    one to its counter) or :class:`ServerUnavailable` (503)."""
    if isinstance(exc, Refusal):
        if exc.counter is not None:
            await count(exc.counter)
        return exc.response()
    if isinstance(exc, ServerUnavailable):
        return responses.unavailable(exc)
    raise exc


REFUSALS = (Refusal, ServerUnavailable)  # what :func:`answer_refusal` answers


def exception_handlers(count: Count) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Starlette's ``exception_handlers`` answering :data:`REFUSALS` from every route."""

    async def handle(request: Request, exc: Exception) -> Response:
        return await answer_refusal(exc, count)

    return dict.fromkeys(REFUSALS, handle)


def needs_redis(endpoint: Endpoint) -> Endpoint:
    """``endpoint``, answering 503 ``unavailable`` when Redis cannot be reached."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except UNAVAILABLE as exc:
            raise ServerUnavailable(f"Redis: {exc}") from None

    return guarded
