"""Coupon records in the validation ledger (``PUT /v1/admin/coupons``).

A coupon orderq knows is checked by the ledger script: its platform must be the
order's channel (coupon_cross_platform), it must not have expired at the order's
accept time (coupon_expired), and a single-use one is used by one order only, the
first to be validated (coupon_used). A coupon orderq does not know is the platform's
own business: only the order's own platform claim and the subsidy cap apply to it.
Re-putting a coupon changes its terms but keeps who used it.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
from msgspec import Meta

from orderq import keys
from orderq.client import Redis
from orderq.schema import Money, Text, cents


class CouponRecord(msgspec.Struct, forbid_unknown_fields=True):
    code: Text
    platform: Annotated[str, Meta(min_length=1, max_length=32, pattern=r"^[a-z0-9_]+$")]
    amount: Money
    expires_at: Annotated[dt.datetime, Meta(tz=True)] | None = None
    single_use: bool = False


class CouponsBody(msgspec.Struct, forbid_unknown_fields=True):
    coupons: Annotated[list[CouponRecord], Meta(min_length=1, max_length=10_000)]


async def put_coupons(r: Redis, coupons: list[CouponRecord]) -> int:
    """Create or update coupon records in one round trip."""

    def build(pipe: object) -> None:
        for c in coupons:
            expiry = int(c.expires_at.timestamp() * 1000) if c.expires_at else 0
            mapping = {"pf": c.platform, "a": cents(c.amount), "x": expiry, "one": 1 if c.single_use else 0}
            pipe.hset(keys.coupon_key(c.code), mapping=mapping)  # type: ignore[attr-defined]

    await r.run(build)
    return len(coupons)


async def get_coupon(r: Redis, code: str) -> dict[str, object] | None:
    h = await r.client.hgetall(keys.coupon_key(code))
    if not h:
        return None
    return {
        "code": code,
        "platform": h[b"pf"].decode(),
        "amount_cents": int(h[b"a"]),
        "expires_ms": int(h[b"x"]) or None,
        "single_use": h[b"one"] == b"1",
        "used_by": h[b"u"].decode() if h.get(b"u") else None,
    }
