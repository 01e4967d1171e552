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
import time
from typing import Any, Iterable, Mapping, Sequence, Union

import redis

from stores.redis.client import BatchLayout, chunks, new_client, register_batch_script
from domain.stories import (
    StoryPolicy,
    assemble_tray,
    publish_refusal,
    redis_expire_at_ms,
    story_created_at,
    story_expiry,
)
from schemas.events import STORY_TTL_MS, StoryEvent, StoryEventKind
from schemas.keys import KeyLayout
from schemas.stories import StoryMeta, TrayEntry

#: Outcome of a publish: written, or why not.
PUBLISHED, TOMBSTONED, EXPIRED, BEYOND_HORIZON = "published", "tombstoned", "expired", "beyond_horizon"
#: Outcome of a view: counted, or why not.
VIEWED, UNKNOWN, DELETED, LATE = "viewed", "unknown", "deleted", "late"

#: Operations of the story step (``_STORY_STEP``), one per event or removal.
_OP_PUBLISH, _OP_VIEW, _OP_DELETE, _OP_EXPIRE = "p", "v", "d", "x"
#: Operations per script call (each call runs atomically: this bounds how long
#: it holds the server).
_OPS_PER_CALL = 250

# -- Lua scripts ------------------------------------------------------------------

# Step 1 of a batch, on the stories' own keys, in event order. KEYS: story hash,
# viewers set per operation. ARGV: now ms, grace ms, then five per operation:
#   'p' author, created_at, expires_at, media ('' none): 1 written, 0 removed
#       before (a tombstone: nothing written), -1 expired at now;
#   'v' viewer, viewed_at: {status, author, expires_at}: status 1 counted, 0
#       unknown story, -1 deleted, -2 viewed at/after expiry, -3 expired (at
#       now, or removed);
#   'd' (delete) / 'x' (expiry) author, expires_at (used when the hash has
#       none): marks the hash removed ('deleted' wins over 'expired') so later
#       events of the batch are refused, keeps its viewers for step 2 and
#       returns {removed before or '', author, expires_at, viewers...}. Step 3
#       (_FINISH) turns the hash into a tombstone.
_STORY_STEP = """
local now, grace = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS / 2 do
  local hk, vk = KEYS[2 * i - 1], KEYS[2 * i]
  local j = 2 + (i - 1) * 5
  local kind, a, b, c, d = ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4], ARGV[j + 5]
  if kind == 'p' then
    if redis.call('HEXISTS', hk, 'removed') == 1 then
      out[i] = 0
    elseif tonumber(c) <= now then
      out[i] = -1
    else
      if d == '' then
        redis.call('HSET', hk, 'author_id', a, 'created_at', b, 'expires_at', c)
      else
        redis.call('HSET', hk, 'author_id', a, 'created_at', b, 'expires_at', c, 'media_type', d)
      end
      redis.call('PEXPIREAT', hk, tonumber(c) + grace)
      out[i] = 1
    end
  elseif kind == 'v' then
    local h = redis.call('HMGET', hk, 'author_id', 'expires_at', 'removed')
    if not h[2] then
      out[i] = {0}
    elseif h[3] == 'deleted' then
      out[i] = {-1, h[1], h[2]}
    else
      local expires = tonumber(h[2])
      if tonumber(b) >= expires then
        out[i] = {-2, h[1], h[2]}
      elseif h[3] or now >= expires then
        out[i] = {-3, h[1], h[2]}
      else
        redis.call('SADD', vk, a)
        redis.call('PEXPIREAT', vk, expires + grace)
        redis.call('HSET', hk, 'views', redis.call('SCARD', vk))
        out[i] = {1, h[1], h[2]}
      end
    end
  else
    local h = redis.call('HMGET', hk, 'author_id', 'expires_at', 'removed')
    local author, expires, before = h[1] or a, h[2] or b, h[3] or ''
    local how = 'expired'
    if kind == 'd' or before == 'deleted' then how = 'deleted' end
    if not h[2] then
      redis.call('HSET', hk, 'author_id', author, 'expires_at', expires, 'removed', how)
      redis.call('PEXPIREAT', hk, tonumber(expires) + grace)
    elseif before ~= how then
      redis.call('HSET', hk, 'removed', how)
    end
    local r = redis.call('SMEMBERS', vk)
    table.insert(r, 1, expires)
    table.insert(r, 1, author)
    table.insert(r, 1, before)
    out[i] = r
  end
end
return out
"""

# Step 2, on zsets scored by expires_at (authors' stories, viewers' seen
# stories). KEYS: the zsets. ARGV: now ms, grace ms, then per key: #adds,
# #removes, the adds as score/member pairs, the removed members. Adds go
# before removes: within a batch a story is removed only after its last
# accepted write. Then drops members expired at now and moves the key's expiry
# to its newest score + grace.
_ZSETS = """
local now, grace = ARGV[1], tonumber(ARGV[2])
local j = 3
for i = 1, #KEYS do
  local k = KEYS[i]
  local nadd, nrem = tonumber(ARGV[j]), tonumber(ARGV[j + 1])
  j = j + 2
  if nadd > 0 then
    redis.call('ZADD', k, unpack(ARGV, j, j + 2 * nadd - 1))
    j = j + 2 * nadd
  end
  if nrem > 0 then
    redis.call('ZREM', k, unpack(ARGV, j, j + nrem - 1))
    j = j + nrem
  end
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  local top = redis.call('ZREVRANGE', k, 0, 0, 'WITHSCORES')
  if top[2] then
    redis.call('PEXPIREAT', k, tonumber(top[2]) + grace)
  end
end
return #KEYS
"""

# Step 3 of a removal, after step 2 cleaned the satellites. KEYS: story hash,
# viewers set per removal. ARGV: grace ms, then per removal: how ('deleted' or
# 'expired'), author, expires_at. The hash becomes a tombstone (author, expiry,
# how it was removed: a delete stays a delete) that expires with the story +
# grace, so a replayed publish or view cannot bring it back even when the
# watermark ran ahead of the wall clock.
_FINISH = """
local grace = tonumber(ARGV[1])
for i = 1, #KEYS / 2 do
  local hk, vk = KEYS[2 * i - 1], KEYS[2 * i]
  local j = 1 + (i - 1) * 3
  local how, author, expires = ARGV[j + 1], ARGV[j + 2], ARGV[j + 3]
  if redis.call('HGET', hk, 'removed') == 'deleted' then how = 'deleted' end
  redis.call('DEL', vk, hk)
  redis.call('HSET', hk, 'author_id', author, 'expires_at', expires, 'removed', how)
  redis.call('PEXPIREAT', hk, tonumber(expires) + grace)
end
return #KEYS / 2
"""

_VIEW_STATUS = {1: VIEWED, 0: UNKNOWN, -1: DELETED, -2: LATE, -3: EXPIRED}
_PUBLISH_STATUS = {1: PUBLISHED, 0: TOMBSTONED, -1: EXPIRED}
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
    """What a removal found: how the story had been removed before if it was a
    tombstone (or marked for removal) already (``deleted`` or ``expired``, else
    None), the viewers whose seen entries it cleaned, and the author and expiry
    it used (the stored ones, else the caller's)."""

    removed_as: str | None
    viewers: tuple[int, ...]
    author_id: int
    expires_at: int

    @property
    def tombstoned(self) -> bool:
        return self.removed_as is not None


#: What ``RedisStoryStore.apply`` says about one event: a publish's status, a
#: ``ViewResult`` for a view, a ``Removal`` for a delete.
EventResult = Union[str, "ViewResult", Removal]


# -- helpers ------------------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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


def _unique(ids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(ids))


# -- Redis ------------------------------------------------------------------------


class RedisStoryStore:
    """Stories, viewers and seen sets in Redis (see module doc)."""

    def __init__(self, client: "redis.Redis", keys: KeyLayout, policy: StoryPolicy = StoryPolicy()):
        self.client = client
        self.keys = keys
        self.policy = policy
        # Each call spans many stories and users: split by hash slot on a cluster.
        self._story_step = register_batch_script(client, _STORY_STEP,
                                                 BatchLayout(2, 2, args_per_item=5))
        self._zsets = register_batch_script(client, _ZSETS,
                                            BatchLayout(2, 1, counted=(2, 1), reply="sum"))
        self._finish = register_batch_script(client, _FINISH,
                                             BatchLayout(1, 2, args_per_item=3, reply="sum"))

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

    # -- writes -------------------------------------------------------------------

    def apply(self, events: Sequence[StoryEvent], now_ms: int,
              fallback_expiry: Mapping[int, int] | None = None) -> list[EventResult]:
        """Apply story events in order, whatever their kinds, in at most three
        round trips (the module doc says which). One result per event: a
        publish's status (``published``, ``tombstoned``, ``expired`` or
        ``beyond_horizon``), a ``ViewResult`` per view, a ``Removal`` per delete.
        ``fallback_expiry`` (story id -> expires_at) is the tombstone's expiry of
        a deleted story this store does not hold (default: 24 h after the delete)."""
        fallback = fallback_expiry or {}
        ops: list[tuple] = []
        where: list[int | str] = []   # per event: its op's index, or a refusal
        for e in events:
            if e.kind is StoryEventKind.PUBLISHED:
                refusal = publish_refusal(e, now_ms, self.policy)
                if refusal is not None:
                    where.append(refusal)
                    continue
                media = "" if e.media_type is None else e.media_type.value
                ops.append((_OP_PUBLISH, e.story_id, e.author_id, story_created_at(e),
                            story_expiry(e), media))
            elif e.kind is StoryEventKind.VIEWED:
                ops.append((_OP_VIEW, e.story_id, e.viewer_id, e.event_time, "", ""))
            else:
                expires = fallback.get(e.story_id, e.event_time + STORY_TTL_MS)
                ops.append((_OP_DELETE, e.story_id, e.author_id, expires, "", ""))
            where.append(len(ops) - 1)
        results = self._run(ops, now_ms)
        return [w if isinstance(w, str) else results[w] for w in where]

    def publish(self, events: Sequence[StoryEvent], now_ms: int) -> list[str]:
        """Write PUBLISHED events (hash, then the author's index); one status per event:
        ``published``, ``tombstoned``, ``expired`` or ``beyond_horizon``."""
        return self.apply(events, now_ms)

    def record_views(self, events: Sequence[StoryEvent], now_ms: int) -> list[ViewResult]:
        """Apply VIEWED events: viewer set + count on the story, then the viewer's seen set."""
        return self.apply(events, now_ms)

    def remove_many(self, stories: Sequence[tuple[int, int, int]], deleted: bool,
                    now_ms: int) -> list[Removal]:
        """Remove stories given as ``(story_id, author_id, expires_at)`` (``deleted``:
        DELETED events; else their expiry), each leaving a tombstone hash until
        ``expires_at + grace`` (a delete's stays a delete); three round trips.
        ``author_id`` / ``expires_at`` are used when the hash does not say (the
        stored values win)."""
        kind = _OP_DELETE if deleted else _OP_EXPIRE
        return self._run([(kind, s, a, e, "", "") for s, a, e in stories], now_ms)

    def remove(self, story_id: int, author_id: int, expires_at: int, deleted: bool,
               now_ms: int | None = None) -> Removal:
        """``remove_many`` of one story."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        return self.remove_many([(story_id, author_id, expires_at)], deleted, now)[0]

    def _run(self, ops: Sequence[tuple], now_ms: int) -> list[Any]:
        """The three steps over ``ops`` (``_STORY_STEP`` operations): the story
        keys in order, then the zsets the accepted writes and the removals touch,
        then the removals' tombstones. A removal cleans its satellites before its
        hash becomes a tombstone, so a batch retried after a crash part-way still
        finds the viewers (step 1 keeps them until step 3)."""
        if not ops:
            return []
        keys, grace = self.keys, self.policy.grace_ms
        pipe = self._pipeline()
        for chunk in chunks(ops, _OPS_PER_CALL):
            call_keys: list[str] = []
            args: list[Any] = [now_ms, grace]
            for kind, story_id, a, b, c, d in chunk:
                call_keys += [keys.story(story_id), keys.story_viewers(story_id)]
                args += [kind, a, b, c, d]
            self._story_step(keys=call_keys, args=args, client=pipe)
        raw = [r for call in pipe.execute() for r in call]

        results: list[Any] = []
        zsets: dict[str, tuple[dict, list]] = {}
        finish: list[tuple[int, str, int, int]] = []
        for (kind, story_id, a, _, c, _), r in zip(ops, raw):
            if kind == _OP_PUBLISH:
                status = _PUBLISH_STATUS[int(r)]
                if status == PUBLISHED:
                    zsets.setdefault(keys.author_stories(a), ({}, []))[0][story_id] = c
                results.append(status)
            elif kind == _OP_VIEW:
                status = _VIEW_STATUS[int(r[0])]
                if status == UNKNOWN:
                    results.append(ViewResult(status))
                    continue
                author, expires = int(r[1]), int(r[2])
                if status == VIEWED:
                    zsets.setdefault(keys.seen_stories(a), ({}, []))[0][story_id] = expires
                results.append(ViewResult(status, author, expires))
            else:
                before = _text(r[0]) or None
                author, expires = int(r[1]), int(r[2])
                viewers = tuple(sorted(int(v) for v in r[3:]))
                for v in viewers:
                    zsets.setdefault(keys.seen_stories(v), ({}, []))[1].append(story_id)
                for owner in {author, a}:
                    zsets.setdefault(keys.author_stories(owner), ({}, []))[1].append(story_id)
                how = "deleted" if kind == _OP_DELETE or before == "deleted" else "expired"
                finish.append((story_id, how, author, expires))
                results.append(Removal(before, viewers, author, expires))
        if zsets:
            pipe = self._pipeline()
            self._update_zsets(pipe, zsets, now_ms)
            pipe.execute()
        if finish:
            pipe = self._pipeline()
            self._finish_removals(pipe, finish)
            pipe.execute()
        return results

    def _update_zsets(self, pipe, changes: Mapping[str, tuple[Mapping[int, int], Sequence[int]]],
                      now_ms: int) -> None:
        """``_ZSETS`` calls for ``changes``: zset key -> (member -> score to add,
        members to remove after the adds)."""
        entries = []
        step = 2 * _OPS_PER_CALL   # Lua's unpack takes a few thousand values at most
        for key, (adds, removes) in changes.items():
            flat = [x for member, score in adds.items() for x in (score, member)]
            entries += [(key, flat[i:i + step], ()) for i in range(0, len(flat), step)]
            entries += [(key, (), removes[i:i + step]) for i in range(0, len(removes), step)]
        for chunk in chunks(entries, _OPS_PER_CALL):
            args: list[Any] = [now_ms, self.policy.grace_ms]
            for _, adds, removes in chunk:
                args += [len(adds) // 2, len(removes), *adds, *removes]
            self._zsets(keys=[key for key, _, _ in chunk], args=args, client=pipe)

    def _finish_removals(self, pipe, removals: Sequence[tuple[int, str, int, int]]) -> None:
        """``_FINISH`` calls for ``(story_id, how, author_id, expires_at)``."""
        for chunk in chunks(removals, _OPS_PER_CALL):
            call_keys: list[str] = []
            args: list[Any] = [self.policy.grace_ms]
            for story_id, how, author, expires in chunk:
                call_keys += [self.keys.story(story_id), self.keys.story_viewers(story_id)]
                args += [how, author, expires]
            self._finish(keys=call_keys, args=args, client=pipe)

    def restore_deletions(self, deletions: Sequence[tuple[int, int, int]], now_ms: int) -> int:
        """Tombstones of deleted stories, ``(story_id, author_id, expires_at)`` as
        ``CassandraStoryStore.scan_deletions`` gives them, exactly as a delete
        leaves them (``feedbeam rebuild``); ones past ``expires_at + grace`` are
        skipped. Returns how many were written."""
        todo = [(s, a, e) for s, a, e in deletions
                if redis_expire_at_ms(e, self.policy) > now_ms]
        if todo:
            pipe = self._pipeline()
            changes: dict[str, tuple[dict, list]] = {}
            for story_id, author, _ in todo:
                changes.setdefault(self.keys.author_stories(author), ({}, []))[1].append(story_id)
            self._update_zsets(pipe, changes, now_ms)
            self._finish_removals(pipe, [(s, "deleted", a, e) for s, a, e in todo])
            pipe.execute()
        return len(todo)

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

    def held_expiries(self, story_ids: Sequence[int]) -> dict[int, int]:
        """``expires_at`` of each of ``story_ids`` whose hash holds one (a live story or
        its tombstone), one round trip: what a removal uses when given none."""
        if not story_ids:
            return {}
        pipe = self._pipeline()
        for sid in story_ids:
            pipe.hget(self.keys.story(sid), "expires_at")
        return {sid: int(v) for sid, v in zip(story_ids, pipe.execute()) if v is not None}

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
        changes: dict[str, tuple[dict, list]] = {}
        for viewer_id, story_id, expires_at in entries:
            changes.setdefault(self.keys.seen_stories(viewer_id), ({}, []))[0][story_id] = expires_at
        pipe = self._pipeline()
        self._update_zsets(pipe, changes, now_ms)
        pipe.execute()
