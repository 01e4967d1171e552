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
import logging
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
from stores.redis.client import BatchLayout, register_batch_script

#: Items (posts, or hashes of sums) per script call.
DEFAULT_CHUNK = 500

# KEYS: posts' first viewers or engagers. ARGV[1] key TTL ms; then per key a count n and
# n (viewer, time ms) pairs. Keeps each viewer's earliest time; returns per key a list
# with 1 per pair whose viewer is new to the set, else 0 (a replayed or repeated
# event, or a later one of the same viewer).
_FIRSTS = """
local out = {}
local j = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[j])
  local flags = {}
  for i = j + 1, j + 2 * n, 2 do
    local old = redis.call('ZSCORE', KEYS[k], ARGV[i])
    if old then
      if tonumber(ARGV[i + 1]) < tonumber(old) then
        redis.call('ZADD', KEYS[k], ARGV[i + 1], ARGV[i])
      end
      flags[#flags + 1] = 0
    else
      redis.call('ZADD', KEYS[k], ARGV[i + 1], ARGV[i])
      flags[#flags + 1] = 1
    end
  end
  redis.call('PEXPIRE', KEYS[k], ARGV[1])
  out[k] = flags
  j = j + 1 + 2 * n
end
return out
"""
_FIRSTS_LAYOUT = BatchLayout(header=1, keys_per_item=1, counted=(2,))

# KEYS: hashes of decayed sums, each field "<sum>@<as of ms>". ARGV[1] key TTL ms,
# ARGV[2] half-life ms; then per key a count n and n (field, weight, time ms) triples:
# the sum decayed to the later of its time and the weight's, plus the weight decayed
# likewise (what domain.social_features._Decayed.add does, for a weight that may
# stand for several events: ``combined``). Returns the number of fields written.
_ADD_DECAYED = """
local hl = tonumber(ARGV[2])
local j = 3
for k = 1, #KEYS do
  local n = tonumber(ARGV[j])
  for i = j + 1, j + 3 * n, 3 do
    local w, t = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
    local v, at = 0, t
    local stored = redis.call('HGET', KEYS[k], ARGV[i])
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
    redis.call('HSET', KEYS[k], ARGV[i], string.format('%.17g@%d', v, at))
  end
  redis.call('PEXPIRE', KEYS[k], ARGV[1])
  j = j + 1 + 3 * n
end
return #KEYS
"""
_ADD_LAYOUT = BatchLayout(header=2, keys_per_item=1, counted=(3,), reply="sum")

log = logging.getLogger(__name__)

_ENGAGING = np.array([LIKE, COMMENT, SHARE, SAVE])


def combined(t: np.ndarray, starts: np.ndarray, half_life_ms: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Unit weights at times ``t`` summed per group (rows ``starts[i]`` up to the next
    start) as one weight at the group's latest time: ``(latest time, weight)``. Adding
    that weight is adding the events one by one (decay is exponential), with one write
    instead of many."""
    latest = np.maximum.reduceat(t, starts)
    at = np.repeat(latest, np.diff(np.r_[starts, len(t)]))
    weight = np.add.reduceat(np.exp2(-(at - t) / half_life_ms), starts)
    return latest, weight


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
        self._firsts = register_batch_script(client, _FIRSTS, _FIRSTS_LAYOUT)
        self._add = register_batch_script(client, _ADD_DECAYED, _ADD_LAYOUT)

    def apply(self, kind: np.ndarray, t: np.ndarray, viewer: np.ndarray, post: np.ndarray,
              author: np.ndarray) -> int:
        """Record the first views and first engagements among these events (kind codes of
        ``domain.features``; other kinds and events without a post are left out), then add
        the new ones to the decayed sums: two round trips, a script call per
        ``chunk_size`` posts or sums. Returns the new firsts.

        Idempotent per fact: a replayed event is no first, so it adds nothing. A batch
        whose first round trip landed and whose second did not (a crash between them)
        leaves its firsts out of the sums; the features it feeds are estimates, and the
        next events of the same authors and viewers carry on from there.
        """
        kind = np.asarray(kind)
        post = np.asarray(post, np.int64)
        engaged = np.isin(kind, _ENGAGING)
        rows = np.flatnonzero((engaged | (kind == VIEW)) & (post >= 0))
        if not len(rows):
            return 0
        # By post and kind (engagements first), then arrival order.
        rows = rows[np.lexsort((rows, ~engaged[rows], post[rows]))]
        t, viewer = np.asarray(t, np.int64)[rows], np.asarray(viewer, np.int64)[rows]
        post, engaged, author = post[rows], engaged[rows], np.asarray(author, np.int64)[rows]
        group = post * 2 + engaged
        starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
        ends = np.r_[starts[1:], len(rows)]
        pairs = np.empty(2 * len(rows), np.int64)
        pairs[0::2], pairs[1::2] = viewer, t
        pairs = pairs.tolist()
        key_of = {True: self.keys.post_engagers, False: self.keys.post_viewers}
        keys = [key_of[e](p) for p, e in zip(post[starts].tolist(), engaged[starts].tolist())]
        pipe = self.client.pipeline(transaction=False)
        bounds = list(zip(starts.tolist(), ends.tolist()))
        for lo in range(0, len(keys), self.chunk_size):
            args: list = [self.retention.post_ms]
            for a, b in bounds[lo:lo + self.chunk_size]:
                args.append(b - a)
                args += pairs[2 * a:2 * b]
            self._firsts(keys=keys[lo:lo + self.chunk_size], args=args, client=pipe)
        new = np.fromiter((flag for reply in pipe.execute() for flags in reply for flag in flags),
                          dtype=bool, count=len(rows))
        if new.any():
            self._add_sums(t[new], viewer[new], author[new], engaged[new])
        return int(new.sum())

    def _add_sums(self, t: np.ndarray, viewer: np.ndarray, author: np.ndarray,
                  engaged: np.ndarray) -> None:
        """The new firsts into the authors' sums (``e`` engaged, ``v`` viewed), the
        engaging viewers' sums per author and the totals: one round trip."""
        hl = self.params.half_life_ms
        items: list[tuple[str, list]] = []
        for key_of, entity, field, rows, names in (
                (self.keys.author_social, author, np.where(engaged, 0, 1), slice(None),
                 ("e", "v")),
                (self.keys.viewer_social, viewer, author, engaged, None)):
            e, f, times = entity[rows], field[rows], t[rows]
            if not len(e):
                continue
            order = np.lexsort((f, e))
            e, f, times = e[order], f[order], times[order]
            starts = np.flatnonzero(np.r_[True, (e[1:] != e[:-1]) | (f[1:] != f[:-1])])
            latest, weight = combined(times, starts, hl)
            by_entity: dict[int, list] = {}
            for ent, fld, at, w in zip(e[starts].tolist(), f[starts].tolist(),
                                       latest.tolist(), weight.tolist()):
                by_entity.setdefault(ent, []).extend(
                    (names[fld] if names else fld, repr(w), at))
            items += [(key_of(ent), triples) for ent, triples in by_entity.items()]
        head = [self.retention.sums_ms, hl]
        pipe = self.client.pipeline(transaction=False)
        for lo in range(0, len(items), self.chunk_size):
            part = items[lo:lo + self.chunk_size]
            args: list = list(head)
            for _, triples in part:
                args.append(len(triples) // 3)
                args += triples
            self._add(keys=[key for key, _ in part], args=args, client=pipe)
        views = int((~engaged).sum())
        for field, n in (("engaged", len(engaged) - views), ("views", views)):
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
        #: Whether a read found no facts at all and said so (once).
        self.warned = False

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
        if totals[1] is None and not self.warned:
            self.warned = True
            log.warning("ranking: a model on the social features is served, but Redis holds "
                        "no social facts (%s): run the features pipeline with its 'social' "
                        "sink (--sinks=redis,cassandra,log,top_followers,social)",
                        k.social_totals())
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
