"""The client's commands packed in C: the same bytes on the wire as redis-py's own packer, the
same errors for what it refuses, and a real server that answers them."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from orderq import client as oq_client
from orderq.server import EmbeddedServer

ARGS: list[tuple[Any, ...]] = [
    ("SET", "k", "v"),
    ("SET", b"k", b"\x00\xff"),
    ("SET", "k", "é中"),
    ("SET", "k", 0),
    ("SET", "k", -5),
    ("SET", "k", 2**70),
    ("SET", "k", 0.1),
    ("SET", "k", 1.5e300),
    ("HSET", "k", "f", memoryview(b"mv")),
    ("CONFIG GET", "maxmemory"),
    (b"CONFIG GET", b"maxmemory"),
    ("EVALSHA", "a" * 40, 2, "k1", "k2", *[f"head\t{i}" for i in range(50)], *[b"x" * 7000] * 3),
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: " ".join(str(x)[:12] for x in a[:3]))
def test_packed_as_redis_py_packs(args: tuple[Any, ...]) -> None:
    ours = oq_client._Connection().pack_command(*args)
    theirs = Connection().pack_command(*args)
    assert b"".join(bytes(x) for x in ours) == b"".join(bytes(x) for x in theirs)


@pytest.mark.parametrize("bad", [True, None, object()])
def test_refused_as_redis_py_refuses(bad: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        oq_client._Connection().pack_command("SET", "k", bad)


def test_bytearray_converted_as_redis_py_converts() -> None:
    ours = oq_client._Connection().pack_command("SET", "k", bytearray(b"ba"))
    assert b"".join(ours) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nba\r\n"


async def test_every_connection_packs_in_c(valkey: EmbeddedServer) -> None:
    """The server answers commands packed in C, on the connection class the URL asks for."""
    c = oq_client.make_client(valkey.url)
    try:
        pool = c.connection_pool
        assert issubclass(pool.connection_class, oq_client._PackInC)
        assert issubclass(pool.connection_class, (Connection, UnixDomainSocketConnection))
        await c.set("orderq-test:packed", "é中" * 1000)
        assert (await c.get("orderq-test:packed")).decode() == "é中" * 1000
        assert await c.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}  # ("CONFIG GET")
        assert await c.eval("return {KEYS[1], ARGV[1], ARGV[2]}", 1, "k", 7, b"\x00") == [b"k", b"7", b"\x00"]
        await c.delete("orderq-test:packed")
    finally:
        await c.aclose()


async def test_backlog_counted_also_after_the_server_lost_its_scripts(r: oq_client.Redis) -> None:
    """The breaker's sample (``backlog.lua``) reads every stage's length per partition; a server
    restarted without its script cache answers NOSCRIPT, and the sample loads them and reads on."""
    from orderq import stats

    p = r.partitions[0]
    pipe = r.client.pipeline(transaction=False)
    pipe.xadd(p.intake, {"k": "a"})
    pipe.xadd(p.lanes[0], {"k": "b"})
    pipe.xadd(p.lanes[2], {"k": "c"})
    pipe.xadd(p.lanes[2], {"k": "d"})
    pipe.zadd(p.review, {"e": 1})
    pipe.xadd(p.deferred, {"k": "f"})
    pipe.zadd(p.held, {"g": 1, "h": 2})
    await pipe.execute()
    want = {"intake": 1, "ready": {"vip": 1, "new": 0, "regular": 2}, "review": 1, "deferred": 1, "held": 2}
    assert await stats.backlog(r) == (4, want)
    await r.client.execute_command("SCRIPT", "FLUSH")
    assert await stats.backlog(r) == (4, want)
    total, depth, _totals = await stats.snapshot(r)
    assert (total, depth) == (4, want)
