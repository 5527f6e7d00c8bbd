"""Fulfilment routing: which warehouse ships each line, with which carrier, and
when a person decides instead.

The rules are one declarative table, ``routing.toml`` in ``ORDERQ_ROUTING_DIR`` (shipped:
``routing/routing.toml``), decoded into the Structs below, read at start and again on SIGHUP (a file that does not parse
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
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, cast

import msgspec
from msgspec import Meta

from orderq import geo, keys
from orderq.client import Redis
from orderq.commands import Value
from orderq.ledger import stock
from orderq.openrecords import OpenRecords
from orderq.schema import Order, flat_totals, goods_cents
from orderq.warehouses import Warehouse
from orderq.wire import WAITING_STATUSES, RouteOutcome, RouteParcel

ROUTING_FILE = "routing.toml"
RANK_CACHE = 10_000  # places x hot-line combinations remembered
NO_ROUTING = [[1, 0.0, 0, 0, 0, "", ""]]  # no warehouse: everything ships from "default"

# Rule and carrier names: none of the route's separators.
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# hot_sku and nearest rank the warehouses, carrier picks the carrier of a region,
# freight_review sends an order whose freight passes a share of its goods value to a person.
Kind = Literal["hot_sku", "nearest", "carrier", "freight_review"]


class RulesError(ValueError):
    """The routing file is not usable; the message names the file and the entry."""


class Rule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[rule]]`` of the routing file, in force as written."""

    name: Name
    kind: Kind
    front: dict[str, str] = {}  # hot_sku: SKU -> warehouse
    prefer_km: Annotated[float, Meta(ge=0)] = 200.0  # nearest
    provinces: tuple[str, ...] = ()  # carrier
    carrier: str = ""  # carrier: one of [carriers]
    max_share: Annotated[float, Meta(gt=0, le=10)] = 0.15  # freight_review: freight / goods value

    def __post_init__(self) -> None:
        if self.kind == "carrier" and (not self.carrier or not self.provinces):
            raise ValueError("a carrier rule needs provinces and a carrier")


class Rates(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ``[carriers.<name>]`` table: freight per parcel = base + per_km x km + per_unit x units,
    amounts in CNY written ``"8.00"`` (or as TOML numbers)."""

    base: Decimal = Decimal(0)
    per_km: Decimal = Decimal(0)
    per_unit: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if not value.is_finite() or value < 0:
                raise ValueError(f"{name}: expected a non-negative amount, got {str(value)!r}")


Carrier = Rates | Name  # a carrier's rates; "default" names the carrier of a warehouse without one


class RoutingFile(msgspec.Struct, forbid_unknown_fields=True):
    """``routing.toml``: the rules in file order, and the carriers."""

    rule: list[Rule] = []
    carriers: dict[Name, Carrier] = {}

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, r in enumerate(self.rule):
            if r.name in seen:
                raise ValueError(f"rule[{i}].name: {r.name!r} is already the name of another rule")
            seen.add(r.name)
        for name, value in self.carriers.items():
            if name == "default" and not isinstance(value, str):
                raise ValueError("carriers.default: expected the name of the default carrier")
            if name != "default" and isinstance(value, str):
                raise ValueError(f"carriers.{name}: expected a table")
        priced = {name for name, value in self.carriers.items() if isinstance(value, Rates)} | {self.default_carrier}
        for i, r in enumerate(self.rule):
            if r.kind == "carrier" and r.carrier not in priced:
                raise ValueError(f"rule[{i}]: carrier {r.carrier!r} has no [carriers.{r.carrier}] tariff")

    @property
    def default_carrier(self) -> str:
        return str(self.carriers.get("default", "express"))


@dataclass(frozen=True, slots=True)
class Tariff:
    base: int  # cents per parcel
    per_km: int  # cents per 1000 km (thousandths of a cent per km)
    per_unit: int  # cents per unit in the parcel


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


_AT = re.compile(r"^(?P<why>.*?) - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`$", re.S)


def _convert(value: object, into: Any, where: str, source: str) -> Any:
    """``msgspec.convert``, its error as RulesError naming the file and the TOML path."""
    try:
        return msgspec.convert(value, into)
    except msgspec.ValidationError as exc:
        found = _AT.match(str(exc))
        why, path = (found["why"], where + found["path"]) if found else (str(exc), where)
        if found and found["key"]:
            why = f"a key: {why}"
        raise RulesError(f"{source}: {path.lstrip('.')}: {why}" if path else f"{source}: {why}") from None


def parse(doc: dict[str, Any], source: str = "") -> Rules:
    """The TOML document -> Rules, or RulesError naming what is wrong and where."""
    carriers = doc.get("carriers")
    if isinstance(carriers, dict):  # one by one first: an error then names its carrier
        for name, value in carriers.items():
            _convert(name, Name, f"carriers.{name}", source)
            _convert(value, Carrier, f"carriers.{name}", source)
    file: RoutingFile = _convert(doc, RoutingFile, "", source)
    default = file.default_carrier
    tariffs = {
        name: Tariff(base=round(t.base * 100), per_km=round(t.per_km * 100_000), per_unit=round(t.per_unit * 100))
        for name, t in file.carriers.items()
        if isinstance(t, Rates)
    }
    tariffs.setdefault(default, Tariff(0, 0, 0))
    fronts: dict[str, str] = {}
    for rule in file.rule:
        for sku, wh in rule.front.items():
            fronts.setdefault(sku, wh)
    return Rules(rules=tuple(file.rule), tariffs=tariffs, default_carrier=default, source=source, fronts=fronts)


def load(directory: Path) -> Rules:
    """Read ``routing.toml`` from ``directory`` (ORDERQ_ROUTING_DIR)."""
    path = directory / ROUTING_FILE
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise RulesError(f"{path}: no such file") from None
    except OSError as exc:
        raise RulesError(f"{path}: {exc.strerror}") from None
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

    outcome: RouteOutcome
    route: str  # the status record's "route" entries, JSON ("" when not routed)
    picks: list[str]  # the warehouses that ship it, one wms.pick each ([] when not routed)
    gift_out_of_stock: list[str]
    routed: bool  # False: no warehouse configured (one implicit pick)
    recorded: bool = False  # route.lua recorded it (kept open until the worker reports it executed)


_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder(list[str]).decode


def _sku_keys(
    names: list[str], ids: list[str], cand_lists: list[list[list[object]]], lists_of: dict[str, set[int]]
) -> list[object]:
    """Append each SKU's keys to ``names`` (route.lua's KEYS): its stock, its holders, and its
    holders in each warehouse its orders' candidate lists name (where it may be allocated);
    return route.lua's map of them, ``[sku, index of the stock key, [warehouse index, ...]]...``."""
    places = [sorted({cast(int, c[0]) for c in cands}) for cands in cand_lists]
    layout: list[object] = []
    for sku, lists in lists_of.items():
        whs = places[next(iter(lists)) - 1] if len(lists) == 1 else sorted({w for i in lists for w in places[i - 1]})
        layout += (sku, len(names) + 1, whs)
        names += (keys.stock_key(sku), keys.holders_key(sku))
        names += [keys.wh_holders_key(sku, ids[w - 1]) for w in whs]
    return layout


def _text(flat: list[object]) -> str:
    """``[sku, qty, ...]`` as route text: ``sku:qty,...``."""
    return ",".join(f"{flat[i]}:{flat[i + 1]}" for i in range(0, len(flat), 2))


class Router:
    """The routing rules in force, and the batch call."""

    def __init__(self, routing_dir: Path) -> None:
        self.routing_dir = routing_dir
        self.rules = load(routing_dir)
        # Candidates depend only on the place and the hot lines: ranked once per (province,
        # city, fronts) while the rules and the warehouses stay the same objects.
        self._cache_for: tuple[Rules, dict[str, Warehouse]] | None = None
        self._ranked: dict[tuple[str, str | None, tuple[str, ...]], list[list[object]]] = {}
        # an order in a waiting status may be routed again: its route record stays open (route.lua)
        self.open = OpenRecords(keys.ROUTED_OPEN_KEY, WAITING_STATUSES)

    def executed(self, order_keys: Iterable[str]) -> None:
        """The worker executed these orders (each with a recorded route): the next call closes
        their open route records."""
        self.open.done(order_keys)

    def _candidates(self, rules: Rules, whs: dict[str, Warehouse], ids: list[str], o: Order) -> list[list[object]]:
        """``o``'s candidate list as route.lua reads it: warehouse index, km, tariff, and the
        parcel's text up to its freight (wire.RouteParcel.head), plain and split."""
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
                # the parcel's text up to its freight: route.lua appends what it decides
                plain = RouteParcel.head(c.warehouse, c.carrier, c.rule, c.carrier_rule, km)
                split = RouteParcel.head(c.warehouse, c.carrier, "split", c.carrier_rule, km)
                rows.append([index[c.warehouse], km or 0.0, t.base, t.per_km, t.per_unit, plain, split])
            found = self._ranked[key] = rows
        return found

    def reload(self) -> Rules:
        """Read the file again; RulesError leaves the rules in force unchanged."""
        self.rules = load(self.routing_dir)
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
        # KEYS: route.lua's fixed ones, then each accept hour's records, then each SKU's (below)
        names = [keys.ROUTED_OPEN_KEY, keys.RETIRED_WAREHOUSES_KEY, keys.GIFT_OOS_KEY]
        names += [keys.wh_skus_key(w) for w in ids]
        hours: dict[str, int] = {}  # accept hour -> index of its route records in KEYS
        lists_of: dict[str, set[int]] = {}  # SKU -> the candidate lists of its orders
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
            bucket = hours.get(hour)
            if bucket is None:
                names.append(keys.route_key(int(hour)))
                bucket = hours[hour] = len(names)
            over = 0 if approved[n] else limit
            lines, gifts = flat_totals(o.lines), flat_totals(o.gifts)
            goods = goods_cents(o) if over else 0
            rows.append([o.key, lines, gifts, cands, goods, over, hour, _text(lines), _text(gifts), bucket])
            sent.append(n)
            for flat in (lines, gifts):
                for i in range(0, len(flat), 2):
                    sku = str(flat[i])
                    found = lists_of.get(sku)
                    if found is None:
                        lists_of[sku] = {cands}
                    else:
                        found.add(cands)
        out = [Routed(RouteOutcome.SHIP, "", [], [], routed) for _ in orders]
        if not rows:
            return out
        # a route is needed again only by an order routed a second time: in its hour's bucket for
        # a day, like decisions, and kept open until the order is executed (orderq/openrecords.py)
        await self.open.sweep(r)
        closing = self.open.take()
        layout = _sku_keys(names, ids, cand_lists, lists_of)
        args: list[Value] = [stock.buffer_ppm(r.settings.stock_buffer), keys.LEDGER_REPLAY_TTL_S]
        args += [_pack(ids), _pack(cand_lists), _pack(rows), "1" if routed else "0", _pack(closing) if closing else ""]
        args.append(_pack(layout))
        try:
            (raw,) = await r.run(lambda pipe: r.script(pipe, "route", names, args))
        except BaseException:
            self.open.give_back(closing)
            raise
        for n, rec in zip(sent, _unpack(raw), strict=True):
            outcome, _freight, picks, oos, route = rec.split("\t", 4)
            out[n] = Routed(
                RouteOutcome(outcome),
                route,
                picks.split(",") if picks else [],
                oos.split(",") if oos else [],
                routed,
                recorded=outcome == RouteOutcome.SHIP,
            )
        return out
