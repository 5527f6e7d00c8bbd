"""Region holds: set, lift, list; and the sweep that sends held orders on once their
province is no longer held.

Executors hold a ready order whose province is in ``control.holds`` (execute/worker.py
parks it in the partition's ``held`` zset + ``parked`` hash). Lifting a hold sweeps at
once (the DELETE handler) and every few seconds in each validate process, which also
catches an order an executor held on a stale view just after the hold was lifted.

A sweep pages through every held order of every partition (``ZSCAN``, ``SWEEP_PAGE``
a page), so an order held for a lifted province is found however many orders held for
other provinces are in front of it, and no call reads or moves more than a page. A
validate process's background sweep makes a whole pass only when it may find work (a hold
was lifted, shortly after, and every ``FULL_PASS_S``); in between it reads one page per
partition, so thousands of orders held through a typhoon week cost little.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from orderq import control
from orderq.client import Redis
from orderq.keys import HOLDS_KEY, Partition
from orderq.schema import json_encoder, utc_iso

SWEEP_S = 2.0  # background sweep period of each validate process
SWEEP_PAGE = 1000  # held orders read (ZSCAN COUNT) and moved per partition per call
FULL_PASS_S = 60.0  # background: a whole pass at least this often, whatever changed
# Background: whole passes go on this long after the holds changed. An executor may hold an
# order on its old view of the holds for a moment after a lift (control re-read: 1 s, plus
# the batch it had in hand).
STALE_S = 10.0
CACHE_MAX = 200_000  # held orders whose province a process remembers (more: read each time)


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
    """Send on every held order whose province is not held now: a whole pass over every
    held order of every partition, a page (``SWEEP_PAGE`` per partition) per round trip.
    Round trips: one when nothing is held; else per page the read, the payloads not seen
    before (``cache``: order key -> province) and one ``unhold`` call per partition with work."""
    held_now, pages = await _first_page(r, [(p, 0) for p in r.partitions])
    cache = cache if cache is not None else {}
    moved = 0
    live: set[str] = set()
    while pages:
        for _p, _cursor, ks in pages:
            live.update(ks)
        moved += await _send_on(r, [(p, ks) for p, _c, ks in pages], held_now, cache)
        pages = await _scan(r, [(p, c) for p, c, _ks in pages if c])
    for k in [k for k in cache if k not in live]:
        del cache[k]
    return moved


class Sweeper:
    """The background sweep of one process: whole passes only when they may find work, else a
    page per partition per call, its cursor kept from one call to the next (so a whole pass
    also happens, slowly, in the background)."""

    def __init__(self) -> None:
        self.cache: dict[str, str] = {}  # held order key -> province
        self._seen: frozenset[str] | None = None  # the holds at the last sweep
        self._whole_until = 0.0  # monotonic: whole passes go on until then
        self._next_whole = 0.0
        self._cursors: dict[int, int] = {}  # partition index -> ZSCAN cursor of the slow pass

    async def sweep(self, r: Redis) -> int:
        """One background sweep; returns the orders sent on."""
        now = time.monotonic()
        held_now = frozenset(k.decode() for k in await r.client.hkeys(HOLDS_KEY))
        if self._seen is None or self._seen - held_now:  # a hold was lifted (setting one frees nothing)
            self._whole_until = now + STALE_S  # (a pass that fails is tried again until then)
        self._seen = held_now
        if now < self._whole_until or now >= self._next_whole:
            moved = await sweep(r, self.cache)
            self._next_whole = now + FULL_PASS_S
            return moved
        parts = r.partitions
        _, pages = await _first_page(r, [(p, self._cursors.get(p.index, 0)) for p in parts], read_holds=False)
        self._cursors = {p.index: c for p, c, _ks in pages if c}
        return await _send_on(r, [(p, ks) for p, _c, ks in pages], held_now, self.cache)


async def _first_page(
    r: Redis, targets: Sequence[tuple[Partition, int]], read_holds: bool = True
) -> tuple[frozenset[str], list[tuple[Partition, int, list[str]]]]:
    """The holds now and one page of each partition's held orders, in one round trip."""
    pipe = r.client.pipeline(transaction=False)
    if read_holds:
        pipe.hkeys(HOLDS_KEY)
    for p, cursor in targets:
        pipe.zscan(p.held, cursor, count=SWEEP_PAGE)
    res = await pipe.execute()
    held_now = frozenset(k.decode() for k in res[0]) if read_holds else frozenset()
    replies = res[1:] if read_holds else res
    return held_now, _pages(targets, replies)


async def _scan(r: Redis, targets: Sequence[tuple[Partition, int]]) -> list[tuple[Partition, int, list[str]]]:
    """The next page of each partition (cursor not 0), in one round trip."""
    if not targets:
        return []
    pipe = r.client.pipeline(transaction=False)
    for p, cursor in targets:
        pipe.zscan(p.held, cursor, count=SWEEP_PAGE)
    return _pages(targets, await pipe.execute())


def _pages(targets: Sequence[tuple[Partition, int]], replies: list[Any]) -> list[tuple[Partition, int, list[str]]]:
    """(partition, next cursor (0: done), order keys of the page) per target."""
    return [
        (p, int(cursor), [m.decode() for m, _score in members])
        for (p, _c), (cursor, members) in zip(targets, replies, strict=True)
    ]


async def _send_on(
    r: Redis, pages: list[tuple[Partition, list[str]]], held_now: frozenset[str], cache: dict[str, str]
) -> int:
    """Move the orders of one page per partition whose province is not held now."""
    pages = [(p, list(dict.fromkeys(ks))) for p, ks in pages if ks]  # (ZSCAN may repeat a key)
    if not pages:
        return 0
    province = {k: cache[k] for _p, ks in pages for k in ks if k in cache}
    unknown = [(p, [k for k in ks if k not in province]) for p, ks in pages]
    unknown = [(p, ks) for p, ks in unknown if ks]
    if unknown:
        pipe = r.client.pipeline(transaction=False)
        for p, ks in unknown:
            pipe.hmget(p.parked, ks)
        names: dict[str, str] = {}  # one string per province, shared by the cache's entries
        for (_p, ks), payloads in zip(unknown, await pipe.execute(), strict=True):
            for k, payload in zip(ks, payloads, strict=True):
                name = ""  # no payload, or one that does not decode: the unhold script decides
                if payload is not None:
                    try:
                        name = _province_of(payload).ship_to.province
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        pass
                province[k] = names.setdefault(name, name)
                if len(cache) < CACHE_MAX:
                    cache[k] = province[k]
    moves = [(p, [k for k in ks if province[k] not in held_now]) for p, ks in pages]
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
