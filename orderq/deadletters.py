"""Dead letters an operator can act on (contract §5): list, replay, discard.

Where they are: each partition has two dead-letter streams. ``p.dead`` holds the validate
and execute entries the recovery sweep gave up on (reclaim.lua: the entry's own fields plus
``stream``, ``id``, ``deliveries``, ``error``); ``keys.dispatch_dead(p)`` the downstream
deliveries the dispatcher gave up on (plus ``action``). An entry still in one of them is an
unresolved dead letter; replay and discard delete it in the same script that acts on it
(deadletter.lua), so nothing else keeps that state and ``orderq audit`` ages them by their
stream ids. Dead-letter streams are never trimmed: they shrink by resolution only.

An id names partition, stage and stream id (``e2-1733312345678-0``): replay and discard
find their entry with one ``XRANGE id id``. Treat it as opaque.

- **replay** puts the entry back on the stream it failed in, for that stage's consumer
  group (a dispatch entry: its action's outbox, and the action ``done`` again): once in
  effect as always, since every stage is idempotent per order (handoff.lua acts only on an
  ``accepted`` order, execute.lua only on a ``validated`` one with the ledger's ``HSETNX``
  per action, the dispatcher's target dedups by ``Idempotency-Key``).
- **discard** resolves it for good: a validate or execute entry's order becomes
  ``rejected`` with reason ``discarded`` and gives back what it holds in the validation
  ledger (stock units, also those allocated to a warehouse, single-use coupons, its day's
  subsidy); a dispatch entry's action becomes ``failed``. The ledger lives in another
  slot: the discard script records the release as owed (``keys.dead_release``), the
  release follows (release.lua and restock.lua, both idempotent) and clears it; a discard
  cut short in between is completed by the next discard.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from orderq import keys, lifecycle
from orderq.client import Redis
from orderq.commands import Value
from orderq.keys import REASONS_KEY
from orderq.ledger import review, stock
from orderq.schema import unpack_order, utc_iso
from orderq.wire import Decided, Field

STAGES = ("validate", "execute", "dispatch")
MAX_LIST = 1000  # items per page
OLDEST = 5  # dead letters the dashboard shows
_LETTER = {"validate": "v", "execute": "e", "dispatch": "d"}
_STAGE_OF = {v: k for k, v in _LETTER.items()}
_ID = re.compile(r"^([ved])(\d{1,4})-(\d{1,20})-(\d{1,20})$")
_META = frozenset({b"stream", b"id", b"deliveries", b"error", b"action"})  # added by the dead-lettering


class NotFound(LookupError):
    """No unresolved dead letter has this id (never had, or replayed or discarded already)."""


class NotReplayable(ValueError):
    """The entry names a stream its stage does not read: it cannot be put back (discard it)."""


class Owed(msgspec.Struct, array_like=True):
    """What a discarded order still has to give back in the validation ledger: its review-form
    ledger record (release.lua's input; empty: it holds nothing there, nothing to write) and
    the SKUs of its lines and gifts (units allocated to a warehouse are released by restock.lua)."""

    record: bytes
    skus: list[str]


_owed_decoder = msgspec.msgpack.Decoder(Owed)
_owed_encoder = msgspec.msgpack.Encoder()


@dataclass(slots=True)
class DeadLetter:
    id: str
    stage: str
    order_key: str
    action: str | None
    error: str
    deliveries: int
    since: str
    partition: keys.Partition
    stream_id: str
    fields: dict[bytes, bytes]

    def doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stage": self.stage,
            "order_key": self.order_key,
            "action": self.action,
            "error": self.error,
            "deliveries": self.deliveries,
            "since": self.since,
        }

    @property
    def sort_key(self) -> tuple[int, int, int, int]:
        ms, seq = self.stream_id.split("-")
        return (int(ms), int(seq), self.partition.index, 1 if self.stage == "dispatch" else 0)


def make_id(stage: str, p: keys.Partition, stream_id: str) -> str:
    return f"{_LETTER[stage]}{p.index}-{stream_id}"


def parse_id(r: Redis, dl_id: str) -> tuple[str, keys.Partition, str] | None:
    """(stage, partition, stream id) of a dead-letter id; None when it cannot be one."""
    m = _ID.match(dl_id)
    if not m or int(m.group(2)) >= len(r.partitions):
        return None
    return _STAGE_OF[m.group(1)], r.partitions[int(m.group(2))], f"{int(m.group(3))}-{int(m.group(4))}"


def _stream_of(stage: str, p: keys.Partition) -> str:
    return keys.dispatch_dead(p) if stage == "dispatch" else p.dead


def _text(v: bytes | None) -> str:
    return v.decode("utf-8", "replace") if v else ""


def _action_of(p: keys.Partition, f: dict[bytes, bytes]) -> str:
    """A dispatch dead letter's action: its ``action`` field (the dispatcher's), else its outbox
    stream's name (the recovery sweep's copy has no ``action``)."""
    if f.get(b"action"):
        return _text(f[b"action"])
    return _text(f.get(b"stream")).removeprefix(p.outbox(""))


def _item(p: keys.Partition, dispatch: bool, stream_id: str, f: dict[bytes, bytes]) -> DeadLetter:
    if dispatch:
        stage, action = "dispatch", _action_of(p, f)
    else:  # p.dead: the intake's entries failed validation, the lanes' execution
        stage, action = ("validate" if _text(f.get(b"stream")) == p.intake else "execute"), None
    try:
        deliveries = int(f.get(b"deliveries") or 0)
    except ValueError:
        deliveries = 0
    return DeadLetter(
        id=make_id(stage, p, stream_id),
        stage=stage,
        order_key=_text(f.get(b"k")),
        action=action,
        error=_text(f.get(b"error")),
        deliveries=deliveries,
        since=utc_iso(int(stream_id.split("-")[0]) * 1000),
        partition=p,
        stream_id=stream_id,
        fields=f,
    )


async def list_dead(
    r: Redis, stage: str | None = None, limit: int = 100, after: str | None = None
) -> tuple[list[DeadLetter], str | None]:
    """Unresolved dead letters, oldest first (by the time they were dead-lettered), over every
    partition; ``after``: the ``next`` of the page before. Returns (items, next or None).
    Raises ValueError for an ``after`` that is no dead-letter id."""
    cursor: tuple[int, int, int, int] | None = None
    if after:
        parsed = parse_id(r, after)
        if parsed is None:
            raise ValueError("after is not a dead-letter id")
        st, p, sid = parsed
        ms, seq = sid.split("-")
        cursor = (int(ms), int(seq), p.index, 1 if st == "dispatch" else 0)
    sources: list[tuple[keys.Partition, bool]] = []
    for p in r.partitions:
        if stage != "dispatch":
            sources.append((p, False))
        if stage in (None, "dispatch"):
            sources.append((p, True))
    start: dict[tuple[int, bool], str] = {}
    for p, dispatch in sources:
        if cursor is None:
            start[(p.index, dispatch)] = "-"
        else:  # entries with the cursor's stream id come after it only in a later stream
            later = (p.index, 1 if dispatch else 0) > cursor[2:]
            start[(p.index, dispatch)] = ("" if later else "(") + f"{cursor[0]}-{cursor[1]}"
    found: dict[tuple[int, bool], list[DeadLetter]] = {(p.index, d): [] for p, d in sources}
    todo = list(sources)
    page = limit + 1
    while todo:  # each stream's first limit + 1 matching entries: enough for the merged page
        pipe = r.client.pipeline(transaction=False)
        for p, dispatch in todo:
            pipe.xrange(_stream_of("dispatch" if dispatch else "", p), min=start[(p.index, dispatch)], count=page)
        again = []
        for (p, dispatch), entries in zip(todo, await pipe.execute(), strict=True):
            got = found[(p.index, dispatch)]
            for raw_id, f in entries:
                item = _item(p, dispatch, raw_id.decode(), f)
                if stage is None or item.stage == stage:
                    got.append(item)
            if len(entries) == page and len(got) < page:
                start[(p.index, dispatch)] = "(" + entries[-1][0].decode()
                again.append((p, dispatch))
        todo = again
    merged = list(heapq.merge(*found.values(), key=lambda d: d.sort_key))
    items = merged[:limit]
    return items, (items[-1].id if len(merged) > limit else None)


async def summary(r: Redis, oldest: int = OLDEST) -> dict[str, Any]:
    """For the dashboard: how many are unresolved, and the oldest few."""
    pipe = r.client.pipeline(transaction=False)
    for p in r.partitions:
        pipe.xlen(p.dead)
        pipe.xlen(keys.dispatch_dead(p))
    unresolved = sum(await pipe.execute())
    items = (await list_dead(r, limit=oldest))[0] if unresolved else []
    return {"unresolved": unresolved, "oldest": [d.doc() for d in items]}


async def get(r: Redis, dl_id: str) -> DeadLetter:
    """The unresolved dead letter ``dl_id``; raises NotFound."""
    parsed = parse_id(r, dl_id)
    if parsed is None:
        raise NotFound(dl_id)
    stage, p, sid = parsed
    entries = await r.client.xrange(_stream_of(stage, p), min=sid, max=sid)
    if not entries:
        raise NotFound(dl_id)
    item = _item(p, stage == "dispatch", sid, entries[0][1])
    if item.stage != stage:
        raise NotFound(dl_id)
    return item


def _sources(d: DeadLetter) -> list[str]:
    """The streams the entry may go back to: its stage's own."""
    p = d.partition
    if d.stage == "validate":
        return [p.intake]
    if d.stage == "execute":
        return list(p.lanes)
    return [p.outbox(a) for a in keys.OUTBOX_ACTIONS]


def _ledger_field(d: DeadLetter) -> str:
    """A dispatch dead letter's field in the effect ledger: ``x:<action>``, ``@<warehouse>`` for a
    routed pick (execute.lua's names), ``:<kind>`` for a second effect of the action (event.lua's
    ``x:notify.sms:shipped``), as dispatched.lua marked it failed."""
    if d.stage != "dispatch":
        return ""
    wh, kind = _text(d.fields.get(b"w")), _text(d.fields.get(b"n"))
    if kind:
        return f"{Field.ACTION}{d.action}:{kind}"
    return f"{Field.ACTION}{d.action}@{wh}" if wh else f"{Field.ACTION}{d.action}"


async def _resolve(r: Redis, d: DeadLetter, op: str, reason: str = "", owed: bytes = b"") -> str:
    p = d.partition
    ks = [
        _stream_of(d.stage, p),
        p.counters,
        p.status(d.order_key),
        keys.dead_release(p),
        p.order_copies,
        p.copy_refs,
        p.payload(d.order_key),
        *_sources(d),
        p.cancel_owed,
    ]
    args: list[Value] = [op, d.stream_id, d.order_key, d.stage, _ledger_field(d), r.settings.status_ttl_s, reason, owed]
    res = (await r.run(lambda pipe: r.script(pipe, "deadletter", ks, args)))[0]
    code = int(res[0])
    if code == 0:
        raise NotFound(d.id)  # resolved by someone else since it was read
    if code < 0:
        raise NotReplayable(f"dead letter {d.id} names stream {_text(d.fields.get(b'stream'))!r}")
    return _text(res[1])


async def replay(r: Redis, dl_id: str) -> dict[str, Any]:
    """Put ``dl_id`` back where it failed. Raises NotFound, NotReplayable."""
    d = await get(r, dl_id)
    status = await _resolve(r, d, "replay")
    return {**d.doc(), "resolution": "replayed", "status": status or None}


async def discard(r: Redis, dl_id: str, reason: str) -> dict[str, Any]:
    """Resolve ``dl_id`` for good (see the module's doc). Raises NotFound."""
    await settle_owed(r)  # a discard cut short before: complete its release first
    d = await get(r, dl_id)
    owed = await _owed(r, d) if d.stage != "dispatch" else None
    status = await _resolve(r, d, "discard", reason, _owed_encoder.encode(owed) if owed else b"")
    if owed and status == "rejected":
        await _settle(r, [(d.partition, d.order_key, owed)])
    if status == "cancelled" and d.stage != "dispatch":  # (deadletter.lua owed its release)
        await lifecycle.settle_owed(r, [d.partition])
    if status == "rejected" and d.stage != "dispatch":
        await r.client.hincrby(REASONS_KEY, "discarded", 1)  # the operators' view of rejection reasons
        # final: its decision and route are no longer kept open for it (orderq/openrecords.py)
        await r.run(lambda pipe: [pipe.hdel(k, d.order_key) for k in (keys.DECIDED_OPEN_KEY, keys.ROUTED_OPEN_KEY)])
    return {**d.doc(), "resolution": "discarded", "status": status or None}


async def _owed(r: Redis, d: DeadLetter) -> Owed | None:
    """What the dead letter's order holds in the validation ledger, if anything."""
    if not r.settings.rules:
        return None  # pass-through validation holds nothing
    try:
        order = unpack_order(d.fields.get(b"d", b""))
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # never decoded, so never checked: it holds nothing
    accepted_us = int(d.fields.get(b"ta") or 0)
    skus = list(dict.fromkeys([line.sku for line in order.lines] + [g.sku for g in order.gifts]))
    # Validation's decision (in its hour's bucket for a day, open until handed off): 'v' or 'w'
    # hold, 'r' holds nothing. Without it: an execute entry passed validation; a validate entry
    # holds if the ledger lists it anywhere.
    pipe = r.client.pipeline(transaction=False)
    pipe.hget(keys.decided_key(accepted_us // 1000 // 3_600_000), order.key)
    pipe.hget(keys.DECIDED_OPEN_KEY, order.key)
    for line in order.lines:
        pipe.hexists(keys.holders_key(line.sku), order.key)
    for c in order.coupons:
        pipe.hget(keys.coupon_key(c.code), "u")
    decided, still_open, *found = await pipe.execute()
    decided = decided or still_open
    if decided is not None:
        held = decided[:1].decode() in (Decided.VALIDATED, Decided.REVIEW)
    else:
        holders, users = found[: len(order.lines)], found[len(order.lines) :]
        held = d.stage == "execute" or any(holders) or order.key.encode() in users
    if not held:
        return None
    return Owed(review.freight_hold(order, accepted_us), skus)


async def _settle(r: Redis, owed: list[tuple[keys.Partition, str, Owed]]) -> None:
    """Give back what discarded orders hold in the ledger (idempotent), then clear the debt.

    Units first, from every holders hash of the order's SKUs (the total's and each warehouse's:
    routing may have moved some), by what each really lists; then release.lua, with the
    order's review-form record (an order that passed validation has none yet: it is written;
    one that was in review and approved keeps its own), returns its single-use coupons and day
    subsidy exactly as a reviewer's reject does, and finds no units left to return twice."""
    warehouses = [w.decode() for w in await r.client.hkeys(keys.WAREHOUSES_KEY)]
    ttl = r.settings.status_ttl_s

    def ledger(pipe: Any) -> None:
        steps: list[list[Value]] = []
        for _p, key, o in owed:
            for sku in o.skus:
                for wh in ("", *warehouses):
                    steps.append([sku, wh, "-", 1, key])  # settle this holder, leave the count
        if steps:
            r.script(pipe, "restock", *stock.restock_call(steps))
        for _p, key, o in owed:
            pipe.set(keys.ledger_key(key), o.record, nx=True, ex=ttl)

    await r.run(ledger)
    await stock.release(r, [key for _, key, _ in owed])
    await r.run(lambda pipe: [pipe.hdel(keys.dead_release(p), key) for p, key, _ in owed])


async def settle_owed(r: Redis) -> int:
    """Complete the ledger releases of discards cut short (a crash between the two slots)."""
    pipe = r.client.pipeline(transaction=False)
    for p in r.partitions:
        pipe.hgetall(keys.dead_release(p))
    owed = [
        (p, k.decode(), _owed_decoder.decode(v))
        for p, h in zip(r.partitions, await pipe.execute(), strict=True)
        for k, v in h.items()
    ]
    if owed:
        await _settle(r, owed)
    return len(owed)
