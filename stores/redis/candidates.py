"""Reading the ranking candidates of many users from Redis in a few round trips.

``CandidateReader.read(requests, now_ms, policy)`` returns each user's
candidates: the newest entries of the home feed, recent posts of followed
accounts at or above the push threshold (pulled, not pushed) and the posts the
triggers created, minus deleted ones (``domain.ranking.merge_candidates``
decides). It reads the fan-out's keys with one pipeline per step for the whole
batch; the steps: docs/architecture.md, "Stores".
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

from stores.redis.feeds import RedisFeedStore
from domain.ranking import RankingPolicy, merge_candidates
from schemas.ranking import Candidate, RefreshRequest

_META_FIELDS = ("author_id", "created_at", "media_type", "deleted")


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def parse_meta(values: Sequence) -> tuple[dict | None, bool]:
    """``(metadata or None if unknown, tombstoned?)`` from an HMGET of ``_META_FIELDS``."""
    author, created, media, deleted = (_text(v) for v in values)
    if deleted == "1":
        return None, True
    if author is None or created is None:
        return None, False
    return {"author_id": int(author), "created_at": int(created), "media_type": media or ""}, False


class CandidateReader:
    """Batched candidate reads over a ``RedisFeedStore``'s client and key layout.

    ``clock`` (seconds, monotonic) expires the follower-count cache.
    """

    def __init__(self, feeds: RedisFeedStore, count_ttl_s: float = 60.0,
                 max_cached: int = 1_000_000, clock: Callable[[], float] = time.monotonic):
        self.feeds = feeds
        self.count_ttl_s = count_ttl_s
        self.max_cached = max_cached
        self._clock = clock
        self._counts: dict[int, tuple[int, float]] = {}

    def _pipeline(self):
        return self.feeds.client.pipeline(transaction=False)

    def follower_counts(self, user_ids: Sequence[int]) -> dict[int, int]:
        """Follower count of each user, from the cache when fresh, else one ZCARD each
        (one round trip for all misses)."""
        now = self._clock()
        out: dict[int, int] = {}
        missing = []
        for u in dict.fromkeys(user_ids):
            hit = self._counts.get(u)
            if hit is not None and hit[1] > now:
                out[u] = hit[0]
            else:
                missing.append(u)
        if missing:
            counts = self.feeds.follower_counts(missing)
            if len(self._counts) + len(missing) > self.max_cached:
                self._counts.clear()
            expires = now + self.count_ttl_s
            for u, count in zip(missing, counts):
                out[u] = int(count)
                self._counts[u] = (int(count), expires)
        return out

    def read(self, requests: Sequence[RefreshRequest], now_ms: int, policy: RankingPolicy
             ) -> dict[int, list[Candidate]]:
        """Candidates per requested user (see the module docstring), newest first."""
        if not requests:
            return {}
        keys = self.feeds.keys
        users = list(dict.fromkeys(r.user_id for r in requests))
        pipe = self._pipeline()
        for u in users:
            # Ids only: the creation time comes with the metadata read below.
            pipe.zrevrange(keys.home_feed(u), 0, policy.pushed_limit - 1)
            pipe.zrange(keys.following(u), 0, -1)
        replies = pipe.execute()
        pushed = {u: [int(m) for m in replies[2 * i]] for i, u in enumerate(users)}
        following = {u: [int(m) for m in replies[2 * i + 1]] for i, u in enumerate(users)}

        counts = self.follower_counts([f for fs in following.values() for f in fs])
        celebrities = sorted({f for f, c in counts.items() if c >= policy.push_threshold})
        timelines: dict[int, list[int]] = {}
        if celebrities and policy.celebrity_posts:
            pipe = self._pipeline()
            oldest = now_ms - policy.max_age_ms
            for c in celebrities:
                pipe.zrevrangebyscore(keys.author_timeline(c), "+inf", oldest, start=0,
                                      num=policy.celebrity_posts)
            timelines = {c: [int(m) for m in entries]
                         for c, entries in zip(celebrities, pipe.execute())}
        pulled = {u: [e for f in following[u] for e in timelines.get(f, ())] for u in users}

        post_ids = list(dict.fromkeys(
            [p for u in users for p in pushed[u]] + [p for u in users for p in pulled[u]]
            + [c.post_id for r in requests for c in r.new_posts]))
        meta, tombstoned = self.post_meta(post_ids)
        by_user = {r.user_id: r for r in requests}  # a user appears once per batch
        return {u: merge_candidates(pushed[u], pulled[u], by_user[u], meta, tombstoned, now_ms,
                                    policy)
                for u in users}

    def post_meta(self, post_ids: Sequence[int]) -> tuple[Mapping[int, dict | None], set[int]]:
        """``({post_id: metadata or None}, tombstoned ids)``, one round trip."""
        if not post_ids:
            return {}, set()
        pipe = self._pipeline()
        for pid in post_ids:
            pipe.hmget(self.feeds.keys.post(pid), _META_FIELDS)
        meta: dict[int, dict | None] = {}
        tombstoned: set[int] = set()
        for pid, values in zip(post_ids, pipe.execute()):
            meta[pid], gone = parse_meta(values)
            if gone:
                tombstoned.add(pid)
        return meta, tombstoned
