"""Feed reads: Redis first, Cassandra when Redis is slow or down, 503 when both are.

``FeedService`` answers the ranked and chronological feed endpoints from what
the pipelines materialized, through the stores they write with
(``stores.redis.feeds.FeedCommands`` on the async Redis client,
``stores.cassandra.aio.AioCassandra``, ``stores.ranked``); the decisions (merge,
pages, cursors, breaker) are ``serving.logic``. Round trips, cold-user rebuilds
and fallbacks: docs/serving.md.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple, Sequence

import hiredis

from stores.cassandra.aio import AioCassandra, CassandraUnavailable
from stores.redis.aio import AioRedis, RedisUnavailable, is_noscript, pack_command
from stores.ranked import READ_PAGE_SCRIPT, page_args, page_keys, parse_page
from stores.redis.feeds import FeedCommands
from schemas.keys import KeyLayout
from schemas.ranked import RankedEntry, RankedPage
from serving.config import ServingConfig
from serving.logic import (
    ChronoCursor,
    CircuitBreaker,
    DeletionFollower,
    FlatSource,
    Page,
    Position,
    RankedCursor,
    SourceBatch,
    fresh_entries,
    merge_flat,
    merge_page,
    needs_rebuild,
    rebuild_entries,
)

log = logging.getLogger(__name__)

#: Extra entries read per source beyond the page, so ties at a page boundary
#: rarely need a second read.
SLACK = 4
#: Seconds a cached post is still used while Redis is failing.
STALE_POSTS_S = 60.0
#: Read-size growth when a page came out empty because of a long tie.
_GROWTH = (4, 32)


class StoresUnavailable(Exception):
    """Neither Redis nor Cassandra could answer (HTTP 503); the message says why."""


class Overloaded(StoresUnavailable):
    """This worker is behind on its own work (HTTP 503 with Retry-After): a Redis
    timeout then says more about us than about Redis, so no fallback either."""


class FeedResult(NamedTuple):
    """A page of a feed, hydrated. ``kind`` is ``ranked`` or ``chronological``;
    ``source`` says where it came from: ``redis``, ``cassandra`` or ``rebuilt``."""

    items: list[dict]
    next_cursor: ChronoCursor | RankedCursor | None
    kind: str
    source: str
    model_version: str | None = None


class _Graph(NamedTuple):
    """The followed celebrities a page pulls (at most ``max_pulled_timelines``)."""

    celebrities: list[int]
    expires: float


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check(replies: Sequence[Any]) -> Sequence[Any]:
    for r in replies:
        if isinstance(r, hiredis.ReplyError):
            raise RedisUnavailable(f"Redis error reply: {r}", "error reply")
    return replies


def newer_than(flat: Sequence[bytes], ms: int) -> Sequence[bytes]:
    """The head of a flat ``WITHSCORES`` reply (newest first) scored above ``ms``:
    what a ranked page's ``fresh`` posts can come from, without parsing the rest."""
    end = 0
    while end < len(flat) and float(flat[end + 1]) > ms:
        end += 2
    return flat[:end]


def reason(exc: BaseException) -> str:
    """What a client may be told about a store failure: a fixed phrase, never the
    driver's text (addresses, hosts); that goes to the log."""
    return getattr(exc, "reason", "failed")


class FailureLog:
    """Logs store failures with their full text, at most once per ``every_s`` per
    store: an outage at 2,000 requests/s must not write 2,000 lines a second."""

    def __init__(self, every_s: float = 5.0):
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, store: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last.get(store, -1e18) < self.every_s:
            self.suppressed[store] = self.suppressed.get(store, 0) + 1
            return
        self._last[store] = now
        log.warning("%s failed: %s: %s (%d similar failures not logged)", store,
                    type(exc).__name__, exc, self.suppressed.pop(store, 0))


class FeedService:
    """See the module doc. One per process, used from one event loop."""

    def __init__(self, config: ServingConfig, redis: AioRedis, cassandra: AioCassandra,
                 metrics=None, loop_lag_s=lambda: 0.0):
        self.config = config
        self.redis = redis
        self.cassandra = cassandra
        self.cmd = FeedCommands(KeyLayout(config.key_prefix))
        self.keys = self.cmd.keys
        self.metrics = metrics
        self.loop_lag_s = loop_lag_s  # how late this worker's event loop runs (serving.app)
        self.redis_breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s)
        self.cassandra_breaker = CircuitBreaker(config.breaker_failures, config.breaker_reset_s)
        self._ranked_script = redis.register_script(READ_PAGE_SCRIPT)
        self._last_read_script = redis.register_script(FeedCommands.last_read_script)
        self._graphs: dict[int, _Graph] = {}
        self._followee_pages: dict[tuple[int, int, int], tuple[list[int], float]] = {}
        self.log_failure = FailureLog()
        self._packed_posts: dict[int, bytes] = {}
        self._packed_timelines: dict[tuple[int, int], bytes] = {}
        # post -> (monotonic time read, meta; None: deleted); see _keep_post
        self._post_cache: dict[int, tuple[float, dict | None]] = {}
        self._posts_since = 0.0  # the cache's last clear (monotonic): nothing read before enters
        self.deletions = DeletionFollower(config.deletion_poll_s, config.post_cache_s)
        self._last_read_redis: dict[int, float] = {}
        self._last_read_cassandra: dict[int, float] = {}
        self._durable_reads: dict[int, int] = {}  # user -> last read (ms) not yet written
        self._durable_flush: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._fallbacks = 0  # Cassandra fallback reads in flight
        self._rebuilt: dict[int, float] = {}  # user -> when a rebuild was last tried
        self._generation: bytes | None = b""  # Redis' generation marker as last read
        self._generation_until = 0.0          # when to read it again (monotonic s)

    # -- public reads -----------------------------------------------------------------

    async def chronological(self, user_id: int, limit: int,
                            cursor: ChronoCursor | None) -> FeedResult:
        after = None if cursor is None else cursor.position
        return await self.with_fallback(
            lambda: self._chrono_redis(user_id, limit, after),
            lambda: self._chrono_cassandra(user_id, limit, after))

    async def feed(self, user_id: int, limit: int,
                   cursor: ChronoCursor | RankedCursor | None) -> FeedResult:
        """The ranked feed when the user has one, else the chronological feed; a
        cursor keeps the kind its first page had."""
        if isinstance(cursor, ChronoCursor):
            return await self.chronological(user_id, limit, cursor)
        return await self.with_fallback(
            lambda: self._ranked_redis(user_id, limit, cursor),
            lambda: self._ranked_cassandra(user_id, limit, cursor))

    async def followees_page(self, user_id: int, start: int, count: int) -> tuple[list[int], str]:
        """Whom the user follows, most recent follow first, ``count`` from rank
        ``start`` (one bounded read, reused for ``graph_cache_s`` like the
        celebrities), from Redis or else Cassandra (by followee id there, at
        most ``max_followees_scanned`` deep); and which store."""
        now = time.monotonic()
        cached = self._followee_pages.get((user_id, start, count))
        if cached is not None and cached[1] > now:
            return cached[0], "redis"
        redis_error = "circuit open"
        if self.redis_breaker.allow():
            try:
                (reply,) = await self.pipeline([
                    ("ZREVRANGE", self.keys.following(user_id), start, start + count - 1)])
            except RedisUnavailable as exc:
                self._redis_failed(exc)
                redis_error = reason(exc)
            else:
                self.redis_breaker.success()
                page = self.cmd.ids(reply)
                if not page and start == 0:  # nothing in Redis: maybe only in Cassandra (lost cache)
                    durable = await self.cassandra_extra(
                        lambda: self.cassandra.following(user_id, count), [])
                    page = durable[::-1]
                if len(self._followee_pages) >= 200_000:
                    self._followee_pages.clear()
                self._followee_pages[(user_id, start, count)] = (page, now + self.config.graph_cache_s)
                return page, "redis"
        # Bounded too: the table is clustered by followee id, with no follow-time
        # order to seek to rank ``start`` in, so a page reads every row above it,
        # at most ``max_followees_scanned`` (past that the pages end while Redis
        # fails), and pages in id order: each page a stable slice of the rows.
        depth = min(start + count, self.config.max_followees_scanned)
        if start >= depth:
            return [], "cassandra"
        try:
            by_id = sorted(await self.cassandra.following(user_id, depth))
        except CassandraUnavailable as exc:
            self.log_failure("cassandra", exc)
            raise StoresUnavailable(f"Redis: {redis_error}; Cassandra: {reason(exc)}") from None
        return by_id[start:depth], "cassandra"

    def status(self) -> dict[str, str]:
        """Each store's circuit breaker state (``/metrics``)."""
        return {"redis": self.redis_breaker.state, "cassandra": self.cassandra_breaker.state}

    # -- fallback plumbing ------------------------------------------------------------

    def _redis_failed(self, exc: RedisUnavailable) -> None:
        """Count a Redis failure, unless it is our own backlog: a reply late
        because this worker's event loop runs behind is no fault of Redis, and
        the slower Cassandra path would only deepen it (503 ``Overloaded``)."""
        lag = self.loop_lag_s()
        if lag > self.config.redis_timeout_s:
            self._count("overload_shed")
            raise Overloaded(f"overloaded: event loop {lag * 1000:.0f} ms behind") from None
        self.redis_breaker.failure()
        self._count("redis_failures")
        self.log_failure("redis", exc)

    async def with_fallback(self, on_redis, on_cassandra):
        """``on_redis()``, else ``on_cassandra()``; 503 bodies name each store's
        failure by ``reason`` only (the details go to the log)."""
        redis_error = "circuit open"
        if self.redis_breaker.allow():
            try:
                lost = await self._redis_lost()
                result = None if lost else await on_redis()
            except RedisUnavailable as exc:
                self._redis_failed(exc)
                redis_error = reason(exc)
            else:
                self.redis_breaker.success()
                if not lost:
                    return result
                redis_error = "lost its data, being restored"
                self._count("redis_lost_reads")
        if not self.cassandra_breaker.allow():
            raise StoresUnavailable(f"Redis: {redis_error}; Cassandra: circuit open")
        if self._fallbacks >= self.config.max_fallback_in_flight:
            # A Cassandra read costs ~10x a Redis one: shed rather than let a Redis
            # outage queue up every request behind the slow path.
            self._count("fallback_shed")
            raise StoresUnavailable(f"Redis: {redis_error}; Cassandra: fallback capacity "
                                    f"({self.config.max_fallback_in_flight} reads) in use")
        self._fallbacks += 1
        try:
            result = await on_cassandra()
        except CassandraUnavailable as exc:
            self.cassandra_breaker.failure()
            self.log_failure("cassandra", exc)
            raise StoresUnavailable(f"Redis: {redis_error}; Cassandra: {reason(exc)}") from None
        finally:
            self._fallbacks -= 1
        self.cassandra_breaker.success()
        self._count("fallback_reads")
        return result

    async def _redis_lost(self) -> bool:
        """Whether Redis lost its data (no generation marker) as last read; read again
        at most every ``generation_check_s``. An empty Redis is no truth to serve:
        the jobs are restoring it from Cassandra, which answers meanwhile. When the
        marker changes, the graph caches filled from the old Redis are dropped."""
        if self.config.generation_check_s <= 0:
            return False
        now = time.monotonic()
        if now >= self._generation_until:
            self._generation_until = now + self.config.generation_check_s
            (marker,) = await self.pipeline([("GET", self.keys.generation())])
            if marker != self._generation:
                self._graphs.clear()
                self._followee_pages.clear()
                self._clear_posts()
                self.deletions.reset()
                self._generation = marker
        return self._generation is None

    async def cassandra_extra(self, make, default):
        """An optional Cassandra read on the Redis path: ``default`` if it fails."""
        if not self.cassandra_breaker.allow():
            return default
        try:
            value = await make()
        except CassandraUnavailable as exc:
            self.cassandra_breaker.failure()
            self.log_failure("cassandra", exc)
            return default
        self.cassandra_breaker.success()
        return value

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.event(what)

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def pipeline(self, commands: list[tuple], scripts: dict[int, Any] | None = None) -> list:
        """One Redis round trip; commands at ``scripts``' indexes are EVALSHAs of
        those scripts, re-run with EVAL if the server lost its script cache."""
        replies = await self.redis.pipeline(commands)
        for i, script in (scripts or {}).items():
            if is_noscript(replies[i]):
                _, _, nkeys, *rest = commands[i]
                replies[i] = await script(keys=rest[:nkeys], args=rest[nkeys:])
        return list(_check(replies))

    # -- graph (cached, bounded) ----------------------------------------------------

    async def _graph_redis(self, user_id: int) -> _Graph:
        graph = self._graphs.get(user_id)
        now = time.monotonic()
        if graph is not None and graph.expires > now:
            return graph
        return self._remember(user_id, await self._celebrities_redis(user_id), now)

    async def _celebrities_redis(self, user_id: int) -> list[int]:
        """The followed celebrities a page pulls: the ``max_pulled_timelines`` most
        recently followed members of the set the fan-out keeps
        (``KeyLayout.followed_celebrities``), oldest follow first; one command
        whatever the account. An empty set is the common case (a user following
        no celebrity), not a lost cache: a lost Redis shows in the generation
        marker (``_redis_lost``), so there is no Cassandra read here."""
        (reply,) = await self.pipeline([
            self.cmd.followed_celebrities(user_id, self.config.max_pulled_timelines)])
        return self.cmd.ids(reply)

    async def _graph_cassandra(self, user_id: int) -> _Graph:
        """The graph from Cassandra (Redis is failing): one partition read of the
        ``followed_celebrities`` table with ``LIMIT max_pulled_timelines``. A cached
        graph is used even when expired: slightly stale beats reading it again
        per request."""
        graph = self._graphs.get(user_id)
        if graph is not None:
            return graph
        now = time.monotonic()
        pulled = await self.cassandra.followed_celebrities(user_id,
                                                           self.config.max_pulled_timelines)
        return self._remember(user_id, pulled, now)

    def _remember(self, user_id: int, pulled: list[int], now: float) -> _Graph:
        graph = _Graph(pulled, now + self.config.graph_cache_s)
        if len(self._graphs) >= 200_000:
            self._graphs.clear()
        self._graphs[user_id] = graph
        return graph

    # -- chronological ---------------------------------------------------------------

    async def _chrono_redis(self, user_id: int, limit: int, after: Position | None,
                            first_replies: list | None = None) -> FeedResult:
        """A chronological page from Redis. ``first_replies``: the replies of
        ``_page_commands`` for ``after=None`` already read by the caller (the
        ranked path reads them in its own round trip)."""
        graph = await self._graph_redis(user_id)
        source = "redis"
        count = limit + SLACK
        for growth in (1,) + _GROWTH:
            n = count * growth
            if growth == 1 and first_replies is not None:
                replies = first_replies
            else:
                replies = await self.pipeline(self._page_commands(user_id, graph, n, after))
            page, last_read, size = await self._page_from(user_id, replies, n, limit, after)
            if after is None and growth == 1 and needs_rebuild(
                    last_read, size, _now_ms(), self.config.inactive_ms) and self._may_rebuild(user_id):
                if await self._rebuild(user_id):
                    source = "rebuilt"
                    replies = await self.pipeline(self._page_commands(user_id, graph, n, after))
                    page, _, _ = await self._page_from(user_id, replies, n, limit, after)
            if page.entries or not page.short:
                break
        items = await self._hydrate_redis(user_id, page.entries, self.config.post_cache_chrono_s)
        cursor = None if page.next_position is None else ChronoCursor(user_id, page.next_position)
        return FeedResult(items, cursor, "chronological", source)

    def _page_commands(self, user_id: int, graph: _Graph, n: int,
                       after: Position | None) -> list[tuple]:
        """Home feed (``n`` entries at or below the cursor), its size, the last read,
        and each followed celebrity's timeline likewise: one round trip."""
        top = None if after is None else after.created_at
        commands: list = [self.cmd.feed(user_id, top, n), self.cmd.feed_size(user_id),
                          self.cmd.last_read(user_id)]
        if top is not None:
            return commands + [self.cmd.timeline(c, top, n) for c in graph.celebrities]
        # First pages read the same head of a celebrity's timeline for every
        # follower: pack each such command once.
        packed = self._packed_timelines
        if len(packed) >= 100_000:
            packed.clear()
        for c in graph.celebrities:
            command = packed.get((c, n))
            if command is None:
                command = packed[(c, n)] = pack_command(self.cmd.timeline(c, None, n))
            commands.append(command)
        return commands

    async def _page_from(self, user_id: int, replies: list, n: int, limit: int,
                         after: Position | None) -> tuple[Page, int | None, int]:
        """The page, the last read and the feed size from ``_page_commands``' replies."""
        home = FlatSource.answer(replies[0], n)   # parsed only as far as the page needs
        size = int(replies[1])
        sources = [home]
        if not home.full and size >= self.config.feed_cap:
            # The Redis feed was trimmed at its cap: older entries live in Cassandra only.
            before = None if after is None else (after.post_id, after.created_at)
            durable = await self.cassandra_extra(
                lambda: self.cassandra.feed_page(user_id, n, before, _now_ms()), None)
            if durable is not None:
                sources = [home, FlatSource.of(durable, len(durable) >= n)]
        sources += [FlatSource.answer(reply, n) for reply in replies[3:]]
        return merge_flat(sources, after, limit), self.cmd.optional_int(replies[2]), size

    async def _chrono_cassandra(self, user_id: int, limit: int, after: Position | None) -> FeedResult:
        graph = await self._graph_cassandra(user_id)
        now = _now_ms()
        n = limit + SLACK
        before = None if after is None else (after.post_id, after.created_at)
        home, *timelines = await asyncio.gather(
            self.cassandra.feed_page(user_id, n, before, now),
            *(self.cassandra.timeline(c, n, now) for c in graph.celebrities))
        # Timelines are read newest first without a lower bound, so they say
        # nothing about what lies below them: not "full" (see README limits).
        batches = [SourceBatch(home, len(home) >= n)] + [SourceBatch(t, False) for t in timelines]
        page = merge_page(batches, after, limit)
        items = await self._hydrate_cassandra(page.entries)
        self._record_read_durable(user_id, now)
        cursor = None if page.next_position is None else ChronoCursor(user_id, page.next_position)
        return FeedResult(items, cursor, "chronological", "cassandra")

    # -- ranked ------------------------------------------------------------------------

    async def _ranked_redis(self, user_id: int, limit: int, cursor: RankedCursor | None) -> FeedResult:
        first = cursor is None
        graph = await self._graph_redis(user_id) if first else None
        start = 0 if first else cursor.offset
        gen = None if first else cursor.generated_at_ms
        keys, args = page_keys(self.keys, user_id), page_args(gen, start, limit)
        commands = [self._ranked_script.command(keys, args)]
        if first:
            # The first chronological page's reads ride along: they give the posts
            # newer than the ranking, or the whole page when there is no ranking.
            commands += self._page_commands(user_id, graph, limit + SLACK, None)
        sent_at = time.monotonic()
        follow = self._deletion_reads(sent_at)
        replies = await self.pipeline(commands + follow, {0: self._ranked_script})
        if follow:
            self._follow_deletions(replies[len(commands):], sent_at)
            del replies[len(commands):]
        ranked = parse_page(replies[0], start)
        if ranked is None:
            return await self._chrono_redis(user_id, limit, None, replies[1:] if first else None)
        fresh: list[tuple[int, int]] = []
        if first:
            sources = [replies[1]] + replies[4:]  # home feed and celebrity timelines
            batches = [SourceBatch(self.cmd.entries(newer_than(r, ranked.generated_at_ms)), False)
                       for r in sources]
            fresh = fresh_entries(batches, ranked.generated_at_ms,
                                  (e.post_id for e in ranked.entries), limit)
        entries, cursor_out = self._ranked_slice(user_id, ranked, fresh, limit)
        # A ranked list can hold a post deleted since it was ranked: cached posts
        # serve it for as long as chronological pages while this worker follows
        # the log of deleted posts, for post_cache_s else.
        max_age = (self.config.post_cache_chrono_s if self.deletions.current(time.monotonic())
                   else self.config.post_cache_s)
        metas = await self._hydrate_redis(user_id, [(pid, 0) for pid, _ in entries], max_age)
        return FeedResult(self._with_scores(metas, entries), cursor_out, "ranked", "redis",
                          ranked.model_version)

    async def _ranked_cassandra(self, user_id: int, limit: int,
                                cursor: RankedCursor | None) -> FeedResult:
        feed = await self.cassandra.ranked(user_id)
        if feed is None:
            return await self._chrono_cassandra(user_id, limit, None)
        start = 0 if cursor is None else cursor.offset
        ranked = RankedPage(feed.entries[start:start + limit], start, len(feed.entries),
                            feed.model_version, feed.generated_at_ms,
                            cursor is None or cursor.generated_at_ms == feed.generated_at_ms)
        entries, cursor_out = self._ranked_slice(user_id, ranked, [], limit)
        metas = await self._hydrate_cassandra([(pid, 0) for pid, _ in entries])
        self._record_read_durable(user_id, _now_ms())
        return FeedResult(self._with_scores(metas, entries), cursor_out, "ranked", "cassandra",
                          feed.model_version)

    @staticmethod
    def _ranked_slice(user_id: int, ranked: RankedPage, fresh: list[tuple[int, int]],
                      limit: int) -> tuple[list[tuple[int, float | None]], RankedCursor | None]:
        """``(post_id, score)`` of the page: fresh posts first (no score), then
        ranked entries; the cursor continues at the next rank of this version."""
        entries: list[tuple[int, float | None]] = [(pid, None) for pid, _ in fresh[:limit]]
        taken: list[RankedEntry] = list(ranked.entries[:limit - len(entries)])
        entries += [(e.post_id, e.score) for e in taken]
        nxt = ranked.start + len(taken)
        cursor = RankedCursor(user_id, ranked.generated_at_ms, nxt) if nxt < ranked.total else None
        return entries, cursor

    @staticmethod
    def _with_scores(metas: list[dict], entries: list[tuple[int, float | None]]) -> list[dict]:
        scores = dict(entries)
        return [{**m, "score": scores.get(m["post_id"])} for m in metas]  # metas may be cached

    # -- hydration and last read --------------------------------------------------------

    async def _hydrate_redis(self, user_id: int, entries: Sequence[tuple[int, int]],
                             max_age_s: float | None = None) -> list[dict]:
        """Post metadata of the page (one pipeline, with the last-read write when due);
        deleted or unknown posts are left out.

        Posts read in the last ``max_age_s`` (default ``post_cache_s``) come from
        a per-process cache: a post's metadata never changes, only a delete
        does, and fan-out removes a deleted post from feeds and timelines at
        once. So a chronological page, whose entries come from those, may use
        any cached copy (``post_cache_chrono_s``); a ranked list can hold a
        deleted post until it is re-ranked, so a ranked page uses the long age
        only while the worker follows the log of deleted posts (``_ranked_redis``).
        """
        now_s = time.time()
        at = time.monotonic()
        max_age = self.config.post_cache_s if max_age_s is None else max_age_s
        cache, packed = self._post_cache, self._packed_posts
        metas: list = [None] * len(entries)
        wanted: list[int] = []  # indexes read from Redis
        commands: list = []
        for i, (pid, _) in enumerate(entries):
            hit = cache.get(pid)
            if hit is not None and at - hit[0] < max_age:
                metas[i] = hit[1]
                continue
            command = packed.get(pid)
            if command is None:  # post keys never change: pack each HMGET once
                if len(packed) >= 500_000:
                    packed.clear()
                command = packed[pid] = pack_command(self.cmd.post(pid))
            wanted.append(i)
            commands.append(command)
        scripts = {}
        if now_s - self._last_read_redis.get(user_id, 0.0) >= self.config.last_read_redis_every_s:
            scripts[len(commands)] = self._last_read_script
            commands.append(self._last_read_script.command(
                [self.keys.last_read(user_id)], [int(now_s * 1000)]))
        if commands:
            replies = await self.pipeline(commands, scripts)
            if scripts:
                self._remember_read(self._last_read_redis, user_id, now_s)
                self._record_read_durable(user_id, int(now_s * 1000))
            missing = []  # no hash at all (not a tombstone): a lost cache, try the durable copy
            post_meta, keep = self.cmd.post_meta, self._keep_post
            if len(cache) >= 200_000:
                self._clear_posts()
            for i, reply in zip(wanted, replies):
                pid = entries[i][0]
                meta = metas[i] = post_meta(pid, reply)
                if meta is None and reply[-1] is None and reply[1] is None:
                    missing.append(i)
                else:
                    keep(pid, at, meta)
            if missing:
                durable = await self.cassandra_extra(
                    lambda: self.cassandra.posts([entries[i][0] for i in missing]), [])
                for i, meta in zip(missing, durable):
                    metas[i] = meta
        return [m for m in metas if m is not None]

    async def _hydrate_cassandra(self, entries: Sequence[tuple[int, int]]) -> list[dict]:
        """Post metadata from Cassandra (Redis is failing). Posts hydrated within
        ``STALE_POSTS_S`` are reused: degraded mode trades a minute of staleness
        on deletes for a Cassandra read less per post."""
        at = time.monotonic()
        cache = self._post_cache
        metas: list = [None] * len(entries)
        wanted = []
        for i, (pid, _) in enumerate(entries):
            hit = cache.get(pid)
            if hit is not None and hit[0] > at - STALE_POSTS_S:
                metas[i] = hit[1]
            else:
                wanted.append(i)
        if wanted:
            durable = await self.cassandra.posts([entries[i][0] for i in wanted])
            for i, meta in zip(wanted, durable):
                metas[i] = meta
                if meta is not None:
                    self._keep_post(meta["post_id"], at, meta)
        return [m for m in metas if m is not None]

    def _keep_post(self, post_id: int, at: float, meta: dict | None) -> None:
        """Cache ``meta`` (None: deleted) of a post read at ``at`` (monotonic), unless
        the cache was cleared since (the read may predate a delete the clear
        forgot) or the post is marked deleted (a delete is forever: a read that
        raced it must not bring the post back)."""
        if at < self._posts_since:
            return
        old = self._post_cache.get(post_id)
        if meta is None or old is None or old[1] is not None:
            self._post_cache[post_id] = (at, meta)

    def _clear_posts(self) -> None:
        self._post_cache.clear()
        self._posts_since = time.monotonic()

    def _deletion_reads(self, now: float) -> list[tuple]:
        """The read of the log of deleted posts when one is due (``DeletionFollower``)."""
        follower = self.deletions
        if not follower.due(now):
            return []
        if follower.last_id is None:
            return [self.cmd.deletions_head()]
        return self.cmd.deletions_after(follower.last_id, follower.batch)

    def _follow_deletions(self, replies: Sequence[Any], sent_at: float) -> None:
        """Mark the posts the log names deleted; clear the cache when it may miss some."""
        ids, posts = self.cmd.deletions(replies[0])
        if len(replies) == 1:  # the head: where to follow from
            self.deletions.start(ids, sent_at)
            self._clear_posts()
            return
        oldest, _ = self.cmd.deletions(replies[1])
        if self.deletions.advance(ids, oldest, sent_at):
            log.warning("the log of deleted posts was trimmed past this worker's place: "
                        "cleared its post cache")
            self._clear_posts()
        marked_at = time.monotonic()
        for pid in posts:
            self._post_cache[pid] = (marked_at, None)

    @staticmethod
    def _remember_read(table: dict[int, float], user_id: int, now_s: float) -> None:
        if len(table) >= 500_000:
            table.clear()
        table[user_id] = now_s

    def _record_read_durable(self, user_id: int, now_ms: int) -> None:
        """The durable last-read write, throttled per user, off the request path:
        written with the others of the next ``last_read_flush_s``."""
        now_s = now_ms / 1000
        if now_s - self._last_read_cassandra.get(user_id, 0.0) < self.config.last_read_cassandra_every_s:
            return
        self._remember_read(self._last_read_cassandra, user_id, now_s)
        self._durable_reads[user_id] = now_ms
        if self._durable_flush is None:
            self._durable_flush = asyncio.ensure_future(self._flush_reads_later())

    async def _flush_reads_later(self) -> None:
        await asyncio.sleep(self.config.last_read_flush_s)
        self._durable_flush = None
        await self.flush_reads()

    async def flush_reads(self) -> None:
        """Write the pending durable last reads now (a failure drops them: Redis has
        them too, and the next read of the hour writes again)."""
        if self._durable_flush is not None:  # called at shutdown: the timer's work is done here
            self._durable_flush.cancel()
            self._durable_flush = None
        pending, self._durable_reads = self._durable_reads, {}
        if pending:
            await self.cassandra_extra(
                lambda: self.cassandra.set_last_reads(list(pending.items())), None)

    # -- rebuild ------------------------------------------------------------------------

    def _may_rebuild(self, user_id: int) -> bool:
        """At most one rebuild per user per ``graph_cache_s``: a user whose followees
        have no posts keeps an empty feed, and must not pay a rebuild per read."""
        now = time.monotonic()
        if self._rebuilt.get(user_id, -1e18) > now - self.config.graph_cache_s:
            return False
        if len(self._rebuilt) >= 200_000:
            self._rebuilt.clear()
        self._rebuilt[user_id] = now
        return True

    async def _rebuild(self, user_id: int) -> bool:
        """Refill a cold or inactive user's Redis feed; whether anything was written."""
        try:
            entries = await asyncio.wait_for(self._rebuild_entries(user_id),
                                             self.config.rebuild_budget_s)
        except asyncio.TimeoutError:
            log.warning("feed rebuild of user %d exceeded %.0f ms; serving without it",
                        user_id, self.config.rebuild_budget_s * 1000)
            self._count("rebuild_timeouts")
            return False
        now_ms = _now_ms()
        commands = self.cmd.merge_feed(user_id, entries, self.config.feed_cap) if entries else []
        commands.append(self._last_read_script.command([self.keys.last_read(user_id)], [now_ms]))
        await self.pipeline(commands, {len(commands) - 1: self._last_read_script})
        self._remember_read(self._last_read_redis, user_id, now_ms / 1000)
        self._record_read_durable(user_id, now_ms)
        self._count("rebuilds")
        return bool(entries)

    async def _rebuild_entries(self, user_id: int) -> list[tuple[int, int]]:
        cfg = self.config
        per = cfg.rebuild_per_followee
        now = _now_ms()
        durable_task = asyncio.ensure_future(self.cassandra_extra(
            lambda: self.cassandra.feed_page(user_id, cfg.feed_cap, None, now), []))
        # The most recent follows (the cap bounds a rebuild whatever the account).
        (reply,) = await self.pipeline([
            ("ZRANGE", self.keys.following(user_id), -cfg.rebuild_followees, -1)])
        followees = self.cmd.ids(reply) or await self.cassandra_extra(
            lambda: self.cassandra.following(user_id, cfg.rebuild_followees), [])
        replies = await self.pipeline([self.cmd.timeline(f, None, per) for f in followees])
        sources = [self.cmd.entries(r) for r in replies]
        if followees and not any(sources):  # timelines not in Redis (lost cache): Cassandra's
            sources = await self.cassandra_extra(
                lambda: asyncio.gather(*(self.cassandra.timeline(f, per, now) for f in followees)),
                [])
        sources.append(await durable_task)
        return rebuild_entries(sources, cfg.feed_cap)
