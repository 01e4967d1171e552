"""A small asyncio Redis client for the serving hot path: one pipelined connection, hiredis parsing.

One TCP connection per client, shared by every request of the process; a
timeout per call (a late reply is read and dropped); a lost connection fails
every waiting call with ``RedisUnavailable`` and the next call reconnects;
scripts run by EVALSHA with an EVAL fallback (``register_script`` has redis-py's
signature). Error replies come back as ``hiredis.ReplyError`` values in the
result list; ``call`` raises them. Serving uses it, the pipelines keep redis-py;
why: docs/serving.md, "Why no web framework and an own Redis client".

    client = AioRedis.from_url("redis://127.0.0.1:6379/0", timeout_s=0.05)
    zs, n = await client.pipeline([("ZREVRANGE", key, 0, 9), ("ZCARD", key)])
    await client.close()

``connect(url)`` gives an ``AioRedisCluster`` for ``redis+cluster://host:port``:
the same interface over one such connection per master, each command sent
to the master of its key's hash slot (the slot map from CLUSTER SLOTS,
refreshed on a MOVED reply, ASK followed once). Serving's commands each touch
one user's, post's or story's keys, so a command never spans slots.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any, Sequence
from urllib.parse import urlparse

import hiredis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from stores.redis.client import is_cluster_url


class RedisUnavailable(Exception):
    """Redis could not be reached or did not answer in time. ``reason`` is a short
    fixed phrase (``timed out``, ``unreachable``, ``error reply``) that callers may
    show to clients; the message (addresses, OS errors) is for logs only."""

    def __init__(self, message: str, reason: str = "unavailable"):
        super().__init__(message)
        self.reason = reason


class _Waiter:
    __slots__ = ("future", "count", "replies")

    def __init__(self, future: asyncio.Future, count: int):
        self.future = future
        self.count = count
        self.replies: list[Any] = []


class _Protocol(asyncio.Protocol):
    def __init__(self):
        self.reader = hiredis.Reader()
        self.waiters: collections.deque[_Waiter] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiters, gets = self.waiters, self.reader.gets
        while waiters:
            w = waiters[0]
            while len(w.replies) < w.count:
                reply = gets()
                if reply is False:
                    return
                w.replies.append(reply)
            waiters.popleft()
            if not w.future.done():  # a timed-out call's late replies are dropped
                w.future.set_result(w.replies)

    def connection_lost(self, exc) -> None:
        self.closed = True
        error = RedisUnavailable(f"connection to Redis lost: {exc or 'closed by server'}",
                                 "unreachable")
        while self.waiters:
            w = self.waiters.popleft()
            if not w.future.done():
                w.future.set_exception(error)


def pack_command(command: Sequence[Any]) -> bytes:
    """``command`` in the wire format, for callers that reuse it: ``pipeline``
    takes such bytes in place of a command tuple."""
    return hiredis.pack_command(tuple(command))


def _expire(future: asyncio.Future, timeout_s: float) -> None:
    if not future.done():
        future.set_exception(RedisUnavailable(
            f"Redis did not answer within {timeout_s * 1000:.0f} ms", "timed out"))


class AioScript:
    """A Lua script called like redis-py's ``Script``: ``await script(keys=..., args=...)``."""

    def __init__(self, client: "AioRedis", text: str):
        self.client = client
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple:
        """The EVALSHA command (for a ``pipeline`` batch; see ``is_noscript``)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()):
        (reply,) = await self.client.pipeline([self.command(keys, args)])
        if is_noscript(reply):
            (reply,) = await self.client.pipeline([("EVAL", self.text, len(keys), *keys, *args)])
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply


def is_noscript(reply: Any) -> bool:
    """Whether ``reply`` says the server does not have the script (load it with EVAL)."""
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


class AioRedis:
    """See the module doc. Not thread-safe: use it from one event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379, db: int = 0,
                 timeout_s: float = 0.05, connect_timeout_s: float = 0.25):
        self.host, self.port, self.db = host, port, db
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Future | None = None

    @classmethod
    def from_url(cls, url: str, **options) -> "AioRedis":
        """``redis://host:port/db`` (no auth or TLS: the stack is on loopback)."""
        u = urlparse(url)
        if u.scheme != "redis":
            raise ValueError(f"unsupported Redis URL {url!r}: use redis://host:port/db")
        db = int(u.path.lstrip("/") or 0)
        return cls(u.hostname or "127.0.0.1", u.port or 6379, db, **options)

    def register_script(self, text: str) -> AioScript:
        return AioScript(self, text)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(_Protocol, self.host, self.port), self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisUnavailable(f"cannot connect to Redis at {self.host}:{self.port}: "
                                   f"{type(exc).__name__} {exc}", "unreachable") from None
        if self.db:
            self._protocol = protocol
            await self._send(protocol, [("SELECT", self.db)], self.connect_timeout_s)
        return protocol

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        # One connect at a time; concurrent callers wait for it.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            try:
                self._protocol = await self._connecting
            finally:
                self._connecting = None
            return self._protocol
        return await asyncio.shield(self._connecting)

    async def _send(self, protocol: _Protocol, commands: Sequence[Sequence[Any]],
                    timeout_s: float) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        protocol.waiters.append(_Waiter(future, len(commands)))
        protocol.transport.write(b"".join([c if c.__class__ is bytes else hiredis.pack_command(c)
                                           for c in commands]))
        # A timer instead of asyncio.wait_for: the same effect at a fraction of the cost.
        timer = loop.call_later(timeout_s, _expire, future, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()

    async def pipeline(self, commands: Sequence[Sequence[Any]], timeout_s: float | None = None) -> list:
        """Replies of ``commands`` (tuples, or bytes from ``pack_command``), sent in
        one write; error replies are in the list."""
        if not commands:
            return []
        protocol = await self._connection()
        return await self._send(protocol, commands, self.timeout_s if timeout_s is None else timeout_s)

    async def call(self, *command: Any, timeout_s: float | None = None) -> Any:
        """The reply of one command; an error reply raises ``hiredis.ReplyError``."""
        (reply,) = await self.pipeline([command], timeout_s)
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


def connect(url: str, **options) -> "AioRedis | AioRedisCluster":
    """The client for ``url``: ``AioRedisCluster`` for ``redis+cluster://``, else ``AioRedis``."""
    if is_cluster_url(url):
        return AioRedisCluster.from_url(url, **options)
    return AioRedis.from_url(url, **options)


def command_key(command: Sequence[Any] | bytes) -> bytes | None:
    """The key that routes ``command`` (a tuple, or bytes from ``pack_command``): its
    first argument, or for EVAL/EVALSHA its first key; None for a command without."""
    if command.__class__ is bytes:
        command = _first_args(command, 4)
    if len(command) < 2:
        return None
    name = command[0].upper() if command[0].__class__ is bytes else str(command[0]).upper()
    if name in ("EVALSHA", "EVAL", b"EVALSHA", b"EVAL"):
        return _encoded(command[3]) if len(command) > 3 and int(command[2]) > 0 else None
    return _encoded(command[1])


def _encoded(value: Any) -> bytes:
    return value if value.__class__ is bytes else str(value).encode()


def _first_args(packed: bytes, n: int) -> list[bytes]:
    """The first ``n`` bulk strings of a RESP array (a packed command)."""
    out: list[bytes] = []
    pos = packed.index(b"\r\n") + 2  # past "*<count>"
    while len(out) < n and pos < len(packed):
        end = packed.index(b"\r\n", pos)
        size = int(packed[pos + 1:end])  # "$<size>"
        out.append(packed[end + 2:end + 2 + size])
        pos = end + 2 + size + 2
    return out


def _redirect(reply: Any) -> tuple[str, str, int] | None:
    """``(MOVED or ASK, host, port)`` of a redirection error reply, else None."""
    if not isinstance(reply, hiredis.ReplyError):
        return None
    text = str(reply)
    if not text.startswith(("MOVED ", "ASK ")):
        return None
    kind, _, address = text.split()
    host, _, port = address.rpartition(":")
    return kind, host, int(port)


class AioRedisCluster:
    """``AioRedis``'s interface over a Redis Cluster (see the module doc). Not
    thread-safe: use it from one event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 7001, timeout_s: float = 0.05,
                 connect_timeout_s: float = 0.25):
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._seeds = [(host, port)]
        self._nodes: dict[tuple[str, int], AioRedis] = {}
        self._slots: list[tuple[str, int]] | None = None
        self._refreshing: asyncio.Future | None = None

    @classmethod
    def from_url(cls, url: str, **options) -> "AioRedisCluster":
        """``redis+cluster://host:port`` (any node of the cluster)."""
        u = urlparse(url)
        if not is_cluster_url(url) or u.path.strip("/") not in ("", "0"):
            raise ValueError(f"unsupported Redis Cluster URL {url!r}: use redis+cluster://host:port")
        return cls(u.hostname or "127.0.0.1", u.port or 7001, **options)

    # The same on one server and on a cluster: both go through ``pipeline``.
    register_script = AioRedis.register_script
    call = AioRedis.call

    def _node(self, address: tuple[str, int]) -> AioRedis:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = AioRedis(*address, timeout_s=self.timeout_s,
                                                   connect_timeout_s=self.connect_timeout_s)
        return node

    async def _refresh(self) -> None:
        """Read the slot map from the first node that answers (one refresh at a time)."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        self._refreshing = asyncio.ensure_future(self._read_slots())
        try:
            await self._refreshing
        finally:
            self._refreshing = None

    async def _read_slots(self) -> None:
        error: Exception | None = None
        for address in [*self._nodes, *self._seeds]:
            try:
                ranges = await self._node(address).call("CLUSTER", "SLOTS",
                                                        timeout_s=self.connect_timeout_s)
            except (RedisUnavailable, hiredis.ReplyError) as exc:
                error = exc
                continue
            table: list[tuple[str, int]] = [None] * REDIS_CLUSTER_HASH_SLOTS  # type: ignore
            for first, last, master, *_ in ranges:
                owner = (master[0].decode() or address[0], int(master[1]))
                table[first:last + 1] = [owner] * (last - first + 1)
                self._seeds = list(dict.fromkeys([*self._seeds, owner]))
            self._slots = table
            return
        raise RedisUnavailable(f"no node of the Redis Cluster answered CLUSTER SLOTS: {error}",
                               "unreachable")

    def _owner(self, command) -> tuple[str, int]:
        key = command_key(command)
        owner = self._slots[key_slot(key)] if key is not None else None
        return owner or next(iter(self._slots_owners()))

    def _slots_owners(self):
        return dict.fromkeys(a for a in self._slots if a is not None)

    async def pipeline(self, commands: Sequence[Sequence[Any]], timeout_s: float | None = None) -> list:
        """Replies of ``commands`` in order, as ``AioRedis.pipeline``: one pipelined write
        per master, sent concurrently; a MOVED reply refreshes the slot map and sends
        that command again, an ASK sends it once to the node named (after ASKING)."""
        if not commands:
            return []
        if self._slots is None:
            await self._refresh()
        try:
            replies = await self._scatter(commands, list(range(len(commands))), timeout_s)
        except RedisUnavailable as exc:
            if exc.reason == "unreachable":
                self._slots = None  # a failover may have moved its slots: read them anew
            raise
        moved = [i for i, r in enumerate(replies) if (_redirect(r) or ("",))[0] == "MOVED"]
        if moved:
            await self._refresh()
            again = await self._scatter(commands, moved, timeout_s)
            for i, reply in zip(moved, again):
                replies[i] = reply
        for i, reply in enumerate(replies):
            redirect = _redirect(reply)
            if redirect is not None and redirect[0] == "ASK":
                _, asked = await self._node(redirect[1:]).pipeline(
                    [("ASKING",), commands[i]], timeout_s)
                replies[i] = asked
        return replies

    async def _scatter(self, commands, indices: list[int], timeout_s: float | None) -> list:
        by_node: dict[tuple[str, int], list[int]] = {}
        for i in indices:
            by_node.setdefault(self._owner(commands[i]), []).append(i)
        results = await asyncio.gather(*(
            self._node(address).pipeline([commands[i] for i in group], timeout_s)
            for address, group in by_node.items()))
        out: dict[int, Any] = {}
        for group, replies in zip(by_node.values(), results):
            out.update(zip(group, replies))
        return [out[i] for i in indices]

    async def close(self) -> None:
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            await node.close()
