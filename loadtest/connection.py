"""One keep-alive HTTP/1.1 connection of the load generator on a raw asyncio protocol.

Why not httpx/aiohttp: on a 2-core machine every microsecond the generator spends is taken from
the ingress it measures. One request in flight per connection, requests sent as pre-encoded
bytes, and only the status line, ``Content-Length`` and ``Retry-After`` parsed from answers.
"""

from __future__ import annotations

import asyncio


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.need = -1  # bytes of the whole answer once its head is parsed
        self.body_at = 0
        self.status = 0
        self.closed = False
        self.reusable = True
        self.retry_after: float | None = None  # of the last answer, when a 429 / 503 carried one

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(loop), host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None:
            self._parse()

    def _parse(self) -> None:
        buf = self.buf
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i < 0:
                self._fail(ConnectionError("answer without Content-Length (chunked answers are not supported)"))
                return
            j = head.find(b"\r\n", i + 17)
            self.body_at = end + 4
            self.need = self.body_at + int(head[i + 17 : j if j > 0 else end])
            self.reusable = b"\r\nconnection: close" not in head
            self.retry_after = _retry_after(head) if self.status in (429, 503) else None
        if len(buf) >= self.need:
            body = bytes(buf[self.body_at : self.need])
            del buf[: self.need]
            self.need = -1
            waiter, self.waiter = self.waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result((self.status, body))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection closed: {exc}"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        fut: asyncio.Future[tuple[int, bytes]] = self.loop.create_future()
        self.waiter = fut
        assert self.transport is not None
        self.transport.write(data)
        return fut

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _retry_after(head: bytes) -> float | None:
    """Seconds of a (lower-cased) answer head's ``Retry-After``, if it has one."""
    i = head.find(b"\r\nretry-after:")
    if i < 0:
        return None
    j = head.find(b"\r\n", i + 14)
    try:
        return max(0.0, float(head[i + 14 : j if j > 0 else len(head)]))
    except ValueError:
        return None


async def open_connections(host: str, port: int, n: int) -> list[HttpConnection]:
    return list(await asyncio.gather(*(HttpConnection.open(host, port) for _ in range(n))))


async def send(conns: list[HttpConnection], i: int, host: str, port: int, data: bytes) -> tuple[int, bytes] | None:
    """One request on connection ``i``; reopens a closed connection (an error is counted, not retried)."""
    conn = conns[i]
    if conn.closed or not conn.reusable:
        conn.close()
        conn = conns[i] = await HttpConnection.open(host, port)
    try:
        return await conn.request(data)
    except ConnectionError:
        conn.close()
        return None
