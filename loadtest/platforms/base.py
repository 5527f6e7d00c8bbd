"""What every platform simulator shares: the order store (modification times, late writes,
status changes), the faults, the credentials it checks, and the server (uvicorn on a free
loopback port, in a thread of its own)."""

from __future__ import annotations

import base64
import copy
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SAMPLES = Path(__file__).resolve().parent.parent.parent / "mappings" / "samples"
SECRETS = {  # what the simulators accept; a test's connector files name environment variables holding these
    "app_key": "sim-app-key",
    "app_secret": "sim-app-secret",
    "session": "sim-session",
    "access_token": "sim-access-token",
    "client_id": "sim-client-id",
    "client_secret": "sim-client-secret",
}


LATE_PAGE_S = 2  # how long before its listing a late write of Faults.late_per_page was modified


@dataclass
class Faults:
    """Misbehaviour on purpose. Counts are per call of the list API unless said otherwise."""

    throttle_every: int = 0  # every Nth call (any API) is answered with the platform's throttling error
    burst_every: int = 0  # every Nth call starts a burst of 5xx answers ...
    burst_len: int = 3  # ... this many calls long
    touch_per_page: int = 0  # orders of the window modified (moved to now) as each list page is read
    late_per_page: int = 0  # late writes showing up as each list page is read, modified LATE_PAGE_S before
    close_share: float = 0.2  # of the orders touched, this share is cancelled, the rest change status
    rate_per_s: float = 0.0  # calls per second over which the platform throttles (0: no limit)


@dataclass
class SimOrder:
    id: str
    modified: int  # epoch seconds: the platforms' modification times are whole seconds
    visible: float  # when it appears in the lists: later than ``modified`` for a late write
    status: str
    payload: dict[str, Any]
    closed: bool = False


@dataclass
class Stats:
    calls: int = 0
    throttled: int = 0
    errors_5xx: int = 0
    touched: int = 0
    closed: int = 0
    pages: int = 0


class Platform:
    """One platform: its order shape and its API. Subclasses supply ``routes``, ``new_order``,
    ``set_status`` and the statuses."""

    name: ClassVar[str] = ""
    sample: ClassVar[str] = ""
    open_status: ClassVar[str] = ""
    moved_status: ClassVar[str] = ""  # the open status a touched order moves to
    closed_status: ClassVar[str] = ""

    def __init__(self, faults: Faults, seed: int = 1, lag_s: float = 0.0) -> None:
        self.faults = faults
        self.lag_s = lag_s  # how far behind now a window must end (Pinduoduo: 180 s)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.orders: dict[str, SimOrder] = {}
        self.stats = Stats()
        self._burst_left = 0
        self._bucket = (0.0, time.monotonic())  # (calls counted, since) for rate_per_s
        self.template = json.loads((SAMPLES / f"{self.sample}.json").read_text(encoding="utf-8"))

    # --- orders --------------------------------------------------------------------------------
    def new_order(self, n: int, modified: int) -> SimOrder:
        raise NotImplementedError

    def set_status(self, o: SimOrder, status: str, modified: int) -> None:
        """Change the status and the modification time in the payload too."""
        raise NotImplementedError

    def populate(self, count: int, start: int, end: int) -> None:
        """``count`` orders modified evenly over [start, end) seconds, visible at once (history)."""
        with self.lock:
            base = len(self.orders)
            for i in range(count):
                o = self.new_order(base + i, start + (end - start) * i // max(1, count))
                self.orders[o.id] = o

    def feed(self, count: int, seconds: float, late_share: float = 0.0, late_s: float = 0.0) -> threading.Thread:
        """A sale going on: ``count`` orders over ``seconds``, each modified now; ``late_share`` of
        them are late writes, listed only up to ``late_s`` seconds after their modification time."""

        def run() -> None:
            t0 = time.monotonic()
            for i in range(count):
                delay = t0 + seconds * i / count - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                now = time.time()
                with self.lock:
                    o = self.new_order(len(self.orders), int(now))
                    if self.rng.random() < late_share:
                        o.visible = now + self.rng.uniform(0.1, late_s)
                    self.orders[o.id] = o

        t = threading.Thread(target=run, name=f"feed-{self.name}", daemon=True)
        t.start()
        return t

    def template_copy(self) -> dict[str, Any]:
        return copy.deepcopy(self.template)

    def window(self, start: float, end: float, desc: bool = True) -> list[SimOrder]:
        """The visible orders modified in [start, end], sorted by modification time."""
        now = time.time()
        with self.lock:
            got = [o for o in self.orders.values() if start <= o.modified <= end and o.visible <= now]
        got.sort(key=lambda o: (o.modified, o.id), reverse=desc)
        return got

    def after_page(self, candidates: list[SimOrder]) -> None:
        """The window changes under its reader once a list page is answered: some of its orders
        are modified (their modification time moves to now, out of it) and late writes show up in
        it (new orders modified LATE_PAGE_S ago, listed from now on)."""
        self.touch(candidates)
        if not self.faults.late_per_page:
            return
        modified = int(time.time()) - LATE_PAGE_S
        with self.lock:
            for _ in range(self.faults.late_per_page):
                o = self.new_order(len(self.orders), modified)
                self.orders[o.id] = o

    def touch(self, candidates: list[SimOrder]) -> None:
        """Modify some orders of the window being read: their modification time moves to now."""
        n = min(self.faults.touch_per_page, len(candidates))
        if not n:
            return
        now = int(time.time())
        with self.lock:
            for o in self.rng.sample(candidates, n):
                if o.closed:
                    continue
                self.stats.touched += 1
                if self.rng.random() < self.faults.close_share:
                    o.closed = True
                    self.stats.closed += 1
                    self.set_status(o, self.closed_status, now)
                else:
                    self.set_status(o, self.moved_status, now)

    # --- faults --------------------------------------------------------------------------------
    def gate(self) -> str | None:
        """``"throttle"``, ``"5xx"`` or None for this call."""
        f = self.faults
        with self.lock:
            self.stats.calls += 1
            n = self.stats.calls
            if self._burst_left > 0:
                self._burst_left -= 1
                self.stats.errors_5xx += 1
                return "5xx"
            if f.burst_every and n % f.burst_every == 0:
                self._burst_left = f.burst_len - 1
                self.stats.errors_5xx += 1
                return "5xx"
            if f.throttle_every and n % f.throttle_every == 0:
                self.stats.throttled += 1
                return "throttle"
            if f.rate_per_s:
                counted, since = self._bucket
                now = time.monotonic()
                if now - since >= 1.0:
                    counted, since = 0.0, now
                counted += 1
                self._bucket = (counted, since)
                if counted > f.rate_per_s:
                    self.stats.throttled += 1
                    return "throttle"
        return None

    def routes(self) -> list[Route]:
        raise NotImplementedError

    # --- ground truth for tests ----------------------------------------------------------------
    def truth(self) -> dict[str, bool]:
        """Order id -> closed, of every order (visible or not yet)."""
        with self.lock:
            return {o.id: o.closed for o in self.orders.values()}


def encrypt(text: str, mark: str) -> str:
    """The platforms' cipher text, as far as a connector can tell: opaque, marked (``~…~`` on
    Pinduoduo, ``#…#`` on Douyin), decryptable only by the platform's own call."""
    return f"{mark}{base64.b64encode(text.encode()).decode()}{mark}"


def decrypt(cipher: str, mark: str) -> str:
    return base64.b64decode(cipher.strip(mark).split(mark)[0]).decode()


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(doc, status_code=status, headers=headers)


async def form_or_query(request: Request) -> dict[str, str]:
    params = dict(request.query_params)
    if request.method == "POST" and request.headers.get("content-type", "").startswith("application/x-www-form"):
        # parsed here: starlette's form parser needs python-multipart, for this one content type
        params.update(parse_qsl((await request.body()).decode(), keep_blank_values=True))
    return params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Simulator:
    """A platform served on a free loopback port from a thread of its own."""

    platform: Platform
    port: int = 0
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> Simulator:
        self.port = port or free_port()
        app = Starlette(routes=self.platform.routes())
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"sim-{self.platform.name}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the {self.platform.name} simulator did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
