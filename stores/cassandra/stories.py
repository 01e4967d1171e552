"""Story state in Cassandra (durable): the twin of ``stores.redis.stories``.

``CassandraStoryStore`` keeps ``stories_by_author``, ``story_views``,
``stories_seen_by_viewer``, ``stories_by_id``, ``story_expiry_index`` and
``story_deletions``; its read side matches ``RedisStoryStore``'s, so serving
can answer from either. Design and idempotence: ``docs/pipelines/stories.md``.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Iterable, Iterator, Sequence

from domain.stories import (
    EXPIRY_SHARDS,
    HOUR_MS,
    StoryPolicy,
    assemble_tray,
    expiry_bucket,
    expiry_shard,
    removal_timestamp_us,
    story_created_at,
    story_expiry,
    sweep_buckets,
    ttl_seconds,
    write_timestamp_us,
)
from schemas import cassandra as cs
from stores.cassandra import session as cassandra_session
from schemas.events import StoryEvent
from schemas.stories import DurableRemoval, StoryDurableWrites, StoryMeta, TrayEntry
from stores.cassandra.feeds import CassandraFeedStore, pack_batches, to_ms


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


@dataclasses.dataclass(frozen=True, slots=True)
class IndexedStory:
    """A row of the expiry index: a story that was live when written."""

    story_id: int
    author_id: int
    expires_at: int


def _first(i: int):
    return lambda params: params[i]


#: Sort key (the partition) of each write's parameters.
_PARTITION_KEY = {
    "put_by_author": _first(1), "put_by_id": _first(0), "put_view": _first(0),
    "put_seen": _first(0), "put_deletion": _first(0),
    "put_index": lambda p: (p[0], p[1]),
    "del_by_author": _first(1), "del_by_id": _first(1), "del_seen": _first(1),
    "del_views": _first(1), "del_index": lambda p: (p[1], p[2]),
}


class CassandraStoryStore:
    """Stories, viewers and seen rows in Cassandra (see module doc).

    Statement execution (prepared once per session, concurrent, transient
    errors retried with backoff, ``stats``) is ``CassandraFeedStore``'s.
    """

    def __init__(self, session, keyspace: str, policy: StoryPolicy = StoryPolicy(), **options):
        self._db = CassandraFeedStore(session, keyspace, **options)
        self.policy = policy
        self.keyspace = ks = self._db.keyspace
        self.stats = self._db.stats
        cols = "story_id, author_id, created_at, expires_at, media_type"
        self._cql = {
            "put_by_author": f"INSERT INTO {ks}.{cs.STORIES_BY_AUTHOR} ({cols}) VALUES "
                             "(?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?",
            "put_by_id": f"INSERT INTO {ks}.{cs.STORIES_BY_ID} ({cols}) VALUES (?, ?, ?, ?, ?) "
                         "USING TIMESTAMP ? AND TTL ?",
            "put_index": f"INSERT INTO {ks}.{cs.STORY_EXPIRY_INDEX} (bucket, shard, expires_at, "
                         "story_id, author_id) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?",
            "put_view": f"INSERT INTO {ks}.{cs.STORY_VIEWS} (story_id, viewer_id, viewed_at) "
                        "VALUES (?, ?, ?) USING TIMESTAMP ? AND TTL ?",
            "put_seen": f"INSERT INTO {ks}.{cs.STORIES_SEEN_BY_VIEWER} (viewer_id, story_id, "
                        "author_id, expires_at) VALUES (?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?",
            "put_deletion": f"INSERT INTO {ks}.{cs.STORY_DELETIONS} (story_id, author_id, "
                            "expires_at) VALUES (?, ?, ?) USING TIMESTAMP ? AND TTL ?",
            "del_by_author": f"DELETE FROM {ks}.{cs.STORIES_BY_AUTHOR} USING TIMESTAMP ? "
                             "WHERE author_id = ? AND story_id = ?",
            "del_by_id": f"DELETE FROM {ks}.{cs.STORIES_BY_ID} USING TIMESTAMP ? WHERE story_id = ?",
            "del_index": f"DELETE FROM {ks}.{cs.STORY_EXPIRY_INDEX} USING TIMESTAMP ? WHERE "
                         "bucket = ? AND shard = ? AND expires_at = ? AND story_id = ?",
            "del_views": f"DELETE FROM {ks}.{cs.STORY_VIEWS} USING TIMESTAMP ? WHERE story_id = ?",
            "del_seen": f"DELETE FROM {ks}.{cs.STORIES_SEEN_BY_VIEWER} USING TIMESTAMP ? "
                        "WHERE viewer_id = ? AND story_id = ?",
            "by_author": f"SELECT {cols} FROM {ks}.{cs.STORIES_BY_AUTHOR} WHERE author_id = ?",
            "by_id": f"SELECT {cols} FROM {ks}.{cs.STORIES_BY_ID} WHERE story_id = ?",
            "viewers": f"SELECT viewer_id FROM {ks}.{cs.STORY_VIEWS} WHERE story_id = ?",
            "seen": f"SELECT story_id, expires_at FROM {ks}.{cs.STORIES_SEEN_BY_VIEWER} "
                    "WHERE viewer_id = ?",
            "due": f"SELECT story_id, author_id, expires_at FROM {ks}.{cs.STORY_EXPIRY_INDEX} "
                   "WHERE bucket = ? AND shard = ? AND expires_at <= ? LIMIT ?",
            "earliest": f"SELECT expires_at FROM {ks}.{cs.STORY_EXPIRY_INDEX} WHERE bucket = ? "
                        "AND shard IN ? AND expires_at > ? PER PARTITION LIMIT 1",
            "swept": f"SELECT story_id, author_id, expires_at FROM {ks}.{cs.STORY_EXPIRY_INDEX} "
                     "WHERE bucket = ? AND shard IN ? AND expires_at <= ?",
        }

    @classmethod
    def connect(cls, host: str, port: int, keyspace: str, policy: StoryPolicy = StoryPolicy(),
                connect_wait_s: float = 120.0, read_consistency: str = cassandra_session.AUTO,
                write_consistency: str = cassandra_session.AUTO,
                **options) -> "CassandraStoryStore":
        """A store on a new cluster connection (retried and at the given levels as
        ``CassandraFeedStore.connect``); ``close()`` shuts it."""
        cluster, store = cassandra_session.open_on_new_cluster(
            host, port, lambda session: cls(session, keyspace, policy, **options), connect_wait_s,
            keyspace=keyspace, read_consistency=read_consistency,
            write_consistency=write_consistency)
        store._db._cluster = cluster
        return store

    def close(self) -> None:
        self._db.close()

    def _run(self, work: Sequence[tuple[str, tuple]]) -> list:
        return self._db.execute_cql([(self._cql[name], params) for name, params in work])

    def _rows(self, name: str, params: tuple) -> list:
        (rs,) = self._run([(name, params)])
        return list(rs)

    def _write(self, work: Sequence[tuple[str, tuple]]) -> None:
        """Execute writes as one concurrent execution: the rows of each statement
        sorted by partition, so that an unlogged batch (``batch_rows`` rows)
        holds as few partitions as possible, then packed (``CassandraFeedStore``)."""
        if not work:
            return
        by_name: dict[str, list[tuple]] = {}
        for name, params in work:
            by_name.setdefault(name, []).append(params)
        ordered = []
        for name, rows in by_name.items():
            stmt = self._db.prepare(self._cql[name])
            key = _PARTITION_KEY[name]
            ordered += [(stmt, p) for p in sorted(rows, key=key)]
        self._db._execute(pack_batches(ordered, self._db.batch_rows))

    # -- writes -------------------------------------------------------------------

    def write(self, publishes: Sequence[StoryEvent] = (),
              views: Sequence[tuple[StoryEvent, int, int]] = (),
              removals: Sequence[DurableRemoval] = (), now_ms: int | None = None) -> None:
        """Write a batch in one concurrent execution (plus one for the removed
        stories' views partitions, last, so that a retry still finds the viewers):
        PUBLISHED events (the caller passes those Redis accepted) to the author's
        stories, the by-id table and the expiry index; counted views, given as
        ``(event, author_id, expires_at)``, as the story's viewer row and the
        viewer's seen row; removals (``DurableRemoval``) at
        ``removal_timestamp_us(expires_at)``."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        work: list[tuple[str, tuple]] = []
        for e in publishes:
            expires = story_expiry(e)
            ttl = ttl_seconds(expires, now, self.policy)
            if ttl == 0:
                continue
            ts = write_timestamp_us(e.event_time, expires)
            media = None if e.media_type is None else e.media_type.value
            row = (e.story_id, e.author_id, story_created_at(e), expires, media, ts, ttl)
            work += [("put_by_author", row), ("put_by_id", row),
                     ("put_index", (expiry_bucket(expires), expiry_shard(e.story_id), expires,
                                    e.story_id, e.author_id, ts, ttl))]
        for e, author, expires in views:
            ttl = ttl_seconds(expires, now, self.policy)
            if ttl == 0:
                continue
            ts = write_timestamp_us(e.event_time, expires)
            work += [("put_view", (e.story_id, e.viewer_id, e.event_time, ts, ttl)),
                     ("put_seen", (e.viewer_id, e.story_id, author, expires, ts, ttl))]
        last = []
        for r in removals:
            ts = removal_timestamp_us(r.expires_at)
            work += [("del_seen", (ts, v, r.story_id)) for v in sorted(set(r.viewers))]
            if r.deleted:
                ttl = ttl_seconds(r.expires_at, now, self.policy)
                if ttl:
                    work.append(("put_deletion", (r.story_id, r.author_id, r.expires_at, ts, ttl)))
            work += [("del_by_author", (ts, r.author_id, r.story_id)),
                     ("del_by_id", (ts, r.story_id)),
                     ("del_index", (ts, expiry_bucket(r.expires_at), expiry_shard(r.story_id),
                                    r.expires_at, r.story_id))]
            last.append(("del_views", (ts, r.story_id)))
        self._write(work)
        self._write(last)

    def publish(self, events: Sequence[StoryEvent], now_ms: int) -> None:
        """``write`` of PUBLISHED events."""
        self.write(publishes=events, now_ms=now_ms)

    def record_views(self, views: Sequence[tuple[StoryEvent, int, int]], now_ms: int) -> None:
        """``write`` of counted views ``(event, author_id, expires_at)``."""
        self.write(views=views, now_ms=now_ms)

    def remove(self, story_id: int, author_id: int, expires_at: int,
               viewers: Iterable[int] = (), deleted: bool = False,
               now_ms: int | None = None) -> None:
        """Remove one story: ``write`` of its ``DurableRemoval``, with ``viewers``
        and the viewers stored here."""
        stored = self.removal_context([story_id])[story_id][1]
        self.write(removals=[DurableRemoval(story_id, author_id, expires_at,
                                            tuple(set(viewers) | set(stored)), deleted)],
                   now_ms=now_ms)

    def removal_context(self, story_ids: Sequence[int], stories: bool = True
                        ) -> dict[int, tuple[StoryMeta | None, tuple[int, ...]]]:
        """Per story id, the story as stored here (None if unknown or removed, or
        not read: ``stories=False``) and its stored viewers: what a removal needs
        besides Redis' view of it (a delete's expiry when Redis lost the story,
        the viewers it lost). One concurrent execution."""
        ids = _unique(story_ids)
        if not ids:
            return {}
        reads = ("by_id", "viewers") if stories else ("viewers",)
        results = iter(self._run([(name, (sid,)) for sid in ids for name in reads]))
        out = {}
        for sid in ids:
            meta = None
            if stories:
                rows = [r for r in next(results) if r.expires_at is not None]
                meta = self._meta(rows[0]) if rows else None
            out[sid] = (meta, tuple(sorted(r.viewer_id for r in next(results))))
        return out

    def with_stored_viewers(self, removals: Sequence[DurableRemoval]) -> list[DurableRemoval]:
        """``removals`` with the viewers stored here added to those of the deleted
        stories (an expiry's removal has them already: ``StoryWriter.expire_due``
        reads them); one concurrent execution when any is deleted. So a delete
        cleans every seen row this table has, whatever Redis knew."""
        deleted = [r.story_id for r in removals if r.deleted]
        if not deleted:
            return list(removals)
        stored = self.removal_context(deleted, stories=False)
        return [dataclasses.replace(r, viewers=tuple(sorted(set(r.viewers) |
                                                            set(stored[r.story_id][1]))))
                if r.deleted else r for r in removals]

    def write_decided(self, writes: Sequence[StoryDurableWrites], now_ms: int) -> None:
        """``write`` of what Redis decided for one or more batches
        (``StoryDurableWrites``), the viewers kept here of the deleted stories
        added first (``with_stored_viewers``)."""
        self.write([e for w in writes for e in w.publishes], [v for w in writes for v in w.views],
                   self.with_stored_viewers([r for w in writes for r in w.removals]), now_ms)

    # -- the expiry index -----------------------------------------------------------

    def due(self, shards: Sequence[int], buckets: Sequence[int], bound_ms: int,
            limit: int = 5000) -> tuple[list[IndexedStory], int | None]:
        """Stories of the expiry index expiring at or before ``bound_ms`` in
        ``buckets`` x ``shards``, ordered by expiry (one concurrent execution), and
        None when that is all of them, else (a partition held more than
        ``limit``) the earliest ``expires_at`` that may still be due."""
        work = [("due", (b, s, bound_ms, limit)) for b in buckets for s in shards]
        out: list[IndexedStory] = []
        more: int | None = None
        for rs in self._run(work):
            rows = [IndexedStory(r.story_id, r.author_id, to_ms(r.expires_at)) for r in rs]
            out += rows
            if len(rows) >= limit:
                more = rows[-1].expires_at if more is None else min(more, rows[-1].expires_at)
        return sorted(out, key=lambda s: (s.expires_at, s.story_id)), more

    def earliest(self, shards: Sequence[int], buckets: Sequence[int],
                 after_ms: int) -> dict[int, int]:
        """Per bucket (of ``buckets``) holding any, the earliest ``expires_at`` after
        ``after_ms`` in the expiry index of ``shards``; one concurrent execution."""
        out: dict[int, int] = {}
        shard_list = list(shards)
        for b, rs in zip(buckets, self._run([("earliest", (b, shard_list, after_ms))
                                             for b in buckets])):
            times = [to_ms(r.expires_at) for r in rs]
            if times:
                out[b] = min(times)
        return out

    def pending(self, shards: Sequence[int], now_ms: int) -> dict[int, int]:
        """What the expiry index of ``shards`` holds at ``now_ms``: bucket ->
        earliest ``expires_at``, over ``sweep_buckets`` (the start-up re-arm)."""
        return self.earliest(shards, sweep_buckets(now_ms, self.policy), 0)

    def sweep(self, now_ms: int) -> list[IndexedStory]:
        """Every story in the expiry index that may still need removing at ``now_ms``
        (``sweep_buckets``), ordered by expiry (tools and tests). One read per bucket
        (all shards at once): 170 for the default week, not 16 times as many."""
        end = max(now_ms + self.policy.max_life_ms, now_ms) + HOUR_MS
        shards = list(range(EXPIRY_SHARDS))
        rows = [IndexedStory(r.story_id, r.author_id, to_ms(r.expires_at))
                for rs in self._run([("swept", (b, shards, end))
                                     for b in sweep_buckets(now_ms, self.policy)])
                for r in rs]
        return sorted(rows, key=lambda s: (s.expires_at, s.story_id))

    # -- reads --------------------------------------------------------------------

    @staticmethod
    def _meta(row, views: int = 0) -> StoryMeta:
        return StoryMeta(row.story_id, row.author_id, to_ms(row.created_at),
                         to_ms(row.expires_at), row.media_type, views)

    def story(self, story_id: int) -> StoryMeta | None:
        """The story with its unique view count; None when unknown or removed
        (expired ones may be returned until removed: check ``StoryMeta.active``)."""
        rows = self._rows("by_id", (story_id,))
        if not rows or rows[0].expires_at is None:
            return None
        return self._meta(rows[0], len(self.viewers(story_id)))

    def active_stories(self, author_id: int, now_ms: int) -> list[StoryMeta]:
        """The author's stories still active at ``now_ms``, oldest first."""
        return self._active_by_author([author_id], now_ms).get(author_id, [])

    def _active_by_author(self, authors: Sequence[int], now_ms: int) -> dict[int, list[StoryMeta]]:
        out: dict[int, list[StoryMeta]] = {}
        for a, rs in zip(authors, self._run([("by_author", (a,)) for a in authors])):
            live = [self._meta(r) for r in rs if r.expires_at is not None]
            live = [s for s in live if s.active(now_ms)]
            if live:
                out[a] = sorted(live, key=lambda s: (s.created_at, s.story_id))
        return out

    def viewers(self, story_id: int) -> list[int]:
        return sorted(r.viewer_id for r in self._rows("viewers", (story_id,)))

    def seen(self, viewer_id: int, now_ms: int) -> set[int]:
        return {r.story_id for r in self._rows("seen", (viewer_id,))
                if r.expires_at is not None and to_ms(r.expires_at) > now_ms}

    def tray(self, viewer_id: int, followee_ids: Sequence[int], now_ms: int,
             limit: int) -> list[TrayEntry]:
        """The viewer's story tray from Cassandra (when Redis is down): one
        partition read per followee, concurrently, plus the seen rows."""
        if limit < 1:
            return []
        followees = _unique(followee_ids)
        seen = self.seen(viewer_id, now_ms)
        return assemble_tray(followees, self._active_by_author(followees, now_ms), seen,
                             now_ms, limit)

    def mark_seen(self, viewer_id: int, story_id: int, now_ms: int) -> bool:
        """Record that the viewer saw the story; False when unknown, removed or expired."""
        story = self.story(story_id)
        if story is None or not story.active(now_ms):
            return False
        ttl = ttl_seconds(story.expires_at, now_ms, self.policy)
        self._run([("put_seen", (viewer_id, story_id, story.author_id, story.expires_at,
                                 write_timestamp_us(now_ms, story.expires_at), ttl))])
        return True

    # -- scans (``feedbeam rebuild``: whole tables, tools only) -------------------------

    def scan_stories(self) -> Iterator[StoryMeta]:
        """Every story row of ``stories_by_author`` (expired ones not yet removed included;
        ``views`` left 0: the views are ``scan_views``)."""
        for r in self._db.scan_rows(f"SELECT story_id, author_id, created_at, expires_at, "
                                    f"media_type FROM {self.keyspace}.{cs.STORIES_BY_AUTHOR}"):
            if r.expires_at is not None and r.created_at is not None:
                yield self._meta(r)

    def scan_views(self) -> Iterator[tuple[int, int, int]]:
        """``(story_id, viewer_id, viewed_at_ms)`` of every view row."""
        for r in self._db.scan_rows(f"SELECT story_id, viewer_id, viewed_at FROM "
                                    f"{self.keyspace}.{cs.STORY_VIEWS}"):
            if r.viewed_at is not None:
                yield r.story_id, r.viewer_id, to_ms(r.viewed_at)

    def scan_seen(self) -> Iterator[tuple[int, int, int]]:
        """``(viewer_id, story_id, expires_at_ms)`` of every seen row (views and
        ``mark_seen``)."""
        for r in self._db.scan_rows(f"SELECT viewer_id, story_id, expires_at FROM "
                                    f"{self.keyspace}.{cs.STORIES_SEEN_BY_VIEWER}"):
            if r.expires_at is not None:
                yield r.viewer_id, r.story_id, to_ms(r.expires_at)

    def scan_deletions(self) -> Iterator[tuple[int, int, int]]:
        """``(story_id, author_id, expires_at_ms)`` of every recorded delete (rows leave
        with their TTL, at ``expires_at + grace``)."""
        for r in self._db.scan_rows(f"SELECT story_id, author_id, expires_at FROM "
                                    f"{self.keyspace}.{cs.STORY_DELETIONS}"):
            if r.expires_at is not None and r.author_id is not None:
                yield r.story_id, r.author_id, to_ms(r.expires_at)

    def dump(self) -> dict[str, list[dict]]:
        """Every row of the story tables (tests on small keyspaces only)."""
        return self._db.dump((cs.STORIES_BY_AUTHOR, cs.STORIES_BY_ID, cs.STORY_EXPIRY_INDEX,
                              cs.STORY_VIEWS, cs.STORIES_SEEN_BY_VIEWER))
