"""Reading, for many users at once, what ranking needs from the fan-out's keys in Redis.

``CandidateReader.columns(requests, now_ms, policy)`` returns the candidates of
a whole batch of users as columns: the newest entries of each home feed,
recent posts of followed accounts at or above the push threshold (pulled, not
pushed) and the posts the triggers created, minus deleted ones
(``domain.ranking.select_candidates`` decides), in four round trips whatever
the batch size. ``AudienceReader.audiences(authors, policy)`` returns who a
post of each author refreshes eagerly (``domain.ranking.post_audience``), in
three round trips and bounded work per author, however many followers it has.
"""
from __future__ import annotations

import time
from itertools import chain
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domain.fanout import select_celebrity_targets
from domain.ranking import RankingPolicy, post_audience, select_candidates
from schemas.ranking import Candidate, CandidateColumns, PostTable, RefreshRequest
from stores.redis.feeds import RedisFeedStore
from stores.redis.multiread import HashReads

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


def post_table(post_ids: Sequence[int], replies: Sequence[Sequence]) -> PostTable:
    """A ``PostTable`` of the posts whose HMGET of ``_META_FIELDS`` is ``replies``
    (unknown posts left out), parsed as arrays."""
    ids = np.asarray(post_ids, np.int64)
    cells = np.array(replies, dtype=object).reshape(len(ids), len(_META_FIELDS))
    tombstoned = cells[:, 3] == b"1"
    live = ~tombstoned & (cells[:, 0] != None) & (cells[:, 1] != None)  # noqa: E711
    keep = np.flatnonzero(live | tombstoned)
    order = keep[np.argsort(ids[keep], kind="stable")]
    author = np.zeros(len(order), np.int64)
    created = np.zeros(len(order), np.int64)
    alive = live[order]
    if alive.any():
        author[alive] = np.array(cells[order[alive], 0].tolist()).astype(np.int64)
        created[alive] = np.array(cells[order[alive], 1].tolist()).astype(np.int64)
    media = np.array([_media(m) for m in cells[order, 2].tolist()], dtype=object)
    return PostTable(ids[order], author, created, media, np.where(alive, 1, 2).astype(np.int8))


_MEDIA: dict = {}


def _media(raw: bytes | None) -> str:
    """A stored media type as str (the few values recur: decoded once)."""
    name = _MEDIA.get(raw)
    if name is None:
        name = _text(raw) or ""
        if len(_MEDIA) < 1000:
            _MEDIA[raw] = name
    return name


def _with_carried(request: RefreshRequest, held: Mapping[bytes, bytes],
                  since_ms: int) -> RefreshRequest:
    """``request`` with the carried posts of ``held`` (``KeyLayout.carried_posts``)
    created at ``since_ms`` or later among its new posts."""
    if not held:
        return request
    have = {c.post_id for c in request.new_posts}
    carried = []
    for post, value in held.items():
        author, created, media = _text(value).split(":", 2)
        if int(created) >= since_ms and int(post) not in have:
            carried.append(Candidate(int(post), int(author), int(created), media))
    if not carried:
        return request
    return request._replace(new_posts=request.new_posts + tuple(carried))


def _id_lists(replies: Sequence[Sequence[bytes]]) -> list[np.ndarray]:
    """Each reply's members, decimal ids, as int64: all of them converted at once by
    Arrow (a third of NumPy's time for a batch's home feeds, none of it per id)."""
    flat = list(chain.from_iterable(replies))
    if not flat:
        return [np.zeros(0, np.int64) for _ in replies]
    try:
        ids = pc.cast(pa.array(flat, pa.binary()).cast(pa.string()), pa.int64()).to_numpy()
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise ValueError(f"members that are not decimal ids: {exc}") from None
    return np.split(ids, np.cumsum([len(r) for r in replies])[:-1])


def _pairs(reply) -> Mapping:
    """An HGETALL reply as a dict (raw it is a flat list of fields and values)."""
    return reply if isinstance(reply, Mapping) else dict(zip(reply[0::2], reply[1::2]))


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

    def columns(self, requests: Sequence[RefreshRequest], now_ms: int, policy: RankingPolicy
                ) -> CandidateColumns:
        """The candidates of each requested user (one request per user), newest first."""
        keys = self.feeds.keys
        users = [r.user_id for r in requests]
        if len(set(users)) != len(users):
            raise ValueError("one request per user (merge_requests)")
        pushed: list[np.ndarray] = []
        following: list[list[int]] = []
        carry = policy.carry_unstored_ms > 0
        if users:
            oldest = now_ms - policy.max_age_ms
            commands = []
            for u in users:
                # Ids only, newest first, none older than max_age: the creation time
                # and author come with the metadata read below.
                commands.append(("ZREVRANGEBYSCORE", keys.home_feed(u), "+inf", oldest,
                                 "LIMIT", 0, policy.pushed_limit))
                commands.append(("ZRANGE", keys.following(u), 0, -1))
                if carry:
                    commands.append(("HGETALL", keys.carried_posts(u)))
            with HashReads(self.feeds.client) as reads:
                replies = reads.take(reads.calls(commands))
            step = 3 if carry else 2
            pushed = _id_lists(replies[0::step])
            following = [f.tolist() for f in _id_lists(replies[1::step])]
            if carry:
                since = now_ms - policy.carry_unstored_ms
                requests = [_with_carried(r, _pairs(held), since)
                            for r, held in zip(requests, replies[2::3])]

        counts = self.follower_counts([f for fs in following for f in fs])
        celebrities = sorted(f for f, c in counts.items() if c >= policy.push_threshold)
        timelines: dict[int, np.ndarray] = {}
        if celebrities and policy.celebrity_posts:
            pipe = self._pipeline()
            oldest = now_ms - policy.max_age_ms
            for c in celebrities:
                pipe.zrevrangebyscore(keys.author_timeline(c), "+inf", oldest, start=0,
                                      num=policy.celebrity_posts)
            timelines = dict(zip(celebrities, _id_lists(pipe.execute())))
        empty = np.zeros(0, np.int64)
        pulled = [np.concatenate([timelines[f] for f in fs if f in timelines] or [empty])
                  for fs in following]

        ids = np.unique(np.concatenate(pushed + pulled + [empty]
                                       + [np.fromiter((c.post_id for r in requests
                                                       for c in r.new_posts), np.int64)]))
        posts = self.post_table(ids.tolist())
        return select_candidates(users, pushed, pulled, requests, posts, now_ms, policy)

    def read(self, requests: Sequence[RefreshRequest], now_ms: int, policy: RankingPolicy
             ) -> dict[int, list[Candidate]]:
        """``columns`` as ``{user: [Candidate]}`` (requests of one user merged)."""
        from domain.ranking import merge_requests

        cols = self.columns(merge_requests(requests), now_ms, policy)
        return {u: cols.of(i) for i, u in enumerate(cols.users)}

    def carry(self, posts: Mapping[int, Sequence[Candidate]], ttl_ms: int,
              forget: Mapping[int, Iterable[int]] | None = None) -> None:
        """Remember, per user, the new posts its ranking had only from triggers
        (``KeyLayout.carried_posts``, replacing what was held, kept ``ttl_ms``), and
        forget the posts of ``forget`` (deleted) of the users not in ``posts``; one
        round trip, none when there is nothing to do."""
        keys, pipe = self.feeds.keys, self._pipeline()
        for user, carried in posts.items():
            key = keys.carried_posts(user)
            pipe.delete(key)
            pipe.hset(key, mapping={c.post_id: f"{c.author_id}:{c.created_at}:{c.media_type}"
                                    for c in carried})
            pipe.pexpire(key, ttl_ms)
        for user, gone in (forget or {}).items():
            if user not in posts and gone:
                pipe.hdel(keys.carried_posts(user), *gone)
        if len(pipe):
            pipe.execute()

    def post_table(self, post_ids: Sequence[int]) -> PostTable:
        """Stored metadata of ``post_ids`` (``PostTable``), one round trip."""
        with HashReads(self.feeds.client) as reads:
            at = reads.same([self.feeds.keys.post(p) for p in post_ids], _META_FIELDS)
            return post_table(post_ids, reads.take(at))

    def edge_versions(self, wanted: Mapping[int, Sequence[int]]) -> dict[int, dict[int, int | None]]:
        """``{user: {followee: applied edge version or None}}`` for each user's
        ``followees`` in ``wanted``, as the fan-out's graph holds them; one round trip."""
        users = [u for u, fs in wanted.items() if fs]
        if not users:
            return {}
        pipe = self._pipeline()
        for u in users:
            pipe.hmget(self.feeds.keys.following_edges(u), [str(f) for f in wanted[u]])
        return {u: {f: None if v is None else int(v) for f, v in zip(wanted[u], values)}
                for u, values in zip(users, pipe.execute())}


class AudienceReader:
    """Who a post refreshes eagerly, read from the fan-out's graph for many authors at once."""

    def __init__(self, feeds: RedisFeedStore):
        self.feeds = feeds

    def audiences(self, authors: Mapping[int, int], policy: RankingPolicy
                  ) -> dict[int, list[int]]:
        """``{author: users}`` for ``{author: event time ms}`` (``post_audience``).

        Below the push threshold the author's followers (fewer than the
        threshold); at or above it the most engaged ones the features pipeline
        keeps (``top_followers``) topped up in follow order, as the fan-out's
        celebrity push chooses (``select_celebrity_targets``): at most twice the
        cap per author is read, never the whole follower set.
        """
        if not authors or policy.post_refresh_cap == 0:
            return {a: [] for a in authors}
        keys = self.feeds.keys
        order = list(authors)
        pipe = self.feeds.client.pipeline(transaction=False)
        for a in order:
            pipe.zcard(keys.followers(a))
        counts = dict(zip(order, pipe.execute()))
        big = {a for a in order if counts[a] >= policy.push_threshold}
        want = 2 * policy.post_refresh_cap
        pipe = self.feeds.client.pipeline(transaction=False)
        for a in order:
            if a in big:
                pipe.zrevrange(keys.top_followers(a), 0, want - 1)
                pipe.zrange(keys.followers(a), 0, policy.post_refresh_cap - 1)
            else:
                pipe.zrange(keys.followers(a), 0, -1)
        replies = iter(pipe.execute())
        candidates: dict[int, list[int]] = {}
        engaged: dict[int, list[int]] = {}
        for a in order:
            if a in big:
                engaged[a] = [int(m) for m in next(replies)]
                oldest = [int(m) for m in next(replies)]
                candidates[a] = engaged[a] + oldest
            else:
                candidates[a] = [int(m) for m in next(replies)]
        readers = list(dict.fromkeys(u for a in order for u in candidates[a]))
        pipe = self.feeds.client.pipeline(transaction=False)
        for a in order:
            if engaged.get(a):  # top_followers may hold users who unfollowed since
                pipe.zmscore(keys.followers(a), engaged[a])
        if readers:
            pipe.mget([keys.last_read(u) for u in readers])
        replies = iter(pipe.execute())
        for a in order:
            if engaged.get(a):
                still = [u for u, score in zip(engaged[a], next(replies)) if score is not None]
                candidates[a] = select_celebrity_targets(still, candidates[a][len(engaged[a]):],
                                                         want)
        last = dict(zip(readers, (None if v is None else int(v)
                                  for v in (next(replies) if readers else ()))))
        return {a: post_audience(counts[a], candidates[a], [last[u] for u in candidates[a]],
                                 authors[a], policy)
                for a in order}
