"""Story tray and mark-seen, through the stories pipeline's store (``stores.redis.stories``).

That store is synchronous (redis-py, the Cassandra driver's blocking calls),
so its calls run on a small thread pool, each bounded by the request budget;
the Redis client it gets here has short timeouts and no retries, so a dead
Redis frees the thread quickly. Redis first, Cassandra when Redis fails (the
feed service's circuit breakers are shared, so an outage seen by the feed
path also sends trays straight to Cassandra). The viewer's followees come from
the feed service's cached graph.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable

import redis

from stores.redis.aio import RedisUnavailable
from stores.redis.client import ScriptSafeRedis
from stores.cassandra.stories import CassandraStoryStore
from stores.redis.stories import RedisStoryStore
from schemas.keys import KeyLayout
from schemas.stories import TrayEntry
from serving.feeds import FeedService, StoresUnavailable


class StoryNotFound(Exception):
    """The story is unknown, deleted or expired (HTTP 404)."""


def tray_json(entries: list[TrayEntry]) -> list[dict]:
    return [{"author_id": e.author_id, "unseen": e.unseen,
             "latest_created_at": e.latest_created_at,
             "stories": [dataclasses.asdict(s) for s in e.stories]} for e in entries]


class StoryService:
    """See the module doc."""

    def __init__(self, feeds: FeedService, threads: int = 4):
        cfg = feeds.config
        self.feeds = feeds
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="stories")
        # Script-safe pipelines: a Redis restart between loading a script and running
        # it retries the batch instead of failing the request.
        client = ScriptSafeRedis.from_url(cfg.redis_url, socket_timeout=cfg.redis_timeout_s * 4,
                                          socket_connect_timeout=cfg.redis_timeout_s * 4)
        self._redis = RedisStoryStore(client, KeyLayout(cfg.key_prefix))
        self._cassandra: CassandraStoryStore | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._redis.close()

    def _cassandra_store(self) -> CassandraStoryStore | None:
        store = self.feeds.cassandra.store
        if store is None:
            return None
        if self._cassandra is None:
            self._cassandra = CassandraStoryStore(store.session, store.keyspace)
        return self._cassandra

    async def _run(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn)

    async def _either(self, on_redis: Callable[[RedisStoryStore], Any],
                      on_cassandra: Callable[[CassandraStoryStore], Any]) -> tuple[Any, str]:
        feeds = self.feeds
        redis_error = "circuit open after repeated failures"
        if feeds.redis_breaker.allow():
            try:
                result = await self._run(lambda: on_redis(self._redis))
            except (redis.RedisError, RedisUnavailable) as exc:
                feeds.redis_breaker.failure()
                redis_error = f"{type(exc).__name__}: {exc}"
            else:
                feeds.redis_breaker.success()
                return result, "redis"
        store = self._cassandra_store()
        if store is None or not feeds.cassandra_breaker.allow():
            raise StoresUnavailable(f"Redis: {redis_error}; Cassandra: not available")
        try:
            result = await self._run(lambda: on_cassandra(store))
        except Exception as exc:  # the driver's errors have no common base; all mean "down" here
            feeds.cassandra_breaker.failure()
            raise StoresUnavailable(f"Redis: {redis_error}; Cassandra: {type(exc).__name__}: "
                                    f"{exc}") from None
        feeds.cassandra_breaker.success()
        return result, "cassandra"

    async def tray(self, user_id: int, limit: int) -> tuple[list[dict], str]:
        """The viewer's tray (unseen authors first) and where it came from."""
        followees = await self.feeds.followees(user_id)
        now = int(time.time() * 1000)
        entries, source = await self._either(
            lambda s: s.tray(user_id, followees, now, limit),
            lambda s: s.tray(user_id, followees, now, limit))
        return tray_json(entries), source

    async def mark_seen(self, user_id: int, story_id: int) -> str:
        """Record the view in both stores (either may be down); ``StoryNotFound``
        when the story is unknown, deleted or expired."""
        now = int(time.time() * 1000)
        written, source = await self._either(
            lambda s: s.mark_seen(user_id, story_id, now),
            lambda s: s.mark_seen(user_id, story_id, now))
        if not written:
            raise StoryNotFound(f"story {story_id} is unknown, deleted or expired")
        if source == "redis":
            store = self._cassandra_store()
            if store is not None:  # the durable copy too; best effort, Redis already has it
                try:
                    await self._run(lambda: store.mark_seen(user_id, story_id, now))
                except Exception:  # Cassandra down: the Redis seen set serves meanwhile
                    self.feeds.cassandra_breaker.failure()
        return source
