"""Locust scenarios for orderq, one user class per scenario; name it on the command line:

    locust -f loadtest/locustfile.py --headless -u 100 -r 20 -t 10m \\
        --host http://127.0.0.1:8080 --csv out/steady Steady

- ``Steady``: everyday multi-channel mix, 5 % VIP, single orders and batches.
- ``RetryStorm``: channels that time out and resend; 30 % of sends replay an order
  already accepted and must get ``200`` duplicate.
- ``VipFlood``: VIP batches at full rate, plus a trickle of regular orders whose way to
  ``executed`` is tracked (rows ``E2E regular order ...``): aging must keep them moving.
- ``Spike618``: the user of the 618 midnight spike; run it through its shape,
  ``locust -f loadtest/spike618.py`` (21,000 orders in one minute).

Tokens come from ORDERQ_CHANNEL_TOKENS / ORDERQ_ADMIN_TOKEN, else from
``$ORDERQ_DATA_DIR/tokens.env`` (``./.orderq`` by default), as ``orderq up`` writes them.
The contract's backpressure answers (``503`` shedding or ``overloaded``, ``429`` over the
channel's rate, all with ``Retry-After``; a batch's ``shed`` orders) are not failures: they
are counted in their own rows (``... [503]``, ``... [429]``) and the refused orders are sent
again after Retry-After, as a channel must. A failure is anything the contract does not allow.

Every order key sent (announced before its request goes out: a user stopped mid-request leaves
its orders in doubt, not unknown) and every answer go into the client-side oracle
(``loadtest/oracle.py``). When the test stops, each process that sent orders looks every key up
through the contract (``GET /v1/orders/{channel}/{order_id}``, admin token) and reports lost
(acknowledged, no record), duplicated (an action applied twice), unexpected (a refused order
that was written) and recovered (an answer in doubt, yet the order is there): logged, written as JSON to
``ORDERQ_LOADTEST_ORACLE_OUT`` (default: ``<--csv prefix>_oracle.json``), in rows ``ORACLE
...`` of the printed statistics (the ``--csv`` files are written before the check ends), and
any lost, duplicated, unexpected or unchecked order makes locust exit 1.
``ORDERQ_LOADTEST_ORACLE=0`` skips the check (the answers are still recorded).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, constant_pacing, constant_throughput, events, task
from locust.runners import MasterRunner, WorkerRunner

try:
    from loadtest import orders as oq
    from loadtest.oracle import Oracle
except ImportError:  # run from a checkout without the project installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from loadtest import orders as oq
    from loadtest.oracle import Oracle

log = logging.getLogger("orderq.loadtest")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        sys.exit(f"loadtest: {name} must be a number, got {raw!r}")


PACING_S = _env_float("ORDERQ_LOADTEST_PACING_S", 1.0)  # Steady/RetryStorm: one request per user per this
BATCH_MIN, BATCH_MAX = 20, 100  # orders per batch request
REPLAY_SHARE = _env_float("ORDERQ_LOADTEST_REPLAY_SHARE", 0.30)  # RetryStorm: sends that replay an order
CHANNEL_TIMEOUT_S = _env_float("ORDERQ_LOADTEST_CHANNEL_TIMEOUT_S", 2.0)  # RetryStorm: the channel's patience
VIP_BATCH = int(_env_float("ORDERQ_LOADTEST_VIP_BATCH", 50))  # VipFlood: VIP orders per batch
REGULAR_EVERY_S = _env_float("ORDERQ_LOADTEST_REGULAR_EVERY_S", 1.0)  # VipFlood: one regular order per user per
# VipFlood: a regular order not executed after this long has starved (aging serves it after
# ORDERQ_PRIORITY_AGING_S at the latest, so twice that plus a margin).
STARVED_S = _env_float("ORDERQ_LOADTEST_STARVED_S", 2 * _env_float("ORDERQ_PRIORITY_AGING_S", 30.0) + 30)
MAX_ATTEMPTS = 20  # a refused order is sent again this many times before the channel gives up
SETTLED = frozenset({"executed", "rejected", "review", "held"})

TOKENS = oq.Tokens.from_env()
CHANNELS = TOKENS.usable_channels()
if not CHANNELS:
    sys.exit(
        "loadtest: no channel tokens: set ORDERQ_CHANNEL_TOKENS, or ORDERQ_DATA_DIR to the directory of the "
        "tokens.env that `orderq up` wrote (or ORDERQ_AUTH=off against an open ingress)"
    )
MAKER = oq.OrderMaker(CHANNELS)  # one per process: order ids unique across its users
ORACLE = Oracle()  # every order key this process sent and what its answers said
_ORDER_ID = re.compile(rb'"order_id":"([^"]*)"')


def _key(channel: str, body: bytes) -> str:
    """The order key of an encoded order (``oq.encode``: compact JSON)."""
    m = _ORDER_ID.search(body)
    return f"{channel}:{m.group(1).decode() if m else ''}"


class Ring:
    """The last ``size`` orders accepted, to replay at random (RetryStorm)."""

    def __init__(self, size: int = 20_000) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.size = size
        self.next = 0

    def add(self, item: tuple[str, bytes]) -> None:
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            self.items[self.next] = item
            self.next = (self.next + 1) % self.size

    def pick(self) -> tuple[str, bytes] | None:
        return random.choice(self.items) if self.items else None


SENT = Ring()
_seq = itertools.count()


class OrderqUser(FastHttpUser):
    """A sales channel: sends orders, honours Retry-After, judges answers by the contract."""

    abstract = True
    network_timeout = 10.0
    connection_timeout = 5.0

    def on_start(self) -> None:
        # (due, seq, kind, channel, bodies, expected outcome per body, attempts)
        self.retries: list[tuple[float, int, str, str, list[bytes], list[str], int]] = []

    # --- sending ---------------------------------------------------------------------
    def send_one(self, channel: str, body: bytes, name: str, expect: str = "accepted", attempt: int = 0) -> str:
        """POST one order; returns accepted · duplicate · refused · timeout · error."""
        key = _key(channel, body)
        ORACLE.sending((key,))  # (a user stopped mid-request leaves it in doubt, not unknown)
        with self.client.post(
            "/v1/orders", data=body, headers=TOKENS.headers(channel), name=name, catch_response=True
        ) as resp:
            code = resp.status_code
            ORACLE.record_answer(key, code, resp.content if code else None)
            if code in (200, 202):
                outcome = "accepted" if code == 202 else "duplicate"
                if expect not in ("either", outcome):
                    resp.failure(f"expected {expect}, got {code} ({outcome})")
                return outcome
            if self._refused(resp, name):
                self._later("one", channel, [body], [expect], _retry_after(resp), attempt)
                return "refused"
            if code == 0:
                resp.failure(f"no answer within {self.network_timeout}s: {type(resp.error).__name__}")
                return "timeout"
            resp.failure(f"{code}: {(resp.text or '')[:200]}")
            return "error"

    def send_batch(
        self, channel: str, bodies: list[bytes], name: str, expect: list[str] | None = None, attempt: int = 0
    ) -> list[str]:
        """POST a batch; returns each order's status (``refused`` for all when the batch was refused)."""
        expect = expect or ["accepted"] * len(bodies)
        body = b'{"orders":[' + b",".join(bodies) + b"]}"
        keys = [_key(channel, b) for b in bodies]
        ORACLE.sending(keys)
        with self.client.post(
            "/v1/orders/batch", data=body, headers=TOKENS.headers(channel), name=name, catch_response=True
        ) as resp:
            if resp.status_code == 202:
                doc = resp.json()
                ORACLE.record_batch(keys, 202, doc)
                statuses = [r["status"] for r in doc["results"]]
                wrong = [
                    (i, s, e)
                    for i, (s, e) in enumerate(zip(statuses, expect, strict=True))
                    if s != "shed" and e not in ("either", s)
                ]
                if len(statuses) != len(bodies):
                    resp.failure(f"{len(statuses)} results for {len(bodies)} orders")
                elif wrong:
                    i, s, e = wrong[0]
                    resp.failure(f"{len(wrong)} orders answered unexpectedly, e.g. #{i}: {s}, expected {e}")
                shed = [i for i, s in enumerate(statuses) if s == "shed"]
                if shed:  # sent again after the answer's Retry-After (overload), else a little later
                    delay = _retry_after(resp) if resp.headers and resp.headers.get("Retry-After") else 2.0
                    self._later("batch", channel, [bodies[i] for i in shed], [expect[i] for i in shed], delay, attempt)
                return statuses
            ORACLE.record_batch(keys, resp.status_code, resp.content if resp.status_code else None)
            if self._refused(resp, name):
                self._later("batch", channel, bodies, expect, _retry_after(resp), attempt)
                return ["refused"] * len(bodies)
            resp.failure(f"{resp.status_code}: {(resp.text or '')[:200]}")
            return ["error"] * len(bodies)

    def _refused(self, resp: Any, name: str) -> bool:
        """A contract backpressure answer: counted in its own row, not a failure."""
        code = resp.status_code
        if code in (429, 503) and resp.headers and resp.headers.get("Retry-After"):
            resp.request_meta["name"] = f"{name} [{code}]"
            resp.success()
            return True
        return False

    def _later(
        self, kind: str, channel: str, bodies: list[bytes], expect: list[str], delay: float, attempt: int
    ) -> None:
        if attempt + 1 >= MAX_ATTEMPTS:
            _event("GAVE UP", f"{kind} refused {MAX_ATTEMPTS} times", 0, RuntimeError("channel gave up"))
            return
        due = time.monotonic() + delay * random.uniform(1.0, 1.5)
        heapq.heappush(self.retries, (due, next(_seq), kind, channel, bodies, expect, attempt + 1))

    def retry_due(self) -> bool:
        """Send one refused order (or batch) whose Retry-After has passed; True if one was sent."""
        if not self.retries or self.retries[0][0] > time.monotonic():
            return False
        _due, _, kind, channel, bodies, expect, attempt = heapq.heappop(self.retries)
        if kind == "one":
            self.send_one(channel, bodies[0], "POST /v1/orders (after Retry-After)", expect[0], attempt)
        else:
            self.send_batch(channel, bodies, "POST /v1/orders/batch (after Retry-After)", expect, attempt)
        return True

    def new_single(self, **kw: Any) -> tuple[str, bytes, str]:
        order = MAKER.make(**kw)
        return order["channel"], oq.encode(order), "POST /v1/orders"

    def new_batch(self, size: int, **kw: Any) -> tuple[str, list[bytes]]:
        channel = MAKER.channel()  # one token per request: a batch holds one channel's orders
        return channel, [oq.encode(MAKER.make(channel=channel, **kw)) for _ in range(size)]


def _retry_after(resp: Any) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After")))
    except (TypeError, ValueError):
        return 1.0


def _event(kind: str, name: str, ms: float, exc: Exception | None = None) -> None:
    """A custom row in locust's statistics (end-to-end times, give-ups)."""
    events.request.fire(request_type=kind, name=name, response_time=ms, response_length=0, exception=exc, context={})


# --- scenarios -------------------------------------------------------------------------


class Steady(OrderqUser):
    """Everyday traffic: a weighted channel mix, 5 % VIP, 9 single orders to 1 batch."""

    wait_time = constant_pacing(PACING_S)

    @task(9)
    def single(self) -> None:
        if not self.retry_due():
            self.send_one(*self.new_single())

    @task(1)
    def batch(self) -> None:
        if not self.retry_due():
            channel, bodies = self.new_batch(random.randint(BATCH_MIN, BATCH_MAX))
            self.send_batch(channel, bodies, "POST /v1/orders/batch")


class Spike618(OrderqUser):
    """One buyer stream of the 618 midnight sale: one order a second (see spike618.py)."""

    wait_time = constant_throughput(1.0)

    @task
    def single(self) -> None:
        if not self.retry_due():
            self.send_one(*self.new_single())


class RetryStorm(OrderqUser):
    """Channels that give up waiting and resend: 30 % of sends replay an accepted order."""

    wait_time = constant_pacing(PACING_S)
    network_timeout = CHANNEL_TIMEOUT_S

    @task(9)
    def single(self) -> None:
        if self.retry_due():
            return
        old = SENT.pick() if random.random() < REPLAY_SHARE else None
        if old is not None:
            self.send_one(old[0], old[1], "POST /v1/orders (replay)", expect="duplicate")
            return
        channel, body, name = self.new_single()
        outcome = self.send_one(channel, body, name)
        for _ in range(3):  # timed out: the channel cannot know whether it arrived, so it resends
            if outcome != "timeout":
                break
            outcome = self.send_one(channel, body, "POST /v1/orders (resend after timeout)", expect="either")
        if outcome in ("accepted", "duplicate"):
            SENT.add((channel, body))

    @task(1)
    def batch(self) -> None:
        """A channel re-pushing a window of orders: 30 % already accepted, the rest new."""
        if self.retry_due():
            return
        channel, bodies = self.new_batch(random.randint(BATCH_MIN, BATCH_MAX))
        expect = ["accepted"] * len(bodies)
        for i in range(len(bodies)):
            old = SENT.pick() if random.random() < REPLAY_SHARE else None
            if old is not None and old[0] == channel and old[1] not in bodies:
                bodies[i], expect[i] = old[1], "duplicate"
        statuses = self.send_batch(channel, bodies, "POST /v1/orders/batch (with replays)", expect)
        for body, status in zip(bodies, statuses, strict=True):
            if status == "accepted":
                SENT.add((channel, body))


class VipFlood(OrderqUser):
    """VIP batches back to back; one regular order a second per user, followed to ``executed``."""

    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.watch: deque[tuple[float, str, str]] = deque()  # (sent at, channel, order id)
        self.next_regular = 0.0
        self.next_check = 0.0
        # Returning customers: from their second order on, their priority is "regular".
        self.customers = [f"r{MAKER.rid}-{id(self) % 100_000}-{i}" for i in range(5)]

    @task
    def flood(self) -> None:
        now = time.monotonic()
        if self.retry_due():
            return
        if now >= self.next_regular:
            self.next_regular = now + REGULAR_EVERY_S
            order = MAKER.make(tier="regular", customer_id=random.choice(self.customers))
            outcome = self.send_one(order["channel"], oq.encode(order), "POST /v1/orders (regular)")
            if outcome == "accepted":
                self.watch.append((time.monotonic(), order["channel"], order["order_id"]))
        elif self.watch and now >= self.next_check:
            self.next_check = now + 1.0
            self.check_oldest()
        else:
            channel, bodies = self.new_batch(VIP_BATCH, tier="vip")
            self.send_batch(channel, bodies, "POST /v1/orders/batch (vip)")

    def check_oldest(self) -> None:
        sent, channel, order_id = self.watch[0]
        path = f"/v1/orders/{channel}/{order_id}"
        with self.client.get(
            path, headers=TOKENS.headers(channel), name="GET /v1/orders/{channel}/{order_id}", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {(resp.text or '')[:200]}")
                return
            rec = resp.json()
        waited = time.monotonic() - sent
        if rec["status"] in SETTLED:
            self.watch.popleft()
            _event("E2E", f"regular order {rec['status']} (priority {rec.get('priority')})", waited * 1000)
        elif waited > STARVED_S:
            self.watch.popleft()
            _event(
                "E2E",
                "regular order starved",
                waited * 1000,
                RuntimeError(f"still {rec['status']} after {STARVED_S:.0f}s of VIP flood"),
            )


SCENARIOS = (Steady, Spike618, RetryStorm, VipFlood)


@events.init.add_listener
def _announce(environment: Any, **_: Any) -> None:
    chosen = [c.__name__ for c in environment.user_classes or [] if c in SCENARIOS]
    if len(chosen) > 1 and not isinstance(environment.runner, WorkerRunner):
        log.warning("several scenarios run mixed (%s); name one class to run one scenario", ", ".join(chosen))
    log.info("orderq loadtest: %d channels, tokens from %s", len(CHANNELS), TOKENS.source)


@events.test_stop.add_listener
def _check_oracle(environment: Any, **_: Any) -> None:
    """Look up every order this process sent (contract §4) and judge it; see the module doc."""
    if isinstance(environment.runner, MasterRunner) or not ORACLE.answers or not environment.host:
        return
    if os.environ.get("ORDERQ_LOADTEST_ORACLE", "1") == "0":
        return
    if TOKENS.auth and not TOKENS.admin:
        log.warning("oracle: no admin token, the %d orders sent are not checked", len(ORACLE.answers))
        return
    t0 = time.monotonic()
    try:
        import gevent.pool

        pool_map = gevent.pool.Pool(16).imap_unordered
    except ImportError:  # pragma: no cover - locust always brings gevent
        pool_map = None
    verdict = ORACLE.check_http(environment.host, TOKENS.admin_headers(), pool_map=pool_map)
    took_ms = (time.monotonic() - t0) * 1000
    log.info("oracle: %s (%.1f s)", verdict.line(), took_ms / 1000)
    _event("ORACLE", "orders checked", took_ms)
    for category in ("lost", "duplicated", "unexpected", "unchecked"):
        n = getattr(verdict, category)
        if n:
            examples = ", ".join(verdict.examples.get(category, [])[:5])
            _event("ORACLE", category, 0, RuntimeError(f"{n} orders {category}: {examples}"))
    out = os.environ.get("ORDERQ_LOADTEST_ORACLE_OUT", "").strip()
    prefix = getattr(environment.parsed_options, "csv_prefix", None) if environment.parsed_options else None
    if not out and prefix:
        out = f"{prefix}_oracle.json"
    if out:
        Path(out).write_text(json.dumps(verdict.as_dict(), indent=2), encoding="utf-8")
    if not verdict.ok:
        environment.process_exit_code = 1
    ORACLE.clear()  # checked once, also when locust stops twice


@events.test_start.add_listener
def _seed_stock(environment: Any, **_: Any) -> None:
    """Make the catalogue sellable, so load-test orders are not refused for stock (admin token needed)."""
    if isinstance(environment.runner, WorkerRunner) or not environment.host:
        return
    if os.environ.get("ORDERQ_LOADTEST_SEED_STOCK", "1") == "0":
        return
    if TOKENS.auth and not TOKENS.admin:
        log.warning("no admin token: stock not seeded; unknown SKUs follow ORDERQ_UNKNOWN_SKU")
        return
    req = urllib.request.Request(
        environment.host.rstrip("/") + "/v1/admin/stock",
        data=oq.encode(oq.stock_items()),
        headers=TOKENS.admin_headers(),
        method="PUT",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            log.info("stock seeded for %d SKUs (%s)", len(oq.stock_items()["items"]), resp.status)
    except urllib.error.HTTPError as exc:
        log.warning("stock not seeded: PUT /v1/admin/stock answered %s", exc.code)
    except OSError as exc:
        log.warning("stock not seeded: %s", exc)
