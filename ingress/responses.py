"""JSON responses, the contract's error body (§4), and every error answer of the ingress.

A handler refuses a request by raising a :class:`Refusal` built by one of the functions
below; the app answers it in one place (:mod:`ingress.http`). The one exception is the
overload refusal, which admission control answers from responses it built at start.
"""

from __future__ import annotations

import random
from typing import Any

from starlette.responses import Response

from orderq.errors import ServerUnavailable
from orderq.schema import ErrorDetail, json_encoder

SHEDDING_MESSAGE = "backlog too high; retry later"
SHEDDING_RETRY_AFTER_S = 2  # the breaker's stage changes in seconds, not in milliseconds
SHEDDING_ERROR = {"code": "shedding", "message": SHEDDING_MESSAGE, "details": []}  # a shed batch item's error


def error_bytes(code: str, message: str, details: list[ErrorDetail] | None = None) -> bytes:
    return json_encoder.encode({"error": {"code": code, "message": message, "details": details or []}})


def json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_encoder.encode(content), status, headers, media_type="application/json")


def error(
    status: int,
    code: str,
    message: str,
    details: list[ErrorDetail] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(error_bytes(code, message, details), status, headers, media_type="application/json")


def retry_after(base: int = 1) -> dict[str, str]:
    """A ``Retry-After`` header of ``base`` seconds plus 0-2 at random: refused clients do not
    come back in step."""
    return {"Retry-After": str(base + random.randint(0, 2))}


class Refusal(Exception):
    """Control flow: answer the request with this error. ``counter``: the global counter the
    refusal adds one to when it is answered (``invalid``, ``shed``), or None."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[ErrorDetail] | None = None,
        headers: dict[str, str] | None = None,
        counter: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers
        self.counter = counter

    def response(self) -> Response:
        return error(self.status, self.code, self.message, self.details, self.headers)

    def body(self) -> dict[str, Any]:
        """The error object alone, as a batch item carries it."""
        return {"code": self.code, "message": self.message, "details": self.details or []}


def unavailable(exc: ServerUnavailable) -> Response:
    """503 ``unavailable``: Redis did not confirm in time or cannot be reached."""
    return error(503, "unavailable", str(exc), headers=retry_after(exc.retry_after))


# --- 4xx ------------------------------------------------------------------------------------
def invalid_json(reason: str) -> Refusal:
    return Refusal(400, "invalid_json", f"body is not valid JSON: {reason}")


def empty_body() -> Refusal:
    return Refusal(400, "invalid_json", "empty body")


def unauthorized(message: str, challenge: bool = True) -> Refusal:
    """401; ``challenge``: with ``WWW-Authenticate: Bearer`` (the bearer-token routes)."""
    return Refusal(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"} if challenge else None)


def forbidden(message: str, details: list[ErrorDetail] | None = None) -> Refusal:
    return Refusal(403, "forbidden", message, details)


def wrong_channel(token_channel: str, channel: str, details: list[ErrorDetail] | None = None) -> Refusal:
    """403: a channel token writing another channel's orders."""
    return forbidden(f"token of channel {token_channel!r} cannot write {channel!r} orders", details)


def not_found(message: str) -> Refusal:
    return Refusal(404, "not_found", message)


def unsupported_media_type() -> Refusal:
    return Refusal(415, "unsupported_media_type", "Content-Type must be application/json")


def invalid_order(details: list[ErrorDetail], message: str = "the order fails the schema") -> Refusal:
    """422 ``invalid_order``, counted as ``invalid``."""
    return Refusal(422, "invalid_order", message, details, counter="invalid")


def invalid_batch(message: str, details: list[ErrorDetail]) -> Refusal:
    return Refusal(422, "invalid_batch", message, details)


def batch_size(n: int, limit: int) -> Refusal:
    return invalid_batch(
        f"a batch holds 1 to {limit} orders",
        [ErrorDetail(path="orders", message=f"expected 1 to {limit} orders, got {n}")],
    )


def rate_limited(channel: str, wait_s: int) -> Refusal:
    return Refusal(
        429, "rate_limited", f"channel {channel!r} is over its rate; retry later", headers={"Retry-After": str(wait_s)}
    )


# --- 503 ------------------------------------------------------------------------------------
def shedding() -> Refusal:
    """503 ``shedding`` (the breaker sheds this order's tier), counted as ``shed``."""
    return Refusal(503, "shedding", SHEDDING_MESSAGE, headers=retry_after(SHEDDING_RETRY_AFTER_S), counter="shed")


# --- /readyz and the unexpected -------------------------------------------------------------
def not_ready(code: str, message: str, retry_after_s: int | None = None) -> Response:
    """/readyz's 503: ``unavailable`` (Redis unreachable, no ``Retry-After``), ``overloaded`` or
    ``shedding`` (every order refused, VIP too)."""
    return error(503, code, message, headers=retry_after(retry_after_s) if retry_after_s is not None else None)


def internal() -> Response:
    """500 of the fast paths, whose handlers run outside Starlette's error middleware."""
    return error(500, "internal", "unexpected error; the order may not be queued")
