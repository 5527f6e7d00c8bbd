"""Region holds: set, lift, list; and the sweep that sends held orders on once their
province is no longer held.

Executors hold a ready order whose province is in ``control.holds`` (execute/worker.py
parks it in the partition's ``held`` zset + ``parked`` hash). Lifting a hold sweeps at
once (the DELETE handler) and every few seconds in each validate process, which also
catches an order an executor held on a stale view just after the hold was lifted.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from orderq import control
from orderq.client import Redis
from orderq.control import HOLDS_KEY
from orderq.schema import json_encoder, utc_iso

SWEEP_S = 2.0  # background sweep period of each validate process
SWEEP_LIMIT = 10_000  # held orders looked at per partition per sweep


class _Province(msgspec.Struct):
    province: str


class _Payload(msgspec.Struct):
    ship_to: _Province


_province_of = msgspec.msgpack.Decoder(_Payload).decode  # reads only ship_to.province


async def set_hold(r: Redis, province: str, reason: str) -> dict[str, Any]:
    doc = {"reason": reason, "since": utc_iso(time.time_ns() // 1000)}
    await r.client.hset(HOLDS_KEY, province, json_encoder.encode(doc))
    await control.publish(r, {"holds": "set", "province": province})
    return {"province": province, **doc}


async def delete_hold(r: Redis, province: str) -> tuple[bool, int]:
    """Lift a hold; returns (it existed, orders sent on now)."""
    existed = bool(await r.client.hdel(HOLDS_KEY, province))
    await control.publish(r, {"holds": "lifted", "province": province})
    return existed, await sweep(r)


async def list_holds(r: Redis) -> list[dict[str, Any]]:
    raw = await r.client.hgetall(HOLDS_KEY)
    out = [{"province": k.decode(), **msgspec.json.decode(v)} for k, v in raw.items()]
    return sorted(out, key=lambda h: (h.get("since", ""), h["province"]))


async def sweep(r: Redis, cache: dict[str, str] | None = None) -> int:
    """Send on every held order whose province is not held now. Round trips: one when
    nothing is held; else three (held keys + current holds, payloads not seen before,
    one ``unhold`` call per partition with work). ``cache`` (order key -> province)
    spares decoding the same held orders on every sweep."""
    parts = r.partitions
    pipe = r.client.pipeline(transaction=False)
    pipe.hkeys(HOLDS_KEY)
    for p in parts:
        pipe.zrange(p.held, 0, SWEEP_LIMIT - 1)
    res = await pipe.execute()
    held_now = {k.decode() for k in res[0]}
    members = [[m.decode() for m in ms] for ms in res[1:]]
    if not any(members):
        if cache:
            cache.clear()
        return 0
    cache = cache if cache is not None else {}
    unknown = [(p, [k for k in ms if k not in cache]) for p, ms in zip(parts, members, strict=True)]
    unknown = [(p, ks) for p, ks in unknown if ks]
    if unknown:
        pipe = r.client.pipeline(transaction=False)
        for p, ks in unknown:
            pipe.hmget(p.parked, ks)
        for (_p, ks), payloads in zip(unknown, await pipe.execute(), strict=True):
            for k, payload in zip(ks, payloads, strict=True):
                if payload is None:
                    cache[k] = ""  # record gone: the unhold script drops the leftovers
                    continue
                try:
                    cache[k] = _province_of(payload).ship_to.province
                except (msgspec.DecodeError, msgspec.ValidationError):
                    cache[k] = ""
    live = {k for ms in members for k in ms}
    for k in [k for k in cache if k not in live]:
        del cache[k]
    moves = [(p, [k for k in ms if cache.get(k) not in held_now]) for p, ms in zip(parts, members, strict=True)]
    moves = [(p, ks) for p, ks in moves if ks]
    if not moves:
        return 0

    def build(pipe: Any) -> None:
        for p, ks in moves:
            r.script(pipe, "unhold", [p.held, p.parked, *p.lanes, p.counters, *(p.status(k) for k in ks)], ks)

    moved = sum(int(n) for n in await r.run(build))
    for _p, ks in moves:
        for k in ks:
            cache.pop(k, None)
    return moved
