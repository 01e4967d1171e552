"""Story tray and mark-seen on the async clients, bounded per request whatever the account.

Reads the stories pipeline's keys (``schemas.keys``: author story indexes, story
hashes, seen sets) through the feed service's Redis client and breakers,
Cassandra when Redis fails. A tray page reads the story indexes of at most
``tray_followees`` followees (most recent follows first, by followee id while
Redis fails; ``next_cursor`` goes on with the next ones). A story can be marked seen only by its author or a
follower of its author; any other story id is a 404 that does not say whether
it exists. Design: docs/serving.md, "Stories".
"""
from __future__ import annotations

import time
from typing import Sequence

from domain.stories import StoryPolicy, assemble_tray, redis_expire_at_ms
from stores.redis.aio import pack_command
from stores.redis.stories import parse_story
from schemas.stories import StoryMeta, TrayEntry
from serving.feeds import FeedService
from serving.logic import TrayCursor

#: Story ids read per author's index (an author has a few dozen live at most).
PER_AUTHOR = 50
#: Seen-set entries read per tray (the viewer's seen stories of the last day).
MAX_SEEN = 5000


class StoryNotFound(Exception):
    """The story is unknown, deleted, expired or not visible to the caller (HTTP 404)."""


def tray_json(entries: list[TrayEntry]) -> list[dict]:
    # Field by field: dataclasses.asdict deep-copies, and cost more than the reads.
    return [{"author_id": e.author_id, "unseen": e.unseen,
             "latest_created_at": e.latest_created_at,
             "stories": [{"story_id": s.story_id, "created_at": s.created_at,
                          "expires_at": s.expires_at, "media_type": s.media_type,
                          "seen": s.seen} for s in e.stories]} for e in entries]


def _hash(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """A flat ``HGETALL`` reply as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def _tray(followees: list[int], by_author: dict[int, list[StoryMeta]], seen: set[int],
          now: int, limit: int) -> list[TrayEntry]:
    """``assemble_tray`` over the followees that have stories only (it skips the
    others anyway, after a sort each: most of a tray's cost when most have none)."""
    return assemble_tray([a for a in followees if a in by_author], by_author, seen, now, limit)


class StoryService:
    """See the module doc. Shares the feed service's clients, breakers and limits."""

    def __init__(self, feeds: FeedService, policy: StoryPolicy = StoryPolicy()):
        self.feeds = feeds
        self.keys = feeds.keys
        self.policy = policy
        self.page = feeds.config.tray_followees
        self._index_commands: dict[int, bytes] = {}  # author -> packed index read
        self._stories: dict[int, tuple[float, StoryMeta | None]] = {}  # story -> (read at, meta)

    async def tray(self, user_id: int, limit: int,
                   cursor: TrayCursor | None) -> tuple[list[dict], str, TrayCursor | None]:
        """One tray page (unseen authors first among this page's followees), the
        store it came from, and the cursor of the next page (None at the end)."""
        start = 0 if cursor is None else cursor.offset
        # One more than the page says whether there is a next one.
        followees, _ = await self.feeds.followees_page(user_id, start, self.page + 1)
        more = len(followees) > self.page
        followees = followees[:self.page]
        now = int(time.time() * 1000)
        entries, source = await self.feeds.with_fallback(
            lambda: self._tray_redis(user_id, followees, now, limit),
            lambda: self._tray_cassandra(user_id, followees, now, limit))
        return tray_json(entries), source, TrayCursor(user_id, start + self.page) if more else None

    async def _tray_redis(self, user_id: int, followees: list[int], now: int,
                          limit: int) -> tuple[list[TrayEntry], str]:
        """One round trip: the seen set with each followee's newest story ids
        (scored by expiry: the expired ones are dropped here, whatever the expiry
        pipeline's lag); a second only for story hashes not read lately (a
        story's metadata never changes, and a removed one leaves its author's
        index, so a cached copy cannot bring it back; a tombstone or a missing
        hash is skipped)."""
        packed = self._index_commands
        if len(packed) + len(followees) >= 500_000:
            packed.clear()
        commands: list = [("ZRANGEBYSCORE", self.keys.seen_stories(user_id), f"({now}", "+inf",
                           "LIMIT", 0, MAX_SEEN)]
        for a in followees:
            command = packed.get(a)
            if command is None:  # constant per author: pack it once
                command = packed[a] = pack_command(
                    ("ZREVRANGE", self.keys.author_stories(a), 0, PER_AUTHOR - 1, "WITHSCORES"))
            commands.append(command)
        seen_reply, *indexes = await self.feeds.pipeline(commands)
        ids = [int(flat[i]) for flat in indexes for i in range(0, len(flat), 2)
               if float(flat[i + 1]) > now]
        metas = await self._story_metas(ids)
        by_author: dict[int, list[StoryMeta]] = {}
        for story in metas:
            if story is not None:
                by_author.setdefault(story.author_id, []).append(story)
        seen = {int(m) for m in seen_reply}
        return _tray(followees, by_author, seen, now, limit), "redis"

    async def _story_metas(self, ids: list[int]) -> list[StoryMeta | None]:
        now_s = time.time()
        max_age = self.feeds.config.post_cache_chrono_s
        cache = self._stories
        out: list[StoryMeta | None] = [None] * len(ids)
        wanted = []
        for i, sid in enumerate(ids):
            hit = cache.get(sid)
            if hit is not None and now_s - hit[0] < max_age:
                out[i] = hit[1]
            else:
                wanted.append(i)
        if wanted:
            hashes = await self.feeds.pipeline([("HGETALL", self.keys.story(ids[i])) for i in wanted])
            if len(cache) + len(wanted) >= 200_000:
                cache.clear()
            for i, flat in zip(wanted, hashes):
                out[i] = parse_story(ids[i], _hash(flat))
                cache[ids[i]] = (now_s, out[i])
        return out

    async def _tray_cassandra(self, user_id: int, followees: list[int], now: int,
                              limit: int) -> tuple[list[TrayEntry], str]:
        cassandra = self.feeds.cassandra
        seen = await cassandra.seen(user_id, now, MAX_SEEN)
        by_author = await cassandra.active_stories(followees, now, PER_AUTHOR)
        return _tray(followees, by_author, seen, now, limit), "cassandra"

    async def mark_seen(self, user_id: int, story_id: int) -> str:
        """Record the view in the viewer's seen set (Redis, else Cassandra; the
        durable copy too, off the request path) and say which store took it.
        ``StoryNotFound`` unless the story is active and the viewer is its author
        or follows its author: the same answer whether or not it exists."""
        now = int(time.time() * 1000)
        source = await self.feeds.with_fallback(
            lambda: self._seen_redis(user_id, story_id, now),
            lambda: self._seen_cassandra(user_id, story_id, now))
        return source

    def _not_found(self, story_id: int) -> StoryNotFound:
        return StoryNotFound(f"story {story_id} not found")

    async def _seen_redis(self, user_id: int, story_id: int, now: int) -> str:
        feeds = self.feeds
        (flat,) = await feeds.pipeline([("HGETALL", self.keys.story(story_id))])
        story = parse_story(story_id, _hash(flat))
        if story is None or not story.active(now):
            raise self._not_found(story_id)
        if story.author_id != user_id:
            (since,) = await feeds.pipeline([("ZSCORE", self.keys.following(user_id),
                                              story.author_id)])
            if since is None:
                raise self._not_found(story_id)
        # The stories pipeline's seen-set rule (sorted by expiry, expired members
        # dropped, the key outliving its newest member by the grace) as one MULTI;
        # NX then GT: PEXPIREAT sets a first expiry and only ever extends it.
        key, expire_at = self.keys.seen_stories(user_id), redis_expire_at_ms(story.expires_at,
                                                                            self.policy)
        await feeds.pipeline([("MULTI",), ("ZADD", key, story.expires_at, story_id),
                              ("ZREMRANGEBYSCORE", key, "-inf", now),
                              ("PEXPIREAT", key, expire_at, "NX"),
                              ("PEXPIREAT", key, expire_at, "GT"), ("EXEC",)])
        feeds.spawn(feeds.cassandra_extra(
            lambda: feeds.cassandra.put_seen(user_id, story, now, self.policy), None))
        return "redis"

    async def _seen_cassandra(self, user_id: int, story_id: int, now: int) -> str:
        cassandra = self.feeds.cassandra
        story = await cassandra.story(story_id)
        if story is None or not story.active(now):
            raise self._not_found(story_id)
        if story.author_id != user_id and not await cassandra.follows(user_id, story.author_id):
            raise self._not_found(story_id)
        await cassandra.put_seen(user_id, story, now, self.policy)
        return "cassandra"
