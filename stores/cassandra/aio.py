"""Asynchronous reads of the durable feed tables, for serving's fallback and rebuild paths.

Runs the prepared statements of ``CassandraFeedStore`` (and ``RankedFeedStore``)
with ``execute_async`` bridged onto the asyncio loop, each call with its own
timeout and one resend after a client-side timeout (``timeout_retries``).
``start`` connects in the background and keeps retrying; until it has, every
call raises ``CassandraUnavailable``. Why: docs/serving.md, "Degradation".

    reader = AioCassandra("127.0.0.1", 9042, "feedbeam", timeout_s=0.5)
    await reader.start()
    rows = await reader.feed_page(7, limit=20, before=None, now_ms=now)
    await reader.close()
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from cassandra import OperationTimedOut

from domain.stories import StoryPolicy, ttl_seconds, write_timestamp_us
from stores.cassandra.feeds import (CassandraFeedStore, pack_batches, plan_buckets,
                                    post_from_row, to_ms)
from stores.ranked import RankedFeedStore, feed_from_row
from schemas import cassandra as cs
from schemas.keys import KeyLayout
from schemas.ranked import RankedFeed
from schemas.stories import StoryMeta

#: Partitions per ``IN`` query of the story reads (a coordinator fans one
#: statement out to them; more per statement would make one slow reply likelier).
IN_CHUNK = 100
#: Users per unlogged batch of last-read writes (``set_last_reads``).
LAST_READ_BATCH = 100


def _bounded_cql(ks: str) -> dict[str, str]:
    """Serving's bounded reads (and the seen write) beyond ``CassandraFeedStore``'s:
    every one reads a fixed number of rows or partitions, whatever the account."""
    story_cols = "story_id, author_id, created_at, expires_at, media_type"
    return {
        "following_limit": f"SELECT followee_id, since FROM {ks}.{cs.FOLLOWING_BY_USER} "
                           "WHERE user_id = ? LIMIT ?",
        "followed_celebrities_limit": f"SELECT celebrity_id, followed_at FROM "
                                      f"{ks}.{cs.FOLLOWED_CELEBRITIES} WHERE user_id = ? LIMIT ?",
        "follows": f"SELECT since FROM {ks}.{cs.FOLLOWING_BY_USER} "
                   "WHERE user_id = ? AND followee_id = ?",
        "story_by_id": f"SELECT {story_cols} FROM {ks}.{cs.STORIES_BY_ID} WHERE story_id = ?",
        "stories_of": f"SELECT {story_cols} FROM {ks}.{cs.STORIES_BY_AUTHOR} "
                      "WHERE author_id IN ? PER PARTITION LIMIT ?",
        "seen_limit": f"SELECT story_id, expires_at FROM {ks}.{cs.STORIES_SEEN_BY_VIEWER} "
                      "WHERE viewer_id = ? LIMIT ?",
        "put_seen": f"INSERT INTO {ks}.{cs.STORIES_SEEN_BY_VIEWER} (viewer_id, story_id, "
                    "author_id, expires_at) VALUES (?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?",
    }

log = logging.getLogger(__name__)


class CassandraUnavailable(Exception):
    """Cassandra is not connected, or a read failed or timed out. ``reason`` is a
    short fixed phrase (``not connected``, ``timed out``, ``failed``) that callers
    may show to clients; the message (driver text, hosts) is for logs only."""

    def __init__(self, message: str, reason: str = "failed"):
        super().__init__(message)
        self.reason = reason


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        reason = "timed out" if isinstance(error, OperationTimedOut) else "failed"
        future.set_exception(CassandraUnavailable(f"{type(error).__name__}: {error}", reason))


class AioCassandra:
    """See the module doc."""

    def __init__(self, host: str, port: int, keyspace: str, timeout_s: float = 0.5,
                 connect_retry_s: float = 2.0, max_connect_retry_s: float = 30.0,
                 timeout_retries: int = 1):
        self.host, self.port = host, port
        self.keyspace = cs.check_keyspace_name(keyspace)
        self.timeout_s = timeout_s
        self.timeout_retries = timeout_retries
        self.connect_retry_s = connect_retry_s
        self.max_connect_retry_s = max_connect_retry_s
        self.store: CassandraFeedStore | None = None
        self._ranked: RankedFeedStore | None = None
        self._bounded: dict[str, Any] = {}
        self._connector: asyncio.Task | None = None
        self._closed = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self.store is not None

    async def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        if self._connector is None:
            self._connector = asyncio.ensure_future(self._connect_loop())

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the connection; whether it is there."""
        if self._connector is not None and not self.connected:
            try:
                await asyncio.wait_for(asyncio.shield(self._connector), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.connected

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.connect_retry_s
        while not self._closed:
            try:
                store = await loop.run_in_executor(
                    None, lambda: CassandraFeedStore.connect(self.host, self.port, self.keyspace,
                                                           connect_wait_s=0))
                ranked = RankedFeedStore(None, KeyLayout(), store)
                # Prepare everything now (blocking) rather than on a request's path.
                for name in ("get_posts", "feed", "feed_before", "timeline",
                             "set_last_read", "last_read"):
                    await loop.run_in_executor(None, store.statement, name)
                bounded = {name: await loop.run_in_executor(None, store.prepare, cql)
                           for name, cql in _bounded_cql(store.keyspace).items()}
            except Exception as exc:  # any failure: log, retry later; serving runs on Redis
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("cassandra at %s:%d not available (%s); retrying in %.0fs",
                            self.host, self.port, self.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_connect_retry_s)
                continue
            if self._closed:
                store.close()
                return
            self.store, self._ranked, self._bounded, self.last_error = store, ranked, bounded, None
            log.info("cassandra connected at %s:%d, keyspace %s", self.host, self.port, self.keyspace)
            return

    async def close(self) -> None:
        self._closed = True
        if self._connector is not None and not self._connector.done():
            self._connector.cancel()
        store, self.store = self.store, None
        if store is not None:
            await asyncio.get_running_loop().run_in_executor(None, store.close)

    # -- execution ------------------------------------------------------------------

    def execute(self, stmt, params: tuple, timeout_s: float | None = None) -> asyncio.Future:
        """A future of the rows (first page) of one prepared statement."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.store is None:
            future.set_exception(CassandraUnavailable(
                f"not connected to Cassandra ({self.last_error or 'connecting'})", "not connected"))
            return future
        session = self.store.session
        timeout = self.timeout_s if timeout_s is None else timeout_s

        def send(retries_left: int) -> None:
            try:
                response = session.execute_async(stmt, params, timeout=timeout)
            except Exception as exc:  # e.g. NoHostAvailable raised synchronously
                loop.call_soon_threadsafe(_settle, future, None, exc)
                return

            def failed(exc: BaseException) -> None:
                if retries_left > 0 and isinstance(exc, OperationTimedOut) and not future.done():
                    send(retries_left - 1)
                else:
                    loop.call_soon_threadsafe(_settle, future, None, exc)

            response.add_callbacks(
                lambda rows: loop.call_soon_threadsafe(_settle, future, rows, None), failed)

        send(self.timeout_retries)
        return future

    def _named(self, name: str, params: tuple) -> asyncio.Future:
        if self.store is None:
            return self.execute(None, params)  # raises CassandraUnavailable
        stmt = self._bounded.get(name)
        return self.execute(self.store.statement(name) if stmt is None else stmt, params)

    # -- reads ------------------------------------------------------------------------

    async def posts(self, post_ids: Sequence[int]) -> list[dict | None]:
        """``PostMeta`` per id (None for unknown or deleted), in one ``IN`` query:
        one request for the driver instead of one per post (the driver's
        per-request cost dominates the fallback path's CPU)."""
        if not post_ids:
            return []
        rows = await self._named("get_posts", (list(dict.fromkeys(post_ids)),))
        by_id = {r.post_id: r for r in rows}
        return [post_from_row(by_id.get(p)) for p in post_ids]

    async def feed_page(self, user_id: int, limit: int, before: tuple[int, int] | None,
                        now_ms: int, max_buckets: int = 8) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(post_id, created_at_ms)`` of the durable home feed,
        newest first, strictly after ``before`` = ``(post_id, created_at_ms)``
        (the rules of ``CassandraFeedStore.feed_page``)."""
        start_ms = now_ms if before is None else before[1]
        out: list[tuple[int, int]] = []
        for i, bucket in enumerate(plan_buckets(start_ms, max_buckets)):
            if len(out) >= limit:
                break
            want = limit - len(out)
            if i == 0 and before is not None:
                rows = await self._named("feed_before", (user_id, bucket, before[1], before[0], want))
            else:
                rows = await self._named("feed", (user_id, bucket, want))
            out.extend((r.post_id, to_ms(r.created_at)) for r in rows)
        return out

    async def timeline(self, author_id: int, limit: int, now_ms: int,
                       max_buckets: int = 2) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(post_id, created_at_ms)`` of the author's durable timeline."""
        out: list[tuple[int, int]] = []
        for bucket in plan_buckets(now_ms, max_buckets):
            if len(out) >= limit:
                break
            rows = await self._named("timeline", (author_id, bucket, limit - len(out)))
            out.extend((r.post_id, to_ms(r.created_at)) for r in rows)
        return out

    async def following(self, user_id: int, limit: int) -> list[int]:
        """Up to ``limit`` ids ``user_id`` follows, oldest follow first. The table
        is clustered by followee id, so past ``limit`` these are the lowest ids,
        not the most recent follows (the fallback trades that for bounded work)."""
        rows = await self._named("following_limit", (user_id, limit))
        return [r.followee_id for r in sorted(rows, key=lambda r: (r.since, r.followee_id))]

    async def followed_celebrities(self, user_id: int, limit: int) -> list[int]:
        """Up to ``limit`` of the accounts at or above the push threshold ``user_id``
        follows (the fan-out's ``followed_celebrities`` table), oldest follow first:
        one partition read. Clustered by celebrity id, so past ``limit`` these are
        the lowest ids, not the most recent follows, as with ``following``."""
        rows = await self._named("followed_celebrities_limit", (user_id, limit))
        return [r.celebrity_id for r in sorted(rows, key=lambda r: (r.followed_at, r.celebrity_id))]

    async def follows(self, user_id: int, followee_id: int) -> bool:
        """Whether ``user_id`` follows ``followee_id`` (one row read)."""
        return bool(await self._named("follows", (user_id, followee_id)))

    # -- stories (serving's fallback) ---------------------------------------------------

    @staticmethod
    def _story(row) -> StoryMeta:
        return StoryMeta(row.story_id, row.author_id, to_ms(row.created_at),
                         to_ms(row.expires_at), row.media_type)

    async def story(self, story_id: int) -> StoryMeta | None:
        """The story (``views`` left 0), None when unknown or removed; expired ones
        may come back until removed: check ``StoryMeta.active``."""
        rows = await self._named("story_by_id", (story_id,))
        if not rows or rows[0].expires_at is None or rows[0].created_at is None:
            return None
        return self._story(rows[0])

    async def active_stories(self, authors: Sequence[int], now_ms: int,
                             per_author: int = 50) -> dict[int, list[StoryMeta]]:
        """Stories active at ``now_ms`` per author (only authors with some), from
        ``IN`` queries of ``IN_CHUNK`` authors, the newest ``per_author`` rows of each."""
        chunks = [list(authors[i:i + IN_CHUNK]) for i in range(0, len(authors), IN_CHUNK)]
        results = await asyncio.gather(*(self._named("stories_of", (c, per_author))
                                         for c in chunks))
        out: dict[int, list[StoryMeta]] = {}
        for rows in results:
            for r in rows:
                if r.expires_at is not None and r.created_at is not None:
                    story = self._story(r)
                    if story.active(now_ms):
                        out.setdefault(r.author_id, []).append(story)
        return out

    async def seen(self, viewer_id: int, now_ms: int, limit: int = 5000) -> set[int]:
        """Ids of the still-active stories the viewer has seen (at most ``limit`` rows)."""
        rows = await self._named("seen_limit", (viewer_id, limit))
        return {r.story_id for r in rows if r.expires_at is not None and to_ms(r.expires_at) > now_ms}

    async def put_seen(self, viewer_id: int, story: StoryMeta, now_ms: int,
                       policy: StoryPolicy = StoryPolicy()) -> None:
        """The viewer's seen row of an active story, as the stories pipeline writes
        it (TTL to expiry + grace, timestamp below the story's removal)."""
        ttl = ttl_seconds(story.expires_at, now_ms, policy)
        if ttl:
            await self._named("put_seen", (viewer_id, story.story_id, story.author_id,
                                           story.expires_at,
                                           write_timestamp_us(now_ms, story.expires_at), ttl))

    async def last_read(self, user_id: int) -> int | None:
        rows = await self._named("last_read", (user_id,))
        return to_ms(rows[0].last_feed_read_at) if rows else None

    async def set_last_reads(self, reads: Sequence[tuple[int, int]]) -> None:
        """``(user_id, at_ms)`` last reads in unlogged batches of ``LAST_READ_BATCH``
        users: one request for the driver per batch, not one per user."""
        if self.store is None:
            await self.execute(None, ())  # raises CassandraUnavailable
        stmt = self.store.statement("set_last_read")
        work = [(stmt, (cs.event_timestamp_us(at_ms), at_ms, user_id))
                for user_id, at_ms in reads]
        await asyncio.gather(*(self.execute(s, p) for s, p in
                               pack_batches(work, LAST_READ_BATCH)))

    async def ranked(self, user_id: int) -> RankedFeed | None:
        """The durable ranked feed (``RankedFeedStore.read_durable``, asynchronously)."""
        if self._ranked is None:
            await self._named("last_read", (user_id,))  # raises CassandraUnavailable
        rows = await self.execute(*self._ranked.durable_query(user_id))
        return feed_from_row(user_id, rows[0] if rows else None)
