"""Ranked feeds in Redis (hot) and Cassandra (durable), for the ranking pipeline and serving.

The ranking pipeline writes a user's whole ranked feed at once
(``RankedFeedStore.write``); serving reads it a page at a time (``read_page``,
or the async ``AsyncRankedReader``) and falls back to the durable copy
(``read_durable``); ``feedbeam rebuild`` copies it back (``scan_durable``,
``restore``). In Redis one Lua script swaps in a newer ranking and keeps the
previous one for readers paging through it; Cassandra holds one row per user
``USING TIMESTAMP`` of its generation. Layout and why: docs/architecture.md,
"Stores".

    store = RankedFeedStore.connect("redis://127.0.0.1:6379/0", "fb",
                                    "127.0.0.1", 9042, "feedbeam")
    store.write(7, [RankedEntry(101, 3, 0.92), RankedEntry(99, 4, 0.95)], "xgb-3", now_ms)
    store.read(7)            # RankedFeed(entries=(101, 99 ...), model_version='xgb-3', ...)
    store.read_page(7, start=0, count=20)
    store.close()
"""
from __future__ import annotations

import logging
import struct
from typing import Any, Iterator, Sequence

import numpy as np
import redis

from stores.cassandra.feeds import CassandraFeedStore, to_ms
from stores.redis.client import new_client
from schemas import cassandra as cs
from schemas.keys import KeyLayout
from schemas.ranked import RankedEntry, RankedFeed, RankedPage

log = logging.getLogger(__name__)

#: Seconds the replaced ranking stays readable for readers paging through it.
DEFAULT_KEEP_PREVIOUS_S = 900

# In Redis a ranked feed is one string (``KeyLayout.ranked_feed``): a head, then
# one fixed-size record per entry in rank order, so a page is one GETRANGE and a
# replacement one SET, whatever the number of entries. The head: ``generated_at``
# (ms) in 16 ASCII digits, the model version's length in 3, the model version
# (UTF-8). A record: post id and author id (big-endian int64), score (big-endian
# float64, exact).
_STAMP_DIGITS = 16
#: Bytes at the start of a value that hold its ``generated_at`` (``generated_at_of``).
STAMP_BYTES = _STAMP_DIGITS
_VERSION_DIGITS = 3
_HEAD = _STAMP_DIGITS + _VERSION_DIGITS
RECORD = np.dtype([("post_id", ">i8"), ("author_id", ">i8"), ("score", ">f8")])
_RECORD_UNPACK = struct.Struct(">qqd")

# KEYS: live, previous, meta (a hash of the layout before one string per feed,
# deleted where found). ARGV: generated_at (16 digits), the new value,
# keep_previous_s. Returns 1 if written, 0 if the stored ranking is as new or
# newer (nothing changed). The replaced one stays readable as ``previous``.
_SWAP = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then
  if tonumber(redis.call('GETRANGE', KEYS[1], 0, %(stamp)d - 1)) >= tonumber(ARGV[1]) then
    return 0
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
else
  redis.call('DEL', KEYS[1], KEYS[3])
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
""" % {"stamp": _STAMP_DIGITS}

# KEYS: live, previous. ARGV: wanted generated_at (16 digits, '' for the current
# one), first rank, last rank (inclusive; -1 or past the end: to the end).
# Returns {found} when there is no ranked feed, else {found, head, total,
# records}: found is 0 when the wanted version was gone (the current one is
# read instead). A value of another type (the layout before) reads as none.
_READ_PAGE = """
local function head(key)
  local h = redis.pcall('GETRANGE', key, 0, %(head)d - 1)
  if type(h) == 'string' and #h == %(head)d then return h end
  return nil
end
local key, h, found = KEYS[1], head(KEYS[1]), 1
if ARGV[1] ~= '' and (h == nil or string.sub(h, 1, %(stamp)d) ~= ARGV[1]) then
  local p = head(KEYS[2])
  if p ~= nil and string.sub(p, 1, %(stamp)d) == ARGV[1] then
    key, h = KEYS[2], p
  else
    found = 0
  end
end
if h == nil then
  return {found}
end
local at = %(head)d + tonumber(string.sub(h, %(stamp)d + 1))
local total = (redis.call('STRLEN', key) - at) / %(record)d
local first, last = tonumber(ARGV[2]), tonumber(ARGV[3])
if last < 0 or last >= total then last = total - 1 end
local records = ''
if first <= last then
  records = redis.call('GETRANGE', key, at + %(record)d * first, at + %(record)d * last + %(record)d - 1)
end
return {found, redis.call('GETRANGE', key, 0, at - 1), total, records}
""" % {"head": _HEAD, "stamp": _STAMP_DIGITS, "record": RECORD.itemsize}


#: The page read, for clients that run it themselves (``register_script``).
READ_PAGE_SCRIPT = _READ_PAGE


# -- pure helpers (unit tested without Redis) ------------------------------------------


def entry_records(entries: Sequence[RankedEntry]) -> np.ndarray:
    """``entries`` (rank order) as ``RECORD`` rows, the layout of the Redis value;
    ValueError on a repeated post id, a score that is not a finite number or a
    value that is not a number in range."""
    try:
        post_ids, author_ids, scores = zip(*entries) if len(entries) else ((), (), ())
        ids = np.array(post_ids, np.int64)
        values = np.array(scores, np.float64)
        out = np.empty(len(ids), RECORD)
        out["post_id"], out["author_id"], out["score"] = ids, author_ids, values
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"a ranked entry is not (post id, author id, score): {exc}") from None
    ordered = np.sort(ids)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated):
        raise ValueError(f"post {int(repeated[0])} appears twice in one ranked feed")
    finite = np.isfinite(values)
    if not finite.all():
        at = int(np.argmin(finite))
        raise ValueError(f"post {int(ids[at])} has a non-finite score {float(values[at])!r}")
    return out


# A ranked_feeds.ranked_posts value (frozen<list<frozen<ranked_entry>>>) as the
# native protocol (v3 and later) carries it: an int32 count, then per entry its
# size (36) and the UDT's fields, each an int32 size and a big-endian value.
_WIRE_ENTRY = np.dtype([("size", ">i4"), ("post_size", ">i4"), ("post_id", ">i8"),
                        ("author_size", ">i4"), ("author_id", ">i8"),
                        ("score_size", ">i4"), ("score", ">f8")])


def pack_ranked_posts(records: np.ndarray) -> bytes:
    """``records`` (``entry_records``) serialized as the ``ranked_posts`` column, with
    NumPy (the driver's own serializer spends microseconds per field: most of a
    refresh's write). ``RankedFeedStore`` checks it against the driver's before
    using it."""
    out = np.empty(len(records), _WIRE_ENTRY)
    out["size"] = 36
    out["post_size"] = out["author_size"] = out["score_size"] = 8
    for name in ("post_id", "author_id", "score"):
        out[name] = records[name]
    return struct.pack(">i", len(records)) + out.tobytes()


def _stamp(generated_at_ms: int) -> str:
    if not 0 <= generated_at_ms < 10 ** _STAMP_DIGITS:
        raise ValueError(f"generated_at {generated_at_ms} is out of range")
    return f"{int(generated_at_ms):0{_STAMP_DIGITS}d}"


def ranked_value(records: np.ndarray, model_version: str, generated_at_ms: int) -> bytes:
    """The Redis value of a ranked feed (see the layout above)."""
    version = model_version.encode()
    if not version or len(version) >= 10 ** _VERSION_DIGITS:
        raise ValueError(f"model_version must be 1 to {10 ** _VERSION_DIGITS - 1} bytes, "
                         f"not {len(version)}")
    head = f"{_stamp(generated_at_ms)}{len(version):0{_VERSION_DIGITS}d}".encode()
    return head + version + records.astype(RECORD, copy=False).tobytes()


def generated_at_of(value: bytes) -> int:
    """The ``generated_at`` (ms) of a Redis value, or of its first ``STAMP_BYTES``."""
    return int(value[:_STAMP_DIGITS])


def parse_value(user_id: int, value: bytes | None) -> RankedFeed | None:
    """The ``RankedFeed`` a Redis value holds (None for no value)."""
    if value is None:
        return None
    at = _HEAD + int(value[_STAMP_DIGITS:_HEAD])
    return RankedFeed(user_id, _entries(value[at:]), value[_HEAD:at].decode(),
                      generated_at_of(value))


def _entries(records: bytes) -> tuple[RankedEntry, ...]:
    return tuple(map(RankedEntry._make, _RECORD_UNPACK.iter_unpack(records)))


def swap_args(records: np.ndarray, model_version: str, generated_at_ms: int,
              keep_previous_s: int) -> list[Any]:
    """ARGV of ``_SWAP`` for ``records`` (``entry_records``)."""
    value = ranked_value(records, model_version, generated_at_ms)
    return [value[:_STAMP_DIGITS].decode(), value, int(keep_previous_s)]


def parse_page(reply: Sequence[Any], start: int) -> RankedPage | None:
    """A ``RankedPage`` from the reply of ``_READ_PAGE``; None when the user has no
    ranked feed (nothing was ever written, or it expired)."""
    if len(reply) < 4:
        return None
    found, head, total, records = reply
    return RankedPage(_entries(records), start, int(total), head[_HEAD:].decode(),
                      generated_at_of(head), bool(found))


def page_args(generated_at_ms: int | None, start: int, count: int) -> list[Any]:
    """ARGV of ``_READ_PAGE``: ranks ``start .. start+count-1`` of the wanted version."""
    if start < 0 or count < 0:
        raise ValueError("start and count must not be negative")
    return ["" if generated_at_ms is None else _stamp(generated_at_ms), start,
            start + count - 1]


def page_keys(keys: KeyLayout, user_id: int) -> list[str]:
    return [keys.ranked_feed(user_id), keys.ranked_feed_previous(user_id)]


def feed_from_row(user_id: int, row) -> RankedFeed | None:
    """A ``RankedFeed`` from a ``ranked_feeds`` row (None for no row)."""
    if row is None or row.generated_at is None:
        return None
    entries = tuple(RankedEntry(int(e[0]), int(e[1]), float(e[2]))
                    for e in (row.ranked_posts or ()))
    return RankedFeed(user_id, entries, row.model_version or "", to_ms(row.generated_at))


# -- the stores ----------------------------------------------------------------------


class RankedFeedStore:
    """Ranked feeds in Redis and/or Cassandra (see module doc).

    Either backend may be None (e.g. serving's fallback reader only needs
    Cassandra); ``write`` writes to each one present, Cassandra first so the
    durable copy is never behind the hot one.
    """

    def __init__(self, redis_client: "redis.Redis | None", keys: KeyLayout,
                 cassandra: CassandraFeedStore | None = None,
                 keep_previous_s: int = DEFAULT_KEEP_PREVIOUS_S):
        self.redis = redis_client
        self.keys = keys
        self.keep_previous_s = keep_previous_s
        self._owns_clients = False
        self._packed: bool | None = None  # pack_ranked_posts matches the driver's?
        self._swap = self._read_page = None
        if redis_client is not None:
            self._swap = redis_client.register_script(_SWAP)
            self._read_page = redis_client.register_script(_READ_PAGE)
        # Statements run through CassandraFeedStore's execution path (prepared
        # once per session, transient errors re-executed with backoff, stats).
        self.cassandra = cassandra
        self._insert = self._select = None
        if cassandra is not None:
            ks = cassandra.keyspace
            self._insert = (f"INSERT INTO {ks}.{cs.RANKED_FEEDS} (user_id, ranked_posts, "
                            "model_version, generated_at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?")
            cassandra.prepare(self._insert)  # fail at start on a schema mismatch
            self._select = cassandra.prepare(
                f"SELECT ranked_posts, model_version, generated_at FROM {ks}.{cs.RANKED_FEEDS} "
                "WHERE user_id = ?")

    @classmethod
    def connect(cls, redis_url: str | None, key_prefix: str = "fb", cassandra_host: str | None = None,
                cassandra_port: int = 9042, keyspace: str = cs.DEFAULT_KEYSPACE,
                **options) -> "RankedFeedStore":
        """A store on new clients (either side may be left out with None);
        ``close()`` closes them."""
        cassandra = None
        if cassandra_host is not None:
            cassandra = CassandraFeedStore.connect(cassandra_host, cassandra_port, keyspace)
        client = None if redis_url is None else new_client(redis_url)
        try:
            store = cls(client, KeyLayout(key_prefix), cassandra, **options)
        except Exception:
            if cassandra is not None:
                cassandra.close()
            raise
        store._owns_clients = True
        return store

    def close(self) -> None:
        """Close the clients ``connect()`` opened (given ones are left open)."""
        if self._owns_clients:
            self._owns_clients = False
            if self.cassandra is not None:
                self.cassandra.close()
            if self.redis is not None:
                self.redis.close()

    # -- writing ------------------------------------------------------------------

    def write(self, user_id: int, entries: Sequence[RankedEntry], model_version: str,
              generated_at_ms: int) -> bool:
        """Replace ``user_id``'s ranked feed by ``entries`` (rank order, best first)
        unless a ranking generated at or after ``generated_at_ms`` is stored.

        Returns whether Redis took it (True when there is no Redis side). The
        Cassandra row is written in any case: its timestamp makes an older
        ranking lose there by itself. ValueError for a repeated post id, a
        non-finite score or an empty model version.
        """
        return self.write_many([RankedFeed(user_id, tuple(entries), model_version,
                                           generated_at_ms)])[0]

    def write_many(self, feeds: Sequence[RankedFeed]) -> list[bool]:
        """``write`` for many users at once: every Cassandra row concurrently, then one
        pipelined Redis round trip for all the swaps. Per feed whether Redis took it."""
        checked = [(f, entry_records(f.entries)) for f in feeds]
        swaps = [(f.user_id, swap_args(records, f.model_version, f.generated_at_ms,
                                       self.keep_previous_s)) for f, records in checked]
        if self._insert is not None and checked:
            self._write_durable(checked)
        if self._swap is None:
            return [True] * len(checked)
        return self._swap_all(swaps)

    def _write_durable(self, checked: Sequence[tuple[RankedFeed, np.ndarray]]) -> None:
        """One row per feed, all concurrently (one attempt: the caller retries the batch).
        The ranked posts are bound pre-serialized (``pack_ranked_posts``) when that
        matches the driver's serialization of the column, else by the driver."""
        from cassandra.concurrent import execute_concurrent
        from cassandra.query import BoundStatement

        stmt = self.cassandra.prepare(self._insert)
        packed = self._packs_like_driver(stmt)
        work = []
        for f, records in checked:
            bound = BoundStatement(stmt).bind((
                f.user_id, [] if packed else records.tolist(), f.model_version,
                f.generated_at_ms, cs.event_timestamp_us(f.generated_at_ms)))
            if packed:
                bound.values[1] = pack_ranked_posts(records)
            work.append((bound, None))
        execute_concurrent(self.cassandra.session, work, concurrency=self.cassandra.concurrency,
                           raise_on_first_error=True)

    def _packs_like_driver(self, stmt) -> bool:
        if self._packed is None:
            sample = entry_records([RankedEntry(1, 2, 0.5), RankedEntry(2**40 + 7, -3, -1.25e-7)])
            version = self.cassandra.session.cluster.protocol_version
            driver = stmt.column_metadata[1].type.serialize(sample.tolist(), version)
            self._packed = driver == pack_ranked_posts(sample)
            if not self._packed:
                log.warning("ranked feeds: the driver serializes ranked_posts differently "
                            "(protocol %s); using its serializer", version)
        return self._packed

    def _swap_all(self, swaps: Sequence[tuple[int, list[Any]]]) -> list[bool]:
        if not swaps:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for user_id, args in swaps:
            self._swap_into(pipe, user_id, args)
        return [r == 1 for r in pipe.execute()]

    def _swap_into(self, client, user_id: int, args: list[Any]):
        k = self.keys
        return self._swap(keys=[k.ranked_feed(user_id), k.ranked_feed_previous(user_id),
                                k.ranked_meta(user_id)], args=args, client=client)

    def restore(self, feeds: Sequence[RankedFeed]) -> list[bool]:
        """Write durable ranked feeds back to Redis only (``feedbeam rebuild``), through
        the same newer-wins swap as ``write``, in one pipelined round trip. True per
        feed Redis took; False where Redis holds a ranking generated at or after it
        (the running pipeline wrote a newer one meanwhile, or this one already)."""
        if self._swap is None:
            raise RuntimeError("this RankedFeedStore has no Redis side")
        return self._swap_all([(f.user_id, swap_args(entry_records(f.entries), f.model_version,
                                                     f.generated_at_ms, self.keep_previous_s))
                               for f in feeds])

    # -- reading ------------------------------------------------------------------

    def read(self, user_id: int) -> RankedFeed | None:
        """The whole current ranked feed from Redis; None if there is none."""
        page = self.read_page(user_id, 0, None)
        if page is None:
            return None
        return RankedFeed(user_id, page.entries, page.model_version, page.generated_at_ms)

    def read_page(self, user_id: int, start: int, count: int | None,
                  generated_at_ms: int | None = None) -> RankedPage | None:
        """Ranks ``start .. start+count-1`` (all from ``start`` with ``count=None``)
        from Redis, of the version generated at ``generated_at_ms`` if it is still
        the current or the previous one, else of the current one
        (``requested_version`` False). None if the user has no ranked feed."""
        if self._read_page is None:
            raise RuntimeError("this RankedFeedStore has no Redis side")
        args = page_args(generated_at_ms, start, 0 if count is None else count)
        if count is None:
            args[2] = -1
        reply = self._read_page(keys=page_keys(self.keys, user_id), args=args)
        return parse_page(reply, start)

    def durable_query(self, user_id: int) -> tuple[Any, tuple]:
        """The prepared statement and parameters that read ``user_id``'s row (for
        asynchronous readers; turn the row into a feed with ``feed_from_row``)."""
        if self._select is None:
            raise RuntimeError("this RankedFeedStore has no Cassandra side")
        return self._select, (user_id,)

    def read_durable(self, user_id: int) -> RankedFeed | None:
        """The ranked feed from Cassandra (the fallback when Redis is unavailable)."""
        (row,) = self.cassandra.execute_rows(*self.durable_query(user_id)) or (None,)
        return feed_from_row(user_id, row)

    def scan_durable(self, page_size: int = 500) -> Iterator[RankedFeed]:
        """Every ranked feed in Cassandra (a full table scan, paged: ``feedbeam rebuild``)."""
        if self.cassandra is None:
            raise RuntimeError("this RankedFeedStore has no Cassandra side")
        rows = self.cassandra.scan_rows(
            f"SELECT user_id, ranked_posts, model_version, generated_at FROM "
            f"{self.cassandra.keyspace}.{cs.RANKED_FEEDS}", page_size)
        for row in rows:
            feed = feed_from_row(row.user_id, row)
            if feed is not None:
                yield feed


class AsyncRankedReader:
    """The Redis read of ``RankedFeedStore.read_page`` on an asyncio client (serving)."""

    def __init__(self, client, keys: KeyLayout):
        self.keys = keys
        self._read_page = client.register_script(_READ_PAGE)

    async def read_page(self, user_id: int, start: int, count: int,
                        generated_at_ms: int | None = None) -> RankedPage | None:
        reply = await self._read_page(keys=page_keys(self.keys, user_id),
                                      args=page_args(generated_at_ms, start, count))
        return parse_page(reply, start)
