"""JSON responses and the contract's error body (§4)."""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from orderq.schema import ErrorDetail, json_encoder


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
