"""A synthetic social workload: follower graph, posts, stories and engagement.

This is the pure model behind ``feedbeam generate`` (``jobs/generate.py`` adds
Kafka, files, pacing and the CLI)::

    workload = Workload(WorkloadConfig(start_ms=1_700_000_000_000, users=2_000))
    for topic, key, event in workload.events():   # lazy, in event-time order
        ...
    workload.affinity(viewer_id, author_id)       # the planted ground truth

The same config (seed, options, ``start_ms``) gives the same events byte for
byte on the same numpy. The model (graph, planted preferences, engagement,
event time) and its constants: docs/workload.md.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import math
import operator
from typing import Iterator

import numpy as np

from schemas.events import (
    STORY_TTL_MS,
    EngagementEvent,
    EngagementKind,
    Event,
    FollowEvent,
    FollowKind,
    MediaType,
    PostEvent,
    PostEventKind,
    StoryEvent,
    StoryEventKind,
)

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

#: Media types in the order of the model's preference and mix columns.
MEDIA_TYPES: tuple[MediaType, ...] = (
    MediaType.PHOTO, MediaType.VIDEO, MediaType.CAROUSEL, MediaType.REEL)
_MEDIA_INDEX = {m: i for i, m in enumerate(MEDIA_TYPES)}

# Graph.
OUT_DEGREE_SIGMA = 0.6
POPULARITY_SHAPE = 1.8
POPULARITY_SIGMA = 0.5
ORDINARY_CAP_FRACTION = 0.6
CELEBRITY_MIN, CELEBRITY_MAX = 1.2, 3.0
CLOSE_MEAN_EXTRA, CLOSE_MAX = 2.0, 8

# Planted preferences and engagement.
PREFERENCE_ALPHA = 0.7
MEDIA_MIX_ALPHA = 0.8
ENGAGE_BIAS = -2.4
W_AFFINITY = 3.5
W_PREFERENCE = 5.0
W_QUALITY = 2.0
EXPLORE_VIEWS = 2.0
DWELL_BASE_MS = (2_500.0, 9_000.0, 5_000.0, 7_000.0)  # by MEDIA_TYPES
DWELL_SLOPE, DWELL_NOISE = 0.5, 0.5
DWELL_MIN_MS, DWELL_MAX_MS = 300, 120_000
P_LIKE, P_COMMENT, P_SHARE, P_SAVE = 0.85, 0.12, 0.05, 0.07
P_UNLIKE = 0.03
P_PROFILE_VIEW_ENGAGED, P_PROFILE_VIEW_SEEN = 0.08, 0.005
P_POST_DELETE, P_STORY_DELETE = 0.02, 0.03
VIEW_DELAY_MEDIAN_MS, VIEW_DELAY_SIGMA = 15 * MINUTE_MS, 1.0
STORY_VIEW_DELAY_MEDIAN_MS, STORY_VIEW_DELAY_SIGMA = 45 * MINUTE_MS, 1.1
STORY_VIEW_BIAS, STORY_VIEW_W_AFFINITY = -1.0, 4.0
P_REFOLLOW = 0.25

HASHTAGS: tuple[str, ...] = (
    "travel", "food", "photography", "fitness", "art", "music", "nature",
    "fashion", "love", "sunset", "dogs", "cats", "coffee", "style", "beach",
    "tbt", "design", "running", "books", "gaming", "diy", "family", "summer",
    "architecture", "streetphotography", "yoga", "cooking", "mountains",
    "vintage", "motivation",
)
_HASHTAG_CDF = np.cumsum(1.0 / np.arange(1, len(HASHTAGS) + 1))

# Drivers (posts, stories, churn) are drawn per slice of simulated time; only
# the pending consequences of posts and stories in flight sit in memory.
_SLICE_MS = MINUTE_MS
_GRAPH_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Every knob of the workload; the module docstring explains the model."""

    start_ms: int
    seed: int = 42
    users: int = 20_000
    avg_following: float = 150.0
    celebrities: int = 3
    push_threshold: int = 10_000
    duration_ms: int = 2 * HOUR_MS
    posts_per_user_day: float = 1 / 7
    stories_per_user_day: float = 0.5
    churn_per_user_day: float = 0.05
    late_fraction: float = 0.0
    max_lateness_ms: int = 5 * MINUTE_MS
    graph_lead_ms: int = HOUR_MS

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.duration_ms

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if self.users < 2:
            raise ValueError(f"users must be at least 2, got {self.users}")
        if not 1 <= self.avg_following <= (self.users - 1) / 2:
            raise ValueError(
                f"avg-following must be between 1 and half the users "
                f"({(self.users - 1) / 2:g}), got {self.avg_following:g}")
        if not 0 <= self.celebrities <= self.users // 10:
            raise ValueError(
                f"celebrities must be between 0 and a tenth of the users "
                f"({self.users // 10}), got {self.celebrities}")
        if self.push_threshold < 1:
            raise ValueError(f"push-threshold must be positive, got {self.push_threshold}")
        if self.celebrities and self.push_threshold >= self.users - 1:
            raise ValueError(
                f"celebrities need more followers than the push threshold "
                f"({self.push_threshold}) but there are only {self.users} users; "
                f"raise --users or lower --push-threshold (or --celebrities 0)")
        if self.duration_ms <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_ms} ms")
        for name in ("posts_per_user_day", "stories_per_user_day", "churn_per_user_day"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {value}")
        if not 0.0 <= self.late_fraction <= 1.0:
            raise ValueError(f"late-fraction must be in [0, 1], got {self.late_fraction}")
        if self.late_fraction > 0 and self.max_lateness_ms < 1:
            raise ValueError("max-lateness must be at least 1 ms when late-fraction > 0")
        if self.graph_lead_ms < 0:
            raise ValueError(f"graph lead must be >= 0, got {self.graph_lead_ms}")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def engagement_logit(affinity, preference, quality):
    """Log-odds that a viewer who sees a post engages with it (numpy-friendly)."""
    return (ENGAGE_BIAS + W_AFFINITY * affinity
            + W_PREFERENCE * (preference - 0.25) + W_QUALITY * (quality - 0.5))


class _Ids:
    """Deterministic ids of one ``events()`` pass: config digest + counters."""

    def __init__(self, digest: bytes, first_event: int = 0):
        h = digest.hex()
        variant = "89ab"[int(h[16], 16) & 3]
        # A version-4 UUID layout whose last 48 bits are the event counter.
        self._event_prefix = f"{h[0:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-"
        self._events = itertools.count(first_event)
        # Post and story ids: 23 digest bits above a 36-bit counter, < 2**59.
        self._posts = itertools.count((int.from_bytes(digest[10:13], "big") >> 1) << 36)
        self._stories = itertools.count((int.from_bytes(digest[13:16], "big") >> 1) << 36)

    def event(self) -> str:
        return f"{self._event_prefix}{next(self._events):012x}"

    def post(self) -> int:
        return next(self._posts)

    def story(self) -> int:
        return next(self._stories)


class Workload:
    """The graph and latent structure of one config, and its event stream.

    Building it costs about a second per million follow edges; ``events()`` can
    be called any number of times and yields the same sequence each time.
    Public methods take and return user ids (``1..users``).
    """

    def __init__(self, config: WorkloadConfig):
        config.validate()
        self.config = config
        self._digest = hashlib.blake2b(
            repr(dataclasses.astuple(config)).encode(), digest_size=16).digest()
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
        self._build_graph(rng)
        self._build_latent(rng)

    # ------------------------------------------------------------------ model

    def _build_graph(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n = cfg.users
        mu = math.log(cfg.avg_following) - OUT_DEGREE_SIGMA ** 2 / 2
        out_degree = np.rint(rng.lognormal(mu, OUT_DEGREE_SIGMA, n)).astype(np.int64)
        out_degree = out_degree.clip(1, min(n - 1, int(10 * cfg.avg_following)))

        popularity = (1.0 + rng.pareto(POPULARITY_SHAPE, n)) * rng.lognormal(
            0.0, POPULARITY_SIGMA, n)
        celebrities = np.argsort(-popularity, kind="stable")[: cfg.celebrities]
        is_celebrity = np.zeros(n, dtype=bool)
        is_celebrity[celebrities] = True
        popularity[celebrities] = 0.0

        celeb_src, celeb_dst = [], []
        for c in celebrities:
            size = min(n - 1, int(cfg.push_threshold * rng.uniform(CELEBRITY_MIN, CELEBRITY_MAX)))
            fans = rng.choice(n - 1, size=size, replace=False)
            fans[fans >= c] += 1  # skip the celebrity itself
            celeb_src.append(fans)
            celeb_dst.append(np.full(size, c))
        celeb_src = np.concatenate(celeb_src) if celeb_src else np.zeros(0, np.int64)
        celeb_dst = np.concatenate(celeb_dst) if celeb_dst else np.zeros(0, np.int64)
        remaining = np.maximum(out_degree - np.bincount(celeb_src, minlength=n), 0)

        # Cap ordinary users' expected in-degree well below the push threshold
        # so that exactly the celebrities are pulled rather than pushed.
        regular_edges = max(float(remaining.sum()), 1.0)
        cap = ORDINARY_CAP_FRACTION * cfg.push_threshold
        for _ in range(20):
            limit = cap * popularity.sum() / regular_edges
            if popularity.max() <= limit * (1 + 1e-9):
                break
            np.minimum(popularity, limit, out=popularity)
        self._popularity_cdf = np.cumsum(popularity)

        # Oversample, drop self-loops and repeats, keep each user's first
        # draws: sampling without replacement, vectorized.
        draws = np.where(remaining > 0, np.ceil(remaining * 1.15).astype(np.int64) + 2, 0)
        src = np.repeat(np.arange(n, dtype=np.int64), draws)
        dst = self._sample_popular(rng, src.size)
        ok = dst != src
        src, dst = src[ok], dst[ok]
        _, first = np.unique(src * n + dst, return_index=True)
        first.sort()
        src, dst = src[first], dst[first]
        rank = np.arange(src.size) - np.searchsorted(src, np.arange(n))[src]
        keep = rank < remaining[src]
        src = np.concatenate([src[keep], celeb_src])
        dst = np.concatenate([dst[keep], celeb_dst])

        order = np.argsort(src * n + dst, kind="stable")
        self._edge_src = src[order].astype(np.int32)
        self._following = dst[order].astype(np.int32)
        self._following_ptr = np.searchsorted(self._edge_src, np.arange(n + 1))
        rorder = np.argsort(self._following.astype(np.int64) * n + self._edge_src, kind="stable")
        self._followers = self._edge_src[rorder]
        self._followers_edge = rorder
        self._followers_ptr = np.searchsorted(self._following[rorder], np.arange(n + 1))
        self._is_celebrity = is_celebrity
        self._celebrities = celebrities

        # Edge affinity, with a few high-affinity "close" followees per user.
        edges = self._following.size
        affinity = rng.beta(1.5, 8.0, edges)
        close_count = np.minimum(1 + rng.poisson(CLOSE_MEAN_EXTRA, n), CLOSE_MAX)
        key = rng.random(edges)
        by_key = np.lexsort((key, self._edge_src))
        rank = np.empty(edges, dtype=np.int64)
        rank[by_key] = np.arange(edges) - self._following_ptr[self._edge_src[by_key]]
        close = (rank < close_count[self._edge_src]) & ~is_celebrity[self._following]
        affinity[close] = rng.beta(8.0, 2.0, int(close.sum()))
        self._affinity = affinity
        self._close = close

    def _sample_popular(self, rng: np.random.Generator, size: int) -> np.ndarray:
        cdf = self._popularity_cdf
        return np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right").clip(
            0, cdf.size - 1)

    def _build_latent(self, rng: np.random.Generator) -> None:
        n = self.config.users
        self._preference = rng.dirichlet([PREFERENCE_ALPHA] * 4, n)
        self._media_mix = rng.dirichlet([MEDIA_MIX_ALPHA] * 4, n)
        self._media_mix_cdf = np.cumsum(self._media_mix, axis=1)
        self._activity = np.clip(rng.lognormal(math.log(0.25), 0.7, n), 0.02, 0.95)
        self._quality = rng.beta(2.0, 3.0, n)
        weight = rng.lognormal(0.0, 0.8, n)
        weight[self._celebrities] *= 3.0
        self._post_cdf = np.cumsum(weight)
        self._story_cdf = np.cumsum(rng.lognormal(0.0, 0.8, n))

    # ------------------------------------------------------------ ground truth

    def _index(self, user_id: int) -> int:
        i = int(user_id) - 1
        if not 0 <= i < self.config.users:
            raise KeyError(f"no user {user_id}")
        return i

    def _edge(self, viewer: int, author: int) -> int | None:
        lo, hi = self._following_ptr[viewer], self._following_ptr[viewer + 1]
        pos = lo + int(np.searchsorted(self._following[lo:hi], author))
        return pos if pos < hi and self._following[pos] == author else None

    @property
    def user_ids(self) -> np.ndarray:
        return np.arange(1, self.config.users + 1)

    @property
    def celebrities(self) -> tuple[int, ...]:
        """Ids of the users given follower counts above the push threshold."""
        return tuple(int(c) + 1 for c in self._celebrities)

    @property
    def edge_count(self) -> int:
        """Follow edges of the initial graph (= FOLLOW events before ``start_ms``)."""
        return int(self._following.size)

    def follower_counts(self) -> np.ndarray:
        """Initial-graph in-degree of every user, indexed by ``user_id - 1``."""
        return np.diff(self._followers_ptr)

    def following_counts(self) -> np.ndarray:
        """Initial-graph out-degree of every user, indexed by ``user_id - 1``."""
        return np.diff(self._following_ptr)

    def followers(self, user_id: int) -> np.ndarray:
        i = self._index(user_id)
        return self._followers[self._followers_ptr[i]:self._followers_ptr[i + 1]] + 1

    def following(self, user_id: int) -> np.ndarray:
        i = self._index(user_id)
        return self._following[self._following_ptr[i]:self._following_ptr[i + 1]] + 1

    def close_followees(self, user_id: int) -> np.ndarray:
        i = self._index(user_id)
        lo, hi = self._following_ptr[i], self._following_ptr[i + 1]
        return self._following[lo:hi][self._close[lo:hi]] + 1

    def affinity(self, viewer_id: int, author_id: int) -> float:
        """Planted affinity in [0, 1] of viewer for author; 0 if not following."""
        edge = self._edge(self._index(viewer_id), self._index(author_id))
        return 0.0 if edge is None else float(self._affinity[edge])

    def is_close(self, viewer_id: int, author_id: int) -> bool:
        edge = self._edge(self._index(viewer_id), self._index(author_id))
        return edge is not None and bool(self._close[edge])

    def preference(self, viewer_id: int, media_type: MediaType | str) -> float:
        """Planted share of ``media_type`` in the viewer's taste (sums to 1 per viewer)."""
        return float(self._preference[self._index(viewer_id), _MEDIA_INDEX[MediaType(media_type)]])

    def media_mix(self, author_id: int, media_type: MediaType | str) -> float:
        """Probability that the author's next post has ``media_type``."""
        return float(self._media_mix[self._index(author_id), _MEDIA_INDEX[MediaType(media_type)]])

    def author_quality(self, author_id: int) -> float:
        """Mean quality of the author's posts, in [0, 1]."""
        return float(self._quality[self._index(author_id)])

    def engagement_probability(self, viewer_id: int, author_id: int,
                               media_type: MediaType | str, quality: float = 0.5) -> float:
        """P(engage | viewer saw a post of author with media type and quality)."""
        z = engagement_logit(self.affinity(viewer_id, author_id),
                             self.preference(viewer_id, media_type), quality)
        return float(_sigmoid(z))

    # ------------------------------------------------------------------ events

    def events(self) -> Iterator[tuple[str, bytes, Event]]:
        """Yield ``(topic, key, event)``: the initial graph, then the run.

        Topics are the canonical names (``PostEvent.TOPIC`` ...); keys are the
        events' own ``key``. Lazy: memory holds the graph plus the pending
        consequences of posts and stories in flight.
        """
        yield from self._graph_events()
        yield from _Run(self).events()

    def _graph_events(self) -> Iterator[tuple[str, bytes, Event]]:
        cfg = self.config
        ids = _Ids(self._digest)
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
        edges = self.edge_count
        perm = rng.permutation(edges)
        t0 = cfg.start_ms - cfg.graph_lead_ms
        topic, follow = FollowEvent.TOPIC, FollowKind.FOLLOW
        for lo in range(0, edges, _GRAPH_CHUNK):
            chunk = perm[lo:lo + _GRAPH_CHUNK]
            times = (t0 + (np.arange(lo, lo + chunk.size, dtype=np.int64)
                           * cfg.graph_lead_ms) // max(edges, 1)).tolist()
            srcs = (self._edge_src[chunk] + 1).tolist()
            dsts = (self._following[chunk] + 1).tolist()
            for t, s, d in zip(times, srcs, dsts):
                yield topic, str(d).encode(), FollowEvent(ids.event(), t, follow, s, d)


class _Run:
    """One pass over the simulated span.

    Drivers (posts, stories, churn) are drawn one slice of simulated time at a
    time, together with all their consequences; every event goes into the
    bucket of the slice its emission time falls in. A bucket is complete once
    its own slice has been scheduled (consequences never precede their
    cause), so it is then sorted (stably: ties keep creation order) and
    emitted. Sorting a bucket in C is much cheaper than a heap in Python.
    """

    def __init__(self, workload: Workload):
        self.w = workload
        cfg = workload.config
        self.cfg = cfg
        self.start, self.end = cfg.start_ms, cfg.end_ms
        self.late = cfg.late_fraction > 0
        self.ids = _Ids(workload._digest, first_event=workload.edge_count)
        self.rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))
        # Lateness has its own stream so that it only reorders, never changes content.
        self.late_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 3]))
        self.buckets: collections.defaultdict[int, list] = collections.defaultdict(list)
        self.touched: set[tuple[int, int]] = set()  # edges churned during the run
        n = cfg.users
        self.post_rate = n * cfg.posts_per_user_day / DAY_MS
        self.story_rate = n * cfg.stories_per_user_day / DAY_MS
        self.churn_rate = n * cfg.churn_per_user_day / DAY_MS

    def events(self) -> Iterator[tuple[str, bytes, Event]]:
        start, buckets = self.cfg.start_ms, self.buckets
        by_time = operator.itemgetter(0)
        for index, lo in enumerate(range(start, self.end, _SLICE_MS)):
            self._schedule_slice(lo, min(lo + _SLICE_MS, self.end))
            yield from self._drain(buckets.pop(index, []), by_time)
        for index in sorted(buckets):  # late arrivals past the end of the span
            yield from self._drain(buckets.pop(index), by_time)

    @staticmethod
    def _drain(bucket: list, by_time) -> Iterator[tuple[str, bytes, Event]]:
        bucket.sort(key=by_time)
        for _, event in bucket:
            yield event.TOPIC, event.key, event

    def _push(self, event: Event) -> None:
        emit = event.event_time
        if self.late and self.late_rng.random() < self.cfg.late_fraction:
            emit += int(self.late_rng.integers(1, self.cfg.max_lateness_ms + 1))
        self.buckets[(emit - self.start) // _SLICE_MS].append((emit, event))

    def _schedule_slice(self, lo: int, hi: int) -> None:
        rng, w = self.rng, self.w
        span = hi - lo
        for cdf, rate, schedule in ((w._post_cdf, self.post_rate, self._schedule_post),
                                    (w._story_cdf, self.story_rate, self._schedule_story)):
            k = int(rng.poisson(rate * span))
            authors = np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right").tolist()
            times = np.sort(rng.integers(lo, hi, k)).tolist()
            for author, t in zip(authors, times):
                schedule(min(author, self.cfg.users - 1), t)
        k = int(rng.poisson(self.churn_rate * span))
        for t in np.sort(rng.integers(lo, hi, k)).tolist():
            self._schedule_churn(t)

    # -- posts

    def _media(self, a: int) -> int:
        cdf = self.w._media_mix_cdf[a]
        return min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), 3)

    def _schedule_post(self, a: int, t: int) -> None:
        rng, w, end, ids = self.rng, self.w, self.end, self.ids
        m = self._media(a)
        media = MEDIA_TYPES[m]
        quality = min(max(float(w._quality[a] + rng.normal(0.0, 0.15)), 0.01), 0.99)
        caption = int(min(2200.0, rng.lognormal(math.log(80), 0.9)))
        n_tags = min(int(rng.poisson(1.2)), 6)
        # Zipf-popular hashtags; a repeated draw just means one tag fewer.
        tags = tuple(HASHTAGS[i] for i in sorted(set(np.searchsorted(
            _HASHTAG_CDF, rng.random(n_tags) * _HASHTAG_CDF[-1], side="right").tolist())))
        post_id = ids.post()
        author_id = a + 1
        self._push(PostEvent(ids.event(), t, PostEventKind.CREATED, post_id, author_id, t,
                             media, caption, tags))
        gone = end
        if rng.random() < P_POST_DELETE:
            gone = t + 1000 + int(rng.lognormal(math.log(30 * MINUTE_MS), 1.0))
            if gone < end:
                self._push(PostEvent(ids.event(), gone, PostEventKind.DELETED, post_id,
                                     author_id, t, media, caption, tags))
            gone = min(gone, end)

        lo, hi = w._followers_ptr[a], w._followers_ptr[a + 1]
        followers = w._followers[lo:hi]
        seen = rng.random(followers.size) < w._activity[followers]
        viewers = followers[seen].astype(np.int64)
        affinity = w._affinity[w._followers_edge[lo:hi][seen]]
        explore = rng.integers(0, self.cfg.users, int(rng.poisson(EXPLORE_VIEWS)))
        explore = explore[explore != a]
        if explore.size:
            viewers = np.concatenate([viewers, explore])
            affinity = np.concatenate(
                [affinity, [w.affinity(v + 1, author_id) for v in explore.tolist()]])
        k = viewers.size
        if k == 0:
            return
        z = engagement_logit(affinity, w._preference[viewers, m], quality)
        view_t = t + 1000 + rng.lognormal(math.log(VIEW_DELAY_MEDIAN_MS), VIEW_DELAY_SIGMA, k)
        dwell = np.minimum(np.maximum(
            DWELL_BASE_MS[m] * np.exp(DWELL_SLOPE * (z - ENGAGE_BIAS)
                                      + rng.normal(0.0, DWELL_NOISE, k)),
            DWELL_MIN_MS), DWELL_MAX_MS)
        u = rng.random((7, k))
        engaged = u[0] < _sigmoid(z)
        like = engaged & (u[1] < P_LIKE)
        comment = engaged & (u[2] < P_COMMENT)
        share = engaged & (u[3] < P_SHARE)
        save = engaged & (u[4] < P_SAVE)
        like |= engaged & ~(like | comment | share | save)
        unlike = like & (u[5] < P_UNLIKE)
        profile = u[6] < np.where(engaged, P_PROFILE_VIEW_ENGAGED, P_PROFILE_VIEW_SEEN)
        acted = view_t + dwell
        times = np.stack([
            view_t, dwell, acted,
            acted + rng.exponential(30_000.0, k),                           # comment
            acted + rng.exponential(10_000.0, k),                           # share
            acted + rng.exponential(5_000.0, k),                            # save
            acted + rng.lognormal(math.log(5 * MINUTE_MS), 1.0, k),         # unlike
            acted + rng.exponential(20_000.0, k),                           # profile view
        ]).astype(np.int64).T.tolist()
        flags = np.stack([like, comment, share, save, unlike, profile]).T.tolist()

        push, eid, E, K = self._push, ids.event, EngagementEvent, EngagementKind
        for v, (vt, dw, at, cmt, sht, svt, ult, pvt), (lk, cm, sh, sv, ul, pv) in zip(
                (viewers + 1).tolist(), times, flags):
            if vt >= gone:
                continue
            push(E(eid(), vt, K.VIEW, v, author_id, post_id, media, dw))
            if lk and at < gone:
                push(E(eid(), at, K.LIKE, v, author_id, post_id, media))
                if ul and ult < gone:
                    push(E(eid(), ult, K.UNLIKE, v, author_id, post_id, media))
            if cm and cmt < gone:
                push(E(eid(), cmt, K.COMMENT, v, author_id, post_id, media))
            if sh and sht < gone:
                push(E(eid(), sht, K.SHARE, v, author_id, post_id, media))
            if sv and svt < gone:
                push(E(eid(), svt, K.SAVE, v, author_id, post_id, media))
            if pv and pvt < end:
                push(E(eid(), pvt, K.PROFILE_VIEW, v, author_id))

    # -- stories

    def _schedule_story(self, a: int, t: int) -> None:
        rng, w, ids = self.rng, self.w, self.ids
        media = MEDIA_TYPES[self._media(a)]
        story_id, author_id = ids.story(), a + 1
        expires = t + STORY_TTL_MS
        self._push(StoryEvent(ids.event(), t, StoryEventKind.PUBLISHED, story_id, author_id,
                              None, t, expires, media))
        gone = min(expires, self.end)
        if rng.random() < P_STORY_DELETE:
            deleted = int(rng.integers(t + MINUTE_MS, expires))
            if deleted < self.end:
                self._push(StoryEvent(ids.event(), deleted, StoryEventKind.DELETED, story_id,
                                      author_id))
            gone = min(gone, deleted)
        lo, hi = w._followers_ptr[a], w._followers_ptr[a + 1]
        followers = w._followers[lo:hi]
        affinity = w._affinity[w._followers_edge[lo:hi]]
        p = np.minimum(0.95, 1.5 * w._activity[followers]) * _sigmoid(
            STORY_VIEW_BIAS + STORY_VIEW_W_AFFINITY * affinity)
        viewed = rng.random(followers.size) < p
        view_t = t + 1000 + rng.lognormal(
            math.log(STORY_VIEW_DELAY_MEDIAN_MS), STORY_VIEW_DELAY_SIGMA, followers.size)
        push, eid = self._push, ids.event
        for v, vt in zip((followers[viewed] + 1).tolist(),
                         view_t[viewed].astype(np.int64).tolist()):
            if vt < gone:
                push(StoryEvent(eid(), vt, StoryEventKind.VIEWED, story_id, author_id, v))

    # -- follow churn

    def _schedule_churn(self, t: int) -> None:
        rng, w, ids = self.rng, self.w, self.ids
        u = int(rng.integers(0, self.cfg.users))
        if rng.random() < 0.5:
            lo, hi = w._following_ptr[u], w._following_ptr[u + 1]
            if hi == lo:
                return
            v = int(w._following[lo + int(rng.integers(0, hi - lo))])
            if (u, v) in self.touched:
                return
            self.touched.add((u, v))
            self._push(FollowEvent(ids.event(), t, FollowKind.UNFOLLOW, u + 1, v + 1))
            if rng.random() < P_REFOLLOW:
                again = t + 1000 + int(rng.lognormal(math.log(10 * MINUTE_MS), 1.0))
                if again < self.end:
                    self._push(FollowEvent(ids.event(), again, FollowKind.FOLLOW, u + 1, v + 1))
        else:
            v = int(w._sample_popular(rng, 1)[0])
            if v == u or (u, v) in self.touched or w._edge(u, v) is not None:
                return
            self.touched.add((u, v))
            self._push(FollowEvent(ids.event(), t, FollowKind.FOLLOW, u + 1, v + 1))
