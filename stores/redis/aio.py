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
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
from typing import Any, Sequence
from urllib.parse import urlparse

import hiredis


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
