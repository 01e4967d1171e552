"""The online side of the social features (``domain.social_features``): facts in Redis,
features computed from them when a feed is ranked.

The features pipeline records, per batch of engagement events, who first viewed
and who first engaged with each post and when (``SocialFacts.apply``), and
keeps the decayed sums behind the author prior and the viewer's community
affinity. The ranking job reads them for a batch of candidates in one round
trip and computes ``SOCIAL_FEATURES`` as of its clock (``SocialReader.rows``),
with the same formulas ``SocialState`` uses offline, so a model trained on the
replayed features scores the online ones. Keys: ``schemas.keys.KeyLayout``
(``post_engagers``, ``post_viewers``, ``author_social``, ``viewer_social``, ``social_totals``);
design and limits: docs/ranking.md, "Online".

    facts = SocialFacts(client, KeyLayout("fb"))
    facts.apply(kinds, times, viewers, posts, authors)     # domain.features kind codes
    SocialReader(client, KeyLayout("fb")).rows([7], np.zeros(2, int), posts, authors,
                                               created_at, now_ms, community)
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from domain.features import COMMENT, LIKE, SAVE, SHARE, VIEW
from domain.social_features import (
    DAY_MS,
    SOCIAL_FEATURES,
    SocialParams,
    author_prior,
    community_affinity,
    decayed,
    smoothed_rate,
)
from schemas.keys import KeyLayout
from stores.redis.client import chunks

#: Facts per script call.
DEFAULT_CHUNK = 500

# KEYS[1] a post's firsts. ARGV[1] key TTL ms, then (viewer, time ms) pairs. Keeps each
# viewer's earliest time; returns per pair 1 when the viewer is new to the set, else 0
# (a replayed or repeated event, or a later one of the same viewer).
_FIRSTS = """
local out = {}
for i = 2, #ARGV, 2 do
  local old = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if old then
    if tonumber(ARGV[i + 1]) < tonumber(old) then
      redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    end
    out[#out + 1] = 0
  else
    redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
    out[#out + 1] = 1
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return out
"""

# KEYS[1] a hash of decayed sums, each field "<sum>@<as of ms>". ARGV[1] key TTL ms,
# ARGV[2] half-life ms, then (field, weight, time ms) triples: the sum decayed to the
# later of its time and the event's, plus the weight decayed likewise (what
# domain.social_features._Decayed.add does).
_ADD_DECAYED = """
local hl = tonumber(ARGV[2])
for i = 3, #ARGV, 3 do
  local w, t = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local v, at = 0, t
  local stored = redis.call('HGET', KEYS[1], ARGV[i])
  if stored then
    local sep = string.find(stored, '@', 1, true)
    v = tonumber(string.sub(stored, 1, sep - 1))
    at = tonumber(string.sub(stored, sep + 1))
  end
  if t >= at then
    v = v * 2 ^ (-(t - at) / hl) + w
    at = t
  else
    v = v + w * 2 ^ (-(at - t) / hl)
  end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g@%d', v, at))
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

_ENGAGING = np.array([LIKE, COMMENT, SHARE, SAVE])


@dataclasses.dataclass(frozen=True)
class SocialRetention:
    """How long the facts stay in Redis after their last write: a post's firsts
    (``post_ms``; a candidate older than that reads as never seen), the author and
    viewer sums (``sums_ms``)."""

    post_ms: int = 2 * DAY_MS
    sums_ms: int = 30 * DAY_MS


class SocialFacts:
    """Writes the facts of engagement events (see the module doc)."""

    def __init__(self, client, keys: KeyLayout, params: SocialParams = SocialParams(),
                 retention: SocialRetention = SocialRetention(), chunk_size: int = DEFAULT_CHUNK):
        self.client = client
        self.keys = keys
        self.params = params
        self.retention = retention
        self.chunk_size = chunk_size
        self._firsts = client.register_script(_FIRSTS)
        self._add = client.register_script(_ADD_DECAYED)

    def apply(self, kind: np.ndarray, t: np.ndarray, viewer: np.ndarray, post: np.ndarray,
              author: np.ndarray) -> int:
        """Record the first views and first engagements among these events (kind codes of
        ``domain.features``; other kinds and events without a post are left out), then add
        the new ones to the decayed sums: two round trips. Returns the new firsts.

        Idempotent per fact: a replayed event is no first, so it adds nothing. A batch
        whose first round trip landed and whose second did not (a crash between them)
        leaves its firsts out of the sums; the features it feeds are estimates, and the
        next events of the same authors and viewers carry on from there.
        """
        kind, t = np.asarray(kind), np.asarray(t, np.int64)
        engaged = np.isin(kind, _ENGAGING)
        rows = np.flatnonzero((engaged | (kind == VIEW)) & (np.asarray(post) >= 0))
        if not len(rows):
            return 0
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p, e in zip(rows.tolist(), np.asarray(post)[rows].tolist(),
                           engaged[rows].tolist()):
            groups.setdefault((p, e), []).append(i)
        viewer_l, t_l, author_l = (np.asarray(viewer).tolist(), t.tolist(),
                                   np.asarray(author).tolist())
        pipe = self.client.pipeline(transaction=False)
        calls: list[list[int]] = []
        for (p, e), members in groups.items():
            key = (self.keys.post_engagers if e else self.keys.post_viewers)(p)
            for part in chunks(members, self.chunk_size):
                args: list = [self.retention.post_ms]
                for i in part:
                    args += [viewer_l[i], t_l[i]]
                self._firsts(keys=[key], args=args, client=pipe)
                calls.append(list(part))
        new = [i for part, flags in zip(calls, pipe.execute())
               for i, flag in zip(part, flags) if flag]
        if new:
            self._add_sums(new, engaged, viewer_l, t_l, author_l)
        return len(new)

    def _add_sums(self, new: list[int], engaged: np.ndarray, viewer: list, t: list,
                  author: list) -> None:
        by_author: dict[int, list] = {}
        by_viewer: dict[int, list] = {}
        counts = {"engaged": 0, "views": 0}
        for i in new:
            if engaged[i]:
                by_author.setdefault(author[i], []).extend(("e", 1, t[i]))
                by_viewer.setdefault(viewer[i], []).extend((author[i], 1, t[i]))
                counts["engaged"] += 1
            else:
                by_author.setdefault(author[i], []).extend(("v", 1, t[i]))
                counts["views"] += 1
        head = [self.retention.sums_ms, self.params.half_life_ms]
        pipe = self.client.pipeline(transaction=False)
        for key_of, table in ((self.keys.author_social, by_author),
                              (self.keys.viewer_social, by_viewer)):
            for entity, triples in table.items():
                for lo in range(0, len(triples), 3 * self.chunk_size):
                    self._add(keys=[key_of(entity)], args=head + triples[lo:lo + 3 * self.chunk_size],
                              client=pipe)
        for field, n in counts.items():
            if n:
                pipe.hincrby(self.keys.social_totals(), field, n)
        pipe.execute()


def _split(stored: bytes) -> tuple[float, int]:
    value, _, at = stored.partition(b"@")
    return float(value), int(at)


class SocialReader:
    """``SOCIAL_FEATURES`` of candidates from the facts (see the module doc)."""

    def __init__(self, client, keys: KeyLayout, params: SocialParams = SocialParams(),
                 recent_cap: int = 5000):
        self.client = client
        self.keys = keys
        self.params = params
        #: At most this many of a post's recent engagers (and viewers) are matched against
        #: the viewer's followees: the social proof of a post seen by more in its recent
        #: window counts among the earliest ``recent_cap`` only.
        self.recent_cap = recent_cap

    def rows(self, viewers: Sequence[int], row_viewer: np.ndarray, post_id: np.ndarray,
             author_id: np.ndarray, created_at: np.ndarray, now_ms: int,
             community: Mapping[int, int]) -> np.ndarray:
        """``(rows, len(SOCIAL_FEATURES))`` float64: row ``i`` is ``viewers[row_viewer[i]]``
        seeing ``post_id[i]`` (by ``author_id[i]``, created at ``created_at[i]``) at
        ``now_ms``, from the facts of events before ``now_ms``. One round trip."""
        prm, k = self.params, self.keys
        n = len(post_id)
        out = np.zeros((n, len(SOCIAL_FEATURES)))
        if not n:
            return out
        posts, post_at = np.unique(np.asarray(post_id, np.int64), return_inverse=True)
        authors, author_at = np.unique(np.asarray(author_id, np.int64), return_inverse=True)
        created = dict(zip(np.asarray(post_id).tolist(), np.asarray(created_at).tolist()))
        before = f"({now_ms}"
        recent_from, velocity_from = now_ms - prm.recent_ms, now_ms - prm.velocity_ms
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(k.social_totals(), ["engaged", "views"])
        for v in viewers:
            pipe.zrange(k.following(v), 0, -1)
            pipe.hgetall(k.viewer_social(v))
        for a in authors.tolist():
            pipe.hgetall(k.author_social(a))
        for p in posts.tolist():
            first_end = min(created[p] + prm.first_ms, now_ms)
            for engaged in (True, False):
                key = (k.post_engagers if engaged else k.post_viewers)(p)
                pipe.zrangebyscore(key, recent_from, before, start=0, num=self.recent_cap)
                pipe.zcount(key, "-inf", before)
                pipe.zcount(key, velocity_from, before)
                if engaged:
                    pipe.zcount(key, "-inf", f"({first_end}")
        replies = iter(pipe.execute())

        totals = next(replies)
        engaged_all, views_all = (float(x or 0) for x in totals)
        followees, affinity_sums = [], []
        hl = prm.half_life_ms
        for _ in viewers:
            followees.append(set(next(replies)))
            per_community: dict[int, float] = {}
            for field, stored in next(replies).items():
                c = community.get(int(field))
                if c is not None:
                    value, at = _split(stored)
                    per_community[c] = per_community.get(c, 0.0) + decayed(value, at, now_ms, hl)
            affinity_sums.append(per_community)
        prior = np.empty(len(authors))
        for j in range(len(authors)):
            sums = next(replies)
            e = decayed(*_split(sums[b"e"]), now_ms, hl) if b"e" in sums else 0.0
            v = decayed(*_split(sums[b"v"]), now_ms, hl) if b"v" in sums else 0.0
            prior[j] = author_prior(e, v, engaged_all, views_all, prm)
        facts = []
        for _ in range(len(posts)):
            eng_recent, eng_total, eng_velocity, eng_first = (next(replies) for _ in range(4))
            view_recent, view_total, view_velocity = (next(replies) for _ in range(3))
            facts.append((eng_recent, view_recent, eng_velocity, view_velocity, eng_first,
                          eng_total, view_total))

        row_viewer = np.asarray(row_viewer).tolist()
        author_l = np.asarray(author_id).tolist()
        for i, (pi, ai, vi) in enumerate(zip(post_at.tolist(), author_at.tolist(), row_viewer)):
            eng_recent, view_recent, e_vel, v_vel, e_first, e_total, v_total = facts[pi]
            mine = followees[vi]
            p_prior = prior[ai]
            sums = affinity_sums[vi]
            c = community.get(author_l[i])
            affinity = sums.get(c, 0.0) if c is not None else 0.0
            out[i] = (sum(1 for u in eng_recent if u in mine),
                      sum(1 for u in view_recent if u in mine),
                      e_vel, v_vel, e_first, e_total, v_total,
                      smoothed_rate(e_total, v_total, p_prior, prm), p_prior,
                      *community_affinity(affinity, sum(sums.values())))
        return out
