"""Pull connectors against the platform simulators (loadtest/platforms), each a real local HTTP
server, polled by real ``orderq connect`` processes on the private Valkey: orders modified while
their window is read, late writes inside the overlap, throttling and 5xx bursts, all arrive once
(the intake streams hold each order key exactly once; cancelled orders are recorded, not queued);
a connect process SIGKILLed mid-run and restarted skips nothing and doubles nothing; of two
processes on one connector one polls, and the other takes over within the lease."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from loadtest.platforms import Faults, Simulator, simulator
from loadtest.platforms.base import SECRETS
from orderq import keys
from orderq.wire import Field
from tests.conftest import StageProcess

CREDENTIALS = {
    "taobao": ("app_key", "app_secret", "session"),
    "jd": ("app_key", "app_secret", "access_token"),
    "douyin": ("app_key", "app_secret", "access_token"),
    "pdd": ("client_id", "client_secret", "access_token"),
    "shopify": ("access_token",),
}
PATHS = {"taobao": "/router/rest", "jd": "/routerjson", "pdd": "/api/router", "douyin": "", "shopify": ""}
CHANNEL = {"taobao": "tmall", "jd": "jd", "douyin": "douyin", "pdd": "pdd", "shopify": "shopify"}
SECRET_ENV = {f"SIM_{k.upper()}": v for k, v in SECRETS.items()}
PDD_LAG_S = 2  # the simulator and the connector agree on a short lag (Pinduoduo's is 180 s) to keep tests short
OVERLAP_S = 6
LATE_S = 3  # late writes show up at most this long after their modification time (inside the overlap)
DETAIL_CALLS = ("taobao", "douyin")
PLATFORMS = ["taobao", "jd", "douyin", "pdd", "shopify"]
LONG_KILLS = 5  # SIGKILLs of the connect process at random moments in the 10,000-order sale
# Real connect processes against each simulator for 10-60 s each: the `long` ones run in `make
# reliability`, which keeps `make test` within its 10 minutes (tests/test_connect_lease.py and
# test_import*.py stay there, and the short case of a window read while the sale goes on).
pytestmark = pytest.mark.timeout(300)


def faults(platform: str) -> Faults:
    """Throttling and 5xx bursts every few calls: a list-only platform makes few calls per order."""
    every = (40, 90) if platform in DETAIL_CALLS else (9, 23)
    return Faults(throttle_every=every[0], burst_every=every[1], burst_len=2, touch_per_page=3, close_share=0.25)


@pytest.fixture
def sim_factory() -> Iterator[Callable[[str], Simulator]]:
    started: list[Simulator] = []

    def start(platform: str) -> Simulator:
        s = simulator(platform, faults(platform), seed=7, lag_s=PDD_LAG_S if platform == "pdd" else 0).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def connector_file(directory: Path, platform: str, sim: Simulator, start: int, **over: Any) -> str:
    name = f"{platform}-flagship"
    opts = {
        "every_s": 0.5,
        "overlap_s": OVERLAP_S,
        "window_s": 600,
        "lease_s": 3,
        **({"lag_s": PDD_LAG_S} if platform == "pdd" else {}),
        **over,
    }
    lines = [f'platform = "{platform}"', 'shop = "flagship"', f'url = "{sim.url}{PATHS[platform]}"']
    lines += [f"{k} = {v}" for k, v in opts.items()]
    lines.append(f'start = "{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start))}"')
    lines.append("[credentials]")
    lines += [f'{f} = "SIM_{f.upper()}"' for f in CREDENTIALS[platform]]
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return name


def intake_keys(url: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with redis.Redis.from_url(url) as c:
        for p in keys.partitions(4):
            for _, fields in c.xrange(p.intake):
                k = fields[b"k"].decode()
                counts[k] = counts.get(k, 0) + 1
    return counts


def closed_keys(url: str, name: str) -> set[str]:
    with redis.Redis.from_url(url) as c:
        return {k.decode() for k in c.hkeys(keys.connector_key(name, "closed"))}


def missing(url: str, sim: Simulator, platform: str, name: str) -> list[str]:
    """Orders of the platform not where they belong: an open order not queued, or a cancelled
    one neither queued before nor recorded as closed."""
    queued, closed = intake_keys(url), closed_keys(url, name)
    out = []
    for oid, is_closed in sim.platform.truth().items():
        key = f"{CHANNEL[platform]}:{oid}"
        if key not in queued and (not is_closed or key not in closed):
            out.append(key)
    return out


def wait_all(url: str, sim: Simulator, platform: str, name: str, procs: list[StageProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = missing(url, sim, platform, name)
        if not left:
            return
        live = [p for p in procs if p.proc is not None and p.proc.poll() is None]
        assert live, "every connect process exited:\n" + "\n".join(p.log()[-3000:] for p in procs)
        if time.monotonic() > deadline:
            logs = "\n".join(p.log()[-4000:] for p in procs)
            raise AssertionError(f"{len(left)} orders never arrived (e.g. {left[:5]}); {sim.platform.stats}\n{logs}")
        time.sleep(0.3)


def assert_once(url: str, sim: Simulator, platform: str, name: str) -> None:
    queued = intake_keys(url)
    assert not [k for k, n in queued.items() if n > 1], "an order was queued twice"
    truth = sim.platform.truth()
    ours = {f"{CHANNEL[platform]}:{oid}" for oid in truth}
    assert set(queued) <= ours
    closed = closed_keys(url, name)
    cancelled = {f"{CHANNEL[platform]}:{oid}" for oid, c in truth.items() if c}
    assert cancelled <= closed | set(queued)
    assert not (closed & ours) - cancelled  # only cancelled orders are recorded closed
    # a closed order queued before went the cancellation path (no stage runs here: it was waiting)
    with redis.Redis.from_url(url) as c:
        for k in closed & set(queued):
            status = c.hget(keys.partitions(4)[keys.partition_of(k, 4)].status(k), Field.STATUS)
            assert status == b"cancelled", (k, status)


def assert_faults_met(sim: Simulator) -> None:
    """The run met what the faults are there for: orders modified while read, and throttling or
    5xx answers."""
    stats = sim.platform.stats
    assert stats.touched > 0 and stats.throttled + stats.errors_5xx > 0, stats


def _sale(
    platform: str, history: int, live: int, flushed: Any, stages: Any, sim_factory: Any, tmp: Path, kills: int = 0
) -> dict[str, Any]:
    """A sale read by ``orderq connect``; with ``kills``, the process is SIGKILLed that many
    times at random moments spread over the run (each once a random share of the orders is
    queued, then up to two seconds later: mid-window, mid-batch or between windows), and
    started again each time."""
    t0 = time.monotonic()
    sim = sim_factory(platform)
    now = int(time.time())
    sim.platform.populate(history, now - 1800, now - 20)  # the sale's first half, not read yet
    name = connector_file(tmp / "connectors", platform, sim, now - 1900)
    env = {"ORDERQ_CONNECTORS_DIR": tmp / "connectors", **SECRET_ENV}
    procs = [stages("connect", **env)]
    feeder = sim.platform.feed(live, 6, late_share=0.2, late_s=LATE_S)  # the rest while it polls
    rng = random.Random(f"{platform}-kills")
    at = sorted(int(rng.uniform(0.05, 0.9) * (history + live)) for _ in range(kills))
    killed, deadline = 0, time.monotonic() + 900
    while killed < kills:  # at most 90% of the orders: the rest are queued after the last kill
        if len(intake_keys(flushed.url)) < at[killed]:
            assert procs[-1].proc is not None and procs[-1].proc.poll() is None, procs[-1].log()[-3000:]
            assert time.monotonic() < deadline, f"{at[killed]} orders never queued"
            time.sleep(0.5)
            continue
        time.sleep(rng.uniform(0.0, 2.0))
        procs[-1].signal(signal.SIGKILL)
        assert procs[-1].proc is not None
        procs[-1].proc.wait()
        killed += 1
        procs.append(stages("connect", **env))
    feeder.join()
    wait_all(flushed.url, sim, platform, name, procs, 900 if history + live > 5000 else 240)
    queued = intake_keys(flushed.url)
    figures = {
        "platform": platform,
        "orders": len(sim.platform.truth()),
        "kills": killed,
        "lost": len(missing(flushed.url, sim, platform, name)),
        "doubled": sum(1 for n in queued.values() if n > 1),
        "wall_s": round(time.monotonic() - t0, 1),
        **{k: getattr(sim.platform.stats, k) for k in ("calls", "throttled", "errors_5xx", "touched", "closed")},
    }
    print(json.dumps(figures))
    assert_once(flushed.url, sim, platform, name)
    assert_faults_met(sim)
    time.sleep(1)  # the window's counters are written just after its orders are queued
    with redis.Redis.from_url(flushed.url) as c:
        accepted = int(c.hget(keys.connector_key(name, "state"), "n:accepted") or 0)
    if kills:  # a process killed after queueing a window, before counting it, leaves it uncounted
        assert 0 < accepted <= len(queued)
    else:
        assert accepted == len(queued)
    return figures


@pytest.mark.long
@pytest.mark.parametrize("platform", PLATFORMS)
def test_sale_arrives_once(
    platform: str, flushed: Any, stages: Callable[..., StageProcess], sim_factory: Any, tmp_path: Path
) -> None:
    # Taobao and Douyin cost a detail call per order: fewer of them in the short version
    history, live = (500, 150) if platform in DETAIL_CALLS else (1500, 500)
    _sale(platform, history, live, flushed, stages, sim_factory, tmp_path)


def test_orders_modified_while_a_window_is_read_are_not_skipped(
    flushed: Any,
    stages: Callable[..., StageProcess],
    sim_factory: Any,
    tmp_path: Path,
) -> None:
    """JD (no lag): orders are modified (and new ones written) while the connector pages through
    a window that reaches the present; restarts make it read the whole sale's window again while
    the sale goes on. A window that ended in the current second let an order modified during the
    read move up inside it, shifting another across a page boundary into a page read already,
    skipped for good. Windows end a second before now."""
    _sale("jd", 4000, 1500, flushed, stages, sim_factory, tmp_path, kills=3)


def test_late_writes_while_a_window_is_paged_skip_no_older_order(
    flushed: Any, stages: Callable[..., StageProcess], tmp_path: Path
) -> None:
    """JD, a sale's last three minutes read in one window that reaches the present: as each page
    is answered a late write shows up at the window's newest end and one of its orders is
    modified out of it. The total stays the same, yet each late write pushes an older order
    across a page boundary into a page read already, and only the overlap is read again: an
    order older than the overlap would be skipped for good. The part of a window past the
    overlap, where no late write lands any more, is read as a window of its own."""
    sim = simulator("jd", Faults(touch_per_page=1, late_per_page=1, close_share=0.0), seed=7).start()
    try:
        now = int(time.time())
        sim.platform.populate(1000, now - 200, now - 20)  # ten pages of one window
        name = connector_file(tmp_path / "connectors", "jd", sim, now - 210)
        procs = [stages("connect", ORDERQ_CONNECTORS_DIR=tmp_path / "connectors", **SECRET_ENV)]
        deadline = time.monotonic() + 60
        while len(intake_keys(flushed.url)) < 900:  # the first window is read and queued
            assert time.monotonic() < deadline, procs[0].log()[-3000:]
            time.sleep(0.2)
        sim.platform.faults.late_per_page = sim.platform.faults.touch_per_page = 0  # the sale ends
        wait_all(flushed.url, sim, "jd", name, procs, 30)
        assert_once(flushed.url, sim, "jd", name)
        assert sim.platform.stats.touched > 0
    finally:
        sim.stop()


@pytest.mark.long
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_sale_10000_arrives_once(
    platform: str, flushed: Any, stages: Callable[..., StageProcess], sim_factory: Any, tmp_path: Path
) -> None:
    figures = _sale(platform, 8000, 2000, flushed, stages, sim_factory, tmp_path, kills=LONG_KILLS)
    out = os.environ.get("ORDERQ_RELIABILITY_OUT")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": "connect_sale_10000", **figures}) + "\n")


@pytest.mark.long
def test_sigkill_mid_run_skips_nothing(
    flushed: Any, stages: Callable[..., StageProcess], sim_factory: Any, tmp_path: Path
) -> None:
    platform = "taobao"  # list, detail calls and pages read backwards: the most to interrupt
    sim = sim_factory(platform)
    now = int(time.time())
    sim.platform.populate(600, now - 3600, now - 20)
    name = connector_file(tmp_path / "connectors", platform, sim, now - 3700, window_s=300)
    env = {"ORDERQ_CONNECTORS_DIR": tmp_path / "connectors", **SECRET_ENV}
    procs = [stages("connect", **env)]
    feeder = sim.platform.feed(200, 8, late_share=0.2, late_s=LATE_S)
    rng = random.Random(3)
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 3.0))
        procs[-1].signal(signal.SIGKILL)
        assert procs[-1].proc is not None
        procs[-1].proc.wait()
        procs.append(stages("connect", **env))
    feeder.join()
    wait_all(flushed.url, sim, platform, name, procs, 240)
    assert_once(flushed.url, sim, platform, name)
    assert_faults_met(sim)


def _owner(url: str, name: str) -> str | None:
    with redis.Redis.from_url(url) as c:
        raw = c.get(keys.connector_key(name, "lease"))
    return raw.decode().partition("|")[0] if raw else None


@pytest.mark.long
def test_two_processes_one_polls_other_takes_over(
    flushed: Any, stages: Callable[..., StageProcess], sim_factory: Any, tmp_path: Path
) -> None:
    platform = "jd"
    sim = sim_factory(platform)
    now = int(time.time())
    sim.platform.populate(300, now - 600, now - 20)
    name = connector_file(tmp_path / "connectors", platform, sim, now - 700)
    env = {"ORDERQ_CONNECTORS_DIR": tmp_path / "connectors", **SECRET_ENV}
    a, b = stages("connect", **env), stages("connect", **env)
    wait_all(flushed.url, sim, platform, name, [a, b], 60)
    owner = _owner(flushed.url, name)
    by_pid = {str(p.proc.pid): p for p in (a, b) if p.proc is not None}
    assert owner is not None and owner.rpartition(":")[2] in by_pid
    polling, other = (a, b) if owner.endswith(f":{a.proc.pid if a.proc else 0}") else (b, a)
    time.sleep(2)
    assert '"connect.window"' in polling.log() and '"connect.window"' not in other.log()
    polling.signal(signal.SIGKILL)
    killed = time.monotonic()
    sim.platform.feed(200, 2)
    while _owner(flushed.url, name) in (None, owner):
        assert time.monotonic() - killed < 3 + 5, "the second process did not take over within the lease"
        time.sleep(0.1)
    wait_all(flushed.url, sim, platform, name, [other], 60)
    assert '"connect.window"' in other.log()
    assert_once(flushed.url, sim, platform, name)
    assert_faults_met(sim)
