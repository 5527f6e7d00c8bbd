"""The order copies of the outbox: each executed order's payload stored once, not once per action.

execute.lua stores an executed order's payload in its partition's ``order_copies`` hash (order
key -> msgpack) and appends one small entry per action that references it: field ``o`` instead
of the payload ``d``. Its ``copy_refs`` hash counts the entries still referencing each copy:
outbox entries, deferred syncs (``p.deferred``) and dispatch dead letters. Every script that
removes or moves such an entry keeps the count in the same call, and the one that removes the
last deletes the copy: dispatched.lua (delivered), replay.lua (a deferred sync replayed hands its
reference on, one no longer owed gives it up), deadletter.lua (a replay hands it on, a discard
gives it up), execute.lua and replay.lua (the oldest entries of a trimmed outbox). An entry that
carries its payload (``d``, possibly empty: "order": null) keeps working as before; the
dispatcher reads a referencing entry's payload with one pipelined ``HMGET`` per partition
(:func:`fetch`), so the request a downstream receives is the same either way.

:func:`check` is ``orderq audit``'s side of it: a copy no entry references (a leak), an entry
whose copy is gone (an action that cannot be sent with its order), and a count that disagrees
with the entries referencing the copy.

An executed order's payload also has a key of its own beside its status record
(``keys.Partition.payload``: what an intercept, a shipment and a return carry), which every
script that sets or takes the record's TTL moves with it. :func:`payload_problems` is the
audit's check of that: a payload key without a TTL whose record is gone (it would never go), and
a record and payload key of which one expires and the other does not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from orderq import keys
from orderq.client import Redis

CHUNK = 2000  # stream entries per XRANGE, fields per HSCAN step
REF = b"o"  # an entry's field that says it references its order's copy

COPY_PROBLEMS = {
    "copy_unreferenced": "an order copy no outbox, deferred or dead-letter entry references (count 0 or none)",
    "copy_missing": "an entry references its order's copy, but the copy is gone",
    "copy_count": "an order copy's reference count differs from the entries referencing it",
    "payload_orphan": "an executed order's payload key outlives its status record, without a TTL",
    "payload_ttl": "an executed order's payload key and its status record disagree: one expires, the other not",
}


async def fetch(r: Redis, wanted: Mapping[keys.Partition, Iterable[str]]) -> dict[tuple[int, str], bytes | None]:
    """The copies of ``wanted`` order keys, (partition index, order key) -> payload (None: gone):
    one ``HMGET`` per partition, in one pipeline."""
    asked = [(p, list(dict.fromkeys(ks))) for p, ks in wanted.items()]
    asked = [(p, ks) for p, ks in asked if ks]
    if not asked:
        return {}
    replies = await r.run(lambda pipe: [pipe.hmget(p.order_copies, ks) for p, ks in asked])
    return {
        (p.index, k): v for (p, ks), values in zip(asked, replies, strict=True) for k, v in zip(ks, values, strict=True)
    }


def _streams(p: keys.Partition) -> list[str]:
    """Every stream whose entries may reference a copy of ``p``."""
    return [*(p.outbox(a) for a in keys.OUTBOX_ACTIONS), p.deferred, keys.dispatch_dead(p)]


async def _references(r: Redis, p: keys.Partition) -> Counter[bytes]:
    """Order key -> entries of ``p`` that reference its copy."""
    out: Counter[bytes] = Counter()
    for stream in _streams(p):
        start = "-"
        while True:
            entries = await r.client.xrange(stream, min=start, count=CHUNK)
            out.update(f.get(b"k", b"") for _id, f in entries if REF in f)
            if len(entries) < CHUNK:
                break
            start = "(" + entries[-1][0].decode()
    return out


async def _hash(r: Redis, key: str, values: bool) -> dict[bytes, bytes]:
    """A hash's fields (with their values, or with b'' when only the fields matter), by HSCAN."""
    out: dict[bytes, bytes] = {}
    cursor = 0
    while True:
        cursor, page = await r.client.hscan(key, cursor, count=CHUNK)
        out.update(page if values else dict.fromkeys(page, b""))
        if cursor == 0:
            return out


async def _counts(r: Redis, p: keys.Partition, order_keys: list[bytes]) -> list[tuple[bool, int]]:
    """(copy exists, reference count) of each order key, read side by side in one pipeline."""
    if not order_keys:
        return []
    res = await r.run(
        lambda pipe: [cmd for k in order_keys for cmd in (pipe.hexists(p.order_copies, k), pipe.hget(p.copy_refs, k))]
    )
    return [(bool(res[i]), int(res[i + 1] or 0)) for i in range(0, len(res), 2)]


def _judge(refs: Counter[bytes], state: Mapping[bytes, tuple[bool, int]]) -> dict[bytes, str]:
    """Order key -> what is wrong with its copy."""
    out: dict[bytes, str] = {}
    for k in set(refs) | set(state):
        exists, count = state.get(k, (False, 0))
        n = refs.get(k, 0)
        if exists and count <= 0 and n == 0:
            out[k] = "copy_unreferenced"
        elif n and not exists:
            out[k] = "copy_missing"
        elif count != n or (count > 0) != exists:
            out[k] = "copy_count"
    return out


async def _partition(r: Redis, p: keys.Partition) -> dict[bytes, str]:
    """What is wrong with the copies of ``p``. Entries first, then the hashes: on a live system an
    entry may come or go between the reads, so a suspect is read again, entries then counts, and
    counts only if it is found wrong, in the same way, both times."""
    refs = await _references(r, p)
    known = set(await _hash(r, p.copy_refs, values=False)) | set(await _hash(r, p.order_copies, values=False))
    candidates = sorted(known | set(refs))
    first = dict(zip(candidates, await _counts(r, p, candidates), strict=True))
    suspects = _judge(refs, first)
    if not suspects:
        return {}
    again_refs = await _references(r, p)
    ks = sorted(suspects)
    second = dict(zip(ks, await _counts(r, p, ks), strict=True))
    again = _judge(Counter({k: again_refs[k] for k in ks if k in again_refs}), second)
    return {
        k: what
        for k, what in suspects.items()
        if again.get(k) == what and second[k] == first[k] and again_refs.get(k, 0) == refs.get(k, 0)
    }


def _life(status_ms: int, payload_ms: int) -> str | None:
    """What is wrong with a payload key, from its PTTL and its record's (-1 none, -2 gone)."""
    if payload_ms == -2:
        return None
    if status_ms == -2:  # (one with a TTL goes by itself, when the record would have)
        return "payload_orphan" if payload_ms == -1 else None
    return "payload_ttl" if (status_ms == -1) != (payload_ms == -1) else None


async def _lives(r: Redis, pairs: list[tuple[str, bytes]]) -> list[str | None]:
    res = await r.run(lambda pipe: [cmd for st, pl in pairs for cmd in (pipe.pttl(st), pipe.pttl(pl))])
    return [_life(int(res[i]), int(res[i + 1])) for i in range(0, len(res), 2)]


async def payload_problems(r: Redis, groups: Sequence[tuple[keys.Partition, list[bytes]]]) -> list[tuple[str, str]]:
    """(order key, problem) of the payload keys of ``groups`` (partition, its payload keys as a
    SCAN found them) that disagree with their status records. Both move in the same script call,
    but two reads may straddle one: a suspect counts only if a second read finds it the same."""
    pairs: list[tuple[str, bytes]] = []
    names: list[str] = []
    for p, payload_keys in groups:
        prefix = len(p.payload("").encode())
        for k in payload_keys:
            name = k[prefix:].decode(errors="replace")
            pairs.append((p.status(name), k))
            names.append(name)
    if not pairs:
        return []
    first = await _lives(r, pairs)
    suspects = [i for i, what in enumerate(first) if what]
    if not suspects:
        return []
    again = await _lives(r, [pairs[i] for i in suspects])
    return [(names[i], first[i] or "") for i, what in zip(suspects, again, strict=True) if what == first[i]]


async def check(r: Redis, payloads: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """``orderq audit``'s check of the copies: counts by problem, and the keys (partition, order
    key); ``payloads``: what :func:`payload_problems` found during the audit's SCAN."""
    by: Counter[str] = Counter()
    listed: list[str] = []
    for name, what in payloads:
        by[what] += 1
        listed.append(f"{name} {what}")
    copies = 0
    for p in r.partitions:
        for k, what in (await _partition(r, p)).items():
            by[what] += 1
            listed.append(f"{k.decode(errors='replace')} {what}")
        copies += int(await r.client.hlen(p.order_copies))
    return {"copies": copies, "by": dict(by), "keys": listed}
