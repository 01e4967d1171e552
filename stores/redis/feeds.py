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

import functools
import itertools
import json
import logging
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence, TypedDict

import numpy as np
import orjson
import redis

from schemas.events import FollowEvent, FollowKind, PostEvent
from schemas.keys import KeyLayout
from stores.redis.client import (BatchLayout, ScriptSafeRedisCluster, chunks, new_client,
                                 register_batch_script)

log = logging.getLogger(__name__)

#: Keys per pipeline round trip (fan-out chunks, MGET batches).
DEFAULT_CHUNK = 1000
#: Entries the log of deleted posts keeps, about (``KeyLayout.deleted_posts``; one
#: per fan-out batch that deleted posts): a serving worker further behind than
#: that clears its post cache.
DELETION_LOG_ENTRIES = 100_000

# -- Lua scripts ------------------------------------------------------------------
# Each touches the keys of one hash tag only (cluster-safe) and is atomic.

# A follow edge is kept on both users' keys, each side deciding newer-wins on
# its own edge version, so both converge whatever the arrival order. Each side
# is one script call per chunk of edges: a loop of per-edge steps that each
# touch one user's keys (a cluster would call it per hash slot, see _PUSH).

# The followee side. KEYS, 6 per edge: edge versions, followers, timeline,
# deleted timeline, celebrity flag and unfollow counter of the followee. ARGV:
# the push threshold (0: leave the flag alone), the unfollow counter's time to
# live in seconds, then 6 per edge: follower id, edge version, '1' follow /
# '0' unfollow, event time ms, merge limit, removal cap. An unfollow that
# removes a follower counts up the counter (``KeyLayout.unfollowed``).
# Returns per edge {status, member, count, cross, entries}: status -1 not newer
# than the stored version (no-op), 1 membership changed, 0 applied without a
# change; member and count after the edge; cross 1 / -1 while a crossing of
# the threshold up / down is pending: the flag becomes '+' / '-' in the same
# step as the count crosses, and stays so until the caller has updated every
# follower's followed celebrities and made that durable (``settle_celebrities``
# sets '1' or deletes it), so a caller that crashed in between leaves the
# crossing to whoever applies the next edge (its replay); entries (flat member, score) read in the same
# atomic step: a follow that is a member gets the newest `merge limit` timeline
# posts (a push running beside it wrote its post to the timeline before it
# read the followers, so one of the two sees the other), an unfollow that is
# not a member the newest `removal cap` posts of the timeline and of its
# deleted set (a delete moves a post between the two atomically).
_EDGES_IN = """
local threshold, stamp_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
local k = 0
for i = 3, #ARGV, 6 do
  local f, follow = ARGV[i], ARGV[i + 2]
  local edges, followers = KEYS[k + 1], KEYS[k + 2]
  local status, member = -1, 0
  local stored = redis.call('HGET', edges, f)
  if not stored or tonumber(stored) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', edges, f, ARGV[i + 1])
    if follow == '1' then
      status, member = redis.call('ZADD', followers, ARGV[i + 3], f), 1
    else
      status = redis.call('ZREM', followers, f)
      if status == 1 then
        local counter = KEYS[k + 6]
        if redis.call('EXISTS', counter) == 0 then
          local now = redis.call('TIME')
          redis.call('SET', counter, now[1] .. string.format('%06d', tonumber(now[2])))
        end
        redis.call('INCR', counter)
        redis.call('EXPIRE', counter, stamp_ttl)
      end
    end
  elseif redis.call('ZSCORE', followers, f) then
    member = 1
  end
  local count = redis.call('ZCARD', followers)
  local cross = 0
  if threshold > 0 then
    local flag = redis.call('GET', KEYS[k + 5])
    if count >= threshold then
      if not flag or flag == '-' then
        redis.call('SET', KEYS[k + 5], '+')
        flag = '+'
      end
      if flag == '+' then cross = 1 end
    else
      if flag == '1' or flag == '+' then
        redis.call('SET', KEYS[k + 5], '-')
        flag = '-'
      end
      if flag == '-' then cross = -1 end
    end
  end
  local entries = {}
  local merge_limit, removal_cap = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  if member == 1 and follow == '1' and merge_limit > 0 then
    entries = redis.call('ZREVRANGE', KEYS[k + 3], 0, merge_limit - 1, 'WITHSCORES')
  elseif member == 0 and follow == '0' and removal_cap > 0 then
    entries = redis.call('ZREVRANGE', KEYS[k + 3], 0, removal_cap - 1, 'WITHSCORES')
    for _, v in ipairs(redis.call('ZREVRANGE', KEYS[k + 4], 0, removal_cap - 1, 'WITHSCORES')) do
      entries[#entries + 1] = v
    end
  end
  out[#out + 1] = {status, member, count, cross, entries}
  k = k + 6
end
return out
"""

# The follower side. KEYS, 3 per edge: edge versions, following and followed
# celebrities of the follower. ARGV, 5 per edge: followee id, edge version,
# '1' / '0', event time ms, and whether the followee is a celebrity ('1', '0',
# or '' when unknown). The followee is in the followed celebrities exactly when
# it is followed and a celebrity (an unknown one is only taken out on an
# unfollow). Returns per edge {status, follow time ms or false}.
_EDGES_OUT = """
local out = {}
local k = 0
for i = 1, #ARGV, 5 do
  local a = ARGV[i]
  local edges, following, celebs = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local status, since = -1, false
  local stored = redis.call('HGET', edges, a)
  if not stored or tonumber(stored) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', edges, a, ARGV[i + 1])
    if ARGV[i + 2] == '1' then
      status, since = redis.call('ZADD', following, ARGV[i + 3], a), ARGV[i + 3]
    else
      status = redis.call('ZREM', following, a)
    end
  else
    since = redis.call('ZSCORE', following, a)
  end
  local celeb = ARGV[i + 4]
  if since and celeb == '1' then
    redis.call('ZADD', celebs, since, a)
  elseif not since or celeb == '0' then
    redis.call('ZREM', celebs, a)
  end
  out[#out + 1] = {status, since or false}
  k = k + 3
end
return out
"""

# KEYS: celebrity flags. ARGV per key: '1' if the account is a celebrity. A
# pending crossing ('+' / '-') in that direction is settled ('1' / deleted);
# anything else (a crossing back meanwhile) is left for its own caller.
_SETTLE_CELEBRITIES = """
for i, key in ipairs(KEYS) do
  local flag = redis.call('GET', key)
  if ARGV[i] == '1' and flag == '+' then
    redis.call('SET', key, '1')
  elseif ARGV[i] == '0' and flag == '-' then
    redis.call('DEL', key)
  end
end
return #KEYS
"""

# KEYS: following and followed-celebrities sets, 2 per user. ARGV[1] an account,
# ARGV[2] '1' to add it where the user follows it (checked in the same step, so
# a concurrent unfollow cannot be undone) or '0' to remove it. Returns per user
# the follow time added, or false.
_SET_CELEBRITY = """
local a, add = ARGV[1], ARGV[2] == '1'
local out = {}
for i = 1, #KEYS, 2 do
  local since = false
  if add then
    since = redis.call('ZSCORE', KEYS[i], a) or false
    if since then
      redis.call('ZADD', KEYS[i + 1], since, a)
    end
  else
    redis.call('ZREM', KEYS[i + 1], a)
  end
  out[#out + 1] = since
end
return out
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

# The n most engaged members of a top-followers zset that still follow (the
# followers zset of the same user); shared by the scripts that pick targets.
_TOP_ENGAGED = """
local function top_engaged(top, followers, n)
  local out = {}
  local batch = math.max(n * 2, 64)
  local start = 0
  while #out < n do
    local ids = redis.call('ZREVRANGE', top, start, start + batch - 1)
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      if redis.call('ZSCORE', followers, id) then
        out[#out + 1] = id
        if #out >= n then break end
      end
    end
    start = start + batch
  end
  return out
end
"""

# KEYS[1] top-followers zset, KEYS[2] followers zset (same user). ARGV[1] n.
_TOP_FOLLOWERS = _TOP_ENGAGED + """
return top_engaged(KEYS[1], KEYS[2], tonumber(ARGV[1]))
"""

# New posts onto their authors' timelines, and whom to push them to, in one
# atomic step: a follow applied beside it either is among the followers read
# here or reads the timeline with the post on it. KEYS, 4 per post: timeline,
# followers, top followers and unfollow counter of the author. ARGV: push
# threshold, timeline cap, top N, then 3 per post: post id, created_at ms, '1'
# to return targets ('0' for a further post of an author already asked for).
# Returns per post {} or {1, counter, followers...} below the threshold, {0,
# counter, n_engaged, engaged..., oldest N...} at or above it; counter is the
# unfollow counter as read with the followers ('' when absent).
_ADD_TO_TIMELINES = _TOP_ENGAGED + """
local threshold, cap, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local k = 0
for i = 4, #ARGV, 3 do
  local timeline, followers = KEYS[k + 1], KEYS[k + 2]
  redis.call('ZADD', timeline, ARGV[i + 1], ARGV[i])
  if redis.call('ZCARD', timeline) > cap then
    redis.call('ZREMRANGEBYRANK', timeline, 0, -cap - 1)
  end
  local targets = {}
  if ARGV[i + 2] == '1' then
    local counter = redis.call('GET', KEYS[k + 4]) or ''
    if redis.call('ZCARD', followers) < threshold then
      targets = redis.call('ZRANGE', followers, 0, -1)
      table.insert(targets, 1, counter)
      table.insert(targets, 1, 1)
    else
      local engaged = n > 0 and top_engaged(KEYS[k + 3], followers, n) or {}
      targets = {0, counter, #engaged}
      for _, u in ipairs(engaged) do targets[#targets + 1] = u end
      if n > 0 then
        for _, u in ipairs(redis.call('ZRANGE', followers, 0, n - 1)) do
          targets[#targets + 1] = u
        end
      end
    end
  end
  out[#out + 1] = targets
  k = k + 4
end
return out
"""

# Deleted posts off their authors' timelines into the deleted sets (newest cap
# kept), and which feeds a push or merge could have reached, in one atomic
# step (an unfollow reads both sets at once, so it sees the post either way).
# KEYS, 4 per post: timeline, deleted timeline, followers, top followers.
# ARGV: cap, scope (oldest followers), top N, then 2 per post: post id,
# created_at ms. Returns per post {n_oldest, oldest..., engaged...}.
_REMOVE_FROM_TIMELINES = _TOP_ENGAGED + """
local cap, scope, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local k = 0
for i = 4, #ARGV, 2 do
  redis.call('ZREM', KEYS[k + 1], ARGV[i])
  redis.call('ZADD', KEYS[k + 2], ARGV[i + 1], ARGV[i])
  if redis.call('ZCARD', KEYS[k + 2]) > cap then
    redis.call('ZREMRANGEBYRANK', KEYS[k + 2], 0, -cap - 1)
  end
  local users = redis.call('ZRANGE', KEYS[k + 3], 0, scope - 1)
  table.insert(users, 1, #users)
  if n > 0 then
    for _, u in ipairs(top_engaged(KEYS[k + 4], KEYS[k + 3], n)) do
      users[#users + 1] = u
    end
  end
  out[#out + 1] = users
  k = k + 4
end
return out
"""

# KEYS: followers zsets. ARGV, per key: how many users, then the users.
# Returns per key the users that are not (or no longer) followers. One ZMSCORE
# per 4,000 users (unpack puts its values on Lua's stack, which has a limit).
_NOT_FOLLOWING = """
local out = {}
local j = 1
for _, key in ipairs(KEYS) do
  local gone = {}
  local n = tonumber(ARGV[j])
  for lo = j + 1, j + n, 4000 do
    local hi = math.min(lo + 3999, j + n)
    local scores = redis.call('ZMSCORE', key, unpack(ARGV, lo, hi))
    for x = 1, hi - lo + 1 do
      if not scores[x] then gone[#gone + 1] = ARGV[lo + x - 1] end
    end
  end
  out[#out + 1] = gone
  j = j + n + 1
end
return out
"""

# KEYS: home feeds of many users. ARGV: post id, score, cap.
# ZADD the post to each feed and trim it to the newest cap entries. One call
# per chunk instead of two commands per feed: the fan-out's hot path is then
# bound by Redis itself, not by building and parsing thousands of replies in
# Python (measured about 8x faster for 200 feeds). The keys belong to
# different users: on a Redis Cluster the call is split per hash slot
# (``stores.redis.client.BatchLayout``).
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

# KEYS: home feeds of many users. ARGV: cap, the batch's posts as one JSON list of
# strings [score, post id, score, post id, ...], then per key the indices (from 0)
# of its posts in that list, 4 bytes big-endian each. Each feed gets all its posts in one
# ZADD (2,000 at a time, as in _MERGE) and one trim: where feeds get several of
# a batch's posts each (a backlog), a ZADD and a ZCARD per feed instead of per
# post and feed. On a Redis Cluster the list would go to every slot's call, so
# there the pushes stay per post (``RedisFeedStore.push_posts``).
_PUSH_BY_FEED = """
local cap = tonumber(ARGV[1])
local posts = cjson.decode(ARGV[2])
local byte = string.byte
for n, key in ipairs(KEYS) do
  local indices = ARGV[n + 2]
  if #indices == 4 then
    local a, b, c, d = byte(indices, 1, 4)
    local i = 2 * (((a * 256 + b) * 256 + c) * 256 + d)
    redis.call('ZADD', key, posts[i + 1], posts[i + 2])
  else
    local entries, m = {}, 0
    for k = 1, #indices, 4 do
      local a, b, c, d = byte(indices, k, k + 3)
      local i = 2 * (((a * 256 + b) * 256 + c) * 256 + d)
      entries[m + 1], entries[m + 2] = posts[i + 1], posts[i + 2]
      m = m + 2
      if m == 4000 then
        redis.call('ZADD', key, unpack(entries))
        entries, m = {}, 0
      end
    end
    if m > 0 then
      redis.call('ZADD', key, unpack(entries))
    end
  end
  if redis.call('ZCARD', key) > cap then
    redis.call('ZREMRANGEBYRANK', key, 0, -cap - 1)
  end
end
return #KEYS
"""


# KEYS: home feeds of many users. ARGV: cap, then per key how many posts and
# that many (score, post id) pairs: each feed gets its posts and is trimmed to
# the newest cap (follow merges of a whole batch in one call). A ZADD per 2,000
# pairs (unpack's stack limit, as in _NOT_FOLLOWING).
_MERGE = """
local cap = tonumber(ARGV[1])
local j = 2
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[j])
  if n > 0 then
    for lo = j + 1, j + 2 * n, 4000 do
      redis.call('ZADD', key, unpack(ARGV, lo, math.min(lo + 3999, j + 2 * n)))
    end
    if redis.call('ZCARD', key) > cap then
      redis.call('ZREMRANGEBYRANK', key, 0, -cap - 1)
    end
  end
  j = j + 2 * n + 1
end
return #KEYS
"""

# KEYS: home feeds of many users. ARGV, per key: how many posts, then their
# ids, removed from that feed (unfollows and deletes of a whole batch).
_UNPUSH = """
local j = 1
local removed = 0
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[j])
  if n > 0 then
    removed = removed + redis.call('ZREM', key, unpack(ARGV, j + 1, j + n))
  end
  j = j + n + 1
end
return removed
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


def _posts_by_feed(user_lists: Sequence[Sequence[int]], min_posts: float
                   ) -> tuple[list[int], list[bytes]] | None:
    """The users of ``user_lists`` (one list per post), each once and in ascending
    order, and per user the indices of the lists it is in, ascending, each as 4
    bytes big-endian (``_PUSH_BY_FEED``); None when the users are in fewer than
    ``min_posts`` lists each on average (or in none)."""
    lengths = np.fromiter(map(len, user_lists), np.int64, len(user_lists))
    total = int(lengths.sum())
    if total == 0 or min_posts == float("inf"):
        return None
    users = np.fromiter(itertools.chain.from_iterable(user_lists), np.int64, total)
    order = np.argsort(users, kind="stable")  # a user's indices ascending
    users = users[order]
    first = np.ones(total, dtype=bool)  # the first entry of each user
    np.not_equal(users[1:], users[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    if total < min_posts * len(starts):
        return None
    packed = np.repeat(np.arange(len(user_lists), dtype=">u4"), lengths)[order].tobytes()
    bounds = (starts * 4).tolist() + [total * 4]
    return (users[starts].tolist(),
            [packed[lo:hi] for lo, hi in zip(bounds, itertools.islice(bounds, 1, None))])


def _ids_with_scores(pairs: Iterable[tuple[bytes, float]]) -> list[tuple[int, int]]:
    return [(int(member), int(score)) for member, score in pairs]


def _pairs(flat: Sequence) -> list[tuple[int, int]]:
    """``[(member, score)]`` from a flat WITHSCORES reply ``[m1, s1, m2, s2, ...]``."""
    return [(int(flat[i]), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]


class PushTargets(NamedTuple):
    """Whom an author's posts go to, as ``RedisFeedStore.add_posts_to_timelines`` reads it."""

    push: bool               # below the threshold: ``followers`` are every follower
    followers: list[int]     # every follower (push), else the most engaged who still follow
    oldest: list[int]        # at or above the threshold: the oldest followers
    unfollows: bytes = b""   # the author's unfollow counter read with them (b"": absent)


class EdgeState(NamedTuple):
    """The followee side of one applied edge event (``apply_followee_edges``)."""

    status: int                      # -1 not newer than the stored version, 1 changed, 0 not
    member: bool                     # the follower follows afterwards
    followers: int                   # the followee's follower count afterwards
    cross: int                       # 1 / -1: the count crossed the push threshold up / down
    entries: list[tuple[int, int]]   # (post_id, created_at) read with it (merge or removal)


# -- the store ------------------------------------------------------------------


#: Posts per feed, on average over a batch's feeds, from which ``push_posts`` writes
#: the batch feed by feed (``_PUSH_BY_FEED``) instead of post by post: grouping
#: costs this process a sort of the batch's targets, and pays only where a feed's
#: ZADD and trim are shared by several posts (docs/benchmarks.md, "Pushes grouped
#: by feed").
GROUP_PUSHES_FROM = 2.0

#: How long an author's unfollow counter outlives the last unfollow
#: (``KeyLayout.unfollowed``): far beyond any push's time between its two reads.
UNFOLLOWED_TTL_S = 86_400


class RedisFeedStore:
    """Feeds, timelines, post metadata, graph and activity in Redis (see module doc)."""

    def __init__(self, client: "redis.Redis", keys: KeyLayout,
                 group_pushes_from: float = GROUP_PUSHES_FROM):
        self.client = client
        self.keys = keys
        # A cluster gets the pushes post by post (see _PUSH_BY_FEED).
        self.group_pushes_from = (float("inf") if isinstance(client, ScriptSafeRedisCluster)
                                  else group_pushes_from)
        # The batch scripts take many users' keys per call; on a Redis Cluster their
        # calls are split by hash slot along these layouts (``BatchLayout``).
        batch = functools.partial(register_batch_script, client)
        self._edges_in = batch(_EDGES_IN, BatchLayout(2, 6, args_per_item=6))
        self._edges_out = batch(_EDGES_OUT, BatchLayout(0, 3, args_per_item=5))
        self._set_celebrity = batch(_SET_CELEBRITY, BatchLayout(2, 2))
        self._settle_celebrities = batch(_SETTLE_CELEBRITIES,
                                         BatchLayout(0, 1, args_per_item=1, reply="sum"))
        self._put_post = client.register_script(_PUT_POST)
        self._tombstone_post = client.register_script(_TOMBSTONE_POST)
        self._set_last_read = client.register_script(_SET_LAST_READ)
        self._top_followers = client.register_script(_TOP_FOLLOWERS)
        self._add_to_timelines = batch(_ADD_TO_TIMELINES, BatchLayout(3, 4, args_per_item=3))
        self._remove_from_timelines = batch(_REMOVE_FROM_TIMELINES,
                                            BatchLayout(3, 4, args_per_item=2))
        self._not_following = batch(_NOT_FOLLOWING, BatchLayout(0, 1, counted=(1,)))
        self._push = batch(_PUSH, BatchLayout(3, 1, reply="sum"))
        self._push_by_feed = batch(_PUSH_BY_FEED, BatchLayout(2, 1, args_per_item=1, reply="sum"))
        self._merge = batch(_MERGE, BatchLayout(1, 1, counted=(2,), reply="sum"))
        self._unpush = batch(_UNPUSH, BatchLayout(0, 1, counted=(1,), reply="sum"))
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

        Both sides of each edge (the followee's ``followers``, the follower's
        ``following``, each with its edge versions), one round trip in all;
        each side decides newer-wins on its own version, so both converge to
        the same edge state. Celebrity flags are left alone (the fan-out keeps
        them, ``apply_followee_edges``). Returns per edge whether the
        followee's follower set changed.
        """
        if not edges:
            return []
        pipe = self._pipeline()
        self._queue_edges_in(pipe, edges, [(0, 0)] * len(edges), 0, DEFAULT_CHUNK)
        self._queue_edges_out(pipe, edges, [None] * len(edges), DEFAULT_CHUNK)
        replies = pipe.execute()
        n_in = -(-len(edges) // DEFAULT_CHUNK)
        return [state[0] == 1 for reply in replies[:n_in] for state in reply]

    def apply_followee_edges(self, edges: Sequence[FollowEvent],
                             plans: Sequence[tuple[int, int]], push_threshold: int,
                             chunk_size: int = DEFAULT_CHUNK) -> list[EdgeState]:
        """The followee side of ``edges`` (its ``followers`` and edge versions), in order,
        one round trip; per edge its ``EdgeState``.

        ``plans[i]`` is ``(merge_limit, removal_cap)``: when the edge is a follow
        and a member afterwards, the newest ``merge_limit`` timeline posts come
        back with it; when an unfollow and not a member, the newest
        ``removal_cap`` posts of the timeline and of its deleted set (read in
        the same atomic step as the edge, see ``_EDGES_IN``). The followee's
        ``celebrity`` flag follows its count against ``push_threshold``.
        """
        if not edges:
            return []
        if len(plans) != len(edges):
            raise ValueError("edges and plans differ in length")
        pipe = self._pipeline()
        self._queue_edges_in(pipe, edges, plans, push_threshold, chunk_size)
        return [EdgeState(int(status), member == 1, int(count), int(cross),
                          _pairs(entries) if entries else [])
                for reply in pipe.execute()
                for status, member, count, cross, entries in reply]

    def apply_follower_edges(self, edges: Sequence[FollowEvent],
                             celebrity: Sequence[bool | None],
                             chunk_size: int = DEFAULT_CHUNK) -> list[int | None]:
        """The follower side of ``edges`` (its ``following``, edge versions and
        ``followed_celebrities``), one round trip.

        ``celebrity[i]``: whether the followee is at or above the push
        threshold (None: unknown, then the followee only leaves the set on an
        unfollow). Returns per edge the follow time (ms) the follower's
        ``following`` holds for the followee afterwards, None if it does not follow.
        """
        if not edges:
            return []
        pipe = self._pipeline()
        self._queue_edges_out(pipe, edges, celebrity, chunk_size)
        return [None if since is None else int(since)
                for reply in pipe.execute() for _, since in reply]

    def _queue_edges_in(self, pipe, edges, plans, push_threshold: int, chunk_size: int) -> None:
        k = self.keys
        for lo in range(0, len(edges), chunk_size):
            keys: list[str] = []
            args: list[Any] = [push_threshold, UNFOLLOWED_TTL_S]
            for e, (merge_limit, removal_cap) in zip(edges[lo:lo + chunk_size],
                                                     plans[lo:lo + chunk_size]):
                a = e.followee_id
                keys += [k.follower_edges(a), k.followers(a), k.author_timeline(a),
                         k.timeline_deleted(a), k.celebrity(a), k.unfollowed(a)]
                args += [e.follower_id, edge_version(e),
                         1 if e.kind is FollowKind.FOLLOW else 0, e.event_time,
                         merge_limit, removal_cap]
            self._edges_in(keys=keys, args=args, client=pipe)

    def _queue_edges_out(self, pipe, edges, celebrity, chunk_size: int) -> None:
        k = self.keys
        for lo in range(0, len(edges), chunk_size):
            keys: list[str] = []
            args: list[Any] = []
            for e, celeb in zip(edges[lo:lo + chunk_size], celebrity[lo:lo + chunk_size]):
                u = e.follower_id
                keys += [k.following_edges(u), k.following(u), k.followed_celebrities(u)]
                args += [e.followee_id, edge_version(e),
                         1 if e.kind is FollowKind.FOLLOW else 0, e.event_time,
                         "" if celeb is None else int(celeb)]
            self._edges_out(keys=keys, args=args, client=pipe)

    def set_followed_celebrity(self, celebrity_id: int, user_ids: Sequence[int], add: bool,
                               chunk_size: int = DEFAULT_CHUNK) -> list[int | None]:
        """Put ``celebrity_id`` into (``add``) or take it out of the followed celebrities
        of ``user_ids``, one round trip. An add applies only where the user follows it
        (checked atomically per user, so it never undoes a concurrent unfollow);
        returns per user the follow time added, or None."""
        if not user_ids:
            return []
        k = self.keys
        pipe = self._pipeline()
        for chunk in chunks(user_ids, chunk_size):
            keys = [key for u in chunk for key in (k.following(u), k.followed_celebrities(u))]
            self._set_celebrity(keys=keys, args=[celebrity_id, int(add)], client=pipe)
        return [None if since is None else int(since)
                for reply in pipe.execute() for since in reply]

    def celebrities(self, user_ids: Sequence[int], chunk_size: int = DEFAULT_CHUNK) -> list[bool]:
        """Per user whether its ``celebrity`` flag says it is at or above the push
        threshold (as of the last edge applied to it; a pending crossing counts as
        done), one round trip (MGET per chunk)."""
        if not user_ids:
            return []
        pipe = self._pipeline()
        for chunk in chunks(user_ids, chunk_size):
            pipe.mget([self.keys.celebrity(u) for u in chunk])
        return [v in (b"1", b"+") for values in pipe.execute() for v in values]

    def settle_celebrities(self, celebrity: Mapping[int, bool]) -> None:
        """Mark the pending threshold crossings of these accounts done (``True``: up,
        ``False``: down), once their followers' sets and the durable copy are
        written; a crossing back in the other direction meanwhile is left pending."""
        if not celebrity:
            return
        self._settle_celebrities(keys=[self.keys.celebrity(u) for u in celebrity],
                                 args=[int(c) for c in celebrity.values()])

    def followed_celebrities(self, user_ids: Sequence[int]) -> dict[int, list[int]]:
        """The accounts at or above the push threshold each user follows (the timelines
        its feed pulls), oldest follow first; one ZRANGE per user, one round trip."""
        pipe = self._pipeline()
        for u in user_ids:
            pipe.zrange(self.keys.followed_celebrities(u), 0, -1)
        return {u: [int(m) for m in members]
                for u, members in zip(user_ids, pipe.execute())} if user_ids else {}

    def restore_followed_celebrities(self, rows: Sequence[tuple[int, int, int]]) -> None:
        """Write back ``(user_id, celebrity_id, followed_at_ms)`` rows (``feedbeam
        rebuild``) and set each named celebrity's flag, one round trip; idempotent."""
        if not rows:
            return
        pipe = self._pipeline()
        for user, celebrity, followed_at in rows:
            pipe.zadd(self.keys.followed_celebrities(user), {str(celebrity): followed_at})
        for celebrity in sorted({c for _, c, _ in rows}):
            pipe.set(self.keys.celebrity(celebrity), "1", nx=True)
        pipe.execute()

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

    def celebrity_targets(self, user_ids: Sequence[int], n: int
                          ) -> dict[int, tuple[list[int], list[int]]]:
        """Per account ``(its n most engaged followers, its n oldest followers)``, one
        round trip: what ``domain.fanout.select_celebrity_targets`` picks the top N
        of an account at or above the threshold from."""
        if not user_ids or n < 1:
            return {u: ([], []) for u in user_ids}
        pipe = self._pipeline()
        for u in user_ids:
            self._top_followers(keys=[self.keys.top_followers(u), self.keys.followers(u)],
                                args=[n], client=pipe)
            pipe.zrange(self.keys.followers(u), 0, n - 1)
        replies = pipe.execute()
        return {u: ([int(m) for m in replies[2 * i]], [int(m) for m in replies[2 * i + 1]])
                for i, u in enumerate(user_ids)}

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
        return self.tombstone_posts([post])[0]

    def tombstone_posts(self, posts: Sequence[PostEvent]) -> list[PostMeta]:
        """``tombstone_post`` for many posts, one round trip; then one entry for them
        all in the log of deleted posts (``KeyLayout.deleted_posts``), a second.

        The log entry goes after the tombstones, never with them (a cluster
        pipeline reaches its nodes in any order): a serving worker that reads it
        marks the posts deleted in its cache, and a read of the post hash after
        that mark must find the tombstone. A re-delivered delete logs the posts
        again, which readers take as the same news.
        """
        if not posts:
            return []
        pipe = self._pipeline()
        for post in posts:
            self._tombstone_post(keys=[self.keys.post(post.post_id)],
                                 args=[post.event_time, post.author_id, post.created_at],
                                 client=pipe)
        befores = pipe.execute()
        self.client.xadd(self.keys.deleted_posts(),
                         {"posts": ",".join(str(post.post_id) for post in posts)},
                         maxlen=DELETION_LOG_ENTRIES, approximate=True)
        return [parse_post(post.post_id, dict(zip(before[0::2], before[1::2])))
                or post_meta_from_event(post)
                for post, before in zip(posts, befores)]

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

    def push_posts(self, pushes: Sequence[tuple[int, Sequence[int], int, int]], cap: int,
                   chunk_size: int = DEFAULT_CHUNK,
                   unfollows: Mapping[int, bytes] | None = None) -> list[list[int]]:
        """Push each ``(author_id, user_ids, post_id, score_ms)``, then read which of its
        users no longer follow the author.

        The read comes after the writes: an unfollow applied meanwhile may have
        cleaned its feed before the push landed, so the caller takes the post out
        of those feeds again. Given ``unfollows`` (per author its unfollow counter
        as ``add_posts_to_timelines`` read it with the followers), only the pushes
        of authors whose counter has moved since are checked: the counters cost
        one round trip for the batch, the check one member test per target.
        Where the batch's feeds get ``group_pushes_from`` posts each or more on
        average (a backlog), the posts are written feed by feed: one ZADD and one
        trim per feed (``_PUSH_BY_FEED``), else one per post and feed.

        Returns per push the users that left.
        """
        trim_stop(cap)  # validates cap
        pipe = self._pipeline()
        self._queue_pushes(pipe, pushes, cap, chunk_size)
        pipe.execute()
        authors = {author for author, user_ids, _, _ in pushes if user_ids}
        if unfollows is not None and authors:
            authors = self._unfollowed_since(authors, unfollows, chunk_size)
        checks = [(author, user_ids) for author, user_ids, _, _ in pushes
                  if user_ids and author in authors]
        if not checks:
            return [[] for _ in pushes]
        pipe = self._pipeline()
        for lo in range(0, len(checks), chunk_size):
            keys: list[str] = []
            args: list[Any] = []
            for author, user_ids in checks[lo:lo + chunk_size]:
                keys.append(self.keys.followers(author))
                args += [len(user_ids), *user_ids]
            self._not_following(keys=keys, args=args, client=pipe)
        gone = iter([[int(u) for u in users] for reply in pipe.execute() for users in reply])
        return [next(gone) if user_ids and author in authors else []
                for author, user_ids, _, _ in pushes]

    def _queue_pushes(self, pipe, pushes: Sequence[tuple[int, Sequence[int], int, int]],
                      cap: int, chunk_size: int) -> None:
        """Queue the writes of ``push_posts``: feed by feed where the batch's feeds get
        ``group_pushes_from`` posts each or more on average, else post by post."""
        home_feeds = self.keys.home_feeds
        by_feed = _posts_by_feed([user_ids for _, user_ids, _, _ in pushes],
                                 self.group_pushes_from)
        if by_feed is None:
            for _, user_ids, post_id, score_ms in pushes:
                for chunk in chunks(user_ids, chunk_size):
                    self._push(keys=home_feeds(chunk), args=[post_id, score_ms, cap],
                               client=pipe)
            return
        feeds, indices = by_feed
        posts = orjson.dumps([str(v) for _, _, post_id, score_ms in pushes
                              for v in (score_ms, post_id)])
        keys = home_feeds(feeds)
        for lo in range(0, len(keys), chunk_size):
            self._push_by_feed(keys=keys[lo:lo + chunk_size],
                               args=[cap, posts, *indices[lo:lo + chunk_size]], client=pipe)

    def _unfollowed_since(self, authors: set[int], unfollows: Mapping[int, bytes],
                          chunk_size: int) -> set[int]:
        """The ``authors`` whose unfollow counter is not the one in ``unfollows`` (or
        who are not in it)."""
        ordered = list(authors)
        pipe = self._pipeline()
        for chunk in chunks(ordered, chunk_size):
            pipe.mget([self.keys.unfollowed(a) for a in chunk])
        now = (value or b"" for reply in pipe.execute() for value in reply)
        return {a for a, value in zip(ordered, now) if unfollows.get(a) != value}

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

    def merge_into_feeds(self, merges: Sequence[tuple[int, Sequence[tuple[int, int]]]],
                         cap: int, chunk_size: int = DEFAULT_CHUNK) -> None:
        """``merge_into_feed(user_id, entries)`` for each ``(user_id, entries)``, one round
        trip (one script call per chunk of feeds)."""
        stop = trim_stop(cap)  # validates cap
        merges = [(u, entries) for u, entries in merges if entries]
        if not merges:
            return
        pipe = self._pipeline()
        for chunk in chunks(merges, chunk_size):
            args: list[Any] = [-stop - 1]
            for _, entries in chunk:
                args.append(len(entries))
                for post_id, score in entries:
                    args += [score, post_id]
            self._merge(keys=[self.keys.home_feed(u) for u, _ in chunk], args=args, client=pipe)
        pipe.execute()

    def remove_entries(self, removals: Sequence[tuple[int, Sequence[int]]],
                       chunk_size: int = DEFAULT_CHUNK) -> int:
        """Take ``post_ids`` out of the home feed of ``user_id`` for each ``(user_id,
        post_ids)``, one round trip; returns how many entries were there."""
        removals = [(u, posts) for u, posts in removals if posts]
        if not removals:
            return 0
        pipe = self._pipeline()
        for chunk in chunks(removals, chunk_size):
            args: list[Any] = []
            for _, post_ids in chunk:
                args += [len(post_ids), *post_ids]
            self._unpush(keys=[self.keys.home_feed(u) for u, _ in chunk], args=args, client=pipe)
        return sum(pipe.execute())

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

    def add_posts_to_timelines(self, posts: Sequence[tuple[int, int, int]], cap: int,
                               push_threshold: int, top_n: int,
                               chunk_size: int = DEFAULT_CHUNK) -> dict[int, PushTargets]:
        """Add each ``(author_id, post_id, created_at_ms)`` to its author's timeline (newest
        ``cap`` kept) and read whom each author's posts go to, atomically per chunk
        (``_ADD_TO_TIMELINES``), one round trip.

        Returns per author its ``PushTargets``: below ``push_threshold`` every
        follower (oldest first); at or above it the ``top_n`` most engaged who
        still follow and the ``top_n`` oldest followers (the caller picks with
        ``domain.fanout.select_celebrity_targets``).
        """
        if not posts:
            return {}
        k = self.keys
        pipe = self._pipeline()
        asked: dict[int, None] = {}  # authors in order, each asked once
        for chunk in chunks(posts, chunk_size):
            keys: list[str] = []
            args: list[Any] = [push_threshold, cap, top_n]
            for author, post_id, created_at in chunk:
                keys += [k.author_timeline(author), k.followers(author), k.top_followers(author),
                         k.unfollowed(author)]
                ask = author not in asked
                asked.setdefault(author)
                args += [post_id, created_at, int(ask)]
            self._add_to_timelines(keys=keys, args=args, client=pipe)
        replies = (r for reply in pipe.execute() for r in reply if r)
        out: dict[int, PushTargets] = {}
        for author, reply in zip(asked, replies):
            if reply[0] == 1:
                out[author] = PushTargets(True, [int(u) for u in reply[2:]], [], reply[1])
            else:
                cut = 3 + reply[2]
                out[author] = PushTargets(False, [int(u) for u in reply[3:cut]],
                                          [int(u) for u in reply[cut:]], reply[1])
        return out

    def remove_posts_from_timelines(self, posts: Sequence[tuple[int, int, int]], cap: int,
                                    scope: int, top_n: int,
                                    chunk_size: int = DEFAULT_CHUNK) -> list[list[int]]:
        """Move each ``(author_id, post_id, created_at_ms)`` from its author's timeline to
        the deleted set (newest ``cap`` kept) and read which feeds may hold it: the
        ``scope`` oldest followers, then the ``top_n`` most engaged who still follow
        and are not among them; one round trip (``_REMOVE_FROM_TIMELINES``)."""
        if not posts:
            return []
        k = self.keys
        pipe = self._pipeline()
        for chunk in chunks(posts, chunk_size):
            keys: list[str] = []
            args: list[Any] = [cap, scope, top_n]
            for author, post_id, created_at in chunk:
                keys += [k.author_timeline(author), k.timeline_deleted(author),
                         k.followers(author), k.top_followers(author)]
                args += [post_id, created_at]
            self._remove_from_timelines(keys=keys, args=args, client=pipe)
        out = []
        for reply in pipe.execute():
            for users in reply:
                oldest = [int(u) for u in users[1:1 + users[0]]]
                seen = set(oldest)
                out.append(oldest + [u for u in map(int, users[1 + users[0]:]) if u not in seen])
        return out

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
        pipe = self._pipeline()
        for chunk in chunks(user_ids, chunk_size):
            pipe.mget(self.keys.last_reads(chunk))
        return [None if v is None else int(v) for values in pipe.execute() for v in values]

    # -- tests and tools ----------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Every key under the layout's prefix with its value, deterministically, but
        the meta keys (``KeyLayout.generation``: tokens, not data).

        zsets become ``[(member, score), ...]`` sorted by member, hashes sorted
        dicts, sets sorted lists, strings ``str`` (``bytes`` when not UTF-8: the
        affinity records). For tests comparing two runs.
        """
        meta = self.keys.meta_pattern()[:-1]
        keys = sorted(k for k in map(_text, self.client.scan_iter(match=self.keys.pattern(),
                                                                  count=1000))
                      if not k.startswith(meta))
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
                try:
                    out[key] = _text(value)
                except UnicodeDecodeError:
                    out[key] = value
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

    def followed_celebrities(self, user_id: int, newest: int | None = None) -> tuple:
        """The accounts at or above the push threshold ``user_id`` follows, oldest follow
        first (parse with ``ids``): the timelines its feed pulls; only the ``newest``
        most recently followed when given (serving's bounded read)."""
        return ("ZRANGE", self.keys.followed_celebrities(user_id),
                0 if newest is None else -newest, -1)

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

    def deletions_head(self) -> tuple:
        """The newest entry of the log of deleted posts (where a reader starts)."""
        return ("XREVRANGE", self.keys.deleted_posts(), "+", "-", "COUNT", 1)

    def deletions_after(self, last_id: bytes, count: int) -> list[tuple]:
        """Up to ``count`` entries of the log of deleted posts after entry ``last_id``,
        and its oldest entry (which says whether it was trimmed past ``last_id``)."""
        key = self.keys.deleted_posts()
        return [("XRANGE", key, b"(" + last_id, "+", "COUNT", count),
                ("XRANGE", key, "-", "+", "COUNT", 1)]

    @staticmethod
    def deletions(reply: Sequence[Any]) -> tuple[list[bytes], list[int]]:
        """The entry ids and the post ids of an ``XRANGE``/``XREVRANGE`` reply over
        the log of deleted posts."""
        ids, posts = [], []
        for entry_id, fields in reply:
            ids.append(entry_id)
            for name, value in zip(fields[0::2], fields[1::2]):
                if name == b"posts" and value:
                    posts += map(int, value.split(b","))
        return ids, posts

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
