"""Reading fields of many hashes: plain HMGETs written to Redis at once, replies read later.

    reads = HashReads(client)
    first = reads.same(keys, ["like_1h", "view_1h"])     # the same fields of every key
    second = reads.each(keys, [[3, 9], [4]])              # each key its own fields
    third = reads.strings(string_keys)                    # GETs: one MGET on a single server
    reads.send()                                          # one write on one connection
    ...                                                   # the caller's own work, while Redis reads
    reads.take(first)                                     # [[b"2@...", None], ...]
    reads.take_strings(third)                             # [b"...", None, ...]
    reads.close()                                         # or use it as a context manager

A refresh batch reads thousands of small hashes (post metadata, post and
author features, affinities). Measured on the 2-core machine
(``bench/probe_hash_reads.py``): one script call per chunk of keys, the design
this replaced, cost Redis 2.5 times the CPU of plain HMGETs, every value
crossing into Lua and back; and redis-py's pipeline spends more client CPU per
command than Redis does. So the commands are packed here, as RESP, written in
one send, and their replies read straight off the connection.

Between ``send`` and the first ``take`` the caller may do work of its own: Redis
reads meanwhile, on the other core. The connection is the caller's alone until
``close``; one closed with replies unread is dropped, never returned to the
pool out of step. On a Redis Cluster, ``send`` runs the HMGETs in a cluster
pipeline at once (redis-py routes each key to its node).
"""
from __future__ import annotations

from typing import Sequence

import socket

import hiredis
import numpy as np
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

#: A reply that was never sent: ``each`` with no fields for a key (HMGET needs one).
_NOTHING = object()


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _pack_same(keys: Sequence, fields: Sequence) -> bytes:
    """``HMGET key *fields`` for every key, as RESP: the command head and the fields
    are packed once, each key on its own."""
    names = [_bytes(f) for f in fields]
    head = b"*%d\r\n$5\r\nHMGET\r\n" % (len(names) + 2)
    tail = b"".join(b"$%d\r\n%b\r\n" % (len(f), f) for f in names)
    out = []
    for key in keys:
        key = _bytes(key)
        out.append(b"%b$%d\r\n%b\r\n%b" % (head, len(key), key, tail))
    return b"".join(out)


class _SocketReplies:
    """Replies read straight off a connection's socket by a hiredis reader of our own.

    redis-py's ``read_response`` costs a few microseconds of Python per reply,
    most of a batch's reading when it has thousands of small replies (a
    refresh batch's post hashes: 6,000). Here each reply is one ``gets()`` of
    hiredis. Used only on a RESP2 connection whose own parser holds no bytes
    (a pooled connection between commands), so the two never share data; an
    error reply is raised as redis-py's ``ResponseError`` (its message kept),
    a timeout or a closed socket as its ``TimeoutError`` / ``ConnectionError``.
    """

    def __init__(self, sock, read_size: int = 1 << 16):
        self._sock, self._size = sock, read_size
        self._reader = hiredis.Reader(replyError=ResponseError)

    @classmethod
    def of(cls, conn) -> "_SocketReplies | bool":
        """A reader for ``conn``, or False when redis-py must read (RESP3, another
        parser, bytes already buffered)."""
        own = getattr(getattr(conn, "_parser", None), "_reader", None)
        sock = getattr(conn, "_sock", None)
        if (sock is None or getattr(conn, "protocol", 2) not in (2, "2", None)
                or own is None or own.has_data()):
            return False
        return cls(sock)

    def pending(self) -> bool:
        """Whether bytes were read beyond the replies taken."""
        return bool(self._reader.has_data())

    def next(self):
        reader = self._reader
        while True:
            reply = reader.gets()
            if reply is not False:
                if isinstance(reply, ResponseError):
                    raise reply
                return reply
            try:
                chunk = self._sock.recv(self._size)
            except socket.timeout:
                raise TimeoutError("Timeout reading batched replies from Redis") from None
            except OSError as exc:
                raise ConnectionError(f"Error reading batched replies from Redis: {exc}") from None
            if not chunk:
                raise ConnectionError("Redis closed the connection during batched replies")
            reader.feed(chunk)


class HashReads:
    """Many HMGETs of one batch (single use): queue with ``same``/``each``, ``send``,
    then ``take`` the replies of each queued group (see module doc)."""

    def __init__(self, client):
        self.client = client
        self._cluster = isinstance(client, RedisCluster)
        self._packed: list[bytes] = []
        self._slots: list = []  # per reply: True (read it) or _NOTHING
        self._commands: list[tuple] = []  # a cluster's, run at send
        self._conn = None
        self._sent = False
        self._got: list = []  # the replies read so far, in order
        self._reader = None  # _SocketReplies, or False: read through redis-py

    def __enter__(self) -> "HashReads":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def same(self, keys: Sequence, fields: Sequence) -> slice:
        """HMGET ``fields`` of every key; returns where its replies will be."""
        start = len(self._slots)
        if not fields:
            self._slots.extend(_NOTHING for _ in keys)
        elif self._cluster:
            self._commands.extend(("HMGET", k, *fields) for k in keys)
            self._slots.extend(True for _ in keys)
        elif keys:
            self._packed.append(_pack_same(keys, fields))
            self._slots.extend(True for _ in keys)
        return slice(start, len(self._slots))

    def each(self, keys: Sequence, fields: Sequence[Sequence]) -> slice:
        """HMGET ``fields[i]`` (names or ids) of ``keys[i]``; a key with no fields
        reads as an empty reply, without a command."""
        start = len(self._slots)
        pack = hiredis.pack_command
        for key, names in zip(keys, fields, strict=True):
            if not len(names):
                self._slots.append(_NOTHING)
            elif self._cluster:
                self._commands.append(("HMGET", key, *names))
                self._slots.append(True)
            else:
                self._packed.append(pack(("HMGET", key, *names)))
                self._slots.append(True)
        return slice(start, len(self._slots))

    def pick(self, keys: Sequence, names: Sequence, index: Sequence[int],
             bounds: Sequence[int]) -> slice:
        """HMGET of ``keys[i]`` the fields ``names[j]`` for ``j`` in
        ``index[bounds[i]:bounds[i + 1]]``: ``each`` for fields drawn from one small
        set (a batch's authors), each name packed once."""
        start = len(self._slots)
        bounds = list(bounds)
        if self._cluster:
            index = list(index)
            return self.each(keys, [[names[j] for j in index[bounds[i]:bounds[i + 1]]]
                                    for i in range(len(keys))])
        packed = np.array([b"$%d\r\n%b\r\n" % (len(n), n) for n in map(_bytes, names)],
                          dtype=object)
        fields = packed[np.asarray(index, np.intp)].tolist() if len(index) else []
        out = self._packed
        for i, key in enumerate(keys):
            a, b = bounds[i], bounds[i + 1]
            if a == b:
                self._slots.append(_NOTHING)
                continue
            key = _bytes(key)
            out.append(b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n%b\r\n" % (b - a + 2, len(key), key))
            out.append(b"".join(fields[a:b]))
            self._slots.append(True)
        return slice(start, len(self._slots))

    def calls(self, commands: Sequence[Sequence]) -> slice:
        """Any other read commands, one reply each, as Redis gives it (an HGETALL is a
        flat list of fields and values; on a cluster redis-py's dict)."""
        start = len(self._slots)
        if self._cluster:
            self._commands.extend(tuple(c) for c in commands)
        else:
            pack = hiredis.pack_command
            self._packed.extend(pack(tuple(c)) for c in commands)
        self._slots.extend(True for _ in commands)
        return slice(start, len(self._slots))

    def strings(self, keys: Sequence) -> slice:
        """GET of every key: one MGET (one reply) on a single server, a GET each on a
        cluster (the keys span slots); ``take_strings`` gives the values either way."""
        if self._cluster:
            return self.calls([("GET", k) for k in keys])
        return self.calls([("MGET", *keys)] if len(keys) else [])

    def take_strings(self, where: slice) -> list:
        """The values (bytes or None) of the keys ``strings`` queued at ``where``."""
        got = self.take(where)
        return list(got) if self._cluster else (got[0] if got else [])

    def send(self) -> "HashReads":
        """Write every queued HMGET (a cluster runs them now); at most once."""
        if self._sent:
            raise RuntimeError("HashReads.send: already sent")
        self._sent = True
        if self._cluster:
            pipe = self.client.pipeline()
            for command in self._commands:
                pipe.execute_command(*command)
            replies = iter(pipe.execute() if self._commands else ())
            self._got = [[] if s is _NOTHING else next(replies) for s in self._slots]
            return self
        if not self._packed:
            self._got = [[] for _ in self._slots]
            return self
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(self._packed)], check_health=False)
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        self._conn = conn
        self._packed = []
        return self

    def replies(self) -> list[list]:
        """Every reply, in the order queued (sending first if not sent)."""
        return self.take(slice(0, len(self._slots)))

    def take(self, where: slice) -> list[list]:
        """The replies (lists of values or None) of the group queued at ``where``,
        reading off the connection no further than its end: a caller taking a large
        group in parts works on the first while Redis still answers the rest."""
        if not self._sent:
            self.send()
        self._read_to(where.stop)
        return self._got[where]

    def _read_to(self, stop: int) -> None:
        got, slots, conn = self._got, self._slots, self._conn
        if conn is None or len(got) >= stop:
            return
        try:
            if self._reader is None:
                self._reader = _SocketReplies.of(conn)
            read = self._reader.next if self._reader else conn.read_response
            while len(got) < stop:
                got.append([] if slots[len(got)] is _NOTHING else read())
        except BaseException:
            self.close()  # replies may be left unread: never reuse it
            raise
        if len(got) == len(slots):
            if self._reader and self._reader.pending():
                self.close()  # bytes beyond our replies: out of step, never reuse it
                return
            self._conn = None
            self.client.connection_pool.release(conn)

    def close(self) -> None:
        """Give the connection back; one with replies unread is dropped first."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self.client.connection_pool.release(conn)


__all__ = ["HashReads"]
