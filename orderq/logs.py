"""structlog, configured once per process as structlog's performance guide recommends."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _msgspec_dumps(obj: object, default: object = None) -> bytes:
    return msgspec.json.encode(obj, enc_hook=str)


def configure(fmt: str | None = None, level: str = "info", stream: TextIO | None = None) -> None:
    """JSON (msgspec-serialised) off a TTY, console on one; ISO UTC timestamps; contextvars."""
    out = stream or sys.stderr
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    factory: structlog.BytesLoggerFactory | structlog.PrintLoggerFactory
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=_msgspec_dumps))
        factory = structlog.BytesLoggerFactory(out.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
