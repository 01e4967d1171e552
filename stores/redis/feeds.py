"""The Redis copy of feeds, timelines, posts and the social graph, for pipelines and serving.

``RedisFeedStore`` is the one place that reads and writes these keys of
``schemas.keys.KeyLayout``: the fan-out pipeline writes through it, rebuild and
serving read through it (``FeedCommands``: the same commands for the async
client). Every write is idempotent (versioned edges, post tombstones, sorted
sets, a last read that only moves forward); how: docs/architecture.md, "Stores".

    store = RedisFeedStore.from_url("redis://127.0.0.1:6379/0")
    store.push([7, 8], post_id=101, score_ms=1_700_000_000_000, cap=1000)
    store.feed(7, limit=20)  # [(101, 1700000000000)]
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypedDict

import orjson
import redis

from schemas.events import FollowEvent, FollowKind, PostEvent
from schemas.keys import KeyLayout
from stores.redis.client import chunks, new_client

log = logging.getLogger(__name__)

#: Keys per pipeline round trip (fan-out chunks, MGET batches).
DEFAULT_CHUNK = 1000

# -- Lua scripts ------------------------------------------------------------------
# Each touches the keys of one hash tag only (cluster-safe) and is atomic.

# KEYS[1] edge-version hash, KEYS[2] membership zset of the same user.
# ARGV: other user id, edge version, '1' follow / '0' unfollow, event time ms.
# Returns -1 if not newer than the stored version (no-op), else 1 when
# membership changed and 0 when it did not (e.g. a newer FOLLOW refreshing the score).
_APPLY_EDGE = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored and tonumber(stored) >= tonumber(ARGV[2]) then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  return redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS[1] post hash. ARGV: event time ms, then field/value pairs.
# Returns 0 (writes nothing) on a tombstone, 1 otherwise; an older create than
# the stored one is a no-op, so a stale replay cannot undo a newer rewrite.
_PUT_POST = """
if redis.call('HGET', KEYS[1], 'deleted') == '1' then
  return 0
end
local stored = redis.call('HGET', KEYS[1], 'event_time')
if stored and tonumber(stored) > tonumber(ARGV[1]) then
  return 1
end
redis.call('HSET', KEYS[1], 'event_time', ARGV[1], unpack(ARGV, 2))
return 1
"""

# KEYS[1] post hash. ARGV: delete event time ms, author_id, created_at (from the event).
# Replaces the hash by a tombstone that keeps what cleanup needs; returns the
# hash as it was before (flat field/value list). Re-applying gives the same hash.
_TOMBSTONE_POST = """
local before = redis.call('HGETALL', KEYS[1])
local author = redis.call('HGET', KEYS[1], 'author_id') or ARGV[2]
local created = redis.call('HGET', KEYS[1], 'created_at') or ARGV[3]
local deleted_at = ARGV[1]
local prev = redis.call('HGET', KEYS[1], 'deleted_at')
if prev and tonumber(prev) > tonumber(deleted_at) then
  deleted_at = prev
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'author_id', author, 'created_at', created,
           'deleted', '1', 'deleted_at', deleted_at)
return before
"""

# KEYS[1] last-read string. ARGV[1] time ms. Only moves forward.
_SET_LAST_READ = """
local stored = redis.call('GET', KEYS[1])
if stored and tonumber(stored) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] top-followers zset, KEYS[2] followers zset (same user). ARGV[1] n.
# The n most engaged members of KEYS[1] that still follow.
_TOP_FOLLOWERS = """
local n = tonumber(ARGV[1])
local out = {}
local batch = math.max(n * 2, 64)
local start = 0
while #out < n do
  local ids = redis.call('ZREVRANGE', KEYS[1], start, start + batch - 1)
  if #ids == 0 then break end
  for _, id in ipairs(ids) do
    if redis.call('ZSCORE', KEYS[2], id) then
      out[#out + 1] = id
      if #out >= n then break end
    end
  end
  start = start + batch
end
return out
"""

# KEYS: home feeds of many users. ARGV: post id, score, cap.
# ZADD the post to each feed and trim it to the newest cap entries. One call
# per chunk instead of two commands per feed: the fan-out's hot path is then
# bound by Redis itself, not by building and parsing thousands of replies in
# Python (measured about 8x faster for 200 feeds). The keys belong to
# different users, so this needs a standalone server (on a cluster, call it
# per hash slot).
_PUSH = """
local member, score, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, score, member)
  if redis.call('ZCARD', key) > cap then
    redis.call('ZREMRANGEBYRANK', key, 0, -cap - 1)
  end
end
return #KEYS
"""


# KEYS[1] top-followers zset, KEYS[2] its stamps hash (same user). ARGV[1] how many to
# keep, then (follower, score or '' to remove, stamp) triples. A triple applies only
# if its stamp is later than the follower's stored one; the zset is then trimmed to
# the highest ARGV[1] scores (their stamps leave with them). Returns how many applied.
_APPLY_ENGAGEMENT = """
local applied = 0
for i = 2, #ARGV, 3 do
  local stored = redis.call('HGET', KEYS[2], ARGV[i])
  if not stored or tonumber(stored) < tonumber(ARGV[i + 2]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
    if ARGV[i + 1] == '' then
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    end
    applied = applied + 1
  end
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  local gone = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return applied
"""


class PostMeta(TypedDict):
    """Post metadata as stored (hydration record)."""

    post_id: int
    author_id: int
    created_at: int
    media_type: str | None
    caption_length: int | None
    hashtags: tuple[str, ...]
    deleted: bool


# -- pure helpers (unit tested without Redis) ---------------------------------------


def edge_version(edge: FollowEvent) -> int:
    """Total order of the events of one edge: later event time wins, and at equal
    times an UNFOLLOW beats a FOLLOW (as a Cassandra tombstone beats a write of the
    same timestamp), so both stores agree whatever the arrival order."""
    return edge.event_time * 2 + (1 if edge.kind is FollowKind.UNFOLLOW else 0)


def post_fields(post: PostEvent) -> dict[str, str]:
    """The hash fields of a created post (event_time aside)."""
    return {
        "author_id": str(post.author_id),
        "created_at": str(post.created_at),
        "media_type": post.media_type.value,
        "caption_length": str(post.caption_length),
        "hashtags": json.dumps(list(post.hashtags), separators=(",", ":")),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def parse_post(post_id: int, fields: Mapping[bytes | str, bytes | str]) -> PostMeta | None:
    """A ``PostMeta`` from a post hash as Redis returns it; None for an empty hash."""
    if not fields:
        return None
    f = {_text(k): _text(v) for k, v in fields.items()}
    caption = f.get("caption_length")
    return PostMeta(
        post_id=post_id,
        author_id=int(f["author_id"]),
        created_at=int(f["created_at"]),
        media_type=f.get("media_type"),
        caption_length=None if caption is None else int(caption),
        hashtags=tuple(json.loads(f["hashtags"])) if "hashtags" in f else (),
        deleted=f.get("deleted") == "1",
    )


def post_meta_from_event(post: PostEvent) -> PostMeta:
    """What a post event itself says about its post."""
    return PostMeta(
        post_id=post.post_id, author_id=post.author_id, created_at=post.created_at,
        media_type=post.media_type.value, caption_length=post.caption_length,
        hashtags=tuple(post.hashtags), deleted=False)


def trim_stop(cap: int) -> int:
    """``ZREMRANGEBYRANK key 0 <stop>`` keeps the ``cap`` highest scores."""
    if cap < 1:
        raise ValueError("cap must be at least 1")
    return -(cap + 1)


def _ids_with_scores(pairs: Iterable[tuple[bytes, float]]) -> list[tuple[int, int]]:
    return [(int(member), int(score)) for member, score in pairs]


# -- the store ------------------------------------------------------------------


class RedisFeedStore:
    """Feeds, timelines, post metadata, graph and activity in Redis (see module doc)."""

    def __init__(self, client: "redis.Redis", keys: KeyLayout):
        self.client = client
        self.keys = keys
        self._apply_edge = client.register_script(_APPLY_EDGE)
        self._put_post = client.register_script(_PUT_POST)
        self._tombstone_post = client.register_script(_TOMBSTONE_POST)
        self._set_last_read = client.register_script(_SET_LAST_READ)
        self._top_followers = client.register_script(_TOP_FOLLOWERS)
        self._push = client.register_script(_PUSH)
        self._apply_engagement = client.register_script(_APPLY_ENGAGEMENT)

    @classmethod
    def from_url(cls, url: str, key_prefix: str = "fb") -> "RedisFeedStore":
        """A store on a new client for ``url`` (``new_client``)."""
        return cls(new_client(url), KeyLayout(key_prefix))

    def close(self) -> None:
        self.client.close()

    def _pipeline(self):
        return self.client.pipeline(transaction=False)

    # -- social graph -------------------------------------------------------------

    def apply_edges(self, edges: Sequence[FollowEvent]) -> list[bool]:
        """Apply follow/unfollow events, newest event time per edge winning.

        Two script calls per edge, one round trip in all: one on the followee's
        keys (``followers`` + its edge versions), one on the follower's
        (``following`` + its edge versions). Each side decides newer-wins on
        its own version, so both converge to the same edge state. Returns per
        edge whether the followee's follower set changed.
        """
        if not edges:
            return []
        k = self.keys
        pipe = self._pipeline()
        for e in edges:
            version = edge_version(e)
            follow = "1" if e.kind is FollowKind.FOLLOW else "0"
            self._apply_edge(keys=[k.follower_edges(e.followee_id), k.followers(e.followee_id)],
                             args=[e.follower_id, version, follow, e.event_time], client=pipe)
            self._apply_edge(keys=[k.following_edges(e.follower_id), k.following(e.follower_id)],
                             args=[e.followee_id, version, follow, e.event_time], client=pipe)
        results = pipe.execute()
        return [r == 1 for r in results[0::2]]

    def followers(self, user_id: int) -> list[int]:
        """Follower ids of ``user_id``, oldest follow first."""
        return [int(m) for m in self.client.zrange(self.keys.followers(user_id), 0, -1)]

    def iter_followers(self, user_id: int, batch_size: int = 10_000) -> Iterator[list[int]]:
        """Follower ids of ``user_id`` in batches, oldest first (for large accounts).

        Pages by rank, so an edge applied meanwhile can shift a follower into
        the next page twice or skip it; callers push idempotently.
        """
        key, start = self.keys.followers(user_id), 0
        while True:
            page = self.client.zrange(key, start, start + batch_size - 1)
            if not page:
                return
            yield [int(m) for m in page]
            start += batch_size

    def top_followers(self, user_id: int, n: int) -> list[int]:
        """The ``n`` followers of ``user_id`` most engaged with them, most engaged first.

        Ranked by ``set_follower_engagement`` scores; users who no longer
        follow are skipped. Empty until engagement was recorded.
        """
        if n < 1:
            return []
        ids = self._top_followers(keys=[self.keys.top_followers(user_id),
                                        self.keys.followers(user_id)], args=[n])
        return [int(m) for m in ids]

    def set_follower_engagement(self, user_id: int, scores: Mapping[int, float],
                                keep: int = 10_000) -> None:
        """Record engagement scores of (would-be) followers with ``user_id`` (absolute
        values, so idempotent), keeping the ``keep`` highest."""
        if not scores:
            return
        key = self.keys.top_followers(user_id)
        pipe = self._pipeline()
        pipe.zadd(key, {str(f): float(s) for f, s in scores.items()})
        pipe.zremrangebyrank(key, 0, trim_stop(keep))
        pipe.execute()

    def apply_follower_engagement(self, updates: Mapping[int, Mapping[int, tuple[float | None, int]]],
                                  keep: int = 10_000) -> int:
        """Newer-wins engagement scores: ``{user_id: {follower: (score or None, stamp)}}``.

        A follower's score changes only for a later ``stamp`` than the one its
        current score came from (None removes it from the ranking), so a replay
        of older scores never rolls the ranking back; each user keeps the
        ``keep`` highest. One script call per user, one round trip. Returns how
        many updates applied.
        """
        if not updates:
            return 0
        pipe = self._pipeline()
        for user_id, scores in updates.items():
            args: list[Any] = [keep]
            for follower, (score, stamp) in scores.items():
                args += [follower, "" if score is None else repr(float(score)), stamp]
            self._apply_engagement(keys=[self.keys.top_followers(user_id),
                                         self.keys.top_followers_stamps(user_id)],
                                   args=args, client=pipe)
        return sum(pipe.execute())

    def follower_count(self, user_id: int) -> int:
        return self.client.zcard(self.keys.followers(user_id))

    def follower_counts(self, user_ids: Sequence[int]) -> list[int]:
        """Follower count per user, one round trip."""
        pipe = self._pipeline()
        for uid in user_ids:
            pipe.zcard(self.keys.followers(uid))
        return pipe.execute() if user_ids else []

    def followers_many(self, user_ids: Sequence[int]) -> list[list[int]]:
        """``followers(u)`` for each user, one round trip."""
        pipe = self._pipeline()
        for uid in user_ids:
            pipe.zrange(self.keys.followers(uid), 0, -1)
        return [list(map(int, members)) for members in pipe.execute()] if user_ids else []

    def following(self, user_id: int) -> list[int]:
        """Ids ``user_id`` follows, oldest follow first."""
        return [int(m) for m in self.client.zrange(self.keys.following(user_id), 0, -1)]

    def following_edge_versions(self, user_id: int,
                                followees: Sequence[int]) -> dict[int, int | None]:
        """The applied ``edge_version`` of each ``user_id -> followee`` edge (None:
        never applied), as the follower's side of the graph holds it."""
        if not followees:
            return {}
        values = self.client.hmget(self.keys.following_edges(user_id), [str(f) for f in followees])
        return {f: None if v is None else int(v) for f, v in zip(followees, values)}

    # -- posts --------------------------------------------------------------------

    def put_post(self, post: PostEvent) -> bool:
        """Store a created post's metadata; False (nothing written) if it is tombstoned."""
        args: list[Any] = [post.event_time]
        for field, value in post_fields(post).items():
            args += [field, value]
        return self._put_post(keys=[self.keys.post(post.post_id)], args=args) == 1

    def put_posts(self, posts: Sequence[PostEvent]) -> list[bool]:
        """``put_post`` for many posts, one round trip; per post False if tombstoned."""
        pipe = self._pipeline()
        for post in posts:
            args: list[Any] = [post.event_time]
            for field, value in post_fields(post).items():
                args += [field, value]
            self._put_post(keys=[self.keys.post(post.post_id)], args=args, client=pipe)
        return [r == 1 for r in pipe.execute()] if posts else []

    def tombstone_post(self, post: PostEvent) -> PostMeta | None:
        """Mark ``post`` deleted forever (keeping author_id and created_at).

        Returns the metadata stored before, or what the DELETED event says when
        nothing was stored. A re-delivered delete returns it again, so a retried
        bundle redoes its cleanup (``deleted`` is then True). Never None in
        practice; the Optional is kept for callers written against it.
        """
        before = self._tombstone_post(
            keys=[self.keys.post(post.post_id)],
            args=[post.event_time, post.author_id, post.created_at])
        fields = dict(zip(before[0::2], before[1::2]))
        return parse_post(post.post_id, fields) or post_meta_from_event(post)

    def deleted(self, post_ids: Sequence[int]) -> list[bool]:
        """Per post id whether it is tombstoned, one round trip."""
        if not post_ids:
            return []
        pipe = self._pipeline()
        for pid in post_ids:
            pipe.hget(self.keys.post(pid), "deleted")
        return [v == b"1" for v in pipe.execute()]

    def posts(self, post_ids: Sequence[int]) -> list[PostMeta | None]:
        """Metadata per post id, one round trip; None for unknown or deleted posts."""
        if not post_ids:
            return []
        pipe = self._pipeline()
        for pid in post_ids:
            pipe.hgetall(self.keys.post(pid))
        out: list[PostMeta | None] = []
        for pid, fields in zip(post_ids, pipe.execute()):
            meta = parse_post(pid, fields)
            out.append(None if meta is None or meta["deleted"] else meta)
        return out

    # -- feeds and timelines ------------------------------------------------------

    def push(self, user_ids: Sequence[int], post_id: int, score_ms: int, cap: int,
             chunk_size: int = DEFAULT_CHUNK) -> int:
        """Add ``post_id`` to each user's home feed, keeping the newest ``cap``.

        One script call per ``chunk_size`` users (ZADD, and a trim by rank
        when the feed is over the cap). Returns the number of feeds written.
        """
        trim_stop(cap)  # validates cap
        home_feed = self.keys.home_feed
        for chunk in chunks(user_ids, chunk_size):
            self._push(keys=[home_feed(uid) for uid in chunk], args=[post_id, score_ms, cap])
        return len(user_ids)

    def push_posts(self, pushes: Sequence[tuple[Sequence[int], int, int]], cap: int,
                   chunk_size: int = DEFAULT_CHUNK) -> int:
        """``push(user_ids, post_id, score_ms)`` for each of ``pushes``, one round trip.

        Returns the number of feeds written.
        """
        trim_stop(cap)  # validates cap
        home_feed = self.keys.home_feed
        pipe = self._pipeline()
        written = 0
        for user_ids, post_id, score_ms in pushes:
            for chunk in chunks(user_ids, chunk_size):
                self._push(keys=[home_feed(uid) for uid in chunk], args=[post_id, score_ms, cap],
                           client=pipe)
            written += len(user_ids)
        if written:
            pipe.execute()
        return written

    def push_many(self, entries: Sequence[tuple[int, int, int]], cap: int,
                  chunk_size: int = DEFAULT_CHUNK) -> int:
        """Add ``(user_id, post_id, score_ms)`` entries, one ZADD + trim per user.

        Returns the number of entries written.
        """
        stop = trim_stop(cap)
        by_user: dict[int, dict[str, int]] = {}
        for uid, pid, score in entries:
            by_user.setdefault(uid, {})[str(pid)] = score
        for chunk in chunks(sorted(by_user), chunk_size):
            pipe = self._pipeline()
            for uid in chunk:
                key = self.keys.home_feed(uid)
                pipe.zadd(key, by_user[uid])
                pipe.zremrangebyrank(key, 0, stop)
            pipe.execute()
        return len(entries)

    def remove_from_feeds(self, user_ids: Sequence[int], post_ids: Sequence[int],
                          chunk_size: int = DEFAULT_CHUNK) -> None:
        """Remove every one of ``post_ids`` from each user's home feed."""
        if not post_ids:
            return
        members = [str(p) for p in post_ids]
        for chunk in chunks(user_ids, chunk_size):
            pipe = self._pipeline()
            for uid in chunk:
                pipe.zrem(self.keys.home_feed(uid), *members)
            pipe.execute()

    def merge_into_feed(self, user_id: int, entries: Sequence[tuple[int, int]], cap: int) -> None:
        """Add ``(post_id, score_ms)`` entries to one feed (e.g. a new follow's recent posts)."""
        if not entries:
            return
        key = self.keys.home_feed(user_id)
        pipe = self._pipeline()
        pipe.zadd(key, {str(pid): score for pid, score in entries})
        pipe.zremrangebyrank(key, 0, trim_stop(cap))
        pipe.execute()

    def feed(self, user_id: int, limit: int, max_score: float | None = None,
             exclusive: bool = False) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(post_id, score_ms)`` of the home feed, newest first.

        ``max_score`` bounds the scores (inclusive; ``exclusive=True`` for
        strictly below), for cursor pages.
        """
        if limit < 1:
            return []
        top = "+inf" if max_score is None else (f"({max_score}" if exclusive else max_score)
        pairs = self.client.zrevrangebyscore(self.keys.home_feed(user_id), top, "-inf",
                                             start=0, num=limit, withscores=True)
        return _ids_with_scores(pairs)

    def add_to_timeline(self, author_id: int, post_id: int, score_ms: int, cap: int) -> None:
        """Add a post to its author's timeline, keeping the newest ``cap``."""
        key = self.keys.author_timeline(author_id)
        pipe = self._pipeline()
        pipe.zadd(key, {str(post_id): score_ms})
        pipe.zremrangebyrank(key, 0, trim_stop(cap))
        pipe.execute()

    def add_to_timelines(self, entries: Sequence[tuple[int, int, int]], cap: int) -> None:
        """``add_to_timeline(author_id, post_id, score_ms)`` for each entry, one round trip."""
        stop = trim_stop(cap)
        pipe = self._pipeline()
        for author_id, post_id, score_ms in entries:
            key = self.keys.author_timeline(author_id)
            pipe.zadd(key, {str(post_id): score_ms})
            pipe.zremrangebyrank(key, 0, stop)
        if entries:
            pipe.execute()

    def remove_from_timeline(self, author_id: int, posts: Sequence[tuple[int, int]],
                             cap: int) -> None:
        """Move ``(post_id, created_at_ms)`` from the author's timeline to its
        deleted-posts set (newest ``cap`` kept), atomically (see ``timeline_deleted``)."""
        if not posts:
            return
        pipe = self.client.pipeline(transaction=True)
        pipe.zrem(self.keys.author_timeline(author_id), *[str(p) for p, _ in posts])
        deleted = self.keys.timeline_deleted(author_id)
        pipe.zadd(deleted, {str(p): c for p, c in posts})
        pipe.zremrangebyrank(deleted, 0, trim_stop(cap))
        pipe.execute()

    def timeline_and_deleted(self, author_id: int, limit: int) -> list[tuple[int, int]]:
        """The newest ``limit`` posts of the timeline and of its deleted set, read
        atomically; newest first. What an unfollow takes out of a feed."""
        if limit < 1:
            return []
        pipe = self.client.pipeline(transaction=True)
        pipe.zrevrange(self.keys.author_timeline(author_id), 0, limit - 1, withscores=True)
        pipe.zrevrange(self.keys.timeline_deleted(author_id), 0, limit - 1, withscores=True)
        live, deleted = pipe.execute()
        return sorted(set(_ids_with_scores(live)) | set(_ids_with_scores(deleted)),
                      key=lambda e: (-e[1], -e[0]))

    def timeline(self, author_id: int, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` ``(post_id, score_ms)`` of the author's timeline, newest first."""
        if limit < 1:
            return []
        pairs = self.client.zrevrange(self.keys.author_timeline(author_id), 0, limit - 1,
                                      withscores=True)
        return _ids_with_scores(pairs)

    # -- activity -----------------------------------------------------------------

    def set_last_read(self, user_id: int, at_ms: int) -> None:
        """Record a feed read at ``at_ms``; an older time than the stored one is a no-op."""
        self._set_last_read(keys=[self.keys.last_read(user_id)], args=[at_ms])

    def last_reads(self, user_ids: Sequence[int], chunk_size: int = DEFAULT_CHUNK) -> list[int | None]:
        """Last feed read (ms) per user, None if never recorded; MGET per chunk, one round trip."""
        if not user_ids:
            return []
        last_read = self.keys.last_read
        pipe = self._pipeline()
        for chunk in chunks(user_ids, chunk_size):
            pipe.mget([last_read(u) for u in chunk])
        return [None if v is None else int(v) for values in pipe.execute() for v in values]

    # -- tests and tools ----------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Every key under the layout's prefix with its value, deterministically.

        zsets become ``[(member, score), ...]`` sorted by member, hashes sorted
        dicts, sets sorted lists, strings ``str``. For tests comparing two runs.
        """
        keys = sorted(_text(k) for k in self.client.scan_iter(match=self.keys.pattern(), count=1000))
        if not keys:
            return {}
        pipe = self._pipeline()
        for key in keys:
            pipe.type(key)
        types = [_text(t) for t in pipe.execute()]
        pipe = self._pipeline()
        readers = {
            "string": lambda k: pipe.get(k),
            "hash": lambda k: pipe.hgetall(k),
            "zset": lambda k: pipe.zrange(k, 0, -1, withscores=True),
            "set": lambda k: pipe.smembers(k),
            "list": lambda k: pipe.lrange(k, 0, -1),
        }
        present = [(k, t) for k, t in zip(keys, types) if t in readers]  # "none": gone meanwhile
        unsupported = sorted({t for t in types if t not in readers and t != "none"})
        if unsupported:
            raise TypeError(f"dump() does not know Redis types {unsupported}")
        for key, kind in present:
            readers[kind](key)
        out: dict[str, Any] = {}
        for (key, kind), value in zip(present, pipe.execute()):
            if kind == "string":
                out[key] = _text(value)
            elif kind == "hash":
                out[key] = dict(sorted((_text(f), _text(v)) for f, v in value.items()))
            elif kind == "zset":
                out[key] = sorted((_text(m), s) for m, s in value)
            elif kind == "set":
                out[key] = sorted(_text(m) for m in value)
            else:
                out[key] = [_text(v) for v in value]
        return out


# -- commands for asynchronous readers (serving) -------------------------------------

#: Post hash fields serving hydrates, in the order ``FeedCommands.post`` asks for them.
POST_FIELDS: tuple[str, ...] = ("author_id", "created_at", "media_type", "caption_length",
                                "hashtags", "deleted")


def _pairs(flat: Sequence[bytes]) -> list[tuple[int, int]]:
    """``[(member, score)]`` from a flat WITHSCORES reply ``[m1, s1, m2, s2, ...]``."""
    return [(int(flat[i]), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]


class FeedCommands:
    """The reads (and the two writes) serving makes, as Redis command tuples plus
    the parsers of their replies, for a client that batches commands of many
    kinds into one pipelined round trip (``stores.redis.aio.AioRedis``).

    Same keys and encodings as ``RedisFeedStore``; the scripts are its scripts
    (``last_read_script`` for the client's ``register_script``).
    """

    last_read_script = _SET_LAST_READ

    def __init__(self, keys: KeyLayout):
        self.keys = keys

    def feed(self, user_id: int, max_ms: int | None, count: int) -> tuple:
        """Up to ``count`` home feed entries with score <= ``max_ms`` (all if None),
        newest first; parse with ``entries``."""
        top = "+inf" if max_ms is None else max_ms
        return ("ZREVRANGEBYSCORE", self.keys.home_feed(user_id), top, "-inf",
                "WITHSCORES", "LIMIT", 0, count)

    def timeline(self, author_id: int, max_ms: int | None, count: int) -> tuple:
        """The same over the author's timeline (celebrity pull); parse with ``entries``."""
        top = "+inf" if max_ms is None else max_ms
        return ("ZREVRANGEBYSCORE", self.keys.author_timeline(author_id), top, "-inf",
                "WITHSCORES", "LIMIT", 0, count)

    @staticmethod
    def entries(reply: Sequence[bytes]) -> list[tuple[int, int]]:
        """``[(post_id, score_ms)]`` of a ``feed``/``timeline`` reply."""
        return _pairs(reply)

    def feed_size(self, user_id: int) -> tuple:
        return ("ZCARD", self.keys.home_feed(user_id))

    def following(self, user_id: int) -> tuple:
        """Ids ``user_id`` follows (parse with ``ids``)."""
        return ("ZRANGE", self.keys.following(user_id), 0, -1)

    @staticmethod
    def ids(reply: Sequence[bytes]) -> list[int]:
        return [int(m) for m in reply]

    def follower_count(self, user_id: int) -> tuple:
        return ("ZCARD", self.keys.followers(user_id))

    def last_read(self, user_id: int) -> tuple:
        """When the user last read (parse with ``optional_int``)."""
        return ("GET", self.keys.last_read(user_id))

    @staticmethod
    def optional_int(reply: bytes | None) -> int | None:
        return None if reply is None else int(reply)

    def post(self, post_id: int) -> tuple:
        """The post's hash fields (parse with ``post_meta``)."""
        return ("HMGET", self.keys.post(post_id), *POST_FIELDS)

    @staticmethod
    def post_meta(post_id: int, reply: Sequence[bytes | None]) -> PostMeta | None:
        """``PostMeta`` of a ``post`` reply; None for an unknown or deleted post.

        The hot path of every feed read (a page hydrates ~20 posts), so it reads
        the fixed field order directly instead of going through ``parse_post``
        (same result: ``tests/unit/test_serving_logic.py``).
        """
        author, created, media, caption, hashtags, deleted = reply
        if author is None or created is None or deleted == b"1":
            return None
        return PostMeta(
            post_id=post_id, author_id=int(author), created_at=int(created),
            media_type=None if media is None else media.decode(),
            caption_length=None if caption is None else int(caption),
            hashtags=() if hashtags is None else tuple(orjson.loads(hashtags)),
            deleted=False)

    def merge_feed(self, user_id: int, entries: Sequence[tuple[int, int]], cap: int) -> list[tuple]:
        """A MULTI/EXEC batch that merges ``(post_id, score_ms)`` entries into the
        home feed through its staging key (ZUNIONSTORE with the live feed at
        EXEC time, so a push that landed meanwhile is kept), trimmed to ``cap``.
        For feed rebuilds of cold and inactive users."""
        staging, live = self.keys.home_feed_staging(user_id), self.keys.home_feed(user_id)
        batch: list[tuple] = [("MULTI",), ("DEL", staging)]
        if entries:
            batch.append(("ZADD", staging, *[x for pid, ms in entries for x in (ms, pid)]))
        batch += [("ZUNIONSTORE", staging, 2, staging, live, "AGGREGATE", "MAX"),
                  ("ZREMRANGEBYRANK", staging, 0, trim_stop(cap)),
                  ("RENAME", staging, live), ("EXEC",)]
        return batch
