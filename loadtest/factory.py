"""The orders of ``orderq bench`` as ready-to-send request bytes: unique (a run id plus a
counter), in a peak day's mix of channels and customer classes, each built from a byte template
with one ``%`` format, so the generator spends next to nothing per order.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

from orderq.schema import json_encoder

# Channel mix of a multi-channel shop on a peak day (weights, not shares of the contract).
CHANNEL_WEIGHTS = {
    "tmall": 30,
    "jd": 20,
    "douyin": 20,
    "pdd": 15,
    "kuaishou": 5,
    "miniapp": 5,
    "shopify": 3,
    "pos": 2,
}
VIP_SHARE = 0.05  # customer.tier vip
NEW_SHARE = 0.30  # a customer id never seen before -> priority "new"
REGULAR_POOL = 1000  # the rest reuse these customer ids -> priority "regular" after their first order
VIP_POOL = 200
REMARK_SHARE = 0.30  # orders with a remark (crm.remark_sync, a non-core sync)
GIFT_SHARE = 0.20  # orders with a gift (crm.gift_sync)
SKUS = tuple(f"BENCH-{i:02d}" for i in range(20))
GIFT_SKU = "BENCH-GIFT"
# (unit_price, paid_price): paid within 10 % of the usual price, so no price-anomaly risk;
# half the orders are >= 500 (invoice.request runs).
PRICES = (("199.00", "189.00"), ("599.00", "569.00"), ("2999.00", "2899.00"), ("89.90", "85.00"))
CREATED_AT = "2026-06-18T00:00:01+08:00"


def _template(channel: str, vip: bool, price: tuple[str, str], remark: bool, gift: bool) -> bytes:
    """One order as JSON bytes with ``%(name)s`` slots for the per-order fields.

    Every field a validation rule keys on (recipient address, phone, IP) varies per
    order, so benchmark orders are not duplicate suspects or an IP burst: they measure
    the path a normal order takes.
    """
    order: dict[str, Any] = {
        "channel": channel,
        "order_id": "@oid@",
        "created_at": CREATED_AT,
        "customer": {"id": "@cid@", "tier": "vip" if vip else "regular", "phone": "@phone@", "ip": "@ip@"},
        "ship_to": {
            "name": "王芳",
            "phone": "@phone@",
            "province": "江苏省",
            "city": "苏州市",
            "district": "工业园区",
            "address": "星湖街 @n@ 号 5 幢 1201",
        },
        "lines": [{"sku": "@sku@", "qty": 1, "unit_price": price[0], "paid_price": price[1]}],
        "paid_amount": price[1],
        "currency": "CNY",
    }
    if remark:
        order["remark"] = "周末送货, 电梯房"
    if gift:
        order["gifts"] = [{"sku": GIFT_SKU, "qty": 1}]
    raw = json_encoder.encode(order).replace(b"%", b"%%")
    for name in (b"oid", b"cid", b"phone", b"ip", b"n", b"sku"):
        raw = raw.replace(b"@" + name + b"@", b"%(" + name + b")s")
    return raw


class OrderFactory:
    """Unique orders as ready-to-send request bytes: a run id plus a counter.

    ``sample`` collects every ``sample_every``-th order key, for end-to-end latency
    read back from the status records afterwards.
    """

    def __init__(
        self,
        run_id: str,
        host: str,
        tokens: dict[str, str] | None,
        channels: Sequence[str],
        seed: int = 618,
    ) -> None:
        self.run_id = run_id
        self.n = 0
        self.track = False  # keep the keys of the request being built, for take_keys()
        self._keys: list[str] = []
        self.rnd = random.Random(seed)
        self.sample: list[str] = []
        self.sample_every = 0
        self.last_class = "regular"  # priority class (vip / new / regular) of the order built last
        self.gifts: set[int] = set()  # counters of the orders built with a gift: units(), for the stock check
        usable = [c for c in CHANNEL_WEIGHTS if c in channels and (tokens is None or c in tokens)]
        if not usable:
            raise ValueError("no channel with a token to send orders with")
        # recipients differ from run to run too: a second run against the same instance within
        # ORDERQ_DUP_WINDOW_S must not meet the first one's orders as duplicate suspects
        self.phone_offset = zlib.crc32(run_id.encode()) % 100_000_000
        self.channel_cycle = [c for c in usable for _ in range(CHANNEL_WEIGHTS[c])]
        self.rnd.shuffle(self.channel_cycle)
        self.templates = {
            (c, vip, pi, rm, gf): _template(c, vip, PRICES[pi], rm, gf)
            for c in usable
            for vip in (False, True)
            for pi in range(len(PRICES))
            for rm in (False, True)
            for gf in (False, True)
        }
        self.heads: dict[tuple[str, str], bytes] = {}
        for c in usable:
            auth = f"Authorization: Bearer {tokens[c]}\r\n" if tokens is not None else ""
            for path in ("/v1/orders", "/v1/orders/batch"):
                self.heads[(c, path)] = (
                    f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: "
                ).encode()

    def _body(self, channel: str) -> bytes:
        n = self.n
        self.n = n + 1
        rnd = self.rnd.random
        roll = rnd()
        run = self.run_id
        if roll < VIP_SHARE:
            vip, cid = True, f"v{run}-{int(rnd() * VIP_POOL)}"
            self.last_class = "vip"
        elif roll < VIP_SHARE + NEW_SHARE:
            vip, cid = False, f"n{run}-{n}"
            self.last_class = "new"
        else:
            vip, cid = False, f"c{run}-{int(rnd() * REGULAR_POOL)}"
            self.last_class = "regular"
        remark = rnd() < REMARK_SHARE
        gift = rnd() < GIFT_SHARE
        if gift:
            self.gifts.add(n)
        tmpl = self.templates[(channel, vip, n & 3, remark, gift)]
        oid = f"B{run}-{n:08d}"
        if self.track:
            self._keys.append(f"{channel}:{oid}")
        if self.sample_every and n % self.sample_every == 0:
            self.sample.append(f"{channel}:{oid}")
        return tmpl % {
            b"oid": oid.encode(),
            b"cid": cid.encode(),
            b"phone": f"138{(n + self.phone_offset) % 100_000_000:08d}".encode(),
            b"ip": f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}".encode(),
            b"n": str(n).encode(),
            b"sku": SKUS[n % len(SKUS)].encode(),
        }

    def _channel(self) -> str:
        return self.channel_cycle[self.n % len(self.channel_cycle)]

    def single(self) -> bytes:
        """One ``POST /v1/orders`` request."""
        channel = self._channel()
        body = self._body(channel)
        return b"%b%d\r\n\r\n%b" % (self.heads[(channel, "/v1/orders")], len(body), body)

    def batch(self, size: int) -> bytes:
        """One ``POST /v1/orders/batch`` request of ``size`` orders (one channel: one token)."""
        channel = self._channel()
        body = b'{"orders":[' + b",".join(self._body(channel) for _ in range(size)) + b"]}"
        return b"%b%d\r\n\r\n%b" % (self.heads[(channel, "/v1/orders/batch")], len(body), body)

    def units(self, key: str) -> dict[str, int]:
        """The units per SKU that order ``key`` (built here) holds once validated: its one line,
        and its gift when it has one."""
        n = int(key.rsplit("-", 1)[1])
        out = {SKUS[n % len(SKUS)]: 1}
        if n in self.gifts:
            out[GIFT_SKU] = 1
        return out

    def take_keys(self) -> list[str]:
        """The order keys of the request built last (with ``track`` on), in request order."""
        keys, self._keys = self._keys, []
        return keys
