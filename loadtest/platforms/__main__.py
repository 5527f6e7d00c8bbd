"""``python -m loadtest.platforms <platform> [--orders N] [--feed N --seconds S] [--port P]``: a
platform simulator to rehearse a sale against (a connector file's ``url`` points at it, its
credentials name variables holding loadtest.platforms.base.SECRETS)."""

from __future__ import annotations

import argparse
import time

from loadtest.platforms import Faults, simulator


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m loadtest.platforms")
    ap.add_argument("platform", choices=("taobao", "jd", "douyin", "pdd", "shopify"))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--orders", type=int, default=1000, help="orders modified over the last hour")
    ap.add_argument("--feed", type=int, default=0, help="orders added live ...")
    ap.add_argument("--seconds", type=float, default=60.0, help="... over this long")
    ap.add_argument("--late-share", type=float, default=0.1)
    ap.add_argument("--late-s", type=float, default=60.0)
    ap.add_argument("--lag-s", type=float, default=180.0, help="Pinduoduo: how far behind now a window must end")
    ap.add_argument("--throttle-every", type=int, default=0)
    ap.add_argument("--burst-every", type=int, default=0)
    ap.add_argument("--touch-per-page", type=int, default=0)
    ap.add_argument("--late-per-page", type=int, default=0, help="late writes showing up as each page is read")
    a = ap.parse_args()
    faults = Faults(
        throttle_every=a.throttle_every,
        burst_every=a.burst_every,
        touch_per_page=a.touch_per_page,
        late_per_page=a.late_per_page,
    )
    sim = simulator(a.platform, faults, lag_s=a.lag_s if a.platform == "pdd" else 0.0).start(a.port)
    now = int(time.time())
    sim.platform.populate(a.orders, now - 3600, now)
    if a.feed:
        sim.platform.feed(a.feed, a.seconds, a.late_share, a.late_s)
    print(f"{a.platform} simulator on {sim.url} ({a.orders} orders); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(5)
            print(sim.platform.stats, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()


if __name__ == "__main__":
    main()
