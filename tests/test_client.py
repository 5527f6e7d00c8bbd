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
