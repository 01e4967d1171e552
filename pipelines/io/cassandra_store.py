"""The durable Cassandra copy of feeds, timelines, posts and the social graph.

``CassandraFeedStore`` reads and writes the tables of ``schemas/cql/`` for the
fan-out pipeline (writer), the rebuild job and the serving layer's fallback
(readers), so every CQL statement is defined here once. It knows nothing of
Beam: a sink DoFn builds one in ``setup()`` (``CassandraFeedStore.connect``),
reads ``stats`` into its metrics and calls ``close()`` in ``teardown()``.

Idempotence comes from Cassandra's last-write-wins with ``USING TIMESTAMP``
set from event times (``schemas.cassandra.event_timestamp_us``): a follow is an
INSERT and an unfollow a DELETE at the event's time, so the latest event wins
whatever the arrival order (a DELETE wins a tie, as ``edge_version`` does in
Redis). No counters, no read-before-write, no lightweight transactions.

Statements are prepared once per session and executed with
``cassandra.concurrent.execute_concurrent`` (bounded concurrency); statements
that failed with a transient error (timeouts, unavailable, overloaded, no
host) are re-executed with exponential backoff, anything else raises at once.

    store = CassandraFeedStore.connect("127.0.0.1", 9042, "feedbeam")
    store.push([7, 8], post_id=101, author_id=3, created_at_ms=1_700_000_000_000)
    store.feed_page(7, limit=20, before=None, now_ms=1_700_000_100_000)
    store.close()
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import weakref
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

from schemas import cassandra as cs
from schemas.events import FollowEvent, FollowKind, PostEvent

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1)
_MS = timedelta(milliseconds=1)

#: Tables ``dump()`` snapshots (what the fan-out and graph pipelines write).
DUMP_TABLES: tuple[str, ...] = (
    cs.FOLLOWERS_BY_USER, cs.FOLLOWING_BY_USER, cs.FOLLOWER_COUNTS, cs.POSTS,
    cs.HOME_FEED_BY_USER, cs.AUTHOR_TIMELINE, cs.USER_ACTIVITY,
)


# -- pure helpers (unit tested without Cassandra) ------------------------------------


def is_transient(exc: BaseException) -> bool:
    """Whether re-executing the (idempotent) statement may succeed."""
    from cassandra import OperationTimedOut, Timeout, Unavailable
    from cassandra.cluster import NoHostAvailable
    from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage

    return isinstance(exc, (OperationTimedOut, Timeout, Unavailable, NoHostAvailable,
                            OverloadedErrorMessage, IsBootstrappingErrorMessage))


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Delay before retry ``attempt`` (0-based): ``base * 2**attempt``, at most ``cap``."""
    return min(cap_s, base_s * (2 ** attempt))


def to_ms(value: datetime | None) -> int | None:
    """A driver ``timestamp`` (naive UTC datetime) as ms since the epoch, exactly."""
    if value is None:
        return None
    return (value - _EPOCH) // _MS



def plan_buckets(start_ms: int, max_buckets: int) -> list[int]:
    """Buckets to read for a page starting at ``start_ms``, newest first."""
    return cs.buckets_back(start_ms, max_buckets)


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
    """Statements executed (``written``), re-executed after a transient error
    (``retried``) and given up on (``failed``), since the store was made."""

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
        with _PREPARED_LOCK:
            stmt = cache.setdefault(cql, stmt)
    return stmt


class CassandraFeedStore:
    """Feeds, timelines, posts, graph and activity in Cassandra (see module doc).

    ``session`` need not be bound to ``keyspace``: statements are qualified.
    """

    def __init__(self, session, keyspace: str, concurrency: int = 64, max_retries: int = 5,
                 backoff_base_s: float = 0.05, backoff_cap_s: float = 2.0):
        self.session = session
        self.keyspace = cs.check_keyspace_name(keyspace)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
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
            "push": f"INSERT INTO {ks}.{cs.HOME_FEED_BY_USER} (user_id, bucket, created_at, "
                    "post_id, author_id) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
            "unpush": f"DELETE FROM {ks}.{cs.HOME_FEED_BY_USER} USING TIMESTAMP ? WHERE user_id = ? "
                      "AND bucket = ? AND created_at = ? AND post_id = ?",
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
    def connect(cls, host: str, port: int, keyspace: str, **options) -> "CassandraFeedStore":
        """A store on a new cluster connection (``schemas.cassandra.new_cluster``); ``close()`` shuts it."""
        cluster = cs.new_cluster(host, port)
        try:
            store = cls(cluster.connect(), keyspace, **options)
        except Exception:
            cluster.shutdown()
            raise
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

        Transient failures are re-executed (only those) with exponential
        backoff, up to ``max_retries`` rounds; the last such error, or any
        other error, is raised.
        """
        from cassandra.concurrent import execute_concurrent

        results: list = [None] * len(work)
        pending = list(range(len(work)))
        attempt = 0
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
            if attempt >= self.max_retries:
                self.stats.failed += len(failed)
                raise failed[0][1]
            self.stats.retried += len(failed)
            delay = backoff_s(attempt, self.backoff_base_s, self.backoff_cap_s)
            log.warning("cassandra: %d statements failed transiently (%s), retry %d in %.2fs",
                        len(failed), type(failed[0][1]).__name__, attempt + 1, delay)
            time.sleep(delay)
            attempt += 1
            pending = [i for i, _ in failed]
        return results

    def prepare(self, cql: str):
        """``cql`` prepared (once per session) as an idempotent statement, for the
        other store modules (ranked feeds, ...) that share this execution path."""
        return _prepare(self.session, cql)

    def execute_rows(self, stmt, params: tuple) -> list:
        """Rows of one prepared statement (all pages), transient failures re-executed
        with backoff as every statement here."""
        (result,) = self._execute([(stmt, params)])
        return list(result)

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
        follow_in, follow_out = self._stmt("follow_in"), self._stmt("follow_out")
        unfollow_in, unfollow_out = self._stmt("unfollow_in"), self._stmt("unfollow_out")
        work = []
        for e in edges:
            ts = cs.event_timestamp_us(e.event_time)
            if e.kind is FollowKind.FOLLOW:
                work.append((follow_in, (e.followee_id, e.follower_id, e.event_time, ts)))
                work.append((follow_out, (e.follower_id, e.followee_id, e.event_time, ts)))
            else:
                work.append((unfollow_in, (ts, e.followee_id, e.follower_id)))
                work.append((unfollow_out, (ts, e.follower_id, e.followee_id)))
        self._execute(work)

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
        self._execute_one("set_count", (cs.event_timestamp_us(at_ms), followers, user_id))

    # -- posts --------------------------------------------------------------------

    def put_post(self, post: PostEvent) -> None:
        """Write a created post's metadata at its event time.

        Never writes ``deleted``, so a create replayed after a delete cannot
        clear the tombstone, whatever the timestamps.
        """
        self._execute_one("put_post", (
            post.post_id, post.author_id, post.created_at, post.media_type.value,
            post.caption_length, list(post.hashtags), cs.event_timestamp_us(post.event_time)))

    def tombstone_post(self, post: PostEvent) -> None:
        """Set ``deleted = true`` (keeping author_id and created_at for cleanup) at the
        delete's event time. Only deletes write ``deleted``, so it can never be undone."""
        self._execute_one("tombstone", (
            cs.event_timestamp_us(post.event_time), post.author_id, post.created_at, post.post_id))

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
        out: list[dict | None] = []
        for rs in self._execute_many("get_post", ((p,) for p in post_ids)):
            row = rs.one()
            if row is None or row.deleted or row.author_id is None:
                out.append(None)
                continue
            out.append({
                "post_id": row.post_id, "author_id": row.author_id,
                "created_at": to_ms(row.created_at), "media_type": row.media_type,
                "caption_length": row.caption_length, "hashtags": tuple(row.hashtags or ()),
                "deleted": False,
            })
        return out

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
        self._execute_many("push", (
            (uid, bucket, created_at_ms, post_id, author_id, ts) for uid in user_ids))

    def remove_from_feeds(self, user_ids: Sequence[int], post_id: int, created_at_ms: int,
                          at_ms: int | None = None) -> None:
        """Delete the post from each user's durable home feed, at ``at_ms``.

        Default ``created_at_ms``: that beats a replayed push with its default
        timestamp (a delete wins a tie). Pass the UNFOLLOW/DELETED event time
        so only a later event (a re-follow push at its time) brings it back.
        """
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        bucket = cs.time_bucket(created_at_ms)
        self._execute_many("unpush", (
            (ts, uid, bucket, created_at_ms, post_id) for uid in user_ids))

    def add_to_timeline(self, author_id: int, post_id: int, created_at_ms: int, media_type: str,
                        at_ms: int | None = None) -> None:
        """Add a post to its author's durable timeline (written at ``at_ms``, default created_at)."""
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        media = getattr(media_type, "value", media_type)
        self._execute_one("add_timeline", (
            author_id, cs.time_bucket(created_at_ms), created_at_ms, post_id, media, ts))

    def remove_from_timeline(self, author_id: int, post_id: int, created_at_ms: int,
                             at_ms: int | None = None) -> None:
        """Remove a post from its author's timeline (at ``at_ms``, default created_at: wins the tie)."""
        ts = cs.event_timestamp_us(created_at_ms if at_ms is None else at_ms)
        self._execute_one("remove_timeline", (
            ts, author_id, cs.time_bucket(created_at_ms), created_at_ms, post_id))

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
        self._execute_one("set_last_read", (cs.event_timestamp_us(at_ms), at_ms, user_id))

    def last_reads(self, user_ids: Sequence[int]) -> list[int | None]:
        """Last feed read (ms) per user, None if never recorded."""
        out: list[int | None] = []
        for rs in self._execute_many("last_read", ((u,) for u in user_ids)):
            row = rs.one()
            out.append(None if row is None else to_ms(row.last_feed_read_at))
        return out

    # -- tests and tools ----------------------------------------------------------

    def dump(self) -> dict[str, list[dict]]:
        """Every row of the graph, post, feed, timeline and activity tables, as
        ``{table: [row dict, ...]}`` sorted, times in ms. A full scan: for tests
        comparing replays on small keyspaces, not for production tables."""
        out: dict[str, list[dict]] = {}
        for table in DUMP_TABLES:
            (rs,) = self._execute([(f"SELECT * FROM {self.keyspace}.{table}", None)])
            rows = [{k: _plain(v) for k, v in sorted(row._asdict().items())} for row in rs]
            out[table] = sorted(rows, key=_sort_key)
        return out
