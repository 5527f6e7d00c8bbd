"""The Redis client as orderq uses it: the commands it awaits, typed by the replies it gets.

orderq's client runs with ``decode_responses=False``: keys, fields and values come back as
bytes. redis-py's own types cannot see that flag (they give such replies as ``bytes | str``), so
the commands orderq awaits are declared here with the types their replies have, read off
redis-py's reply parsers (``redis/_parsers/response_callbacks.py``, RESP2) and, for commands a
cluster sends to every master, its merging callbacks (``redis/cluster.py``). The declaration is
applied in one place, :func:`orderq.client.make_client`. Pipelines keep redis-py's own types:
their replies come back untyped from ``execute()`` anyway, and redis-py checks the arguments.
A command missing here is one orderq does not await yet: add it with the type of its reply.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Literal, Protocol, TypeAlias, overload

from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript

Key: TypeAlias = str | bytes
Value: TypeAlias = bytes | str | int | float  # what redis-py's encoder sends (it refuses None and bool)
StreamId: TypeAlias = str | bytes | int
# Mapping is invariant in its key: a dict[str, ...] is no Mapping[str | bytes, ...].
KeyMapping: TypeAlias = Mapping[str, Value] | Mapping[bytes, Value]
Fields: TypeAlias = dict[bytes, bytes]
Members: TypeAlias = set[bytes]  # named here: inside Client, `set` is the command
StreamEntry: TypeAlias = tuple[bytes, Fields]  # (entry id, fields)
# XREAD / XREADGROUP: per stream, its name and its entries (redis-py gives each pair as a
# two-item list); empty when a BLOCK ran out.
StreamRead: TypeAlias = list[tuple[bytes, list[StreamEntry]]]
Pipe: TypeAlias = Pipeline | ClusterPipeline


class Client(Protocol):
    """A ``redis.asyncio`` client or cluster client made by :func:`orderq.client.make_client`."""

    def pipeline(self, transaction: bool = ...) -> Pipe: ...
    def pubsub(self) -> PubSub: ...
    def register_script(self, script: str) -> AsyncScript: ...
    def execute_command(self, *args: Value, **options: object) -> Awaitable[object]: ...
    def aclose(self) -> Awaitable[None]: ...

    # server; INFO and CONFIG GET answer with the server's own documents (one per node when a
    # node is targeted), read field by field
    def ping(self) -> Awaitable[bool]: ...
    def info(self, section: str | None = None, **kwargs: object) -> Awaitable[dict[str, Any]]: ...
    def config_get(self, pattern: str = "*", **kwargs: object) -> Awaitable[dict[Any, Any]]: ...
    def script_load(self, script: str) -> Awaitable[str]: ...  # the SHA1, as text
    def publish(self, channel: Key, message: Value) -> Awaitable[int]: ...

    # keys and strings
    def exists(self, *names: Key) -> Awaitable[int]: ...
    def expire(self, name: Key, time: int | dt.timedelta) -> Awaitable[bool]: ...
    def scan(
        self, cursor: int = 0, match: Key | None = None, count: int | None = None, **kwargs: object
    ) -> Awaitable[tuple[int | dict[str, int], list[bytes]]]: ...  # a cluster: the cursor per node name
    def get(self, name: Key) -> Awaitable[bytes | None]: ...
    @overload
    def set(
        self,
        name: Key,
        value: Value,
        ex: int | dt.timedelta | None = None,
        px: int | dt.timedelta | None = None,
        nx: bool = False,
        xx: bool = False,
        *,
        get: Literal[True],
    ) -> Awaitable[bytes | None]: ...
    @overload
    def set(
        self,
        name: Key,
        value: Value,
        ex: int | dt.timedelta | None = None,
        px: int | dt.timedelta | None = None,
        nx: bool = False,
        xx: bool = False,
        *,
        get: Literal[False] = False,
    ) -> Awaitable[bool | None]: ...

    # hashes
    def hget(self, name: Key, key: Key) -> Awaitable[bytes | None]: ...
    def hgetall(self, name: Key) -> Awaitable[Fields]: ...
    def hmget(self, name: Key, keys: Key | Iterable[Key], *args: Key) -> Awaitable[list[bytes | None]]: ...
    def hkeys(self, name: Key) -> Awaitable[list[bytes]]: ...
    def hlen(self, name: Key) -> Awaitable[int]: ...
    def hset(
        self,
        name: Key,
        key: Key | None = None,
        value: Value | None = None,
        mapping: KeyMapping | None = None,
    ) -> Awaitable[int]: ...
    def hdel(self, name: Key, *keys: Key) -> Awaitable[int]: ...
    def hincrby(self, name: Key, key: Key, amount: int = 1) -> Awaitable[int]: ...
    def hscan(
        self, name: Key, cursor: int = 0, match: Key | None = None, count: int | None = None
    ) -> Awaitable[tuple[int, Fields]]: ...

    # sets and lists
    def smembers(self, name: Key) -> Awaitable[Members]: ...
    def sadd(self, name: Key, *values: Value) -> Awaitable[int]: ...
    def srem(self, name: Key, *values: Value) -> Awaitable[int]: ...
    def lrange(self, name: Key, start: int, end: int) -> Awaitable[list[bytes]]: ...

    # streams
    def xrange(
        self, name: Key, min: StreamId = "-", max: StreamId = "+", count: int | None = None
    ) -> Awaitable[list[StreamEntry]]: ...
    def xread(
        self,
        streams: Mapping[str, StreamId] | Mapping[bytes, StreamId],
        count: int | None = None,
        block: int | None = None,
    ) -> Awaitable[StreamRead]: ...
    def xreadgroup(
        self,
        groupname: str,
        consumername: str,
        streams: Mapping[str, StreamId] | Mapping[bytes, StreamId],
        count: int | None = None,
        block: int | None = None,
        noack: bool = False,
    ) -> Awaitable[StreamRead]: ...
