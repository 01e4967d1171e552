"""Story state in Redis (hot), for the stories pipeline and serving.

``RedisStoryStore`` keeps each story's hash (metadata and ``views``, or a
tombstone once removed), its viewer set, the author's active stories and each
viewer's seen stories, each key expiring a grace period after the newest
expiry it holds. Its read side matches ``CassandraStoryStore``'s
(``stores.cassandra.stories``); the stories pipeline writes through
``stores.stories.StoryWriter``. Layout, read-time expiry filtering and
idempotence: ``docs/pipelines/stories.md``.

    store = RedisStoryStore.from_url("redis://127.0.0.1:6379/0")
    store.tray(7, followee_ids=[3, 4], now_ms=now, limit=20)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import redis

from stores.redis.client import new_client
from domain.stories import (
    StoryPolicy,
    assemble_tray,
    publish_refusal,
    redis_expire_at_ms,
    story_created_at,
    story_expiry,
)
from schemas.events import StoryEvent
from schemas.keys import KeyLayout
from schemas.stories import StoryMeta, TrayEntry

#: Outcome of a publish: written, or why not.
PUBLISHED, TOMBSTONED, EXPIRED, BEYOND_HORIZON = "published", "tombstoned", "expired", "beyond_horizon"
#: Outcome of a view: counted, or why not.
VIEWED, UNKNOWN, DELETED, LATE = "viewed", "unknown", "deleted", "late"

# -- Lua scripts ------------------------------------------------------------------

# KEYS[1] story hash. ARGV: now ms, expires_at ms, PEXPIREAT ms, then field/value pairs.
# 0 removed before (deleted or expired: nothing written), -1 expired at now, 1 written.
_PUBLISH = """
if redis.call('HEXISTS', KEYS[1], 'removed') == 1 then
  return 0
end
if tonumber(ARGV[2]) <= tonumber(ARGV[1]) then
  return -1
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return 1
"""

# KEYS[1] a zset scored by expires_at (author's stories, viewer's seen stories).
# ARGV: member, expires_at ms, grace ms, now ms. Adds the member, drops members
# expired at now, and moves the key's expiry to its newest score + grace.
_ZADD_EXPIRING = """
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if top[2] then
  redis.call('PEXPIREAT', KEYS[1], tonumber(top[2]) + tonumber(ARGV[3]))
end
return 1
"""

# KEYS[1] story hash, KEYS[2] viewers set. ARGV: viewer id, viewed_at ms, now ms, grace ms.
# Returns {status, author_id, expires_at}: status 1 counted, 0 unknown story,
# -1 deleted, -2 viewed at/after expiry (event time), -3 expired (at now, or removed).
_VIEW = """
local h = redis.call('HMGET', KEYS[1], 'author_id', 'expires_at', 'removed')
if not h[2] then return {0, 0, 0} end
if h[3] == 'deleted' then return {-1, h[1], h[2]} end
local expires = tonumber(h[2])
if tonumber(ARGV[2]) >= expires then return {-2, h[1], h[2]} end
if h[3] or tonumber(ARGV[3]) >= expires then return {-3, h[1], h[2]} end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIREAT', KEYS[2], expires + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'views', redis.call('SCARD', KEYS[2]))
return {1, h[1], h[2]}
"""

# KEYS[1] story hash, KEYS[2] viewers set. ARGV: 'deleted' or 'expired',
# author id, expires_at ms, PEXPIREAT ms. The last step of a removal: the hash
# becomes a tombstone (author, expiry, how it was removed) that expires with
# the story + grace, so a replayed publish or view cannot bring it back even
# when the watermark ran ahead of the wall clock. A delete stays a delete.
_FINISH_REMOVAL = """
redis.call('DEL', KEYS[2])
local how = ARGV[1]
if redis.call('HGET', KEYS[1], 'removed') == 'deleted' then
  how = 'deleted'
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'author_id', ARGV[2], 'expires_at', ARGV[3], 'removed', how)
redis.call('PEXPIREAT', KEYS[1], ARGV[4])
return 1
"""

_VIEW_STATUS = {1: VIEWED, 0: UNKNOWN, -1: DELETED, -2: LATE, -3: EXPIRED}
_STORY_FIELDS = ("author_id", "created_at", "expires_at", "media_type", "views", "removed")


# -- records ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ViewResult:
    """What happened to one VIEWED event: ``status`` is ``viewed`` (counted) or why
    not (``unknown``, ``deleted``, ``late``: viewed at/after expiry, ``expired``:
    expired by the time it was applied). ``author_id`` / ``expires_at`` are the
    story's, when known."""

    status: str
    author_id: int | None = None
    expires_at: int | None = None

    @property
    def counted(self) -> bool:
        return self.status == VIEWED


@dataclasses.dataclass(frozen=True, slots=True)
class Removal:
    """What a removal found: the story as stored (None if unknown or a tombstone),
    how it was removed before if it was a tombstone already (``deleted`` or
    ``expired``, else None), the viewers whose seen entries it cleaned, and the
    author and expiry it used (the stored ones, else the caller's)."""

    story: StoryMeta | None
    removed_as: str | None
    viewers: tuple[int, ...]
    author_id: int
    expires_at: int

    @property
    def tombstoned(self) -> bool:
        return self.removed_as is not None


# -- helpers ------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def parse_story(story_id: int, fields: Mapping[Any, Any] | Sequence[Any]) -> StoryMeta | None:
    """A ``StoryMeta`` from a story hash (HGETALL dict, or HMGET of ``_STORY_FIELDS``);
    None when missing or a tombstone."""
    if not isinstance(fields, Mapping):
        fields = dict(zip(_STORY_FIELDS, fields))
    f = {_text(k): _text(v) for k, v in fields.items() if v is not None}
    if "removed" in f or "expires_at" not in f or "created_at" not in f:
        return None
    return StoryMeta(story_id=story_id, author_id=int(f["author_id"]),
                     created_at=int(f["created_at"]), expires_at=int(f["expires_at"]),
                     media_type=f.get("media_type") or None, views=int(f.get("views", 0)))


def story_fields(event: StoryEvent) -> dict[str, str]:
    """The hash fields a PUBLISHED event writes (``views`` is kept by views)."""
    out = {"author_id": str(event.author_id), "created_at": str(story_created_at(event)),
           "expires_at": str(story_expiry(event))}
    if event.media_type is not None:
        out["media_type"] = event.media_type.value
    return out


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


# -- Redis ------------------------------------------------------------------------


class RedisStoryStore:
    """Stories, viewers and seen sets in Redis (see module doc)."""

    def __init__(self, client: "redis.Redis", keys: KeyLayout, policy: StoryPolicy = StoryPolicy()):
        self.client = client
        self.keys = keys
        self.policy = policy
        self._publish, self._zadd_expiring, self._view, self._finish_removal = (
            client.register_script(src) for src in (_PUBLISH, _ZADD_EXPIRING, _VIEW,
                                                    _FINISH_REMOVAL))

    @classmethod
    def from_url(cls, url: str, key_prefix: str = "fb",
                 policy: StoryPolicy = StoryPolicy()) -> "RedisStoryStore":
        """A store on a new client for ``url`` (``stores.redis.client.new_client``)."""
        client = new_client(url)
        return cls(client, KeyLayout(key_prefix), policy)

    def close(self) -> None:
        self.client.close()

    def _pipeline(self):
        return self.client.pipeline(transaction=False)

    def _add_expiring(self, pipe, key: str, member: int, expires_at: int, now_ms: int) -> None:
        self._zadd_expiring(keys=[key], args=[member, expires_at, self.policy.grace_ms, now_ms],
                            client=pipe)

    # -- writes -------------------------------------------------------------------

    def publish(self, events: Sequence[StoryEvent], now_ms: int) -> list[str]:
        """Write PUBLISHED events (hash, then the author's index); one status per event:
        ``published``, ``tombstoned``, ``expired`` or ``beyond_horizon``."""
        statuses: list[str | None] = [publish_refusal(e, now_ms, self.policy) for e in events]
        todo = [(i, e) for i, e in enumerate(events) if statuses[i] is None]
        if todo:
            pipe = self._pipeline()
            for _, e in todo:
                args: list[Any] = [now_ms, story_expiry(e),
                                   redis_expire_at_ms(story_expiry(e), self.policy)]
                for field, value in story_fields(e).items():
                    args += [field, value]
                self._publish(keys=[self.keys.story(e.story_id)], args=args, client=pipe)
            results = pipe.execute()
            pipe = self._pipeline()
            for (i, e), r in zip(todo, results):
                statuses[i] = {1: PUBLISHED, 0: TOMBSTONED}.get(r, EXPIRED)
                if r == 1:
                    self._add_expiring(pipe, self.keys.author_stories(e.author_id), e.story_id,
                                       story_expiry(e), now_ms)
            pipe.execute()
        return [s for s in statuses if s is not None]

    def record_views(self, events: Sequence[StoryEvent], now_ms: int) -> list[ViewResult]:
        """Apply VIEWED events: viewer set + count on the story, then the viewer's seen set."""
        if not events:
            return []
        pipe = self._pipeline()
        for e in events:
            self._view(keys=[self.keys.story(e.story_id), self.keys.story_viewers(e.story_id)],
                       args=[e.viewer_id, e.event_time, now_ms, self.policy.grace_ms], client=pipe)
        out = []
        pipe2 = self._pipeline()
        for e, (status, author, expires) in zip(events, pipe.execute()):
            status = _VIEW_STATUS[int(status)]
            if status == UNKNOWN:
                out.append(ViewResult(status))
                continue
            out.append(ViewResult(status, int(author), int(expires)))
            if status == VIEWED:
                self._add_expiring(pipe2, self.keys.seen_stories(e.viewer_id), e.story_id,
                                   int(expires), now_ms)
        pipe2.execute()
        return out

    def remove(self, story_id: int, author_id: int, expires_at: int, deleted: bool) -> Removal:
        """Remove a story (``deleted``: a DELETED event; else its expiry), leaving a
        tombstone hash until ``expires_at + grace`` (a delete's stays a delete).
        ``author_id`` / ``expires_at`` are used when the hash does not say (the
        stored values win)."""
        pipe = self._pipeline()
        pipe.hgetall(self.keys.story(story_id))
        pipe.smembers(self.keys.story_viewers(story_id))
        fields, members = pipe.execute()
        fields = {_text(k): _text(v) for k, v in fields.items()}
        story = parse_story(story_id, fields)
        author = int(fields.get("author_id", author_id))
        expires = int(fields.get("expires_at", expires_at))
        viewers = tuple(sorted(int(m) for m in members))
        pipe = self._pipeline()
        for v in viewers:
            pipe.zrem(self.keys.seen_stories(v), story_id)
        pipe.zrem(self.keys.author_stories(author), story_id)
        if author != author_id:
            pipe.zrem(self.keys.author_stories(author_id), story_id)
        self._finish_removal(
            keys=[self.keys.story(story_id), self.keys.story_viewers(story_id)],
            args=["deleted" if deleted else "expired", author, expires,
                  redis_expire_at_ms(expires, self.policy)], client=pipe)
        pipe.execute()
        return Removal(story, fields.get("removed"), viewers, author, expires)

    def restore_deletions(self, deletions: Sequence[tuple[int, int, int]], now_ms: int) -> int:
        """Tombstones of deleted stories, ``(story_id, author_id, expires_at)`` as
        ``CassandraStoryStore.scan_deletions`` gives them, exactly as ``remove``
        leaves them (``feedbeam rebuild``); ones past ``expires_at + grace`` are
        skipped. Returns how many were written."""
        pipe = self._pipeline()
        n = 0
        for story_id, author, expires in deletions:
            expire_at = redis_expire_at_ms(expires, self.policy)
            if expire_at <= now_ms:
                continue
            pipe.zrem(self.keys.author_stories(author), story_id)
            self._finish_removal(
                keys=[self.keys.story(story_id), self.keys.story_viewers(story_id)],
                args=["deleted", author, expires, expire_at], client=pipe)
            n += 1
        if n:
            pipe.execute()
        return n

    # -- reads --------------------------------------------------------------------

    def stories(self, story_ids: Sequence[int]) -> list[StoryMeta | None]:
        """Metadata per story id, one round trip; None for unknown or deleted
        (expired ones are returned: check ``StoryMeta.active``)."""
        if not story_ids:
            return []
        pipe = self._pipeline()
        for sid in story_ids:
            pipe.hmget(self.keys.story(sid), _STORY_FIELDS)
        return [parse_story(sid, f) for sid, f in zip(story_ids, pipe.execute())]

    def story(self, story_id: int) -> StoryMeta | None:
        return self.stories([story_id])[0]

    def _active_ids(self, pipe, key: str, now_ms: int) -> None:
        pipe.zrangebyscore(key, f"({now_ms}", "+inf")

    def active_stories(self, author_id: int, now_ms: int) -> list[StoryMeta]:
        """The author's stories still active at ``now_ms``, oldest first."""
        return self._active_by_author([author_id], now_ms)[0].get(author_id, [])

    def _active_by_author(self, authors: Sequence[int], now_ms: int, seen_of: int | None = None
                          ) -> tuple[dict[int, list[StoryMeta]], set[int]]:
        """Active stories per author (only authors with some), and the active seen
        set of viewer ``seen_of`` read in the same round trip; then one more for
        the story hashes (a story whose hash is gone or tombstoned is skipped)."""
        pipe = self._pipeline()
        if seen_of is not None:
            self._active_ids(pipe, self.keys.seen_stories(seen_of), now_ms)
        for a in authors:
            self._active_ids(pipe, self.keys.author_stories(a), now_ms)
        results = pipe.execute()
        seen = {int(m) for m in results.pop(0)} if seen_of is not None else set()
        ids = {a: [int(m) for m in members] for a, members in zip(authors, results)}
        flat = [sid for a in authors for sid in ids[a]]
        metas = dict(zip(flat, self.stories(flat)))
        out: dict[int, list[StoryMeta]] = {}
        for a in authors:
            live = [metas[s] for s in ids[a] if metas[s] is not None and metas[s].active(now_ms)]
            if live:
                out[a] = sorted(live, key=lambda s: (s.created_at, s.story_id))
        return out, seen

    def viewers(self, story_id: int) -> list[int]:
        """Unique viewers of the story (empty once it is removed)."""
        return sorted(int(m) for m in self.client.smembers(self.keys.story_viewers(story_id)))

    def seen(self, viewer_id: int, now_ms: int) -> set[int]:
        """Ids of the still-active stories ``viewer_id`` has seen."""
        return self._active_by_author([], now_ms, seen_of=viewer_id)[1]

    def tray(self, viewer_id: int, followee_ids: Sequence[int], now_ms: int,
             limit: int) -> list[TrayEntry]:
        """The viewer's story tray (``domain.stories.assemble_tray``) in two round
        trips: the seen set with the followees' indexes, then the story hashes."""
        if limit < 1:
            return []
        followees = _unique(followee_ids)
        by_author, seen = self._active_by_author(followees, now_ms, seen_of=viewer_id)
        return assemble_tray(followees, by_author, seen, now_ms, limit)

    def mark_seen(self, viewer_id: int, story_id: int, now_ms: int) -> bool:
        """Record that the viewer saw the story; False (nothing written) when the
        story is unknown, deleted or expired at ``now_ms``."""
        story = self.story(story_id)
        if story is None or not story.active(now_ms):
            return False
        self.add_seen([(viewer_id, story_id, story.expires_at)], now_ms)
        return True

    def add_seen(self, entries: Sequence[tuple[int, int, int]], now_ms: int) -> None:
        """Put ``(viewer_id, story_id, expires_at)`` entries in the viewers' seen sets
        (one round trip; the caller knows the stories are active: ``mark_seen``, and
        ``feedbeam rebuild`` for the stories it has just republished)."""
        if not entries:
            return
        pipe = self._pipeline()
        for viewer_id, story_id, expires_at in entries:
            self._add_expiring(pipe, self.keys.seen_stories(viewer_id), story_id, expires_at,
                               now_ms)
        pipe.execute()
