"""Pure ASGI middleware: cap request bodies without reading them whole (413)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingress.responses import error_bytes


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a body over the limit: at once by ``Content-Length``, else while streaming."""

    def __init__(self, app: ASGIApp, single: int, batch: int) -> None:
        self.app = app
        self.single = single
        self.batch = batch

    def limit_for(self, path: str) -> int:
        # Webhooks too: a platform's own order payload (Shopify's, with many line items) passes
        # 64 KB, and a 413 would make the platform retry it forever.
        return self.batch if path.endswith("/batch") or path.startswith("/v1/webhooks/") else self.single

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit or declared < 0:
                    await self._refuse(send, limit)
                    return
                break
        else:
            # No Content-Length (chunked): read up to the cap before the app sees anything.
            # Raising from inside the app instead would reach Starlette's error middleware
            # first, which answers 500.
            body = await self._read_capped(receive, limit)
            if body is None:
                # Keep the connection: the server discards the rest of the upload unbuffered,
                # and a client still sending gets its 413 instead of a reset connection.
                await self._refuse(send, limit, close=False)
                return
            receive = _replay(body, receive)
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, limit)

    @staticmethod
    async def _read_capped(receive: Receive, limit: int) -> Message | None:
        """The whole body as one message, or None once it passes ``limit``."""
        parts: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message  # disconnected: let the app see it
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}

    @staticmethod
    async def _refuse(send: Send, limit: int, close: bool = True) -> None:
        body = error_bytes("body_too_large", f"request body exceeds {limit} bytes")
        headers = [(b"content-type", b"application/json")]
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(first: Message, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the client's later messages."""
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
