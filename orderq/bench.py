"""``orderq bench`` (contract §8): a headless benchmark with a printed and a JSON report.

It runs against a running instance (Redis from ``ORDERQ_REDIS_URL`` or the embedded
server under ``ORDERQ_DATA_DIR``, the ingress at ``--url`` or ``ORDERQ_HTTP_HOST``/``PORT``)
or, when nothing runs (or with ``--start``), starts a private one in a temporary data
dir: the embedded server plus every stage as ``python -m orderq <stage>``, stopped at
the end. Phases (BENCHMARKS.md explains each figure):

- ``single`` / ``batch``: the most orders/s the ingress accepts, workers paused (so the
  ingress is measured alone, like the reference it is compared with).
- ``burst``: what single/batch queued is the burst: Redis memory per queued order, then
  the workers resume and the time to drain it to backlog 0 gives executed orders/s; Redis
  memory per order once it is drained (what an executed order keeps: status record, outbox).
- ``e2e``: a fixed offered rate with every stage running: ack and end-to-end latency,
  executed orders/s, time to drain after the last order.
- ``spike`` (``--spike``): the 618 midnight surge, then an audit for lost orders.
- ``reference`` (``--reference``): the same single/batch load against
  :mod:`orderq.benchref` on the same Redis, and the ratios ours / reference.

Every order sent to orderq and its answer are recorded in the client-side oracle
(``loadtest/oracle.py``); after the last phase each key is looked up in Redis and the report
gives lost (acknowledged, no record), duplicated (an action applied twice, by the effect
ledger), unexpected (a refused order that was written) and recovered (an answer in doubt,
yet the order is there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import redis

from loadtest import series
from loadtest.oracle import Oracle
from orderq import audit, keys, loadgen, stats
from orderq import client as oq_client
from orderq.errors import ConfigError, OrderqError
from orderq.server import EmbeddedServer, die_with_parent, free_port
from orderq.settings import Settings
from orderq.tokens import ensure_tokens, tokens_path

SCHEMA = "orderq.bench/1"
CORE_PHASES = ("single", "batch", "burst", "e2e")
ALL_PHASES = ("single", "batch", "burst", "reference", "e2e", "spike", "peers")
SAMPLE_S = 0.1  # backlog / breaker stage sampling period
DRAIN_SAMPLE_S = 0.025  # finer while a burst drains: its drain time gives executed orders/s
PAUSE_SETTLE_S = 0.7  # a worker blocked in XREADGROUP (500 ms) may still take one batch after a pause
START_TIMEOUT_S = 30.0
BENCH_STOCK = 10**9  # physical stock of every bench SKU: never the reason an order waits
# --warehouses: routing on (issue 9); bench orders ship to Suzhou, so Shanghai is the nearest
BENCH_WAREHOUSES = (
    {"id": "SH", "province": "上海市", "city": "上海市", "carriers": ["sf"]},
    {"id": "GZ", "province": "广东省", "city": "广州市", "carriers": ["zto"]},
    {"id": "BJ", "province": "北京市", "city": "北京市", "carriers": ["jd"]},
)
PRIORITIES = keys.PRIORITIES


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON (schema orderq.bench/1)")
    ap.add_argument("--html", metavar="FILE", help="also write the report as one HTML page with plots")
    ap.add_argument(
        "--phases",
        default=",".join(CORE_PHASES),
        help=f"comma list of phases among {', '.join(ALL_PHASES)} (default: {','.join(CORE_PHASES)})",
    )
    ap.add_argument("--spike", action="store_true", help="add the spike phase (618 midnight surge)")
    ap.add_argument("--reference", action="store_true", help="add the reference-endpoint phase and ratios")
    ap.add_argument(
        "--peers",
        action="store_true",
        help="add the peer-queue phase: taskiq's no-op jobs/s on the same Redis (needs the peers extra)",
    )
    ap.add_argument("--peer-jobs", type=int, default=20000, help="no-op jobs the peer queue drains (default 20000)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive connections (default 64)")
    ap.add_argument(
        "--open-connections",
        type=int,
        default=loadgen.OPEN_LOOP_CONNECTIONS,
        help="e2e/spike: keep-alive connections of the open loop, opened before it starts (default "
        f"{loadgen.OPEN_LOOP_CONNECTIONS}); refused orders are sent again after their Retry-After",
    )
    ap.add_argument("--batch-size", type=int, default=100, help="orders per batch request (default 100)")
    ap.add_argument("--batch-connections", type=int, default=16, help="connections of the batch phases (default 16)")
    ap.add_argument("--rate", type=float, default=2400.0, help="orders/s offered in the e2e phase (default 2400)")
    ap.add_argument("--spike-orders", type=int, default=21000, help="orders in the spike (default 21000)")
    ap.add_argument("--spike-seconds", type=float, default=60.0, help="length of the spike (default 60)")
    ap.add_argument("--burst-orders", type=int, default=20000, help="burst size when single/batch did not queue one")
    ap.add_argument(
        "--max-orders", type=int, default=0, help="stop a single/batch phase after this many orders (0: no cap)"
    )
    ap.add_argument("--sample-every", type=int, default=5, help="read back every n-th order's status (default 5)")
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="longest wait for backlog 0 (default 300)")
    ap.add_argument(
        "--warehouses",
        type=int,
        default=0,
        choices=range(0, len(BENCH_WAREHOUSES) + 1),
        metavar=f"0..{len(BENCH_WAREHOUSES)}",
        help="configure this many warehouses (Shanghai, Guangzhou, Beijing) with the bench stock split "
        "between them, so every order is routed (default 0: no warehouse, no routing)",
    )
    ap.add_argument("--url", help="ingress of a running instance, e.g. http://127.0.0.1:8080")
    ap.add_argument("--start", action="store_true", help="always start a private instance")
    ap.add_argument("--keep", action="store_true", help="keep the private instance's data dir")


def main(args: argparse.Namespace, settings: Settings) -> int:
    phases = _phases(args)
    if args.start and args.url:
        raise ConfigError("--url", "cannot be combined with --start")
    positive = ("duration", "connections", "batch_size", "batch_connections", "rate", "spike_orders")
    for name in (*positive, "open_connections"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be > 0")
    if args.batch_size > settings.batch_max:
        raise ConfigError("--batch-size", f"must be <= ORDERQ_BATCH_MAX ({settings.batch_max})")
    target = _find_running(settings, args)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so a private instance is stopped.
    # Outside the event loop a handler raising is enough; inside it, see Bench.run.
    signal.signal(signal.SIGTERM, _interrupt)
    own: OwnInstance | None = None
    if target is None:
        own = OwnInstance(settings, keep=args.keep)
        _progress(f"no running instance: starting a private one in {own.data_dir}")
        try:
            target = own.start(breaker=not ({"single", "batch", "burst"} & set(phases)))
        except BaseException:
            own.stop()
            raise
    try:
        import uvloop

        report = uvloop.run(Bench(args, target, own, phases).run())
    except asyncio.CancelledError:  # SIGTERM while the loop ran
        raise KeyboardInterrupt from None
    finally:
        if own is not None:
            _progress("stopping the private instance")
            own.stop()
    print(render(report), flush=True)
    if args.json:
        Path(args.json).write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")
        print(f"report written to {args.json}", flush=True)
    if args.html:
        from loadtest import report_html

        report_html.write(report, args.html)
        print(f"report written to {args.html}", flush=True)
    return 0


def _phases(args: argparse.Namespace) -> list[str]:
    wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
    for p in wanted:
        if p not in ALL_PHASES:
            raise ConfigError("--phases", f"unknown phase {p!r} (known: {', '.join(ALL_PHASES)})")
    if args.spike:
        wanted.append("spike")
    if args.reference:
        wanted.append("reference")
    if getattr(args, "peers", False) and "peers" not in wanted:
        wanted.append("peers")
    return [p for p in ALL_PHASES if p in wanted]  # run in the documented order


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- the instance under test ---------------------------------------------------------


@dataclass
class Target:
    """Where the bench sends orders and reads Redis."""

    settings: Settings  # with redis_url and tokens resolved
    host: str
    port: int
    tokens: dict[str, str] | None  # None: ORDERQ_AUTH=off
    admin_token: str | None
    own: bool

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as c:
            return bool(c.ping())
    except (redis.RedisError, OSError):
        return False


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _find_running(settings: Settings, args: argparse.Namespace) -> Target | None:
    """The running instance to measure, or None when one must be started."""
    if args.start:
        return None
    try:
        url = oq_client.resolve_url(settings)
    except ConfigError:
        url = None
    if url is None or not _ping(url):
        if settings.redis_url:
            raise OrderqError(f"ORDERQ_REDIS_URL={settings.redis_url} does not answer")
        if args.url:
            raise OrderqError(
                f"--url given, but no Redis found (ORDERQ_REDIS_URL unset, none under {settings.data_dir})"
            )
        return None
    if args.url:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError("--url", f"expected http://host:port, got {args.url!r}")
        host, port = parts.hostname, parts.port or 80
    else:
        host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
        port = settings.http_port
    base = f"http://{host}:{port}"
    if not _healthy(base):
        raise OrderqError(
            f"Redis at {url} runs, but no ingress answers at {base}: pass --url, or --start for a private instance"
        )
    tokens: dict[str, str] | None = None
    admin = None
    if settings.auth:
        if not (settings.channel_tokens and settings.admin_token) and not tokens_path(settings).is_file():
            raise ConfigError(
                "ORDERQ_CHANNEL_TOKENS",
                f"unset and no {tokens_path(settings)}: the bench needs the instance's tokens",
            )
        settings, _ = ensure_tokens(settings)
        tokens, admin = dict(settings.channel_tokens), settings.admin_token
    settings = dataclasses.replace(settings, redis_url=url)
    return Target(settings, host, port, tokens, admin, own=False)


class OwnInstance:
    """A private instance: embedded server in a temp dir, every stage a subprocess."""

    def __init__(self, settings: Settings, keep: bool = False) -> None:
        self.settings = settings
        self.keep = keep
        self.data_dir = Path(tempfile.mkdtemp(prefix="orderq-bench-"))
        self.server: EmbeddedServer | None = None
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env: dict[str, str] = {}
        self.logs: list[Any] = []

    def start(self, breaker: bool) -> Target:
        s = self.settings
        self.server = EmbeddedServer(self.data_dir).start()
        port = free_port()
        tokens = {c: secrets.token_urlsafe(18) for c in s.channels}
        admin = secrets.token_urlsafe(24)
        import orderq

        root = str(Path(orderq.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env.update(
            {
                "ORDERQ_REDIS_URL": self.server.url,
                "ORDERQ_REDIS_CLUSTER": "0",
                "ORDERQ_DATA_DIR": str(self.data_dir),
                "ORDERQ_HTTP_HOST": "127.0.0.1",
                "ORDERQ_HTTP_PORT": str(port),
                "ORDERQ_CHANNEL_TOKENS": ",".join(f"{c}={t}" for c, t in tokens.items()),
                "ORDERQ_ADMIN_TOKEN": admin,
                "ORDERQ_AUTH": "on",
                "ORDERQ_LOG_LEVEL": "warning",
                "ORDERQ_LOG_FORMAT": "json",
                "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p),
            }
        )
        self.env = env
        for _ in range(s.ingress_processes):
            self._spawn("ingress")
        for _ in range(s.validate_processes):
            self._spawn("validate")
        for _ in range(s.execute_processes):
            self._spawn("execute")
        if breaker:
            self.start_breaker()
        settings = dataclasses.replace(
            s,
            redis_url=self.server.url,
            redis_cluster=False,
            data_dir=self.data_dir,
            http_host="127.0.0.1",
            http_port=port,
            channel_tokens=tokens,
            admin_token=admin,
            auth=True,
        )
        target = Target(settings, "127.0.0.1", port, tokens, admin, own=True)
        self._wait_ready(target)
        return target

    def _spawn(self, stage: str) -> None:
        log = open(self.data_dir / f"{stage}-{len(self.procs)}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "orderq", stage],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops the stages in order
            preexec_fn=die_with_parent,  # and nothing outlives a bench that was killed
        )
        self.procs.append((stage, proc))

    def start_breaker(self) -> None:
        if not any(stage == "breaker" for stage, _ in self.procs):
            self._spawn("breaker")

    def _check_alive(self) -> None:
        for stage, proc in self.procs:
            if proc.poll() is not None:
                raise OrderqError(f"{stage} exited with {proc.returncode}:\n{self._tail(stage)}")

    def _tail(self, stage: str) -> str:
        out = []
        for path in sorted(self.data_dir.glob(f"{stage}-*.log")):
            out.append(path.read_text(encoding="utf-8", errors="replace")[-2000:])
        return "\n".join(out)

    def _wait_ready(self, t: Target) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(t.base_url):
            self._check_alive()
            if time.monotonic() > deadline:
                raise OrderqError(f"the ingress did not answer within {START_TIMEOUT_S:.0f}s:\n{self._tail('ingress')}")
            time.sleep(0.1)
        want = {"validate": self.settings.validate_processes, "execute": self.settings.execute_processes}
        assert self.server is not None
        with redis.Redis.from_url(self.server.url) as c:
            while True:
                seen: dict[str, int] = {}
                for raw in c.hvals(keys.WORKERS_KEY):
                    w = msgspec.json.decode(raw)
                    seen[w["stage"]] = seen.get(w["stage"], 0) + 1
                if all(seen.get(k, 0) >= n for k, n in want.items()):
                    return
                self._check_alive()
                if time.monotonic() > deadline:
                    raise OrderqError(f"the workers did not start within {START_TIMEOUT_S:.0f}s")
                time.sleep(0.1)

    def stop(self) -> None:
        # Ingress first (stop accepting), then the workers finish their batches, the server last.
        for group in (("ingress",), ("validate", "execute", "breaker")):
            procs = [p for stage, p in self.procs if stage in group and p.poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for log in self.logs:
            log.close()
        if self.server is not None:
            self.server.stop()
        if not self.keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)


# --- sampling the instance -----------------------------------------------------------


@dataclass
class Sampler:
    """Backlog, deferred syncs and breaker stage every 100 ms, in one round trip each."""

    r: oq_client.Redis
    period_s: float = SAMPLE_S
    samples: list[tuple[float, int, int, str]] = field(default_factory=list)  # (time, backlog, deferred, stage)
    task: asyncio.Task[None] | None = None
    error: str | None = None

    async def probe(self) -> tuple[int, int, str]:
        pipe = self.r.client.pipeline(transaction=False)
        for p in self.r.partitions:
            pipe.xlen(p.intake)
            for lane in p.lanes:
                pipe.xlen(lane)
            pipe.xlen(p.deferred)
        pipe.hget(keys.BREAKER_KEY, "stage")
        res = await pipe.execute()
        stage = (res[-1] or b"normal").decode()
        backlog = deferred = 0
        for i in range(len(self.r.partitions)):
            part = res[i * 5 : i * 5 + 5]
            backlog += sum(part[:4])
            deferred += part[4]
        return backlog, deferred, stage

    async def _loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            try:
                backlog, deferred, stage = await self.probe()
                self.samples.append((time.perf_counter(), backlog, deferred, stage))
            except Exception as exc:  # a sample lost is not worth the run
                self.error = repr(exc)
            await asyncio.sleep(max(0.0, self.period_s - (time.perf_counter() - t0)))

    def start(self) -> Sampler:
        self.samples.clear()
        self.task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def until_zero(self, since: float, timeout: float) -> float | None:
        """First sample time >= ``since`` with backlog 0 (None after ``timeout``)."""
        deadline = time.perf_counter() + timeout
        seen = 0
        while time.perf_counter() < deadline:
            for t, backlog, _d, _s in self.samples[seen:]:
                if t >= since and backlog == 0:
                    return t
            seen = len(self.samples)
            await asyncio.sleep(self.period_s / 2)
        return None

    def peak(self) -> int:
        return max((b for _t, b, _d, _s in self.samples), default=0)

    def stages(self) -> list[str]:
        return list(dict.fromkeys(s for _t, _b, _d, s in self.samples))


# --- the benchmark -------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def _closed_result(rec: loadgen.Recorder, elapsed: float, connections: int, batch_size: int) -> dict[str, Any]:
    return {
        "duration_s": round(elapsed, 2),
        "connections": connections,
        "batch_size": batch_size,
        "requests": rec.requests,
        "requests_per_s": _rate(rec.requests, elapsed),
        "orders_accepted": rec.accepted,
        "orders_per_s": _rate(rec.accepted, elapsed),
        "duplicates": rec.duplicates,
        "refused": rec.refused,
        "connection_errors": rec.errors,
        "statuses": {str(k): v for k, v in sorted(rec.statuses.items())},
        "ack_ms": loadgen.percentiles_ms(rec.latencies),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, target: Target, own: OwnInstance | None, phases: list[str]) -> None:
        self.args = args
        self.t = target
        self.own = own
        self.phases = phases
        self.run_id = f"{int(time.time()) % 100000:05d}{secrets.token_hex(2)}"
        self.factory = loadgen.OrderFactory(
            self.run_id, f"{target.host}:{target.port}", target.tokens, target.settings.channels
        )
        self.notes: list[str] = []
        self.oracle = Oracle()  # every order sent to orderq and its answer, checked at the end
        self.r: oq_client.Redis
        self.http: httpx.AsyncClient

    # --- plumbing --------------------------------------------------------------------
    async def admin(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.t.admin_token}"} if self.t.admin_token else {}
        return await self.http.request(method, path, json=body, headers=headers)

    async def pause(self, paused: bool) -> None:
        for stage in ("validate", "execute"):
            resp = await self.admin("POST", "/v1/admin/pause" if paused else "/v1/admin/resume", {"stage": stage})
            if resp.status_code != 200:
                raise OrderqError(f"{'pause' if paused else 'resume'} {stage}: HTTP {resp.status_code} {resp.text}")

    async def executed(self) -> int:
        return (await stats.totals(self.r))["executed"]

    async def used_memory(self) -> int:
        if self.t.settings.redis_cluster:  # the queue is spread over the masters: their sum
            per_node = await self.r.client.info("memory", target_nodes=self.r.client.PRIMARIES)
            return sum(int(i["used_memory"]) for i in per_node.values())
        info = await self.r.client.info("memory")
        return int(info["used_memory"])

    async def outbox_memory(self) -> int:
        """Bytes of every outbox stream (MEMORY USAGE, every node of each stream counted)."""
        streams = [p.outbox(a) for p in self.r.partitions for a in keys.ACTIONS]
        sizes = await self.r.run(lambda pipe: [pipe.memory_usage(s, samples=0) for s in streams])
        return sum(int(n or 0) for n in sizes)

    async def settle(self, what: str) -> dict[str, Any]:
        """Wait for backlog 0, stage normal and no deferred syncs left: the next phase starts clean."""
        t0 = time.perf_counter()
        deadline = t0 + self.args.drain_timeout
        sampler = Sampler(self.r)
        while True:
            backlog, deferred, stage = await sampler.probe()
            if backlog == 0 and deferred == 0 and stage == "normal":
                return {"settled": True, "waited_s": round(time.perf_counter() - t0, 2)}
            if time.perf_counter() > deadline:
                note = (
                    f"{what}: not settled after {self.args.drain_timeout:.0f}s "
                    f"(backlog {backlog}, deferred {deferred}, stage {stage})"
                )
                self.notes.append(note)
                _progress(note)
                return {"settled": False, "waited_s": round(time.perf_counter() - t0, 2)}
            await asyncio.sleep(0.2)

    async def set_stock(self) -> bool:
        skus = (*loadgen.SKUS, loadgen.GIFT_SKU)
        whs = BENCH_WAREHOUSES[: self.args.warehouses]
        if whs:
            resp = await self.admin("PUT", "/v1/admin/warehouses", {"warehouses": list(whs)})
            if resp.status_code != 200:
                raise OrderqError(f"PUT /v1/admin/warehouses: HTTP {resp.status_code} {resp.text}")
            await asyncio.sleep(1.5)  # every executor has the set (control state re-read each second)
            share = BENCH_STOCK // len(whs)
            items = [{"sku": s, "physical": share, "warehouse": w["id"]} for s in skus for w in whs]
        else:
            items = [{"sku": s, "physical": BENCH_STOCK} for s in skus]
        try:
            resp = await self.admin("PUT", "/v1/admin/stock", {"items": items})
        except httpx.HTTPError as exc:
            resp = None
            self.notes.append(f"stock not set: {exc}")
        if resp is not None and resp.status_code in (200, 201, 202, 204):
            return True
        if resp is not None:
            self.notes.append(
                f"PUT /v1/admin/stock answered {resp.status_code}: bench SKUs have no stock record "
                "(their orders follow ORDERQ_UNKNOWN_SKU)"
            )
        return False

    async def end_to_end_ms(self, sample: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
        """End-to-end latency (executed - accepted) per priority from the sampled status records."""
        per: dict[str, list[float]] = {p: [] for p in PRIORITIES}
        outcomes: dict[str, int] = {}
        for i in range(0, len(sample), 1000):
            chunk = sample[i : i + 1000]
            pipe = self.r.client.pipeline(transaction=False)
            for key in chunk:
                pipe.hmget(self.r.partition_of(key).status(key), "s", "p", "ta", "te")
            for s, p, ta, te in await pipe.execute():
                status = (s or b"missing").decode()
                outcomes[status] = outcomes.get(status, 0) + 1
                if status == "executed" and ta and te and p:
                    per.setdefault(p.decode(), []).append((int(te) - int(ta)) / 1_000_000)
        out: dict[str, Any] = {}
        for prio, values in per.items():
            q = loadgen.percentiles_ms(values)
            out[prio] = {"n": len(values), "p50": q["p50"], "p99": q["p99"], "max": q["max"]}
            out[prio]["hist"] = series.log_hist(values)  # the distribution --html plots
        return out, outcomes

    # --- phases ----------------------------------------------------------------------
    async def closed(self, batch: bool, host: str, port: int, checked: bool = True) -> dict[str, Any]:
        """A closed-loop phase; ``checked``: its orders go to orderq, into the oracle."""
        a = self.args
        size = a.batch_size if batch else 1
        conns = a.batch_connections if batch else a.connections
        rec = loadgen.Recorder(per_request=size, oracle=self.oracle if checked else None)
        make = (lambda: self.factory.batch(size)) if batch else self.factory.single
        max_requests = math.ceil(a.max_orders / size) if a.max_orders else 0
        self.factory.track = checked
        try:
            elapsed = await loadgen.closed_loop(
                host, port, conns, make, a.duration, rec, max_requests, self.factory.take_keys if checked else None
            )
        finally:
            self.factory.track = False
        return _closed_result(rec, elapsed, conns, size)

    async def offered(self, name: str, offsets: list[float], span_s: float) -> dict[str, Any]:
        """Offer ``offsets`` with every stage running; ack, drain and end-to-end figures."""
        a = self.args
        self.factory.sample = []
        self.factory.sample_every = max(1, a.sample_every)
        sampler = Sampler(self.r).start()
        executed0 = await self.executed()
        rec = loadgen.Recorder(oracle=self.oracle)
        self.factory.track = True
        try:
            elapsed = await loadgen.open_loop(
                self.t.host,
                self.t.port,
                a.open_connections,
                self.factory.single,
                offsets,
                rec,
                self.factory.take_keys,
                classify=lambda: self.factory.last_class,
            )
        finally:
            self.factory.track = False
        executed1 = await self.executed()
        t_zero = await sampler.until_zero(rec.last_ack, a.drain_timeout)
        executed2 = await self.executed()
        await sampler.stop()
        self.factory.sample_every = 0
        if t_zero is None:
            self.notes.append(f"{name}: backlog not 0 within {a.drain_timeout:.0f}s of the last order")
        e2e, outcomes = await self.end_to_end_ms(self.factory.sample)
        drain_s = None if t_zero is None else max(0.0, t_zero - rec.last_ack)
        return {
            "duration_s": round(elapsed, 2),
            "offered": len(offsets),
            "offered_per_s": _rate(len(offsets), span_s),
            "connections": rec.connections,
            "requests": rec.requests,
            "orders_accepted": rec.accepted,
            "accepted_per_s": _rate(rec.accepted, elapsed),
            "duplicates": rec.duplicates,
            "refused": rec.refused,
            "connection_errors": rec.errors,
            "statuses": {str(k): v for k, v in sorted(rec.statuses.items())},
            "ack_ms": loadgen.percentiles_ms(rec.ack_latencies),  # 202 / 200 only
            **loadgen.resend_report(rec),  # every answer, first tries, resends, per class
            "executed_per_s": _rate(executed1 - executed0, elapsed),
            "executed_total": executed2 - executed0,
            "executed_per_s_incl_drain": _rate(executed2 - executed0, elapsed + (drain_s or 0.0)),
            "drain_s": None if drain_s is None else round(drain_s, 2),
            "peak_backlog": sampler.peak(),
            "stages_visited": sampler.stages(),
            "e2e_ms": e2e,
            "sampled_outcomes": outcomes,
        }

    async def ingress_phases(self, report: dict[str, Any]) -> None:
        """single + batch with the workers paused, then the burst they queued drains."""
        ph = report["phases"]
        await self.pause(True)
        await asyncio.sleep(PAUSE_SETTLE_S)
        sampler = Sampler(self.r)
        backlog0, _, _ = await sampler.probe()
        mem0 = await self.used_memory()
        outbox0 = await self.outbox_memory()
        watch = Sampler(self.r).start()  # stages the breaker went through while the workers were paused
        if "single" in self.phases:
            _progress(f"single: {self.args.connections} connections for {self.args.duration:g}s (workers paused)")
            ph["single"] = await self.closed(False, self.t.host, self.t.port)
        if "batch" in self.phases:
            _progress(f"batch: {self.args.batch_size} orders per request for {self.args.duration:g}s (workers paused)")
            ph["batch"] = await self.closed(True, self.t.host, self.t.port)
        if "burst" not in self.phases:
            await watch.stop()
            if self.own is not None:
                self.own.start_breaker()
            await self.pause(False)
            await self.settle("ingress phases")
            return
        backlog1, _, _ = await sampler.probe()
        if backlog1 - backlog0 <= 0:
            n = self.args.burst_orders
            _progress(f"burst: queueing {n} orders (workers paused)")
            rec = loadgen.Recorder(per_request=self.args.batch_size, oracle=self.oracle)
            size = self.args.batch_size
            self.factory.track = True
            try:
                await loadgen.closed_loop(
                    self.t.host,
                    self.t.port,
                    self.args.batch_connections,
                    lambda: self.factory.batch(size),
                    3600.0,
                    rec,
                    math.ceil(n / size),
                    self.factory.take_keys,
                )
            finally:
                self.factory.track = False
            backlog1, _, _ = await sampler.probe()
        await watch.stop()
        mem1 = await self.used_memory()
        queued = backlog1 - backlog0
        if self.own is not None:
            self.own.start_breaker()  # not before: a paused backlog must not shed the ingress phases
        _progress(f"burst: {queued} orders queued; workers resumed, draining")
        drain = Sampler(self.r, period_s=DRAIN_SAMPLE_S).start()
        executed0 = await self.executed()
        t0 = time.perf_counter()
        await self.pause(False)
        t_zero = await drain.until_zero(t0, self.args.drain_timeout)
        executed1 = await self.executed()
        await drain.stop()
        drain_s = None if t_zero is None else t_zero - t0
        if t_zero is None:
            self.notes.append(f"burst: backlog not 0 within {self.args.drain_timeout:.0f}s")
        ph["burst"] = {
            "orders_queued": queued,
            "redis_memory_bytes": mem1 - mem0,
            "memory_per_queued_order_bytes": round((mem1 - mem0) / queued) if queued > 0 else None,
            "drain_s": None if drain_s is None else round(drain_s, 2),
            "executed": executed1 - executed0,
            "executed_per_s": _rate(executed1 - executed0, drain_s) if drain_s else None,
            "peak_backlog": max(drain.peak(), backlog1),
            "stages_visited": list(dict.fromkeys(watch.stages() + drain.stages())),
            "stages_while_paused": watch.stages(),
        }
        ph["burst"]["settle"] = await self.settle("burst")
        # What the drained burst still holds: every order is executed, nothing is queued; an
        # executed order keeps its status record (until its TTL) and its outbox entries (until
        # dispatched, or trimmed at ORDERQ_OUTBOX_MAXLEN).
        after = await self.used_memory() - mem0
        outbox = await self.outbox_memory() - outbox0
        ph["burst"]["memory_after_drain"] = {
            "redis_memory_bytes": after,
            "per_order_bytes": round(after / queued) if queued > 0 else None,
            "outbox_per_order_bytes": round(outbox / queued) if queued > 0 else None,
            "settled": ph["burst"]["settle"]["settled"],
        }

    async def reference(self, report: dict[str, Any]) -> None:
        ph = report["phases"]
        if self.t.settings.redis_cluster:
            ph["reference"] = {"skipped": "the reference endpoint does not speak Redis Cluster"}
            return
        port = free_port()
        stream = f"{keys.PREFIX}:benchref:{self.run_id}"
        env = dict(os.environ)
        if self.own is not None:
            env = dict(self.own.env)
        log_path = Path(tempfile.gettempdir()) / f"orderq-benchref-{self.run_id}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "orderq.benchref",
                    "--port",
                    str(port),
                    "--redis-url",
                    self.r.url,
                    "--stream",
                    stream,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while not _healthy(base):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise OrderqError(f"the reference endpoint did not start: {log_path.read_text(errors='replace')}")
                await asyncio.sleep(0.1)
            out: dict[str, Any] = {"stream": stream}
            if "single" in self.phases:
                _progress(f"reference single: {self.args.connections} connections for {self.args.duration:g}s")
                out["single"] = await self.closed(False, "127.0.0.1", port, checked=False)
            if "batch" in self.phases or "single" not in self.phases:
                _progress(f"reference batch: {self.args.batch_size} orders per request for {self.args.duration:g}s")
                out["batch"] = await self.closed(True, "127.0.0.1", port, checked=False)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            await self.r.client.delete(stream)
        out["cleaned"] = await self.r.client.exists(stream) == 0
        log_path.unlink(missing_ok=True)
        ratios: dict[str, float | None] = {}
        for kind in ("single", "batch"):
            ours, ref = ph.get(kind), out.get(kind)
            ratios[kind] = (
                round(ours["orders_per_s"] / ref["orders_per_s"], 3)
                if ours and ref and ref["orders_per_s"] > 0
                else None
            )
        out["ratios"] = ratios
        ph["reference"] = out

    async def peers(self, report: dict[str, Any]) -> None:
        """The best peer queue's no-op rate on the same Redis (loadtest/peers.py), and ours ÷ it."""
        from loadtest import peers

        ph = report["phases"]
        if self.t.settings.redis_cluster or not peers.available():
            missing = "taskiq not installed (pip install -e '.[peers]')"
            ph["peers"] = {"skipped": "Redis Cluster" if self.t.settings.redis_cluster else missing}
            return
        _progress(f"peers: taskiq drains {self.args.peer_jobs:,} no-op jobs (list and stream brokers)")
        out = await peers.best(self.r.url, self.args.peer_jobs)
        cap = (ph.get("burst") or {}).get("executed_per_s")
        out["ratio_burst_executed"] = round(cap / out["best_jobs_per_s"], 2) if cap and out["best_jobs_per_s"] else None
        ph["peers"] = out

    async def run(self) -> dict[str, Any]:
        a = self.args
        # A signal handler that raises inside a protocol callback would only kill that
        # connection: cancel the whole run instead (what asyncio.Runner does for Ctrl-C).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        self.r = await oq_client.connect(self.t.settings)
        self.http = httpx.AsyncClient(base_url=self.t.base_url, timeout=30)
        trace = series.begin(Sampler(self.r).probe)  # backlog, stage and answers over the run, for --html
        started = time.time()
        report: dict[str, Any] = {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "phases_run": self.phases,
            "config": {
                "duration_s": a.duration,
                "connections": a.connections,
                "open_connections": a.open_connections,
                "batch_size": a.batch_size,
                "batch_connections": a.batch_connections,
                "rate": a.rate,
                "spike_orders": a.spike_orders,
                "spike_seconds": a.spike_seconds,
                "max_orders": a.max_orders,
                "sample_every": a.sample_every,
            },
            "phases": {},
        }
        try:
            report["machine"] = await self.machine()
            report["instance"] = self.instance()
            report["instance"]["stock_set"] = await self.set_stock()
            report["instance"]["warehouses"] = self.args.warehouses
            before = await self.settle("start")
            report["instance"]["settled_at_start"] = before["settled"]
            if {"single", "batch", "burst"} & set(self.phases):
                await self.ingress_phases(report)
            if "reference" in self.phases:
                await self.reference(report)
            if "peers" in self.phases:
                await self.peers(report)
            if "e2e" in self.phases:
                _progress(f"e2e: {a.rate:g} orders/s offered for {a.duration:g}s, every stage running")
                offsets = loadgen.constant_schedule(a.rate, a.duration)
                ph = report["phases"]["e2e"] = await self.offered("e2e", offsets, a.duration)
                ph["settle"] = await self.settle("e2e")
            if "spike" in self.phases:
                _progress(f"spike: {a.spike_orders} orders in {a.spike_seconds:g}s, shaped as the midnight surge")
                offsets = loadgen.surge_schedule(a.spike_orders, a.spike_seconds)
                ph = report["phases"]["spike"] = await self.offered("spike", offsets, a.spike_seconds)
                ph["offered_peak_per_s"] = round(loadgen.surge_peak_rate(a.spike_orders, a.spike_seconds), 1)
                ph["settle"] = await self.settle("spike")
            _progress(f"oracle: looking up the {len(self.oracle.answers):,} orders sent")
            verdict = await self.oracle.check_redis(self.r)
            report["oracle"] = verdict.as_dict()
            _progress("audit")
            au = await audit.run(self.r)
            report["audit"] = {k: v for k, v in au.items() if not k.endswith("_keys")}
            report["audit"]["lost_keys"] = au["lost_keys"][:20]
            if "spike" in report["phases"]:
                report["phases"]["spike"]["lost"] = au["lost"]
                report["phases"]["spike"]["duplicate_effects"] = au["duplicate_effects"]
        finally:
            await trace.stop()
            await self.http.aclose()
            await self.r.close()
        ref = report["phases"].get("reference") or {}
        named = [*report["phases"].items(), *((f"reference {k}", v) for k, v in ref.items())]
        for name, d in named:
            if isinstance(d, dict) and (d.get("refused") or d.get("connection_errors")):
                self.notes.append(
                    f"{name}: {d.get('refused')} orders refused, {d.get('connection_errors')} connection errors "
                    f"(statuses {d.get('statuses')}): shedding or overload, see stages_visited"
                )
        report["series"] = trace.export()
        report["elapsed_s"] = round(time.time() - started, 1)
        report["summary"] = summary(report)
        report["targets"] = targets(report)
        report["notes"] = self.notes
        return report

    def instance(self) -> dict[str, Any]:
        s = self.t.settings
        return {
            "mode": "started" if self.t.own else "running",
            "ingress_url": self.t.base_url,
            "redis_url": _safe_url(self.r.url),
            "durability": s.durability,
            "partitions": s.partitions,
            "processes": {
                "ingress": s.ingress_processes,
                "validate": s.validate_processes,
                "execute": s.execute_processes,
            },
            "worker_batch": s.worker_batch,
            "breaker_open_depth": s.breaker_open_depth,
            "shed_depth": s.shed_depth,
        }

    async def machine(self) -> dict[str, Any]:
        info = await self.r.client.info("server")
        server = "valkey" if "valkey_version" in info else "redis"
        version = info.get("valkey_version") or info.get("redis_version")
        cpu = platform.processor() or platform.machine()
        mem_kb = 0
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
                    break
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            usable = os.cpu_count() or 0
        import uvloop

        return {
            "cpu_model": cpu,
            "cores": os.cpu_count(),
            "cores_usable": usable,
            "memory_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
            "os": platform.platform(),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "uvloop": uvloop.__version__,
            "server": server,
            "server_version": str(version),
        }


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# --- summary, targets, text ------------------------------------------------------------


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The contract's §8 figures in one place; each names the phase it comes from."""
    ph = report["phases"]
    single, batch, burst, e2e = (ph.get(k) or {} for k in ("single", "batch", "burst", "e2e"))
    return {
        "accepted_per_s": {"single": single.get("orders_per_s"), "batch": batch.get("orders_per_s")},
        "ack_ms": {k: ph[k]["ack_ms"] for k in ("single", "batch", "e2e", "spike") if k in ph},
        "e2e_ms": {k: ph[k]["e2e_ms"] for k in ("e2e", "spike") if k in ph},
        "executed_per_s": {
            "capacity": burst.get("executed_per_s"),
            "sustained": e2e.get("executed_per_s"),
        },
        "drain_s": {k: ph[k]["drain_s"] for k in ("burst", "e2e", "spike") if k in ph},
        "peak_backlog": {k: ph[k]["peak_backlog"] for k in ("burst", "e2e", "spike") if k in ph},
        "stages_visited": {k: ph[k]["stages_visited"] for k in ("burst", "e2e", "spike") if k in ph},
        "redis_memory_per_queued_order_bytes": burst.get("memory_per_queued_order_bytes"),
        "redis_memory_per_order_after_drain_bytes": (burst.get("memory_after_drain") or {}).get("per_order_bytes"),
        "oracle": {k: v for k, v in (report.get("oracle") or {}).items() if k != "examples"},
        "lost": report.get("audit", {}).get("lost"),
        "duplicate_effects": report.get("audit", {}).get("duplicate_effects"),
        "machine": report.get("machine"),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issues 2 and 3, checked against what this run measured (None: not measured)."""
    ph = report["phases"]
    ratios = (ph.get("reference") or {}).get("ratios") or {}
    e2e = ph.get("e2e") or {}
    burst = ph.get("burst") or {}
    spike = ph.get("spike") or {}
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, ok: bool | None) -> None:
        out.append({"name": name, "target": target, "value": value, "ok": ok})

    def at_least(v: float | None, bound: float) -> bool | None:
        return None if v is None else v >= bound

    def below(v: float | None, bound: float) -> bool | None:
        return None if v is None else v < bound

    add("single vs reference", ">= 0.8", ratios.get("single"), at_least(ratios.get("single"), 0.8))
    add("batch vs reference batch", ">= 0.7", ratios.get("batch"), at_least(ratios.get("batch"), 0.7))
    p99 = (e2e.get("ack_ms") or {}).get("p99")
    add(f"ack p99 at {e2e.get('offered_per_s', 0):g}/s offered, every stage", "< 100 ms", p99, below(p99, 100))
    cap = burst.get("executed_per_s")
    add("executed orders/s (burst drain)", ">= 3500", cap, at_least(cap, 3500))
    peer = (ph.get("peers") or {}).get("ratio_burst_executed")
    add("executed/s vs the best peer queue's no-op jobs/s", ">= 2", peer, at_least(peer, 2))
    sp99 = (spike.get("ack_ms") or {}).get("p99")
    add("spike ack p99", "< 100 ms", sp99, below(sp99, 100))
    ap99 = (spike.get("answer_ms") or {}).get("p99")
    add("spike answer p99 (202 and 503 alike)", "< 100 ms", ap99, below(ap99, 100))
    first = spike.get("taken_first_try_share")
    add("spike orders taken at the first try", ">= 0.6", first, at_least(first, 0.6))
    taken = spike.get("all_taken_s") if spike else None
    add(
        "spike every order taken (resends)",
        "<= 120 s",
        taken,
        None if not spike else (taken is not None and taken <= 120),
    )
    lost = spike.get("lost")
    add("spike lost", "== 0", lost, None if lost is None else lost == 0)
    o = report.get("oracle")
    bad = None if o is None else o["lost"] + o["duplicated"] + o["unexpected"] + o["unchecked"]
    add("oracle: lost + duplicated + unexpected", "== 0", bad, None if bad is None else bad == 0)
    sd = spike.get("drain_s") if spike else None
    add("spike backlog 0 after last order", "<= 5 s", sd, None if not spike else (sd is not None and sd <= 5))
    return out


def _q(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return f"p50 {d['p50']:.1f}  p95 {d.get('p95', 0):.1f}  p99 {d['p99']:.1f}  max {d['max']:.1f} ms"


def render(report: dict[str, Any]) -> str:
    """The printed report."""
    m, inst, ph = report["machine"], report["instance"], report["phases"]
    lines = [
        f"orderq bench  run {report['run_id']}  {report['started_at']}  ({report['elapsed_s']} s)",
        f"machine   {m['cpu_model']}, {m['cores_usable']}/{m['cores']} cores, {m['memory_gb']} GB, {m['python']}, "
        f"{m['server']} {m['server_version']}",
        f"instance  {inst['mode']} · ingress {inst['ingress_url']} · durability {inst['durability']} · "
        f"{inst['partitions']} partitions · processes {inst['processes']} · stock set {inst['stock_set']} · "
        f"warehouses {inst.get('warehouses', 0)}",
        "",
    ]

    def closed(title: str, d: dict[str, Any]) -> None:
        lines.append(
            f"{title:<26} {d['orders_per_s']:>10,.0f} orders/s accepted   ({d['requests_per_s']:,.0f} req/s, "
            f"{d['connections']} conns, refused {d['refused']}, errors {d['connection_errors']})"
        )
        lines.append(f"{'':<26} ack {_q(d['ack_ms'])}")

    if "single" in ph:
        closed("single (workers paused)", ph["single"])
    if "batch" in ph:
        closed(f"batch x{ph['batch']['batch_size']}", ph["batch"])
    ref = ph.get("reference") or {}
    for kind in ("single", "batch"):
        if kind in ref:
            closed(f"reference {kind}", ref[kind])
    if ref.get("ratios"):
        r = ref["ratios"]
        lines.append(f"{'ours / reference':<26} single {r.get('single')}   batch {r.get('batch')}")
    peers = ph.get("peers") or {}
    if peers.get("runs"):
        runs = "   ".join(f"{x['broker']} {x['jobs_per_s']:,.0f}" for x in peers["runs"])
        lines.append(
            f"{'peer queue (taskiq)':<26} no-op jobs/s: {runs}   "
            f"burst executed/s ÷ best: {peers['ratio_burst_executed']}"
        )
    elif peers.get("skipped"):
        lines.append(f"{'peer queue':<26} skipped: {peers['skipped']}")
    if "burst" in ph:
        b = ph["burst"]
        lines.append(
            f"{'burst':<26} {b['orders_queued']:,} queued · "
            f"{b['memory_per_queued_order_bytes']} B Redis memory/order · "
            f"drained in {b['drain_s']} s · {b['executed_per_s']} executed/s · peak backlog {b['peak_backlog']:,} · "
            f"stages {', '.join(b['stages_visited']) or '-'}"
        )
        if b.get("memory_after_drain"):
            m = b["memory_after_drain"]
            lines.append(
                f"{'':<26} after the drain: {m['per_order_bytes']} B Redis memory/order "
                f"({m['outbox_per_order_bytes']} B of it in outbox streams)"
            )
    for name in ("e2e", "spike"):
        if name not in ph:
            continue
        d = ph[name]
        title = f"{name} @ {d['offered_per_s']:,.0f}/s offered" if name == "e2e" else f"spike {d['offered']:,} orders"
        lines.append(
            f"{title:<26} {d['accepted_per_s']:>10,.0f} orders/s accepted · executed {d['executed_per_s']:,.0f}/s · "
            f"refused {d['refused']} · drain {d['drain_s']} s · peak backlog {d['peak_backlog']:,} · "
            f"stages {', '.join(d['stages_visited']) or '-'}"
        )
        lines.append(f"{'':<26} ack {_q(d['ack_ms'])}")
        if d.get("answer_ms"):
            lines.append(f"{'':<26} every answer (202 and 503) {_q(d['answer_ms'])}")
            share = d["taken_first_try_share"]
            lines.append(
                f"{'':<26} taken at the first try {'-' if share is None else f'{share:.1%}'} · "
                f"resends {d['resends']:,} · every order taken after {d['all_taken_s']} s · "
                f"not taken {d['not_taken']} · refusing {d['refusing_s']} s · {d['connections']} connections"
            )
            for cls, q in d["answer_ms_by_class"].items():
                lines.append(
                    f"{'':<26} answer {cls:<8} p50 {q['p50']:.1f}  p99 {q['p99']:.1f} ms  (n={q['n']}"
                    + (", while refusing)" if d["refusing_s"] else ")")
                )
        for prio in PRIORITIES:
            e = d["e2e_ms"].get(prio)
            if e and e["n"]:
                lines.append(f"{'':<26} end-to-end {prio:<8} p50 {e['p50']:.1f}  p99 {e['p99']:.1f} ms  (n={e['n']})")
        if name == "spike":
            lines.append(f"{'':<26} lost {d.get('lost')} · duplicate effects {d.get('duplicate_effects')}")
    au = report.get("audit")
    if au:
        lines.append(
            f"{'audit':<26} accepted {au['accepted']:,} · executed {au['executed']:,} · review {au['review']} · "
            f"rejected {au['rejected']} · lost {au['lost']} · duplicate effects {au['duplicate_effects']}"
        )
    if report.get("oracle"):
        o = report["oracle"]
        lines.append(
            f"{'oracle':<26} {o['sent']:,} orders sent · {o['acked']:,} acknowledged · lost {o['lost']} · "
            f"duplicated {o['duplicated']} · unexpected {o['unexpected']} · recovered {o['recovered']}"
            + (f" · unchecked {o['unchecked']}" if o["unchecked"] else "")
        )
        for category, examples in o["examples"].items():
            lines.append(f"{'':<26} {category}: {', '.join(examples)}")
    lines += ["", "targets"]
    for t in report["targets"]:
        mark = {True: "ok  ", False: "MISS", None: "-   "}[t["ok"]]
        lines.append(f"  {mark} {t['name']:<44} {t['target']:<10} {t['value']}")
    for n in report["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)
