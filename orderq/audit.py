"""``orderq audit``: reconcile what was accepted with what happened to it (contract §1).

It checks the state from five sides, and exits 1 when any of them disagrees:

- **Where each order is.** Every status record against the place its status says its order
  must be: ``accepted`` -> an entry in its intake stream (pending ones included: an entry
  leaves the stream only when its stage acknowledges it), ``validated`` -> an entry in a
  ready lane, ``review`` / ``held`` -> the review / held set and its parked payload; an order
  whose entry is in a dead-letter stream is a dead letter; final states owe nothing. An
  order nowhere is **lost**. On a live system an order may move between two reads: a suspect
  is read again and only counts if it is still nowhere with the same status.
- **The count ever accepted.** The partition counters are moved by the same scripts that
  move orders: ``accepted`` by intake.lua, and each order leaves the waiting states once into
  a final one, bumping ``executed`` or ``rejected`` (or ``cancelled``). So per partition
  ``accepted - final`` orders are owed, and each of them must have a record (a record only
  expires in a final state): fewer is **lost** (``record_missing``), more is a **counter
  mismatch**. Final records that expired are inferred, not counted: ``expired`` is
  ``final counted - final records seen`` (the check's limit: a final record deleted by hand
  looks like an expired one).
- **Dead letters.** ``dead_letters - dead_resolved`` (counters moved with the XADD into, and
  the XDEL out of, a dead-letter stream) must equal the entries in the dead-letter streams;
  fewer is a dead letter gone unresolved (**lost**). An unresolved dead letter older than
  ``ORDERQ_DEAD_LETTER_GRACE_S`` (its age is its stream id, milliseconds) is **stale**.
- **Effects applied twice**, from the effect ledger in the status hash, which survives
  delivery and outbox trimming (outbox entries do not: the dispatcher deletes them): an
  apply count ``xn:<action>`` above 1, a pick both unrouted (``x:wms.pick``) and routed
  (``x:wms.pick@<warehouse>``), or a pick from a warehouse the order's route does not name.
- **Order copies** (orderq/ordercopies.py): each copy's reference count against the outbox,
  deferred and dispatch dead-letter entries that reference it; a copy nothing references, or an
  entry whose copy is gone, is a **copy mismatch**; so is an executed order's payload key that
  would outlive its status record, or expire while the record does not.

Cost: one SCAN of the server (of each master on a cluster), COUNT 1000, each step's records
read by one pipeline of read-only script calls (audit.lua), plus one read of each stream a
waiting order can be in and of each stream an order copy can be referenced from (the outboxes:
up to ``ORDERQ_OUTBOX_MAXLEN`` entries each without a dispatcher): no per-order round trip.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from orderq import keys, ordercopies
from orderq.client import Redis
from orderq.settings import Settings
from orderq.wire import TERMINAL_STATUSES, WAITING_STATUSES, Field, route_warehouses

SCAN_COUNT = 1000  # keys per SCAN step, and status records per audit.lua call
CHUNK = 2000  # stream entries per XRANGE
LISTED = 100  # keys listed per category in the report

# Counters bumped once per order when it leaves the waiting states for a final one.
FINAL_COUNTERS = ("executed", "rejected", "cancelled")

LOST = {
    "accepted_not_queued": "accepted, but in no intake stream entry (queued or pending)",
    "validated_not_queued": "validated, but in no ready lane entry (queued or pending)",
    "review_not_listed": "in review, but not in the review set",
    "review_payload_missing": "in review, but its parked payload is gone",
    "held_not_listed": "held, but not in the held set",
    "held_payload_missing": "held, but its parked payload is gone",
    "record_missing": "counted accepted and not final, but no status record",
    "dead_letter_missing": "dead-lettered (counted), neither in a dead-letter stream nor resolved",
    "intercept_not_issued": "intercepting (owed the warehouse's answer), but no wms.intercept was issued",
}
DUPLICATE = {
    "applied_twice": "the ledger's apply count xn:<action> is above 1",
    "pick_twice": "picked unrouted (x:wms.pick) and routed (x:wms.pick@<warehouse>)",
    "pick_off_route": "a pick from a warehouse its route does not name",
}
MISMATCH = {
    "records_uncounted": "more waiting records than the counters accepted and did not finish",
    "finals_uncounted": "more final records than the final counters",
    "finals_over_accepted": "more orders counted final than accepted",
    "dead_letters_uncounted": "more dead-letter entries than counted unresolved",
}

# statuses with a count of their own in the report (cancelled: final; intercepting: owed the
# warehouse's answer, its wms.intercept issued in the script that set it, cancel.lua)
_SHOWN = frozenset({"executed", "rejected", "cancelled", "intercepting"})
INTERCEPT_APPLIED = f"{Field.APPLIED}wms.intercept".encode()
_PLAIN_PICK = f"{Field.ACTION}wms.pick".encode()
_ROUTED_PICK = _PLAIN_PICK + b"@"
_APPLIED = Field.APPLIED.encode()


class Record(NamedTuple):
    """A status record as audit.lua reads it."""

    status: bytes
    place: int  # review or held: 0 not in its set, 1 in it without parked payload, 2 both
    ledger: dict[bytes, bytes]  # the effect ledger fields ledger_duplicates reads


async def read_records(
    r: Redis, groups: list[tuple[keys.Partition, list[bytes]]], chunk: int = SCAN_COUNT
) -> list[list[Record | None]]:
    """The records of each group's status keys (all of its partition), one script call per
    ``chunk`` keys, all in one pipeline; None where there is no record."""
    calls: list[int] = []  # group index of each call

    def build(pipe: Any) -> None:
        calls.clear()  # (built again when the server lost its scripts)
        for g, (p, status_keys) in enumerate(groups):
            prefix = len(p.status("").encode())
            for i in range(0, len(status_keys), chunk):
                r.script(pipe, "audit", [p.review, p.held, p.parked, *status_keys[i : i + chunk]], [prefix])
                calls.append(g)

    out: list[list[Record | None]] = [[] for _ in groups]
    if not any(status_keys for _, status_keys in groups):
        return out
    for g, res in zip(calls, await r.run(build), strict=True):
        out[g] += [Record(x[0], int(x[1]), dict(zip(x[2::2], x[3::2], strict=True))) if x else None for x in res]
    return out


def ledger_duplicates(h: Mapping[bytes, bytes]) -> list[tuple[str, str]]:
    """(category, action) of each effect a status hash shows applied twice."""
    out: list[tuple[str, str]] = []
    routed: list[bytes] = []
    plain = False
    for f, v in h.items():
        if f.startswith(_ROUTED_PICK):
            routed.append(f[len(_ROUTED_PICK) :])
        elif f == _PLAIN_PICK:
            plain = True
        elif f.startswith(_APPLIED):
            try:
                n = int(v)
            except ValueError:
                n = 0
            if n > 1:
                out.append(("applied_twice", f[len(_APPLIED) :].decode()))
    if plain and routed:
        out.append(("pick_twice", "wms.pick"))
    route = h.get(Field.ROUTE.encode())
    if route and routed:
        named = route_warehouses(route)
        out += [("pick_off_route", f"wms.pick@{wh.decode()}") for wh in routed if wh not in named]
    return out


@dataclass
class _Partition:
    """What the audit saw of one partition."""

    p: keys.Partition
    intake: set[bytes] = field(default_factory=set)  # order keys with an intake entry
    ready: set[bytes] = field(default_factory=set)  # order keys with a ready lane entry
    records: int = 0
    waiting: int = 0  # records in a waiting status
    final: int = 0  # records in a final status
    counts: Counter[str] = field(default_factory=Counter)
    suspects: list[tuple[str, bytes, str]] = field(default_factory=list)  # (order key, status, category)
    dead_keys: set[bytes] = field(default_factory=set)
    dead_entries: int = 0


@dataclass
class _Report:
    counts: Counter[str] = field(default_factory=Counter)
    other: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    lost_keys: list[str] = field(default_factory=list)
    dups: Counter[str] = field(default_factory=Counter)
    dup_keys: list[str] = field(default_factory=list)
    mismatch: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    stale_keys: list[str] = field(default_factory=list)
    unresolved: int = 0
    payloads: list[tuple[str, str]] = field(default_factory=list)  # (order key, problem) of payload keys

    def add_lost(self, category: str, key: str) -> None:
        self.lost[category] += 1
        if len(self.lost_keys) < LISTED:
            self.lost_keys.append(key)


async def _stream_keys(r: Redis, stream: str) -> set[bytes]:
    """The order key of every entry of ``stream`` (pending ones too: they stay until acknowledged)."""
    out: set[bytes] = set()
    start = "-"
    while True:
        entries = await r.client.xrange(stream, min=start, count=CHUNK)
        out.update(f.get(b"k", b"") for _id, f in entries)
        if len(entries) < CHUNK:
            return out
        start = "(" + entries[-1][0].decode()


async def _dead_letters(r: Redis, stream: str, cutoff_ms: int, rep: _Report) -> tuple[set[bytes], int]:
    """Order keys and number of the entries of a dead-letter stream; the stale ones go to ``rep``."""
    out: set[bytes] = set()
    n = 0
    start = "-"
    while True:
        entries = await r.client.xrange(stream, min=start, count=CHUNK)
        for raw_id, f in entries:
            n += 1
            key = f.get(b"k", b"")
            out.add(key)
            entry_id = raw_id.decode()
            if int(entry_id.split("-", 1)[0]) < cutoff_ms:
                rep.stale += 1
                if len(rep.stale_keys) < LISTED:  # a dispatch dead letter names its action, or its outbox
                    action = f.get(b"action") or f.get(b"stream", b"").rpartition(b":ob:")[2]
                    rep.stale_keys.append(f"{stream} {entry_id} {key.decode()} {action.decode()}".rstrip())
        if len(entries) < CHUNK:
            return out, n
        start = "(" + entries[-1][0].decode()


async def _counters(r: Redis) -> list[dict[str, int]]:
    pipe = r.client.pipeline(transaction=False)
    for p in r.partitions:
        pipe.hgetall(p.counters)
    return [{k.decode(): int(v) for k, v in h.items()} for h in await pipe.execute()]


def _place_category(status: bytes, place: int) -> str | None:
    """The lost category of a review or held order missing (part of) its place."""
    if place == 0:
        return f"{status.decode()}_not_listed"
    if place == 1:
        return f"{status.decode()}_payload_missing"
    return None


async def _places(r: Redis, p: keys.Partition, cutoff_ms: int, rep: _Report) -> _Partition:
    """Where the waiting orders of ``p`` are: its streams and dead letters."""
    seen = _Partition(p)
    seen.dead_keys, n_dead = await _dead_letters(r, p.dead, cutoff_ms, rep)
    _, n_dispatch = await _dead_letters(r, keys.dispatch_dead(p), cutoff_ms, rep)
    seen.dead_entries = n_dead + n_dispatch
    seen.intake = await _stream_keys(r, p.intake)
    for lane in p.lanes:
        seen.ready |= await _stream_keys(r, lane)
    return seen


def _judge(seen: _Partition, order_key: str, rec: Record, rep: _Report) -> None:
    """One record against where its order must be, and its effect ledger."""
    seen.records += 1
    status = rec.status.decode()
    if status in TERMINAL_STATUSES:
        seen.final += 1
        seen.counts[status] += 1
        for kind, action in ledger_duplicates(rec.ledger):
            rep.dups[kind] += 1
            if len(rep.dup_keys) < LISTED:
                rep.dup_keys.append(f"{order_key}:{action}")
        if status == "intercepting" and INTERCEPT_APPLIED not in rec.ledger:
            seen.suspects.append((order_key, rec.status, "intercept_not_issued"))
        return
    if status not in WAITING_STATUSES:
        rep.other[status] += 1
        return
    seen.waiting += 1
    okb = order_key.encode()
    category: str | None = None
    if okb in seen.dead_keys:
        seen.counts["dead_letters"] += 1
    elif status == "accepted":
        seen.counts["in_flight"] += 1
        category = None if okb in seen.intake else "accepted_not_queued"
    elif status == "validated":
        seen.counts["in_flight"] += 1
        category = None if okb in seen.ready else "validated_not_queued"
    else:
        seen.counts[status] += 1
        category = _place_category(rec.status, rec.place)
    if category:
        seen.suspects.append((order_key, rec.status, category))


async def _scan(r: Redis, parts: dict[bytes, _Partition], rep: _Report) -> None:
    """Every status record, by one SCAN of each server (COUNT 1000; on a cluster, of each
    master holding partitions), each step read with one pipeline of script calls."""
    cluster = r.cluster
    if cluster is not None:
        masters = (cluster.get_node_from_key(s.p.intake) for s in parts.values())
        nodes = {n.name: n for n in masters if n is not None}
        targets: list[Any] = list(nodes.values())
    else:
        targets = [None]
    skip = len(keys.PREFIX) + 2  # "oq:{": a status key's tag follows
    for node in targets:
        scanned: set[bytes] = set()  # SCAN may return a key twice (the keyspace was resized meanwhile)
        cursor = 0
        while True:
            on_node = {} if node is None else {"target_nodes": node}  # a cluster: one master's keys
            cursors, batch = await r.client.scan(cursor, match=keys.RECORD_PATTERN, count=SCAN_COUNT, **on_node)
            cursor = int(next(iter(cursors.values()))) if isinstance(cursors, dict) else int(cursors)
            groups: dict[bytes, list[bytes]] = {}
            payloads: dict[bytes, list[bytes]] = {}  # executed orders' payload keys (":d:")
            for k in batch:
                if k not in scanned:
                    scanned.add(k)
                    end = k.index(b"}", skip)
                    kind = payloads if k[end + 2 : end + 4] == b"d:" else groups
                    kind.setdefault(k[skip:end], []).append(k)
            mine = [(parts[tag].p, ks) for tag, ks in payloads.items() if tag in parts]
            rep.payloads += await ordercopies.payload_problems(r, mine)
            order = [(tag, ks) for tag, ks in groups.items() if tag in parts]  # (not the ledger's {ledger})
            found = await read_records(r, [(parts[tag].p, ks) for tag, ks in order])
            for (tag, ks), recs in zip(order, found, strict=True):
                seen = parts[tag]
                prefix = len(seen.p.status("").encode())
                for k, rec in zip(ks, recs, strict=True):
                    if rec is not None:  # (None: expired between SCAN and the read)
                        _judge(seen, k[prefix:].decode(), rec, rep)
            if cursor == 0:
                break


async def _recheck(r: Redis, p: keys.Partition, suspects: list[tuple[str, bytes, str]]) -> list[tuple[str, str]]:
    """The suspects that are really lost. On a live system an order can move on between the
    stream reads and its status read: the streams are read again now, after each status was
    read, then the records again (a review or held order's place with it, atomically); an
    order whose status did not change and that is still not where it must be (nor
    dead-lettered) is lost."""
    intake = await _stream_keys(r, p.intake) if any(s == b"accepted" for _, s, _ in suspects) else set()
    ready: set[bytes] = set()
    if any(s == b"validated" for _, s, _ in suspects):
        for lane in p.lanes:
            ready |= await _stream_keys(r, lane)
    dead = await _stream_keys(r, p.dead)
    lost = []
    (now,) = await read_records(r, [(p, [p.status(k).encode() for k, _, _ in suspects])])
    for (order_key, before, category), rec in zip(suspects, now, strict=True):
        okb = order_key.encode()
        if rec is None or rec.status != before or okb in dead:
            continue
        if before == b"accepted":
            placed = okb in intake
        elif before == b"validated":
            placed = okb in ready
        elif before == b"intercepting":
            placed = INTERCEPT_APPLIED in rec.ledger
        else:
            category = _place_category(before, rec.place) or ""
            placed = not category
        if not placed:
            lost.append((order_key, category))
    return lost


def _reconcile(c0: dict[str, int], c1: dict[str, int], seen: _Partition, rep: _Report) -> None:
    """One partition's counters (read before and after the scan) against what the scan saw.
    Counters only grow, so on a live system the reads around the scan bound what it may see."""
    fin0 = sum(c0.get(n, 0) for n in FINAL_COUNTERS)
    fin1 = sum(c1.get(n, 0) for n in FINAL_COUNTERS)
    owed_at_least = c0.get("accepted", 0) - fin1  # accepted before the scan, not final after it
    owed_at_most = c1.get("accepted", 0) - fin0
    rep.lost["record_missing"] += max(0, owed_at_least - seen.waiting)
    rep.mismatch["records_uncounted"] += max(0, seen.waiting - owed_at_most)
    rep.mismatch["finals_uncounted"] += max(0, seen.final - fin1)
    rep.mismatch["finals_over_accepted"] += max(0, fin0 - c1.get("accepted", 0))
    rep.counts["expired"] += max(0, fin1 - seen.final)
    dead_at_least = c0.get("dead_letters", 0) - c1.get("dead_resolved", 0)
    dead_at_most = c1.get("dead_letters", 0) - c0.get("dead_resolved", 0)
    rep.lost["dead_letter_missing"] += max(0, dead_at_least - seen.dead_entries)
    rep.mismatch["dead_letters_uncounted"] += max(0, seen.dead_entries - dead_at_most)


async def run(r: Redis, grace_s: int | None = None) -> dict[str, Any]:
    """The audit report; ``failed`` names every category that is not 0 (exit 1)."""
    grace = r.settings.dead_letter_grace_s if grace_s is None else grace_s
    cutoff_ms = int(time.time() * 1000) - grace * 1000
    rep = _Report()
    before = await _counters(r)
    seen = [await _places(r, p, cutoff_ms, rep) for p in r.partitions]
    await _scan(r, {s.p.tag.encode(): s for s in seen}, rep)
    for s in seen:
        if s.suspects:
            for order_key, category in await _recheck(r, s.p, s.suspects):
                rep.add_lost(category, order_key)
    after = await _counters(r)
    for c0, c1, s in zip(before, after, seen, strict=True):
        _reconcile(c0, c1, s, rep)
        rep.counts.update(s.counts)
        rep.counts["records"] += s.records
        rep.unresolved += s.dead_entries
    totals: Counter[str] = Counter()
    for c in after:
        totals.update(c)
    copies = await ordercopies.check(r, rep.payloads)
    lost = sum(rep.lost.values())
    dups = sum(rep.dups.values())
    mismatch = sum(rep.mismatch.values())
    failed = [
        name
        for name, n in (
            ("lost", lost),
            ("duplicate_effects", dups),
            ("stale_dead_letters", rep.stale),
            ("counter_mismatch", mismatch),
            ("copy_mismatch", len(copies["keys"])),
        )
        if n
    ]
    return {
        "accepted": totals["accepted"],
        "records": rep.counts["records"],
        "expired": rep.counts["expired"],
        "executed": rep.counts["executed"],
        "rejected": rep.counts["rejected"],
        "review": rep.counts["review"],
        "held": rep.counts["held"],
        "cancelled": rep.counts["cancelled"],
        "intercepting": rep.counts["intercepting"],
        "in_flight": rep.counts["in_flight"],
        "dead_letters": rep.counts["dead_letters"],
        "other_statuses": dict(rep.other) | {s: n for s, n in rep.counts.items() if s in TERMINAL_STATUSES - _SHOWN},
        "dead_letters_unresolved": rep.unresolved,
        "dead_letters_resolved": totals["dead_resolved"],
        "stale_dead_letters": rep.stale,
        "dead_letter_grace_s": grace,
        "lost": lost,
        "duplicate_effects": dups,
        "counter_mismatch": mismatch,
        "order_copies": copies["copies"],
        "copy_mismatch": len(copies["keys"]),
        "lost_by": {k: n for k, n in rep.lost.items() if n},
        "duplicate_effects_by": {k: n for k, n in rep.dups.items() if n},
        "counter_mismatch_by": {k: n for k, n in rep.mismatch.items() if n},
        "copy_mismatch_by": copies["by"],
        "failed": failed,
        "lost_keys": rep.lost_keys,
        "duplicate_effect_keys": rep.dup_keys,
        "stale_dead_letter_keys": rep.stale_keys,
        "copy_mismatch_keys": copies["keys"][:LISTED],
    }


EXPLAIN = {**LOST, **DUPLICATE, **MISMATCH, **ordercopies.COPY_PROBLEMS}


def render(report: dict[str, Any]) -> str:
    """The printed report: one ``name: n`` line per count, then what failed and why."""
    lines = []
    for k, v in report.items():
        if isinstance(v, int) and not isinstance(v, bool):
            lines.append(f"{k:>24}: {v}")
    if report["other_statuses"]:
        lines.append(f"{'other statuses':>24}  " + ", ".join(f"{s} {n}" for s, n in report["other_statuses"].items()))
    for group in ("lost_by", "duplicate_effects_by", "counter_mismatch_by", "copy_mismatch_by"):
        for category, n in report[group].items():
            lines.append(f"  {group.removesuffix('_by')} / {category} ({n}): {EXPLAIN[category]}")
    for name in ("lost_keys", "duplicate_effect_keys", "stale_dead_letter_keys", "copy_mismatch_keys"):
        if report[name]:
            lines.append(f"{name}: {', '.join(report[name][:20])}")
    lines.append("audit: " + ("FAILED (" + ", ".join(report["failed"]) + ")" if report["failed"] else "ok"))
    return "\n".join(lines)


async def main(settings: Settings, as_json: bool) -> int:
    """``orderq audit [--json]``: exit 1 when lost, duplicate effects, stale dead letters, a
    counter mismatch or a copy mismatch is not 0."""
    from orderq import client

    r = await client.connect(settings)
    try:
        report = await run(r)
    finally:
        await r.close()
    print(msgspec.json.encode(report).decode() if as_json else render(report))
    return 1 if report["failed"] else 0
