"""The Python↔Lua contracts: every script compiles with the accessor tables it uses, names
only keys it was given in KEYS, and the records round-trip."""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib import resources

import msgspec
import redis

from orderq import client as oq_client
from orderq import keys, wire
from orderq.client import SCRIPT_NAMES, load_lua
from orderq.server import EmbeddedServer
from orderq.settings import Settings

LUA = resources.files("orderq").joinpath("lua")
CALL = re.compile(r"redis\.call\(\s*'(\w+)'\s*,\s*([^,)]+)")
NO_KEY = frozenset({"TIME"})


def _bound_to_keys(script: str, name: str, depth: int = 0) -> bool:
    """``name`` is a local set from KEYS (directly, or a table of KEYS entries or of such locals)."""
    for m in re.finditer(rf"\b{re.escape(name)}\b[^=\n]*=\s*([^\n]+)", script):
        if "KEYS[" in m.group(1):
            return True
    for m in re.finditer(rf"\b{re.escape(name)}\[[^\]]*\]\s*=\s*([A-Za-z_]\w*)\s*$", script, re.MULTILINE):
        if depth < 2 and m.group(1) != name and _bound_to_keys(script, m.group(1), depth + 1):
            return True
    # `local a, b = KEYS[k], KEYS[k + 1]`
    for m in re.finditer(r"local ([\w, ]+)=\s*([^\n]+)", script):
        names = [n.strip() for n in m.group(1).split(",")]
        values = m.group(2).split(",")
        if name in names and len(values) >= len(names) and "KEYS[" in values[names.index(name)]:
            return True
    return False


def test_every_script_touches_only_the_keys_it_is_given() -> None:
    loose: list[str] = []
    for name in SCRIPT_NAMES:
        text = LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        assert "'oq:" not in code and "ARGV[1] .." not in code, name
        for cmd, arg in CALL.findall(code):
            arg = arg.strip()
            if cmd in NO_KEY or arg.startswith("KEYS[") or (cmd == "XREADGROUP" and "'STREAMS', KEYS[" in code):
                continue
            ident = re.match(r"[A-Za-z_]\w*", arg)
            if ident is None or not _bound_to_keys(code, ident.group(0)):
                loose.append(f"{name}.lua: redis.call('{cmd}', {arg}, ...)")
    assert loose == []


def test_every_script_compiles_with_its_tables(valkey: EmbeddedServer) -> None:
    c = redis.Redis.from_url(valkey.url)
    try:
        for name in SCRIPT_NAMES:
            c.script_load(load_lua(name))  # a syntax error or an unknown table raises here
    finally:
        c.close()


def test_accessor_tables_follow_the_structs() -> None:
    script = wire.with_tables("-- a\nreturn {F.status, DecisionRow.day, ReviewHold.released}\n")
    first = script.splitlines()[0]
    assert "local F = {" in first and "status = 's'" in first and first.endswith("-- a")
    assert "day = 9" in first and "released = 10" in first
    assert wire.with_tables("return 1") == "return 1"  # nothing used, nothing added
    for rec in (wire.DecisionRow, wire.DecisionReply, wire.ReviewHold):
        assert wire._TABLES[rec.__name__].count("=") == len(rec.__struct_fields__)


def test_records_encode_as_arrays_and_a_shorter_one_still_decodes() -> None:
    hold = wire.ReviewHold(wire.Decided.REVIEW, 0, ["x"], ["SKU", 2], [], 20000, "t:c", 100, 0)
    raw = wire.encode_hold(hold)
    assert msgspec.msgpack.decode(raw) == ["w", 0, ["x"], ["SKU", 2], [], 20000, "t:c", 100, 0, 0]
    shorter = msgspec.msgpack.encode(["w", 0, [], [], [], 1, "t:c", 1, 0])  # written before `released`
    assert wire.decode_hold(shorter).released == 0
    (reply,) = wire.decode_replies(msgspec.msgpack.encode([["r", 0, 1, ["out_of_stock:A"]]]))
    assert reply.outcome is wire.Decided.REJECTED and reply.reasons == ["out_of_stock:A"]


def test_no_script_builds_a_ledger_key_name() -> None:
    """The ledger's key formats live in keys.py only: no script puts one together (a prefix, a
    kind, a name), whatever variable it would then pass to redis.call."""
    kinds = ("sku", "cpn", "cust", "od", "ip", "dup", "sub", "rt", "wh", "o", "cx")
    fragment = re.compile(r"'(?:" + "|".join(kinds) + r"):'|\.\. *':h'")
    for name in SCRIPT_NAMES:
        text = LUA.joinpath(f"{name}.lua").read_text(encoding="utf-8")
        code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        assert fragment.search(code) is None, name
    assert keys.stock_key("A") + ":h" == keys.holders_key("A")
    assert keys.customer_key("tmall", "c1") == f"{keys.LEDGER_PREFIX}cust:tmall:c1"


def test_a_parcel_is_its_head_plus_what_route_lua_appends() -> None:
    head = wire.RouteParcel.head("GZ", "sf", "nearest", "default", 12.5)
    parcel = wire.RouteParcel.parse(head + "1234|MUG:2,TEE:1|PEN:1")
    lines, gifts = [("MUG", 2), ("TEE", 1)], [("PEN", 1)]
    assert parcel == wire.RouteParcel("GZ", "sf", "nearest", "default", 12.5, 1234, lines, gifts)
    route = f"{head}0|MUG:1|;" + wire.RouteParcel.head("SH", "", "split", "", None) + "5|TEE:1|"
    assert [p.warehouse for p in wire.parse_route(route)] == ["GZ", "SH"]
    assert wire.route_warehouses(route.encode()) == {b"GZ", b"SH"}
    assert wire.parse_route(route)[1].km is None and wire.parse_route(route)[1].gifts == []


async def test_a_lost_script_cache_is_reloaded_for_per_command_errors_too(
    flushed: EmbeddedServer, settings_for: Callable[..., Settings]
) -> None:
    """A replica promoted by a failover has no scripts: with per-command errors handed back
    (raise_on_error=False, the batch paths that isolate entries), a missing script must not
    read as the entry's own failure."""
    r = await oq_client.connect(settings_for())
    try:
        await r.client.execute_command("SCRIPT", "FLUSH")
        bucket = keys.bucket_key("tmall")
        replies = await r.run(lambda pipe: r.script(pipe, "ratelimit", [bucket], [1, 10, 10]), raise_on_error=False)
        assert replies == [[0]], replies
    finally:
        await r.close()
