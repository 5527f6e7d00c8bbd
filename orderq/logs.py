"""structlog, configured once per process as structlog's performance guide recommends."""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _msgspec_dumps(obj: object, default: object = None) -> bytes:
    return msgspec.json.encode(obj, enc_hook=str)


def configure(fmt: str | None = None, level: str = "info", stream: object = None) -> None:
    """JSON (msgspec-serialised) off a TTY, console on one; ISO UTC timestamps; contextvars."""
    out = stream or sys.stderr
    if fmt is None:
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=_msgspec_dumps))
        factory: object = structlog.BytesLoggerFactory(getattr(out, "buffer", out))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=getattr(out, "isatty", lambda: False)()))
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
