"""The overload refusal below the web framework: an HTTP protocol that answers ``503
overloaded`` itself (contract §6).

Measured on this machine at ten times the 618 spike, a refusal that went through uvicorn's
ASGI cycle, Starlette and the handler cost a large share of an acceptance (a task, the
middleware, a ``Request``, a ``Response`` sent in two ASGI messages): the refusals and the
channels' resends took the CPU the acceptances needed, the process took ~100 orders/s and its
answers waited seconds in the sockets. This protocol is uvicorn's own (httptools) with one
change: while admission control has no room for every order, a ``POST /v1/orders`` or
``/v1/orders/batch`` is held when its headers are parsed (its ASGI task not started), its
body collected, and once complete either refused on the spot — the 503 bytes written to the
socket from the parser's callback: no task, no framework, no decode, no Redis — or, a VIP
order with room left for VIP orders, started as any request is. Its token and body are not
checked first: under overload the refusal must cost less than any check, and it reveals
nothing and changes nothing.

Everything else (other routes, a request pipelined behind another, ``Expect: 100-continue``,
a body past the read buffer's high-water mark, a URL with a query) takes the normal path,
where the handlers ask the same controller.

It relies on uvicorn's internals (``on_headers_complete`` creating ``self.cycle`` and calling
``_start_asgi_task``), which is why ``pyproject.toml`` bounds uvicorn's version;
``tests/test_overload.py`` exercises both paths on a real server.
"""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from ingress.admission import ANYONE, BODY, MAX_RETRY_AFTER_S, NOBODY, Admission

SINGLE, BATCH = b"/v1/orders", b"/v1/orders/batch"
# Everything of the answer after uvicorn's default headers (server, date), per Retry-After value.
_TAIL = [
    b"content-type: application/json\r\ncontent-length: %d\r\nretry-after: %d\r\n" % (len(BODY), s)
    for s in range(MAX_RETRY_AFTER_S + 1)
]
_CLOSE = b"connection: close\r\n"
_STATUS = b"HTTP/1.1 503 Service Unavailable\r\n"


class ShedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing order requests itself while admission control
    has no room for every order. :attr:`admission` is set by :func:`ingress.app.serve`."""

    admission: ClassVar[Admission | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._candidate = False  # the request being parsed may be refused here
        self._held: tuple[RequestResponseCycle, Any] | None = None  # its cycle and app, not started

    def on_headers_complete(self) -> None:
        adm = self.admission
        url = self.url
        self._candidate = (
            adm is not None
            and url in (SINGLE, BATCH)
            and adm.room() != ANYONE
            and not self.expect_100_continue
            and self.parser.get_method() == b"POST"
        )
        super().on_headers_complete()  # builds the cycle; starts it through _start_asgi_task
        self._candidate = False

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        if self._candidate:
            self._held = (cycle, app)  # decided once the body is here
            return
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        if self._held is None:
            super().on_body(body)
            return
        cycle = self._held[0]
        cycle.body += body
        if len(cycle.body) > HIGH_WATER_LIMIT:  # not a refusal's size: the normal path, flow control and all
            self._release()

    def on_message_complete(self) -> None:
        held = self._held
        super().on_message_complete()  # more_body False, the body's event set
        if held is None:
            return
        cycle = held[0]
        adm = self.admission
        assert adm is not None
        body = bytes(cycle.body)
        if self.url == SINGLE:
            room, vip = adm.place(body)
            if room != NOBODY:  # taken: the handler admits it again, on the same room
                self._release()
                return
            retry_after_s = adm.retry_after_s(vip)
        else:
            if adm.room() != NOBODY:  # room for some: the handler sheds the batch's other orders itself
                self._release()
                return
            retry_after_s = adm.retry_after_s(n=adm.count_batch(body))
        self._held = None
        self._refuse(cycle, retry_after_s)

    def _release(self) -> None:
        """Start the held request's ASGI task: it is served as any request is."""
        held, self._held = self._held, None
        if held is not None:
            super()._start_asgi_task(*held)

    def _refuse(self, cycle: RequestResponseCycle, retry_after_s: int) -> None:
        parts = [_STATUS]
        for name, value in self.server_state.default_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(_TAIL[retry_after_s])
        if not cycle.keep_alive:
            parts.append(_CLOSE)
        parts += (b"\r\n", BODY)
        self.transport.write(b"".join(parts))
        cycle.response_started = cycle.response_complete = True
        if not cycle.keep_alive:
            self.transport.close()
            return
        self.on_response_complete()  # keep-alive timer, the next pipelined request, flow control
