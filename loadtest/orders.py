"""Orders and tokens for the locust scenarios: stdlib only, so the load generator can run
from any machine with locust installed (it needs no orderq install and no Redis).

Orders look like a multi-channel shop's peak day: weighted channel mix, 5 % VIP, repeat
and first-time customers, 1-3 lines from a small catalogue, a remark or a gift now and
then, Beijing or UTC times depending on the channel. Every field a validation rule keys
on (recipient phone and address, buyer IP) varies per order, so generated orders are
neither duplicate suspects nor an IP burst: they exercise the path a normal order takes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

CHANNELS = ("tmall", "jd", "douyin", "pdd", "kuaishou", "shopify", "miniapp", "pos")
# Orders per channel on a peak day (weights).
CHANNEL_WEIGHTS = {"tmall": 30, "jd": 20, "douyin": 20, "pdd": 15, "kuaishou": 5, "miniapp": 5, "shopify": 3, "pos": 2}
VIP_SHARE = 0.05  # customer.tier vip
NEW_SHARE = 0.30  # a customer never seen before (priority "new")
REPEAT_POOL = 5000  # the other customers come back (priority "regular" after their first order)
VIP_POOL = 500
REMARK_SHARE = 0.30  # crm.remark_sync, a non-core sync the breaker may defer
GIFT_SHARE = 0.20  # crm.gift_sync
BEIJING = dt.timezone(dt.timedelta(hours=8))
UTC_CHANNELS = frozenset({"shopify"})  # channels whose clocks send UTC, the others Beijing time

# sku -> (usual unit price, paid price): paid within 10 % of the usual price (no price anomaly).
CATALOGUE: dict[str, tuple[str, str]] = {
    "LT-SOFA-OAK-3": ("2999.00", "2899.00"),
    "LT-CHAIR-ASH": ("599.00", "569.00"),
    "LT-LAMP-LINEN": ("199.00", "189.00"),
    "LT-TEE-CTN-M": ("89.90", "85.00"),
    "LT-DRESS-SLK-S": ("459.00", "429.00"),
    "LT-SERUM-30ML": ("329.00", "299.00"),
    "LT-MASK-10P": ("129.00", "119.00"),
    "LT-TEA-LJ-250G": ("168.00", "158.00"),
}
GIFTS = ("LT-GIFT-CUSHION", "LT-GIFT-SAMPLE")
REMARKS = (
    "周末送货, 电梯房",
    "请放门口, 不要打电话",
    "送礼用, 不要放发票",
    "工作日白天送达",
    "please deliver after 6pm",
)
NAMES = ("王芳", "李娜", "张伟", "刘洋", "陈静", "杨磊", "赵敏", "黄勇", "周婷", "吴强")
PLACES = (
    ("江苏省", "苏州市", "工业园区", "星湖街"),
    ("浙江省", "杭州市", "西湖区", "文三路"),
    ("上海市", "上海市", "浦东新区", "张杨路"),
    ("广东省", "深圳市", "南山区", "科技园路"),
    ("北京市", "北京市", "朝阳区", "建国路"),
    ("四川省", "成都市", "武侯区", "天府大道"),
    ("湖北省", "武汉市", "洪山区", "珞喻路"),
    ("山东省", "青岛市", "市南区", "香港中路"),
)
PHONE_PREFIXES = ("138", "139", "150", "186", "187", "135")  # none of the virtual carriers


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines, ``#`` comments, optional quotes (the format of ``tokens.env``)."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def parse_pairs(raw: str) -> dict[str, str]:
    """``a=x,b=y`` -> ``{"a": "x", "b": "y"}``."""
    pairs = (item.split("=", 1) for item in raw.split(",") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs if k.strip() and v.strip()}


@dataclass(frozen=True)
class Tokens:
    """Bearer tokens per channel and the admin token; ``auth`` False when the ingress runs open."""

    channels: Mapping[str, str] = field(default_factory=dict)
    admin: str | None = None
    auth: bool = True
    source: str = "environment"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tokens:
        """ORDERQ_CHANNEL_TOKENS / ORDERQ_ADMIN_TOKEN, else ``ORDERQ_DATA_DIR/tokens.env``
        (what ``orderq up`` writes when they are unset)."""
        env = os.environ if env is None else env
        auth = env.get("ORDERQ_AUTH", "on").strip().lower() not in ("0", "off", "false", "no")
        channels = parse_pairs(env.get("ORDERQ_CHANNEL_TOKENS", ""))
        admin = env.get("ORDERQ_ADMIN_TOKEN", "").strip() or None
        source = "environment"
        if not channels or not admin:
            path = Path(env.get("ORDERQ_DATA_DIR", "").strip() or ".orderq") / "tokens.env"
            stored = read_env_file(path)
            if stored:
                source = str(path)
                channels = channels or parse_pairs(stored.get("ORDERQ_CHANNEL_TOKENS", ""))
                admin = admin or stored.get("ORDERQ_ADMIN_TOKEN") or None
        return cls(channels=channels, admin=admin, auth=auth, source=source)

    def usable_channels(self) -> tuple[str, ...]:
        """Channels an order can be sent for: those with a token (all of them without auth)."""
        return tuple(c for c in CHANNEL_WEIGHTS if not self.auth or c in self.channels)

    def headers(self, channel: str) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.auth and channel in self.channels:
            h["Authorization"] = f"Bearer {self.channels[channel]}"
        return h

    def admin_headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.auth and self.admin:
            h["Authorization"] = f"Bearer {self.admin}"
        return h


def run_id() -> str:
    """Unique per load-generator process and run, so two runs never send the same order key."""
    return f"{int(time.time()) % 1_000_000:06d}{os.getpid() % 10_000:04d}{secrets.token_hex(2)}"


class OrderMaker:
    """Valid, unique orders (contract §3) as dicts; ``key(order)`` is the order key."""

    def __init__(self, channels: tuple[str, ...], rid: str | None = None, seed: int | None = None) -> None:
        if not channels:
            raise ValueError("no channel to send orders for")
        self.rid = rid or run_id()
        self.n = 0
        self.rnd = random.Random(seed)
        self.channels = channels
        self.weights = [CHANNEL_WEIGHTS.get(c, 1) for c in channels]
        self.skus = list(CATALOGUE)
        # `locust --processes N` forks after importing the locustfile: each child needs its
        # own run id, or two processes would send the same order keys.
        if rid is None and seed is None and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.rid = run_id()
        self.rnd = random.Random()

    def channel(self) -> str:
        return self.rnd.choices(self.channels, self.weights)[0]

    def order_id(self, channel: str, n: int) -> str:
        """Ids shaped like each platform's (uniqueness comes from the run id and counter)."""
        day = dt.datetime.now(BEIJING).strftime("%Y%m%d")
        prefix = {"tmall": "T", "jd": "", "douyin": "DY", "pdd": day[2:] + "-", "shopify": "SH"}.get(channel, "")
        return f"{prefix}{day}{self.rid}{n:07d}"

    def customer(self, tier: str | None, n: int) -> dict[str, Any]:
        rnd = self.rnd
        if tier is None:
            tier = "vip" if rnd.random() < VIP_SHARE else "regular"
        if tier == "vip":
            cid = f"v{self.rid}-{rnd.randrange(VIP_POOL)}"
        elif rnd.random() < NEW_SHARE / (1 - VIP_SHARE):
            cid = f"n{self.rid}-{n}"
        else:
            cid = f"c{self.rid}-{rnd.randrange(REPEAT_POOL)}"
        return {"id": cid, "tier": tier, "phone": self.phone(), "ip": self.ip()}

    def phone(self) -> str:
        return self.rnd.choice(PHONE_PREFIXES) + f"{self.rnd.randrange(100_000_000):08d}"

    def ip(self) -> str:
        r = self.rnd.randrange
        return f"{r(1, 224)}.{r(256)}.{r(256)}.{r(1, 255)}"

    def make(
        self, tier: str | None = None, channel: str | None = None, customer_id: str | None = None
    ) -> dict[str, Any]:
        """One new order. ``tier`` None: 5 % VIP. ``customer_id`` pins a returning customer."""
        rnd = self.rnd
        n = self.n
        self.n += 1
        channel = channel or self.channel()
        customer = self.customer(tier, n)
        if customer_id:
            customer["id"] = customer_id
        lines = []
        paid = Decimal(0)
        for sku in rnd.sample(self.skus, rnd.choice((1, 1, 1, 2, 2, 3))):
            unit, paid_price = CATALOGUE[sku]
            qty = rnd.choice((1, 1, 1, 2, 3))
            lines.append({"sku": sku, "qty": qty, "unit_price": unit, "paid_price": paid_price})
            paid += Decimal(paid_price) * qty
        province, city, district, street = rnd.choice(PLACES)
        now = dt.datetime.now(dt.UTC if channel in UTC_CHANNELS else BEIJING)
        order: dict[str, Any] = {
            "channel": channel,
            "order_id": self.order_id(channel, n),
            "created_at": now.isoformat(timespec="seconds"),
            "customer": customer,
            "ship_to": {
                "name": rnd.choice(NAMES),
                "phone": customer["phone"],
                "province": province,
                "city": city,
                "district": district,
                "address": f"{street} {rnd.randrange(1, 999)} 号 {rnd.randrange(1, 30)} 幢 {rnd.randrange(101, 2999)}",
            },
            "lines": lines,
            "paid_amount": f"{paid:.2f}",
            "currency": "CNY",
        }
        if rnd.random() < REMARK_SHARE:
            order["remark"] = rnd.choice(REMARKS)
        if rnd.random() < GIFT_SHARE:
            order["gifts"] = [{"sku": rnd.choice(GIFTS), "qty": 1}]
        if channel == "douyin" and rnd.random() < 0.2:
            order["live_room"] = f"room-{rnd.randrange(100)}"  # unknown field: kept in extra
        return order


def key(order: Mapping[str, Any]) -> str:
    return f"{order['channel']}:{order['order_id']}"


def encode(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def stock_items(physical: int = 10_000_000) -> dict[str, Any]:
    """``PUT /v1/admin/stock`` body that makes every catalogue SKU and gift sellable."""
    return {"items": [{"sku": sku, "physical": physical} for sku in (*CATALOGUE, *GIFTS)]}
