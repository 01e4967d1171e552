"""The durable Cassandra copy of feeds, timelines, posts and the social graph.

``CassandraFeedStore`` reads and writes the tables of ``schemas/cql/`` for the
fan-out pipeline (writer), the rebuild job and serving's fallback (readers), so
every CQL statement is defined here once. Writes are upserts and deletes
``USING TIMESTAMP`` of the event time (idempotent), prepared once per session,
packed into unlogged batches of ``batch_rows`` (feed rows: one ``IN`` statement
per post and ``users_per_statement`` followers) and executed concurrently, one
attempt per call (the caller retries its batch, ``stores.retry``);
``deferred()`` holds a block's writes until its end. Why: docs/architecture.md,
"Stores".

    store = CassandraFeedStore.connect("127.0.0.1", 9042, "feedbeam")
    store.push([7, 8], post_id=101, author_id=3, created_at_ms=1_700_000_000_000)
    store.feed_page(7, limit=20, before=None, now_ms=1_700_000_100_000)
    store.close()
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import struct
import threading
import time
import weakref
from datetime import datetime, timedelta
from typing import Any, Iterable, Iterator, Sequence

from schemas import cassandra as cs
from stores.config import DEFAULT_CASSANDRA_BATCH_ROWS, MAX_CASSANDRA_BATCH_ROWS
from stores.retry import RetryPolicy, is_transient
from stores.cassandra import session as cassandra_session
from schemas.events import FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind

log = logging.getLogger(__name__)

#: Stores make one attempt; the caller retries its batch (``stores.retry``).
NO_RETRY = RetryPolicy(attempts=1)
_EPOCH = datetime(1970, 1, 1)


class _UnloggedBatchWarnings(logging.Filter):
    """Drops the server's warning about unlogged multi-partition batches.

    Cassandra warns on every such batch by default (threshold 10 partitions);
    this store sends them on purpose (see the module doc), and one warning line
    per 50 rows would bury everything else in a pipeline's log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unlogged batch covering" not in record.getMessage()


logging.getLogger("cassandra.protocol").addFilter(_UnloggedBatchWarnings())
_MS = timedelta(milliseconds=1)

#: Tables ``dump()`` snapshots (what the fan-out and graph pipelines write).
DUMP_TABLES: tuple[str, ...] = (
    cs.FOLLOWERS_BY_USER, cs.FOLLOWING_BY_USER, cs.FOLLOWER_COUNTS, cs.POSTS,
    cs.HOME_FEED_BY_USER, cs.AUTHOR_TIMELINE, cs.USER_ACTIVITY, cs.FOLLOWED_CELEBRITIES,
)


# -- pure helpers (unit tested without Cassandra) ------------------------------------


#: Estimated bytes (``param_bytes``) an unlogged batch may carry. Cassandra
#: fails a batch above ``batch_size_fail_threshold`` (50 KiB by default;
#: infra/cassandra.yaml warns at 32 KiB) whatever its statement count: one post
#: with 600 long hashtags made a 61 KB batch and failed the fan-out (issue 25).
#: Half the fail threshold leaves room for what the estimate leaves out.
MAX_BATCH_BYTES = 24 * 1024
_STATEMENT_OVERHEAD = 32  # per statement: partition and clustering framing, cell timestamps
_ELEMENT_OVERHEAD = 20  # per collection element: a cell of its own (path, timestamp)


def param_bytes(value: Any) -> int:
    """An estimate of the bytes a bound value adds to a mutation, as Cassandra
    counts a batch's size: the value plus a cell's overhead per collection element."""
    kind = type(value)
    if kind is int or kind is float or kind is bool:
        return 8
    if value is None:
        return 0
    if kind is str:
        return len(value) if value.isascii() else len(value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(param_bytes(v) + _ELEMENT_OVERHEAD for v in value)
    if isinstance(value, dict):
        return sum(param_bytes(k) + param_bytes(v) + _ELEMENT_OVERHEAD
                   for k, v in value.items())
    return 16  # timestamps, uuids, decimals: 8 or 16


def pack_batches(work: Sequence[tuple[Any, tuple]], batch_rows: int,
                 max_batch_bytes: int = MAX_BATCH_BYTES) -> list[tuple[Any, tuple | None]]:
    """``(statement, params)`` writes packed into UNLOGGED batches of at most
    ``batch_rows`` statements and ``max_batch_bytes`` of bound values
    (``param_bytes``), in order.

    A lone statement stays as it is, so one larger than ``max_batch_bytes`` is
    sent on its own (no batch limit applies to it). Batches are marked
    idempotent (their statements are), so the driver may retry them.

    Rows of bigints and timestamps only (the graph and feed rows) are serialized
    here, 8 bytes big-endian a value as the driver's bind would: about a
    twentieth of its per-row ``bind``. Any other row, or a value that is not an
    int of its range (None, a float, a datetime), the driver binds and checks
    (``tests/unit/test_cassandra_batches.py`` checks the bytes are equal).
    """
    if batch_rows <= 1:
        return list(work)
    if batch_rows > MAX_CASSANDRA_BATCH_ROWS:
        raise ValueError(f"batch_rows {batch_rows} above the protocol's "
                         f"{MAX_CASSANDRA_BATCH_ROWS:,} statements")
    widths: dict[Any, int] = {}  # statement -> its marker count if all are 8-byte ints, else 0
    packed: list[tuple[Any, tuple | None]] = []
    rows: list[tuple[Any, tuple, list | None]] = []  # the batch being filled
    size = 0
    for stmt, params in work:
        width = widths.get(stmt)
        if width is None:
            width = widths[stmt] = _int64_width(stmt)
        values = None
        if not params:
            cost = _STATEMENT_OVERHEAD
        elif width:
            cost = _STATEMENT_OVERHEAD + 8 * len(params)
            if len(params) == width:
                try:
                    values = list(map(_INT64, params))
                except struct.error:  # the driver decides (and refuses what it must)
                    pass
        else:
            cost = _STATEMENT_OVERHEAD + sum(map(param_bytes, params))
        if rows and (len(rows) >= batch_rows or size + cost > max_batch_bytes):
            packed.append(_unlogged(rows))
            rows, size = [], 0
        rows.append((stmt, params, values))
        size += cost
    if rows:
        packed.append(_unlogged(rows))
    return packed


def _unlogged(rows: list[tuple[Any, tuple, list | None]]) -> tuple[Any, tuple | None]:
    """One ``pack_batches`` group: a lone statement as it is, else an idempotent
    unlogged batch whose first row the driver binds (that sets the batch's
    keyspace and routing key) and whose pre-serialized rows join it as they are."""
    from cassandra.query import BatchStatement, BatchType

    stmt, params, _ = rows[0]
    if len(rows) == 1:
        return stmt, params
    batch = BatchStatement(batch_type=BatchType.UNLOGGED)
    batch.add(stmt, params)
    entries = batch._statements_and_parameters
    for stmt, params, values in rows[1:]:
        if values is None:
            batch.add(stmt, params)
        else:
            entries.append((True, stmt.query_id, values))
    batch.is_idempotent = True
    return batch, None


_INT64 = struct.Struct(">q").pack


@functools.lru_cache(maxsize=256)
def _int64_width(stmt) -> int:
    """The number of bind markers of the prepared ``stmt`` if every one is a bigint
    or a timestamp (and no column is encrypted by the driver); else 0."""
    from cassandra.cqltypes import DateType, LongType
    from cassandra.query import PreparedStatement

    if not isinstance(stmt, PreparedStatement) or stmt.column_encryption_policy is not None:
        return 0
    meta = stmt.column_metadata
    return len(meta) if meta and all(c.type in (LongType, DateType) for c in meta) else 0


def to_ms(value: datetime | None) -> int | None:
    """A driver ``timestamp`` (naive UTC datetime) as ms since the epoch, exactly."""
    if value is None:
        return None
    return (value - _EPOCH) // _MS



def post_from_row(row) -> dict | None:
    """A ``posts`` row as ``PostMeta`` (the shape of ``RedisFeedStore.posts``);
    None for no row, a tombstone or a row with no create yet."""
    if row is None or row.deleted or row.author_id is None:
        return None
    return {
        "post_id": row.post_id, "author_id": row.author_id,
        "created_at": to_ms(row.created_at), "media_type": row.media_type,
        "caption_length": row.caption_length, "hashtags": tuple(row.hashtags or ()),
        "deleted": False,
    }


def plan_buckets(start_ms: int, max_buckets: int) -> list[int]:
    """Buckets to read for a page starting at ``start_ms``, newest first."""
    return cs.buckets_back(start_ms, max_buckets)


def batched(rows: Iterable, size: int) -> Iterator[list]:
    """``rows`` (say a paged scan) in lists of ``size``, the last one shorter."""
    if size < 1:
        raise ValueError("size must be at least 1")
    batch: list = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return to_ms(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _sort_key(row: dict) -> tuple:
    # None sorts first; values of one column share a type otherwise.
    return tuple((v is not None, v if v is not None else 0) for v in row.values())


# -- statements ------------------------------------------------------------------


@dataclasses.dataclass
class StoreStats:
    """Statements executed (``written``; an unlogged batch counts as one),
    re-executed after a transient error (``retried``) and given up on
    (``failed``), since the store was made."""

    written: int = 0
    retried: int = 0
    failed: int = 0


_PREPARED: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()
_PREPARED_LOCK = threading.Lock()


def _prepare(session, cql: str):
    """``cql`` prepared once per session (shared by every store on that session)."""
    with _PREPARED_LOCK:
        cache = _PREPARED.setdefault(session, {})
        stmt = cache.get(cql)
    if stmt is None:
        stmt = session.prepare(cql)
        stmt.is_idempotent = True  # every statement here is an upsert/delete at a fixed timestamp
        if cql.lstrip()[:6].upper() == "SELECT":
            # execute_concurrent takes no execution profile: reads carry the read level themselves
            stmt.consistency_level = cassandra_session.read_level(session)
        with _PREPARED_LOCK:
            stmt = cache.setdefault(cql, stmt)
    return stmt


class CassandraFeedStore:
    """Feeds, timelines, posts, graph and activity in Cassandra (see module doc).

    ``session`` need not be bound to ``keyspace``: statements are qualified.
    """

    def __init__(self, session, keyspace: str, concurrency: int = 64,
                 retry: RetryPolicy = NO_RETRY, batch_rows: int = DEFAULT_CASSANDRA_BATCH_ROWS,
                 users_per_statement: int = 200):
        if batch_rows < 1 or users_per_statement < 1:
            raise ValueError("batch_rows and users_per_statement must be >= 1")
        self.session = session
        self.batch_rows = batch_rows
        self.users_per_statement = users_per_statement
        self._deferred: list[tuple[Any, tuple]] | None = None
        self._deferred_single: list[tuple[Any, tuple]] | None = None
        self.keyspace = cs.check_keyspace_name(keyspace)
        self.concurrency = concurrency
        self.retry = retry
        self.stats = StoreStats()
        self._cluster = None  # set by connect(): the store then owns it
        ks = self.keyspace
        q = {
            "follow_in": f"INSERT INTO {ks}.{cs.FOLLOWERS_BY_USER} (user_id, follower_id, since) "
                         "VALUES (?, ?, ?) USING TIMESTAMP ?",
            "follow_out": f"INSERT INTO {ks}.{cs.FOLLOWING_BY_USER} (user_id, followee_id, since) "
                          "VALUES (?, ?, ?) USING TIMESTAMP ?",
            "unfollow_in": f"DELETE FROM {ks}.{cs.FOLLOWERS_BY_USER} USING TIMESTAMP ? "
                           "WHERE user_id = ? AND follower_id = ?",
            "unfollow_out": f"DELETE FROM {ks}.{cs.FOLLOWING_BY_USER} USING TIMESTAMP ? "
                            "WHERE user_id = ? AND followee_id = ?",
            "followers": f"SELECT follower_id, since FROM {ks}.{cs.FOLLOWERS_BY_USER} WHERE user_id = ?",
            "following": f"SELECT followee_id, since FROM {ks}.{cs.FOLLOWING_BY_USER} WHERE user_id = ?",
            "count_followers": f"SELECT COUNT(*) FROM {ks}.{cs.FOLLOWERS_BY_USER} WHERE user_id = ?",
            "get_count": f"SELECT followers FROM {ks}.{cs.FOLLOWER_COUNTS} WHERE user_id = ?",
            "set_count": f"UPDATE {ks}.{cs.FOLLOWER_COUNTS} USING TIMESTAMP ? SET followers = ? "
                         "WHERE user_id = ?",
            "put_post": f"INSERT INTO {ks}.{cs.POSTS} (post_id, author_id, created_at, media_type, "
                        "caption_length, hashtags) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?",
            "tombstone": f"UPDATE {ks}.{cs.POSTS} USING TIMESTAMP ? SET deleted = true, "
                         "author_id = ?, created_at = ? WHERE post_id = ?",
            "get_post": f"SELECT post_id, author_id, created_at, media_type, caption_length, "
                        f"hashtags, deleted FROM {ks}.{cs.POSTS} WHERE post_id = ?",
            "get_posts": f"SELECT post_id, author_id, created_at, media_type, caption_length, "
                         f"hashtags, deleted FROM {ks}.{cs.POSTS} WHERE post_id IN ?",
            # One statement for many users (partition key IN): the coordinator
            # applies it to each partition, and the driver binds one list
            # instead of a statement per row (see the module doc). An UPDATE
            # makes the row live through author_id (no row marker), which is
            # all readers select; the DELETE removes it whole.
            "push": f"UPDATE {ks}.{cs.HOME_FEED_BY_USER} USING TIMESTAMP ? SET author_id = ? "
                    "WHERE user_id IN ? AND bucket = ? AND created_at = ? AND post_id = ?",
            "unpush": f"DELETE FROM {ks}.{cs.HOME_FEED_BY_USER} USING TIMESTAMP ? WHERE user_id IN ? "
                      "AND bucket = ? AND created_at = ? AND post_id = ?",
            # The same for one user: a row statement, packed into unlogged
            # batches with the others (follow merges write one feed each).
            "push_one": f"UPDATE {ks}.{cs.HOME_FEED_BY_USER} USING TIMESTAMP ? SET author_id = ? "
                        "WHERE user_id = ? AND bucket = ? AND created_at = ? AND post_id = ?",
            "unpush_one": f"DELETE FROM {ks}.{cs.HOME_FEED_BY_USER} USING TIMESTAMP ? "
                          "WHERE user_id = ? AND bucket = ? AND created_at = ? AND post_id = ?",
            "celeb_add": f"UPDATE {ks}.{cs.FOLLOWED_CELEBRITIES} USING TIMESTAMP ? "
                         "SET followed_at = ? WHERE user_id = ? AND celebrity_id = ?",
            "celeb_remove": f"DELETE FROM {ks}.{cs.FOLLOWED_CELEBRITIES} USING TIMESTAMP ? "
                            "WHERE user_id IN ? AND celebrity_id = ?",
            "celebs": f"SELECT celebrity_id, followed_at FROM {ks}.{cs.FOLLOWED_CELEBRITIES} "
                      "WHERE user_id = ?",
            "feed": f"SELECT post_id, created_at, author_id FROM {ks}.{cs.HOME_FEED_BY_USER} "
                    "WHERE user_id = ? AND bucket = ? LIMIT ?",
            "feed_before": f"SELECT post_id, created_at, author_id FROM {ks}.{cs.HOME_FEED_BY_USER} "
                           "WHERE user_id = ? AND bucket = ? AND (created_at, post_id) < (?, ?) LIMIT ?",
            "add_timeline": f"INSERT INTO {ks}.{cs.AUTHOR_TIMELINE} (author_id, bucket, created_at, "
                            "post_id, media_type) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
            "remove_timeline": f"DELETE FROM {ks}.{cs.AUTHOR_TIMELINE} USING TIMESTAMP ? "
                               "WHERE author_id = ? AND bucket = ? AND created_at = ? AND post_id = ?",
            "timeline": f"SELECT post_id, created_at FROM {ks}.{cs.AUTHOR_TIMELINE} "
                        "WHERE author_id = ? AND bucket = ? LIMIT ?",
            "set_last_read": f"UPDATE {ks}.{cs.USER_ACTIVITY} USING TIMESTAMP ? "
                             "SET last_feed_read_at = ? WHERE user_id = ?",
            "last_read": f"SELECT last_feed_read_at FROM {ks}.{cs.USER_ACTIVITY} WHERE user_id = ?",
        }
        self._cql = q

    @classmethod
    def connect(cls, host: str, port: int, keyspace: str, connect_wait_s: float = 120.0,
                read_consistency: str = cassandra_session.AUTO,
                write_consistency: str = cassandra_session.AUTO, **options) -> "CassandraFeedStore":
        """A store on a new cluster connection; ``close()`` shuts it. An unreachable
        Cassandra is retried for ``connect_wait_s``; the connection reads and writes at
        the given levels (``stores.cassandra.session.open_on_new_cluster``)."""
        cluster, store = cassandra_session.open_on_new_cluster(
            host, port, lambda session: cls(session, keyspace, **options), connect_wait_s,
            keyspace=keyspace, read_consistency=read_consistency,
            write_consistency=write_consistency)
        store._cluster = cluster
        return store

    def close(self) -> None:
        """Shut the cluster down if ``connect()`` made it; a given session is left open."""
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None

    # -- execution ----------------------------------------------------------------

    def _stmt(self, name: str):
        return _prepare(self.session, self._cql[name])

    def _execute(self, work: Sequence[tuple[Any, tuple]]) -> list:
        """Execute ``(statement, params)`` pairs concurrently; results in order.

        Statements that failed transiently are executed again (only those) after
        the waits of ``self.retry``; by default there are none, and the caller
        retries its whole batch (``stores.retry``). The last transient error, or
        any other error, is raised.
        """
        from cassandra.concurrent import execute_concurrent

        results: list = [None] * len(work)
        pending = list(range(len(work)))
        waits = iter(self.retry.delays())
        while pending:
            outcomes = execute_concurrent(
                self.session, [work[i] for i in pending], concurrency=self.concurrency,
                raise_on_first_error=False)
            failed: list[tuple[int, BaseException]] = []
            for i, (ok, value) in zip(pending, outcomes):
                if ok:
                    results[i] = value
                elif is_transient(value):
                    failed.append((i, value))
                else:
                    self.stats.failed += 1
                    raise value
            self.stats.written += len(pending) - len(failed)
            if not failed:
                break
            delay = next(waits, None)
            if delay is None:
                self.stats.failed += len(failed)
                raise failed[0][1]
            self.stats.retried += len(failed)
            log.warning("cassandra: %d statements failed transiently (%s), again in %.2fs",
                        len(failed), type(failed[0][1]).__name__, delay)
            time.sleep(delay)
            pending = [i for i, _ in failed]
        return results

    @contextlib.contextmanager
    def deferred(self):
        """Hold every write made inside the block and execute them all when it ends.

        Reads inside the block still run at once (and do not see the held
        writes). If the block raises, the held writes are dropped: the caller
        retries the whole block, whose writes are idempotent. Nested blocks
        join the outermost one.
        """
        if self._deferred is not None:
            yield
            return
        self._deferred, self._deferred_single = [], []
        try:
            yield
            work = pack_batches(self._deferred, self.batch_rows) + self._deferred_single
            self._deferred = None
            if work:
                self._execute(work)
        finally:
            self._deferred = self._deferred_single = None

    def _write(self, work: Sequence[tuple[Any, tuple]], batchable: bool = True) -> None:
        """Execute idempotent writes, the ``batchable`` ones packed into unlogged
        batches (or hold them, see ``deferred``). Statements that already
        write many partitions (``IN``) are sent on their own."""
        if self._deferred is not None:
            (self._deferred if batchable else self._deferred_single).extend(work)
            return
        if work:
            self._execute(pack_batches(work, self.batch_rows) if batchable else list(work))

    def _write_many(self, name: str, params: Iterable[tuple], batchable: bool = True) -> None:
        stmt = self._stmt(name)
        self._write([(stmt, p) for p in params], batchable)

    def statement(self, name: str):
        """The prepared statement ``name`` of this store (for asynchronous readers
        that execute it themselves: ``stores.cassandra.aio``)."""
        return self._stmt(name)

    def prepare(self, cql: str):
        """``cql`` prepared (once per session) as an idempotent statement, for the
        other store modules (ranked feeds, ...) that share this execution path."""
        return _prepare(self.session, cql)

    def execute_rows(self, stmt, params: tuple) -> list:
        """Rows of one prepared statement (all pages), transient failures re-executed
        with backoff as every statement here."""
        (result,) = self._execute([(stmt, params)])
        return list(result)

    def execute_cql(self, work: Sequence[tuple[str, Any]]) -> list:
        """Execute ``(cql, params)`` pairs with this store's statement cache,
        concurrency and retries (``_execute``); result sets in order. For the
        sibling stores of ``pipelines.io`` (stories) sharing one session."""
        return self._execute([(_prepare(self.session, cql), params) for cql, params in work])

    def _execute_one(self, name: str, params: tuple) -> list:
        """Rows of one statement (all pages), with the same retry rules."""
        (result,) = self._execute([(self._stmt(name), params)])
        return list(result)

    def _execute_many(self, name: str, params: Iterable[tuple]) -> list:
        stmt = self._stmt(name)
        return self._execute([(stmt, p) for p in params])

    # -- social graph -------------------------------------------------------------

    def apply_edges(self, edges: Sequence[FollowEvent]) -> None:
        """Write both directions of each edge at the event's time (latest event wins)."""
        self.write_edges([(e.follower_id, e.followee_id, e.event_time,
                           e.kind is FollowKind.FOLLOW) for e in edges])

    def write_edges(self, edges: Iterable[tuple[int, int, int, bool]]) -> None:
        """``apply_edges`` of ``(follower_id, followee_id, event_time_ms, follow?)`` rows.

        Each table's rows go in the order of their partition key, so that an
        unlogged batch holds as few partitions as it can: about a quarter less
        server CPU per edge than in event order (``bench/probe_graph_writes.py``).
        """
        into: list[tuple] = []  # (followee, follower, event_time, ts)
        out: list[tuple] = []   # (follower, followee, event_time, ts)
        ended_in: list[tuple] = []  # (followee, follower, ts)
        ended_out: list[tuple] = []  # (follower, followee, ts)
        for follower, followee, event_time, follow in edges:
            ts = cs.event_timestamp_us(event_time)
            if follow:
                into.append((followee, follower, event_time, ts))
                out.append((follower, followee, event_time, ts))
            else:
                ended_in.append((followee, follower, ts))
                ended_out.append((follower, followee, ts))
        work = []
        for name, rows in (("follow_in", into), ("follow_out", out)):
            stmt = self._stmt(name)
            work += [(stmt, row) for row in sorted(rows)]
        for name, rows in (("unfollow_in", ended_in), ("unfollow_out", ended_out)):
            stmt = self._stmt(name)
            work += [(stmt, (ts, user, other)) for user, other, ts in sorted(rows)]
        self._write(work)

    def set_follower_counts(self, counts: Iterable[tuple[int, int, int]]) -> None:
        """``set_follower_count`` of ``(user_id, followers, at_ms)`` rows."""
        self._write_many("set_count", ((cs.event_timestamp_us(at_ms), followers, user_id)
                                       for user_id, followers, at_ms in counts))

    def followers(self, user_id: int) -> list[int]:
        """Follower ids of ``user_id``, oldest follow first (ties by id), as in Redis."""
        rows = self._execute_one("followers", (user_id,))
        return [r.follower_id for r in sorted(rows, key=lambda r: (r.since, r.follower_id))]

    def following(self, user_id: int) -> list[int]:
        """Ids ``user_id`` follows, oldest follow first (ties by id)."""
        rows = self._execute_one("following", (user_id,))
        return [r.followee_id for r in sorted(rows, key=lambda r: (r.since, r.followee_id))]

    def follower_count(self, user_id: int) -> int:
        """The count last set by ``set_follower_count``; without one, the rows counted
        (a partition scan: cheap for ordinary users, slow for celebrities)."""
        rows = self._execute_one("get_count", (user_id,))
        if rows and rows[0].followers is not None:
            return rows[0].followers
        return self._execute_one("count_followers", (user_id,))[0].count

    def set_follower_count(self, user_id: int, followers: int, at_ms: int) -> None:
        """Record ``followers`` as of ``at_ms``; an older count never replaces a newer one."""
        self.set_follower_counts([(user_id, followers, at_ms)])

    def set_followed_celebrity(self, followers: Sequence[tuple[int, int]], celebrity_id: int,
                               at_ms: int) -> None:
        """Add ``celebrity_id`` to the followed celebrities of each ``(user_id,
        followed_at_ms)``, written at ``at_ms`` (the time the fan-out decided)."""
        ts = cs.event_timestamp_us(at_ms)
        self._write_many("celeb_add", ((ts, followed_at, user, celebrity_id)
                                       for user, followed_at in followers))

    def remove_followed_celebrity(self, user_ids: Sequence[int], celebrity_id: int,
                                  at_ms: int) -> None:
        """Take ``celebrity_id`` out of the followed celebrities of ``user_ids`` at ``at_ms``."""
        ts = cs.event_timestamp_us(at_ms)
        self._write_many("celeb_remove", ((ts, users, celebrity_id)
                                          for users in self._user_groups(user_ids)),
                         batchable=False)

    def followed_celebrities(self, user_ids: Sequence[int]) -> dict[int, list[int]]:
        """The accounts at or above the push threshold each user follows, oldest follow
        first (the durable copy of ``RedisFeedStore.followed_celebrities``)."""
        out = {}
        for user, rs in zip(user_ids, self._execute_many("celebs", ((u,) for u in user_ids))):
            rows = sorted(rs, key=lambda r: (to_ms(r.followed_at), r.celebrity_id))
            out[user] = [r.celebrity_id for r in rows]
        return out

    # -- posts --------------------------------------------------------------------

    def put_post(self, post: PostEvent) -> None:
        """Write a created post's metadata at its event time.

        Never writes ``deleted``, so a create replayed after a delete cannot
        clear the tombstone, whatever the timestamps.
        """
        self._write_many("put_post", [(
            post.post_id, post.author_id, post.created_at, post.media_type.value,
            post.caption_length, list(post.hashtags), cs.event_timestamp_us(post.event_time))])

    def tombstone_post(self, post: PostEvent) -> None:
        """Set ``deleted = true`` (keeping author_id and created_at for cleanup) at the
        delete's event time. Only deletes write ``deleted``, so it can never be undone."""
        self._write_many("tombstone", [(
            cs.event_timestamp_us(post.event_time), post.author_id, post.created_at, post.post_id)])

    def deleted(self, post_ids: Sequence[int]) -> list[bool]:
        """Per post id whether it is tombstoned (unknown posts are not)."""
        results = self._execute_many("get_post", ((p,) for p in post_ids))
        out = []
        for rs in results:
            row = rs.one()
            out.append(bool(row is not None and row.deleted))
        return out

    def posts(self, post_ids: Sequence[int]) -> list[dict | None]:
        """Metadata per post id, the shape of ``RedisFeedStore.posts`` (``PostMeta``);
        None for unknown or deleted posts (serving fallback, Redis rebuild)."""
        return [post_from_row(rs.one())
                for rs in self._execute_many("get_post", ((p,) for p in post_ids))]

    # -- feeds and timelines ------------------------------------------------------

    def push(self, user_ids: Sequence[int], post_id: int, author_id: int, created_at_ms: int,
             at_ms: int | None = None) -> None:
        """Add the post to each user's durable home feed (partition user + week bucket).

        Written at ``at_ms`` (default ``created_at_ms``): pass the time of the
        event that causes the push when it is later than a possible removal,
        e.g. the FOLLOW event when a re-follow brings posts back.
        """
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        bucket = cs.time_bucket(created_at_ms)
        if len(user_ids) == 1:
            self._write_many("push_one", [(ts, author_id, user_ids[0], bucket, created_at_ms,
                                           post_id)])
            return
        self._write_many("push", (
            (ts, author_id, users, bucket, created_at_ms, post_id)
            for users in self._user_groups(user_ids)), batchable=False)

    def remove_from_feeds(self, user_ids: Sequence[int], post_id: int, created_at_ms: int,
                          at_ms: int | None = None) -> None:
        """Delete the post from each user's durable home feed, at ``at_ms``.

        Default ``created_at_ms``: that beats a replayed push with its default
        timestamp (a delete wins a tie). Pass the UNFOLLOW/DELETED event time
        so only a later event (a re-follow push at its time) brings it back.
        """
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        bucket = cs.time_bucket(created_at_ms)
        if len(user_ids) == 1:
            self._write_many("unpush_one", [(ts, user_ids[0], bucket, created_at_ms, post_id)])
            return
        self._write_many("unpush", (
            (ts, users, bucket, created_at_ms, post_id)
            for users in self._user_groups(user_ids)), batchable=False)

    def _user_groups(self, user_ids: Sequence[int]) -> list[list[int]]:
        n = self.users_per_statement
        return [list(user_ids[i:i + n]) for i in range(0, len(user_ids), n)]

    def add_to_timeline(self, author_id: int, post_id: int, created_at_ms: int, media_type: str,
                        at_ms: int | None = None) -> None:
        """Add a post to its author's durable timeline (written at ``at_ms``, default created_at)."""
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        media = getattr(media_type, "value", media_type)
        self._write_many("add_timeline", [(
            author_id, cs.time_bucket(created_at_ms), created_at_ms, post_id, media, ts)])

    def remove_from_timeline(self, author_id: int, post_id: int, created_at_ms: int,
                             at_ms: int | None = None) -> None:
        """Remove a post from its author's timeline (at ``at_ms``, default created_at: wins the tie)."""
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        self._write_many("remove_timeline", [(
            ts, author_id, cs.time_bucket(created_at_ms), created_at_ms, post_id)])

    def timeline(self, author_id: int, limit: int, now_ms: int,
                 max_buckets: int = 8) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(post_id, created_at_ms)`` of the author, newest first,
        reading week buckets back from ``now_ms`` (at most ``max_buckets``)."""
        out: list[tuple[int, int]] = []
        for bucket in plan_buckets(now_ms, max_buckets):
            if len(out) >= limit:
                break
            rows = self._execute_one("timeline", (author_id, bucket, limit - len(out)))
            out.extend((r.post_id, to_ms(r.created_at)) for r in rows)
        return out

    def feed_page(self, user_id: int, limit: int, before: tuple[int, int] | None, now_ms: int,
                  max_buckets: int = 8) -> list[tuple[int, int, int]]:
        """Up to ``limit`` ``(post_id, created_at_ms, author_id)`` of the durable home
        feed, newest first, for pages past the Redis cap and for rebuilds.

        ``before`` is the ``(post_id, created_at_ms)`` of the previous page's last
        entry (``page[-1][:2]``): the page continues strictly after it. Reads
        at most ``max_buckets`` week buckets, from ``before``'s bucket (or
        ``now_ms``'s) back; an empty page means nothing within that window.
        """
        if limit < 1:
            return []
        start_ms = now_ms if before is None else before[1]
        out: list[tuple[int, int, int]] = []
        for i, bucket in enumerate(plan_buckets(start_ms, max_buckets)):
            if len(out) >= limit:
                break
            want = limit - len(out)
            if i == 0 and before is not None:
                rows = self._execute_one("feed_before", (user_id, bucket, before[1], before[0], want))
            else:
                rows = self._execute_one("feed", (user_id, bucket, want))
            out.extend((r.post_id, to_ms(r.created_at), r.author_id) for r in rows)
        return out

    # -- activity -----------------------------------------------------------------

    def set_last_read(self, user_id: int, at_ms: int) -> None:
        """Record a feed read at ``at_ms``; an older time never replaces a newer one."""
        self._write_many("set_last_read", [(cs.event_timestamp_us(at_ms), at_ms, user_id)])

    def last_reads(self, user_ids: Sequence[int]) -> list[int | None]:
        """Last feed read (ms) per user, None if never recorded."""
        out: list[int | None] = []
        for rs in self._execute_many("last_read", ((u,) for u in user_ids)):
            row = rs.one()
            out.append(None if row is None else to_ms(row.last_feed_read_at))
        return out

    # -- full scans (``feedbeam rebuild``) -------------------------------------------

    def scan_rows(self, cql: str, fetch_size: int = 5000):
        """Every row of a table query, paged (a full scan: tools such as ``feedbeam
        rebuild`` only; the sibling stores of ``pipelines.io`` scan through it too)."""
        from cassandra.query import SimpleStatement

        return self.session.execute(SimpleStatement(cql, fetch_size=fetch_size), timeout=120)

    def scan_follow_edges(self) -> Iterator[FollowEvent]:
        """Every live edge as the FOLLOW event that made it (time = ``since``)."""
        for r in self.scan_rows(f"SELECT user_id, follower_id, since FROM "
                                f"{self.keyspace}.{cs.FOLLOWERS_BY_USER}"):
            t = to_ms(r.since)
            yield FollowEvent(f"rebuild-{r.follower_id}-{r.user_id}", t, FollowKind.FOLLOW,
                              r.follower_id, r.user_id)

    def scan_posts(self) -> Iterator[PostEvent]:
        """Every post as the event that last wrote it: CREATED (at its write time) or
        DELETED (at the delete's write time) for tombstones."""
        for r in self.scan_rows(
                f"SELECT post_id, author_id, created_at, media_type, caption_length, hashtags, "
                f"deleted, writetime(media_type) AS created_us, writetime(deleted) AS deleted_us "
                f"FROM {self.keyspace}.{cs.POSTS}"):
            if r.author_id is None or r.created_at is None:
                continue  # a tombstone of a post never created here: nothing to restore
            created = to_ms(r.created_at)
            if r.deleted:
                yield PostEvent(f"rebuild-d{r.post_id}", r.deleted_us // 1000,
                                PostEventKind.DELETED, r.post_id, r.author_id, created)
            elif r.media_type is not None:
                yield PostEvent(f"rebuild-c{r.post_id}", (r.created_us or created * 1000) // 1000,
                                PostEventKind.CREATED, r.post_id, r.author_id, created,
                                MediaType(r.media_type), r.caption_length or 0,
                                tuple(r.hashtags or ()))

    def scan_home_feeds(self) -> Iterator[tuple[int, int, int]]:
        """``(user_id, post_id, created_at_ms)`` of every durable feed entry."""
        for r in self.scan_rows(f"SELECT user_id, post_id, created_at FROM "
                                f"{self.keyspace}.{cs.HOME_FEED_BY_USER}"):
            yield r.user_id, r.post_id, to_ms(r.created_at)

    def scan_timelines(self) -> Iterator[tuple[int, int, int]]:
        """``(author_id, post_id, created_at_ms)`` of every timeline entry."""
        for r in self.scan_rows(f"SELECT author_id, post_id, created_at FROM "
                                f"{self.keyspace}.{cs.AUTHOR_TIMELINE}"):
            yield r.author_id, r.post_id, to_ms(r.created_at)

    def scan_followed_celebrities(self) -> Iterator[tuple[int, int, int]]:
        """``(user_id, celebrity_id, followed_at_ms)`` of every followed-celebrity row."""
        for r in self.scan_rows(f"SELECT user_id, celebrity_id, followed_at FROM "
                                f"{self.keyspace}.{cs.FOLLOWED_CELEBRITIES}"):
            yield r.user_id, r.celebrity_id, to_ms(r.followed_at)

    def scan_last_reads(self) -> Iterator[tuple[int, int]]:
        """``(user_id, last_feed_read_ms)`` of every user with a recorded read."""
        for r in self.scan_rows(f"SELECT user_id, last_feed_read_at FROM "
                                f"{self.keyspace}.{cs.USER_ACTIVITY}"):
            if r.last_feed_read_at is not None:
                yield r.user_id, to_ms(r.last_feed_read_at)

    # -- tests and tools ----------------------------------------------------------

    def dump(self, tables: Sequence[str] = DUMP_TABLES) -> dict[str, list[dict]]:
        """Every row of ``tables`` (default: the graph, post, feed, timeline and
        activity tables), as ``{table: [row dict, ...]}`` sorted, times in ms. A
        full scan: for tests comparing replays on small keyspaces, not for
        production tables."""
        out: dict[str, list[dict]] = {}
        for table in tables:
            (rs,) = self._execute([(f"SELECT * FROM {self.keyspace}.{table}", None)])
            rows = [{k: _plain(v) for k, v in sorted(row._asdict().items())} for row in rs]
            out[table] = sorted(rows, key=_sort_key)
        return out
