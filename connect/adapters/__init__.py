"""One adapter per platform, each knowing its incremental order API (see each module)."""

from __future__ import annotations

from connect.adapters.base import Adapter
from connect.config import Connector
from orderq.errors import ConfigError


def adapter_for(platform: str) -> type[Adapter]:
    from connect.adapters.douyin import Douyin
    from connect.adapters.jd import Jd
    from connect.adapters.pdd import Pdd
    from connect.adapters.shopify import Shopify
    from connect.adapters.taobao import Taobao

    return {"taobao": Taobao, "jd": Jd, "douyin": Douyin, "pdd": Pdd, "shopify": Shopify}[platform]


def check_spec(c: Connector) -> None:
    """What only the platform's adapter knows: its credentials and its window limit."""
    cls = adapter_for(c.spec.platform)
    missing = [f for f in cls.credentials if f not in c.secrets]
    if missing:
        raise ConfigError(str(c.file), f"{c.spec.platform} needs credentials {', '.join(missing)}")
    if c.spec.window_s is not None and c.spec.window_s > cls.max_window_s:
        raise ConfigError(
            str(c.file), f"window_s {c.spec.window_s:g} is over {c.spec.platform}'s limit of {cls.max_window_s:g}"
        )
