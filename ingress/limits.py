"""Pure ASGI middleware, outermost: a request id on every response, the body cap (413)
and the body read deadline (408).

The body is read here, before the app sees the request: under the cap without reading
more than the cap, and within ``ORDERQ_READ_DEADLINE_S`` so a client trickling bytes
cannot hold a request open. A body that comes in one ``receive()`` (nearly every order)
costs no timer; only a body in several pieces is read under a deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingress.responses import error_bytes

# A client's own request id is echoed when it is short and plain (safe in logs and headers).
SANE_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
TIMED_OUT: Message = {"type": "orderq.timed_out"}


class RequestIds:
    """Cheap unique ids: process id and start second in hex, then a counter (no uuid4 per request)."""

    def __init__(self) -> None:
        self.prefix = f"{os.getpid():x}{int(time.time()):x}-"
        self.counter = itertools.count(1)

    def next(self) -> bytes:
        return (self.prefix + format(next(self.counter), "x")).encode()


class BodyLimit:
    """Refuse a body over the limit: at once by ``Content-Length``, else while streaming;
    refuse a body that has not arrived whole within the read deadline; tag every answer
    with ``x-request-id``."""

    def __init__(self, app: ASGIApp, single: int, batch: int, read_deadline_s: float = 10.0) -> None:
        self.app = app
        self.single = single
        self.batch = batch
        self.read_deadline_s = read_deadline_s
        self.ids = RequestIds()

    def limit_for(self, path: str) -> int:
        # Webhooks too: a platform's own order payload (Shopify's, with many line items) passes
        # 64 KB, and a 413 would make the platform retry it forever.
        return self.batch if path.endswith("/batch") or path.startswith("/v1/webhooks/") else self.single

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid: bytes | None = None
        declared: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value
            elif name == b"content-length":
                declared = value
        if rid is None or SANE_ID.fullmatch(rid) is None:
            rid = self.ids.next()
        send = _tagged(send, rid)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size > limit or size < 0:
                await _refuse(send, 413, "body_too_large", f"request body exceeds {limit} bytes")
                return
        # Read the body before the app sees anything: an exception raised from inside the app
        # (too large, too slow) would reach an error handler first, which answers 500.
        body = await self._read(receive, limit)
        if body is None:
            # Keep the connection: the server discards the rest of the upload unbuffered,
            # and a client still sending gets its 413 instead of a reset connection.
            await _refuse(send, 413, "body_too_large", f"request body exceeds {limit} bytes", close=False)
            return
        if body is TIMED_OUT:
            # Close: the rest of a trickled body is not worth waiting for.
            await _refuse(
                send, 408, "request_timeout", f"the request body did not arrive within {self.read_deadline_s:g} s"
            )
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive, limit: int) -> Message | None:
        """The whole body as one message; None once it passes ``limit``; TIMED_OUT when it
        has not arrived whole within the read deadline."""
        first = await receive()
        if first["type"] != "http.request":
            return first  # disconnected: let the app see it
        chunk = first.get("body", b"")
        if len(chunk) > limit:
            return None
        if not first.get("more_body", False):
            return first  # the common case: one message, no timer
        parts = [chunk]
        seen = len(chunk)
        try:
            async with asyncio.timeout(self.read_deadline_s):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return message
                    chunk = message.get("body", b"")
                    seen += len(chunk)
                    if seen > limit:
                        return None
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return {"type": "http.request", "body": b"".join(parts), "more_body": False}
        except TimeoutError:
            return TIMED_OUT


def _tagged(send: Send, rid: bytes) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
        await send(message)

    return send_with_id


async def _refuse(send: Send, status: int, code: str, message: str, close: bool = True) -> None:
    body = error_bytes(code, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the client's later messages."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
