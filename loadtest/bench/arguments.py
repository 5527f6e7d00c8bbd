"""The options of ``orderq bench`` and the checks made on them before anything starts."""

from __future__ import annotations

import argparse

from loadtest import loadgen
from orderq.errors import ConfigError
from orderq.settings import Settings

CORE_PHASES = ("single", "batch", "burst", "e2e")
ALL_PHASES = ("single", "batch", "burst", "reference", "e2e", "spike", "peers")
# --warehouses: routing on; bench orders ship to Suzhou, so Shanghai is the nearest
BENCH_WAREHOUSES = (
    {"id": "SH", "province": "上海市", "city": "上海市", "carriers": ["sf"]},
    {"id": "GZ", "province": "广东省", "city": "广州市", "carriers": ["zto"]},
    {"id": "BJ", "province": "北京市", "city": "北京市", "carriers": ["jd"]},
)


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
    ap.add_argument(
        "--cancel-share",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="e2e/spike: cancel this share of the acknowledged orders at random moments (right after "
        "the ack, 0-250 ms later, 1-3 s later: interceptions, answered as the warehouse would), then "
        "check every cancelled order and the stock (default 0: no cancel)",
    )
    ap.add_argument("--url", help="ingress of a running instance, e.g. http://127.0.0.1:8080")
    ap.add_argument("--start", action="store_true", help="always start a private instance")
    ap.add_argument("--keep", action="store_true", help="keep the private instance's data dir")
    ap.add_argument(
        "--valkey-instructions",
        action="store_true",
        help="burst: count the instructions the server executes per drained order (callgrind; a private "
        "instance, about 50 times slower: a burst of a few thousand orders; see BENCHMARKS.md)",
    )


def selected(args: argparse.Namespace) -> list[str]:
    """The phases to run, in the documented order."""
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


def check(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse options that cannot work together or with this instance's settings."""
    if args.start and args.url:
        raise ConfigError("--url", "cannot be combined with --start")
    if args.valkey_instructions and args.url:
        raise ConfigError("--valkey-instructions", "counts a private instance's server: cannot be combined with --url")
    positive = ("duration", "connections", "batch_size", "batch_connections", "rate", "spike_orders")
    for name in (*positive, "open_connections"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}", "must be > 0")
    if not 0.0 <= args.cancel_share < 1.0:
        raise ConfigError("--cancel-share", "must be >= 0 and < 1")
    if args.batch_size > settings.batch_max:
        raise ConfigError("--batch-size", f"must be <= ORDERQ_BATCH_MAX ({settings.batch_max})")
