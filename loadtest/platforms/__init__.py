"""Platform simulators: real local HTTP servers that speak each platform's incremental order API
(Taobao/Tmall TOP, JD JOS, Douyin, Pinduoduo, Shopify REST) closely enough for the connectors of
``connect/``: request signatures, window and page rules, rate limits and error codes, and faults
on purpose (late writes inside the overlap, orders modified while a window is read, 5xx bursts,
throttling). The connectors are tested against them, and a shop rehearses a sale with them::

    python -m loadtest.platforms taobao --orders 10000 --port 9100
"""

from __future__ import annotations

from loadtest.platforms.base import Faults, Platform, SimOrder, Simulator


def simulator(platform: str, faults: Faults | None = None, seed: int = 1, lag_s: float = 0.0) -> Simulator:
    from loadtest.platforms.douyin import DouyinSim
    from loadtest.platforms.jd import JdSim
    from loadtest.platforms.pdd import PddSim
    from loadtest.platforms.shopify import ShopifySim
    from loadtest.platforms.taobao import TaobaoSim

    cls = {"taobao": TaobaoSim, "jd": JdSim, "douyin": DouyinSim, "pdd": PddSim, "shopify": ShopifySim}[platform]
    return Simulator(cls(faults or Faults(), seed, lag_s))


__all__ = ["Faults", "Platform", "SimOrder", "Simulator", "simulator"]
