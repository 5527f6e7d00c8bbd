"""Fulfilment routing (issue 9): which warehouse ships each line, with which carrier, and
when a person decides instead.

The rules are one declarative table, ``routing.toml`` in ``ORDERQ_RULES_DIR`` (shipped:
``rules/routing.toml``), read at start and again on SIGHUP (a file that does not parse
keeps the rules in force and logs why). Python ranks each order's candidate warehouses by
the warehouse rules, in file order (``hot_sku`` puts a hot line's front warehouse first;
``nearest`` ranks the rest: those serving the order's province, within ``prefer_km``,
nearest first); picks the carrier by the ``carrier`` rules (else the warehouse's own) and
prices each candidate by its carrier's tariff. Then ONE script call per batch
(orderq/lua/route.lua, in the ledger slot) lets stock decide atomically: the first candidate
with every line in stock, else a split, one parcel per warehouse; gifts from the main
line's warehouse; the freight limit of a ``freight_review`` rule; the allocation.

With no warehouse configured nothing is ranked and no rule fires: the order ships from the
one implicit warehouse ``default``, and the script runs only for orders with gifts.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import msgspec

from orderq import geo, keys
from orderq.client import Redis
from orderq.openrecords import OpenRecords
from orderq.schema import Order, coupon_cents, flat_totals, goods_cents
from orderq.warehouses import Warehouse

RULES_FILE = "routing.toml"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # rule and carrier names: none of the route's separators
RANK_CACHE = 10_000  # places x hot-line combinations remembered
NO_ROUTING = [[1, 0.0, 0, 0, 0, "", ""]]  # no warehouse: everything ships from "default"
WAREHOUSE_KINDS = ("hot_sku", "nearest")
KINDS = (*WAREHOUSE_KINDS, "carrier", "freight_review")
# the statuses in which an order may be routed again: its route record stays open (see route.lua)
ROUTE_WAITING = frozenset({"accepted", "validated", "held", "review"})


class RulesError(ValueError):
    """The routing file is not usable; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Tariff:
    base: int  # cents per parcel
    per_km: int  # cents per 1000 km (thousandths of a cent per km)
    per_unit: int  # cents per unit in the parcel


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    front: dict[str, str] = field(default_factory=dict)  # hot_sku: SKU -> warehouse
    prefer_km: float = 200.0  # nearest
    provinces: tuple[str, ...] = ()  # carrier
    carrier: str = ""  # carrier
    max_share: float = 0.15  # freight_review: freight / goods value


@dataclass(frozen=True, slots=True)
class Rules:
    rules: tuple[Rule, ...]
    tariffs: dict[str, Tariff]
    default_carrier: str
    source: str = ""
    fronts: dict[str, str] = field(default_factory=dict)  # every hot SKU -> its front warehouse

    @property
    def freight_limit_bp(self) -> int:
        """Basis points of the goods value freight may reach (0: no limit)."""
        for r in self.rules:
            if r.kind == "freight_review":
                return round(r.max_share * 10_000)
        return 0

    def tariff(self, carrier: str) -> Tariff:
        return self.tariffs.get(carrier) or self.tariffs[self.default_carrier]


def _amount(where: str, raw: object) -> Decimal:
    """A non-negative amount in CNY (``"12.00"``, or a TOML number)."""
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise RulesError(f"{where}: expected an amount, got {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise RulesError(f"{where}: expected a non-negative amount, got {raw!r}")
    return value


def parse(doc: dict[str, Any], source: str = "") -> Rules:
    """The TOML document -> Rules, or RulesError naming what is wrong."""
    carriers = doc.get("carriers", {})
    if not isinstance(carriers, dict):
        raise RulesError(f"{source}: [carriers] must be a table")
    default = carriers.get("default", "express")
    tariffs: dict[str, Tariff] = {}
    for name, t in carriers.items():
        if name == "default":
            continue
        if not NAME.match(name):
            raise RulesError(f"{source}: carriers.{name}: a carrier is named with letters, digits, _ and -")
        if not isinstance(t, dict):
            raise RulesError(f"{source}: carriers.{name} must be a table")
        unknown = set(t) - {"base", "per_km", "per_unit"}
        if unknown:
            raise RulesError(f"{source}: carriers.{name}: unknown field(s) {', '.join(sorted(unknown))}")
        where = f"{source}: carriers.{name}"
        tariffs[name] = Tariff(
            base=round(_amount(f"{where}.base", t.get("base", "0")) * 100),
            per_km=round(_amount(f"{where}.per_km", t.get("per_km", "0")) * 100_000),
            per_unit=round(_amount(f"{where}.per_unit", t.get("per_unit", "0")) * 100),
        )
    if default not in tariffs:
        tariffs[default] = Tariff(0, 0, 0)
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(doc.get("rule", [])):
        where = f"{source}: rule[{i}]"
        if not isinstance(raw, dict):
            raise RulesError(f"{where} must be a table")
        kind, name = raw.get("kind"), raw.get("name")
        if kind not in KINDS:
            raise RulesError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(name, str) or not NAME.match(name) or name in names:
            raise RulesError(f"{where}: needs a unique name of letters, digits, _ and -, got {name!r}")
        names.add(name)
        unknown = set(raw) - {"name", "kind", "front", "prefer_km", "provinces", "carrier", "max_share"}
        if unknown:
            raise RulesError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            rule = Rule(
                name=name,
                kind=kind,
                front={str(k): str(v) for k, v in dict(raw.get("front", {})).items()},
                prefer_km=float(raw.get("prefer_km", 200.0)),
                provinces=tuple(str(p) for p in raw.get("provinces", ())),
                carrier=str(raw.get("carrier", "")),
                max_share=float(raw.get("max_share", 0.15)),
            )
        except (TypeError, ValueError) as exc:
            raise RulesError(f"{where}: {exc}") from None
        if kind == "carrier" and (not rule.carrier or not rule.provinces):
            raise RulesError(f"{where}: a carrier rule needs provinces and a carrier")
        if kind == "carrier" and rule.carrier not in tariffs:
            raise RulesError(f"{where}: carrier {rule.carrier!r} has no [carriers.{rule.carrier}] tariff")
        if kind == "freight_review" and not 0 < rule.max_share <= 10:
            raise RulesError(f"{where}: max_share must be > 0, got {rule.max_share}")
        rules.append(rule)
    fronts: dict[str, str] = {}
    for rule in rules:
        for sku, wh in rule.front.items():
            fronts.setdefault(sku, wh)
    return Rules(rules=tuple(rules), tariffs=tariffs, default_carrier=default, source=source, fronts=fronts)


def load(rules_dir: Path) -> Rules:
    path = rules_dir / RULES_FILE
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise RulesError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: {exc}") from None
    return parse(doc, str(path))


@dataclass(slots=True)
class Candidate:
    warehouse: str
    rule: str  # the warehouse rule that ranked it
    carrier: str
    carrier_rule: str
    km: float | None


def candidates(rules: Rules, whs: dict[str, Warehouse], o: Order) -> list[Candidate]:
    """The order's warehouses, best first, each with the rule that ranked it and its carrier."""
    province, city = o.ship_to.province, o.ship_to.city
    at = geo.locate(province, city)
    carrier_by: tuple[str, str] | None = None
    for r in rules.rules:
        if r.kind == "carrier" and geo.same_region(province, r.provinces):
            carrier_by = (r.carrier, r.name)
            break

    def cand(wid: str, rule: str) -> Candidate:
        w = whs[wid]
        km = geo.km(at, w.at) if at else None
        if carrier_by:
            carrier, crule = carrier_by
        elif w.carriers:
            carrier, crule = w.carriers[0], "warehouse"
        else:
            carrier, crule = rules.default_carrier, "default"
        return Candidate(wid, rule, carrier, crule, km)

    out: list[Candidate] = []
    taken: set[str] = set()
    for r in rules.rules:
        if r.kind == "hot_sku":
            for line in o.lines:
                wid = r.front.get(line.sku)
                if wid and wid in whs and wid not in taken:
                    taken.add(wid)
                    out.append(cand(wid, r.name))
        elif r.kind == "nearest":
            rest = [wid for wid in whs if wid not in taken]

            def rank(wid: str, prefer: float = r.prefer_km) -> tuple[int, int, float, str]:
                w = whs[wid]
                serves = not w.serves or geo.same_region(province, tuple(w.serves))
                km = geo.km(at, w.at) if at else math.inf
                return (0 if serves else 1, 0 if km < prefer else 1, km, wid)

            for wid in sorted(rest, key=rank):
                taken.add(wid)
                out.append(cand(wid, r.name))
    for wid in whs:  # no nearest rule: the rest in id order
        if wid not in taken:
            out.append(cand(wid, "any"))
    return out


@dataclass(slots=True)
class Routed:
    """What routing decided for one order."""

    outcome: str  # s ship | w review (freight over the limit)
    route: str  # the status record's "route" entries, JSON ("" when not routed)
    picks: list[str]  # the warehouses that ship it, one wms.pick each ([] when not routed)
    gift_out_of_stock: list[str]
    routed: bool  # False: no warehouse configured (one implicit pick)
    recorded: bool = False  # route.lua recorded it (kept open until the worker reports it executed)


_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[str]).decode


def _text(flat: list[object]) -> str:
    """``[sku, qty, ...]`` as route text: ``sku:qty,...``."""
    return ",".join(f"{flat[i]}:{flat[i + 1]}" for i in range(0, len(flat), 2))


def review_record(o: Order, accepted_us: int) -> bytes:
    """What an order sent to review for its freight holds, in the form release.lua reads
    (rules.lua writes the same for the orders validation sends to review)."""
    return _pack(
        [
            "w",
            0,
            ["freight_over_limit"],
            flat_totals(o.lines),
            [c.code for c in o.coupons],
            keys.subsidy_key(keys.beijing_day(accepted_us // 1000)),
            f"{o.channel}:{o.customer.id}",
            goods_cents(o),
            coupon_cents(o),
            0,
        ]
    )


class Router:
    """The routing rules in force, and the batch call."""

    def __init__(self, rules_dir: Path) -> None:
        self.rules_dir = rules_dir
        self.rules = load(rules_dir)
        # Candidates depend only on the place and the hot lines: ranked once per (province,
        # city, fronts) while the rules and the warehouses stay the same objects.
        self._cache_for: tuple[Rules, dict[str, Warehouse]] | None = None
        self._ranked: dict[tuple[str, str | None, tuple[str, ...]], list[list[object]]] = {}
        self.open = OpenRecords(keys.ROUTED_OPEN_KEY, ROUTE_WAITING)

    def executed(self, order_keys: Iterable[str]) -> None:
        """The worker executed these orders (each with a recorded route): the next call closes
        their open route records."""
        self.open.done(order_keys)

    def _candidates(self, rules: Rules, whs: dict[str, Warehouse], ids: list[str], o: Order) -> list[list[object]]:
        """``o``'s candidate list as route.lua reads it: warehouse index, km, tariff, and the
        route entry's JSON up to its freight, plain and split."""
        hot = rules.fronts
        fronts = tuple(hot[line.sku] for line in o.lines if line.sku in hot) if hot else ()
        key = (o.ship_to.province, o.ship_to.city, fronts)
        found = self._ranked.get(key)
        if found is None:
            if len(self._ranked) >= RANK_CACHE:
                self._ranked.clear()
            index = {wid: i for i, wid in enumerate(ids, 1)}
            rows = []
            for c in candidates(rules, whs, o):
                t = rules.tariff(c.carrier)
                km = round(c.km, 1) if c.km is not None else None
                # the route entry up to its freight (compact, see route.lua; orderq/status.py renders it)
                head = f"{c.warehouse}|{c.carrier}|{{}}|{c.carrier_rule}|{'' if km is None else km}|"
                plain, split = head.format(c.rule), head.format("split")
                rows.append([index[c.warehouse], km or 0.0, t.base, t.per_km, t.per_unit, plain, split])
            found = self._ranked[key] = rows
        return found

    def reload(self) -> Rules:
        """Read the file again; RulesError leaves the rules in force unchanged."""
        self.rules = load(self.rules_dir)
        return self.rules

    async def route(
        self,
        r: Redis,
        whs: dict[str, Warehouse],
        orders: list[Order],
        approved: list[bool],
        accepted_us: list[int],
    ) -> list[Routed]:
        """Route a batch with one script call; with no warehouse, only orders with gifts go
        to the script (their gifts' stock), the others ship from ``default`` untouched. An
        order routed before (whatever its delivery count) gets its recorded route back."""
        rules = self.rules
        routed = bool(whs)
        ids = list(whs) if routed else [keys.DEFAULT_WAREHOUSE]
        cached = self._cache_for
        if cached is None or cached[0] is not rules or cached[1] is not whs:  # new rules or warehouses
            self._cache_for = (rules, whs)
            self._ranked.clear()
        limit = rules.freight_limit_bp if routed else 0
        rows: list[list[object]] = []
        sent: list[int] = []
        cand_lists: list[list[list[object]]] = [] if routed else [NO_ROUTING]
        used: dict[int, int] = {}  # id of a candidate list -> its index in cand_lists (1-based)
        for n, o in enumerate(orders):
            if not routed and not o.gifts:
                continue
            if routed:  # orders to one place share one candidate list in the call
                ranked = self._candidates(rules, whs, ids, o)
                cands = used.get(id(ranked))
                if cands is None:
                    cand_lists.append(ranked)
                    cands = used[id(ranked)] = len(cand_lists)
            else:
                cands = 1
            hour = str(accepted_us[n] // 3_600_000_000)  # (Lua formats numbers slowly)
            over = 0 if approved[n] else limit
            lines, gifts = flat_totals(o.lines), flat_totals(o.gifts)
            goods = goods_cents(o) if over else 0
            rows.append([o.key, lines, gifts, cands, goods, over, hour, _text(lines), _text(gifts)])
            sent.append(n)
        out = [Routed("s", "", [], [], routed) for _ in orders]
        if not rows:
            return out
        # a route is needed again only by an order routed a second time: in its hour's bucket for
        # a day, like decisions, and kept open until the order is executed (orderq/openrecords.py)
        await self.open.sweep(r)
        closing = self.open.take()
        args = [keys.RULES_PREFIX, round(r.settings.stock_buffer * 1_000_000), keys.LEDGER_REPLAY_TTL_S]
        args += [_pack(ids), _pack(cand_lists), _pack(rows), "1" if routed else "0", _pack(closing) if closing else ""]
        try:
            (raw,) = await r.run(lambda pipe: r.script(pipe, "route", [keys.RULES_PREFIX], args))
        except BaseException:
            self.open.give_back(closing)
            raise
        for n, rec in zip(sent, _unpack(raw), strict=True):
            outcome, _freight, picks, oos, route = rec.split("\t", 4)
            out[n] = Routed(
                outcome,
                route,
                picks.split(",") if picks else [],
                oos.split(",") if oos else [],
                routed,
                recorded=outcome == "s",
            )
        return out
