"""``orderq audit``: reconcile what was accepted with what happened to it.

Every status record is checked against where its order must be: an ``accepted``
order in its intake stream, a ``validated`` one in a ready lane (or the dead-letter
stream); anything else is **lost**. Every outbox stream is counted per (order,
action; and warehouse, for the picks of a split order): more than one entry is a
**duplicate effect**.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from orderq import keys
from orderq.client import Redis

CHUNK = 5000


async def _stream_keys(r: Redis, stream: str, field: bytes = b"k") -> list[bytes]:
    """Each entry's order key; ``<key>@<warehouse>`` for a routed pick (one per warehouse)."""
    out: list[bytes] = []
    start = "-"
    while True:
        entries = await r.client.xrange(stream, min=start, count=CHUNK)
        for _id, f in entries:
            wh = f.get(b"w")
            out.append(f.get(field, b"") + b"@" + wh if wh else f.get(field, b""))
        if len(entries) < CHUNK:
            return out
        start = "(" + entries[-1][0].decode()


async def _where(r: Redis, p: keys.Partition) -> tuple[set[bytes], set[bytes], set[bytes]]:
    """Order keys in the intake stream, in the ready lanes, and dead-lettered."""
    intake = set(await _stream_keys(r, p.intake))
    ready: set[bytes] = set()
    for lane in p.lanes:
        ready.update(await _stream_keys(r, lane))
    return intake, ready, set(await _stream_keys(r, p.dead))


async def _recheck(r: Redis, p: keys.Partition, suspects: list[tuple[str, bytes]]) -> list[str]:
    """The suspects that are really lost. On a live system an order can move on between
    the stream reads and its status read (or be accepted after them). Streams read now,
    after each status was read, and the status read again after that: an order whose
    status did not change and that is in none of its stage's streams is lost."""
    intake, ready, dead = await _where(r, p)
    pipe = r.client.pipeline(transaction=False)
    for order_key, _ in suspects:
        pipe.hget(p.status(order_key), "s")
    lost = []
    for (order_key, before), now in zip(suspects, await pipe.execute(), strict=True):
        okb = order_key.encode()
        where = intake if before == b"accepted" else ready
        if (now or b"accepted") == before and okb not in where and okb not in dead:
            lost.append(order_key)
    return lost


async def _scan(r: Redis, p: keys.Partition, cursor: int) -> tuple[int, list[bytes]]:
    """One SCAN step over ``p``'s status records. On a cluster, on the master holding the
    partition's slot (a keyless SCAN would go to one arbitrary node)."""
    if not r.settings.redis_cluster:
        return await r.client.scan(cursor, match=p.status_pattern, count=1000)  # type: ignore[no-any-return]
    node = r.client.get_node_from_key(p.intake)
    cursors, batch = await r.client.scan(cursor, match=p.status_pattern, count=1000, target_nodes=node)
    return (int(next(iter(cursors.values()))) if isinstance(cursors, dict) else int(cursors)), batch


async def run(r: Redis) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    lost: list[str] = []
    duplicate_effects: list[str] = []
    for p in r.partitions:
        intake, ready, dead = await _where(r, p)
        suspects: list[tuple[str, bytes]] = []
        cursor = 0
        prefix = p.status("")
        while True:
            cursor, batch = await _scan(r, p, cursor)
            if batch:
                pipe = r.client.pipeline(transaction=False)
                for k in batch:
                    pipe.hget(k, "s")
                for k, s in zip(batch, await pipe.execute(), strict=True):
                    order_key = k.decode()[len(prefix) :]
                    okb = order_key.encode()
                    status = (s or b"accepted").decode()
                    if okb in dead:
                        counts["dead_letters"] += 1
                    elif status == "accepted":
                        counts["in_flight"] += 1
                        if okb not in intake:
                            suspects.append((order_key, s or b"accepted"))
                    elif status == "validated":
                        counts["in_flight"] += 1
                        if okb not in ready:
                            suspects.append((order_key, s))
                    else:
                        counts[status] += 1
            if cursor == 0:
                break
        if suspects:
            lost += await _recheck(r, p, suspects)
        for action in keys.ACTIONS:
            seen = Counter(await _stream_keys(r, p.outbox(action)))
            duplicate_effects += [f"{k.decode()}:{action}" for k, n in seen.items() if n > 1]
    totals: Counter[str] = Counter()
    pipe = r.client.pipeline(transaction=False)
    for p in r.partitions:
        pipe.hgetall(p.counters)
    for h in await pipe.execute():
        for k, v in h.items():
            totals[k.decode()] += int(v)
    return {
        "accepted": totals["accepted"],
        "executed": counts["executed"],
        "rejected": counts["rejected"],
        "review": counts["review"],
        "held": counts["held"],
        "in_flight": counts["in_flight"],
        "dead_letters": counts["dead_letters"],
        "lost": len(lost),
        "duplicate_effects": len(duplicate_effects),
        "lost_keys": lost[:100],
        "duplicate_effect_keys": duplicate_effects[:100],
    }
