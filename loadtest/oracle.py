"""The client-side oracle: what a sender knows about every order it sent, checked against the
server afterwards (the way Jepsen's total-queue checker works).

Only the sender knows which orders were acknowledged: a server-side audit cannot see an
acknowledged write that a failover erased. So every tool that sends orders (the fault tests,
``orderq bench``, the locust scenarios) records each order key it sent and each answer it got,
and afterwards looks every key up, through the contract (``GET /v1/orders/{channel}/{order_id}``
with the admin token, concurrently) or directly in Redis, and counts:

- **lost**: acknowledged (``202``, or ``200`` duplicate: the server said it had it), no record;
- **duplicated**: an action applied twice to the order, by its effect ledger (the audit's
  :func:`orderq.audit.ledger_duplicates`; through the contract, the record's ``actions``);
- **unexpected**: a record for an order the server refused (``503`` shedding / overloaded, ``429``,
  a batch's ``shed``, a ``4xx``) and no request of it was acknowledged or left in doubt: none is
  allowed (contract §6: an order answered 503 was not taken, nothing of it is written);
- **recovered**: a request of it was left in doubt (timeout, connection error, a ``503
  unavailable``: Redis did not confirm the write in time, so the ingress cannot know whether it
  landed; any other ``5xx``), no ``202``, yet it is there. Allowed: the channel resends it and
  gets ``200`` duplicate.

The module uses the standard library only (a locust worker needs no orderq install); the
Redis check imports orderq when it is called.
"""

from __future__ import annotations

import http.client
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

# What a sender learnt from one answer about one order (flags: a key sent again collects several).
ACCEPTED = 1  # 202, or "accepted" in a batch's results
DUPLICATE = 2  # 200 duplicate, or "duplicate": the server already had it
REFUSED = 4  # 503 shedding/overloaded, 429, a batch's "shed": not taken, nothing written
INVALID = 8  # another 4xx, a batch's "invalid": refused for good, nothing written
UNKNOWN = 16  # no answer (timeout, connection error), 503 unavailable, another 5xx: it may have landed

ACKED = ACCEPTED | DUPLICATE
CATEGORIES = ("lost", "duplicated", "unexpected", "recovered")
EXAMPLES = 10  # keys listed per category
# a batch answer's per-order status -> flag
BATCH_STATUS = {"accepted": ACCEPTED, "duplicate": DUPLICATE, "shed": REFUSED, "invalid": INVALID}
_CODE = re.compile(rb'"code"\s*:\s*"([a-z_]+)"')


def outcome(status: int, body: bytes | str | None = None) -> int:
    """The flag an HTTP answer to one order gives (``status`` 0: no answer)."""
    if status == 202:
        return ACCEPTED
    if status == 200:
        return DUPLICATE
    if status == 503:
        raw = body.encode() if isinstance(body, str) else body or b""
        m = _CODE.search(raw)
        # shedding / overloaded: refused before anything was written; unavailable (Redis did not
        # confirm the write in time) or no readable code: the write may have landed
        return REFUSED if m and m.group(1) in (b"shedding", b"overloaded") else UNKNOWN
    if status == 429:
        return REFUSED
    if 400 <= status < 500:
        return INVALID
    return UNKNOWN


@dataclass
class Verdict:
    """The oracle's counts, with a few keys of each category."""

    sent: int = 0  # distinct order keys sent
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    recovered: int = 0
    in_doubt: int = 0  # keys with an answer in doubt (recovered ones included)
    unchecked: int = 0  # keys the check could not look up (an error reading them)
    acked_statuses: Counter[str] = field(default_factory=Counter)  # statuses of the acked keys found
    examples: dict[str, list[str]] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)  # status of each key found (not in as_dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.unchecked)

    def add(self, category: str, key: str) -> None:
        setattr(self, category, getattr(self, category) + 1)
        keys = self.examples.setdefault(category, [])
        if len(keys) < EXAMPLES:
            keys.append(key)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "recovered": self.recovered,
            "in_doubt": self.in_doubt,
            "unchecked": self.unchecked,
            "acked_statuses": dict(self.acked_statuses),
            "examples": self.examples,
        }

    def line(self) -> str:
        return (
            f"{self.sent:,} orders sent · {self.acked:,} acknowledged · lost {self.lost} · "
            f"duplicated {self.duplicated} · unexpected {self.unexpected} · recovered {self.recovered}"
            + (f" · unchecked {self.unchecked}" if self.unchecked else "")
        )


class Oracle:
    """Every order key sent and what its answers said (flags OR-ed over resends).

    A sender that can be stopped in the middle of a request (locust ends a run by killing its
    users) announces each request with :meth:`sending` before it goes out: a key whose request
    never got its answer recorded is then still known, and judged in doubt (Jepsen's
    indeterminate operation), where a key recorded only on its answer would be missing from the
    check altogether."""

    def __init__(self) -> None:
        self.answers: dict[str, int] = {}
        self.in_flight: Counter[str] = Counter()  # requests announced and not answered yet, per key

    def sending(self, keys: Iterable[str]) -> None:
        """A request of ``keys`` goes out now; its answer (:meth:`record_answer`,
        :meth:`record_batch`) settles it, and without one its keys stay in doubt."""
        for k in keys:
            self.answers.setdefault(k, 0)
            self.in_flight[k] += 1

    def _answered(self, keys: Iterable[str]) -> None:
        for k in keys:
            if (n := self.in_flight.pop(k, 0)) > 1:
                self.in_flight[k] = n - 1

    def clear(self) -> None:
        """Forget every key (a sender checked once starts afresh)."""
        self.answers.clear()
        self.in_flight.clear()

    def record(self, key: str, flag: int) -> None:
        self.answers[key] = self.answers.get(key, 0) | flag

    def record_answer(self, key: str, status: int, body: bytes | str | None = None) -> None:
        """One order sent alone: its HTTP status (0: no answer) and body."""
        self.record(key, outcome(status, body))
        self._answered((key,))

    def record_batch(self, keys: Iterable[str], status: int, body: bytes | str | Mapping[str, Any] | None) -> None:
        """A batch of ``keys`` in request order and its answer: per-order results on ``202``."""
        keys = list(keys)
        self._answered(keys)
        if status == 202 and body is not None:
            doc = body if isinstance(body, Mapping) else json.loads(body)
            results = doc.get("results") or []
            if len(results) == len(keys):
                for k, res in zip(keys, results, strict=True):
                    self.record(k, BATCH_STATUS.get(res.get("status"), UNKNOWN))
                return
            status = 0  # an answer that does not say which order got what: in doubt
        flag = outcome(status, body if not isinstance(body, Mapping) else None)
        for k in keys:
            self.record(k, flag)

    @property
    def acked(self) -> set[str]:
        return {k for k, f in self.answers.items() if f & ACKED}

    def judge(self, found: Mapping[str, tuple[str, list[str]] | None], unchecked: Iterable[str] = ()) -> Verdict:
        """The verdict from what was found per key: (status, duplicated actions), or None (no record)."""
        v = Verdict(sent=len(self.answers))
        skip = set(unchecked)
        for key, flags in self.answers.items():
            if key in self.in_flight:  # its request was never answered: it may have landed
                flags |= UNKNOWN
            if flags & ACKED:
                v.acked += 1
            if flags & UNKNOWN:
                v.in_doubt += 1
            if key in skip:
                v.add("unchecked", key)
                continue
            rec = found.get(key)
            if rec is None:
                if flags & ACKED:
                    v.add("lost", key)
                continue
            status, dups = rec
            v.statuses[key] = status
            if flags & ACKED:
                v.acked_statuses[status] += 1
            if dups:
                v.add("duplicated", f"{key} {','.join(dups)}")
            if not flags & (ACCEPTED | UNKNOWN):
                v.add("unexpected", key)  # only refusals (or a 200 that could only come from one)
            elif not flags & ACCEPTED:
                v.add("recovered", key)
        return v

    async def check_redis(self, r: Any, chunk: int = 10_000) -> Verdict:
        """Look every key up in Redis (``r``: an :class:`orderq.client.Redis`): per partition,
        ``chunk`` keys per round trip, read by the audit's script."""
        from orderq.audit import ledger_duplicates, read_records

        by_part: dict[Any, list[str]] = {}
        for k in self.answers:
            by_part.setdefault(r.partition_of(k), []).append(k)
        found: dict[str, tuple[str, list[str]] | None] = {}
        for p, keys in by_part.items():
            for i in range(0, len(keys), chunk):
                part = keys[i : i + chunk]
                (recs,) = await read_records(r, [(p, [p.status(k).encode() for k in part])])
                for k, rec in zip(part, recs, strict=True):
                    if rec is not None:
                        dups = [f"{c}:{a}" for c, a in ledger_duplicates(rec.ledger)]
                        found[k] = (rec.status.decode(), dups)
        return self.judge(found)

    def check_http(
        self,
        base_url: str,
        headers: Mapping[str, str],
        concurrency: int = 16,
        timeout: float = 10.0,
        pool_map: Callable[[Callable[[str], Any], list[str]], Iterable[Any]] | None = None,
    ) -> Verdict:
        """Look every key up through the contract (``headers``: the admin token), ``concurrency``
        connections at a time (``pool_map`` replaces the thread pool, e.g. a gevent pool's imap)."""
        parts = urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)
        conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        prefix = parts.path.rstrip("/")
        keys = list(self.answers)
        per = max(1, -(-len(keys) // concurrency))
        slices = [keys[i : i + per] for i in range(0, len(keys), per)]

        def look(part: list[str]) -> list[tuple[str, Any]]:
            conn = conn_class(host, port, timeout=timeout)
            out: list[tuple[str, Any]] = []
            try:
                for k in part:
                    channel, _, order_id = k.partition(":")
                    path = f"{prefix}/v1/orders/{quote(channel, safe='')}/{quote(order_id, safe='')}"
                    try:
                        conn.request("GET", path, headers=dict(headers))
                        resp = conn.getresponse()
                        body = resp.read()
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conn = conn_class(host, port, timeout=timeout)
                        out.append((k, "error"))
                        continue
                    if resp.status == 200:
                        rec = json.loads(body)
                        out.append((k, (rec.get("status", "?"), record_duplicates(rec))))
                    elif resp.status == 404:
                        out.append((k, None))
                    else:
                        out.append((k, "error"))
            finally:
                conn.close()
            return out

        if pool_map is None:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as ex:
                results = list(ex.map(look, slices))
        else:
            results = list(pool_map(look, slices))
        found: dict[str, tuple[str, list[str]] | None] = {}
        errors: list[str] = []
        for part in results:
            for k, rec in part:
                if rec == "error":
                    errors.append(k)
                else:
                    found[k] = rec
        return self.judge(found, errors)


def record_duplicates(record: Mapping[str, Any]) -> list[str]:
    """Actions a status record (contract §5) shows applied twice: one (action, warehouse) listed
    twice, a pick both without and with a warehouse, or from a warehouse its route does not name."""
    seen: Counter[tuple[str, str | None]] = Counter()
    for a in record.get("actions") or []:
        seen[(a.get("name", ""), a.get("warehouse"))] += 1
    out = [f"applied_twice:{n}" + (f"@{w}" if w else "") for (n, w), c in seen.items() if c > 1]
    routed = [w for (n, w) in seen if n == "wms.pick" and w]
    if routed and ("wms.pick", None) in seen:
        out.append("pick_twice:wms.pick")
    route = record.get("route")
    if route and routed:
        named = {p.get("warehouse") for p in (route if isinstance(route, list) else [route])}
        out += [f"pick_off_route:wms.pick@{w}" for w in routed if w not in named]
    return out
