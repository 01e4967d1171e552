"""Social and early-engagement features of an impression, one event at a time.

    state = SocialState(SocialParams(), community={user: community id})
    state.follow(follower, followee)             # follow-events (unfollow: add=False)
    state.post_created(post, author, t)          # post-events CREATED
    row = state.features(viewer, post, author, t)  # as of just before t: SOCIAL_FEATURES order
    state.view(viewer, post, author, t)          # engagement-events VIEW
    state.engage(viewer, post, author, t)        # LIKE, COMMENT, SHARE, SAVE

Fed events in event-time order, ``features`` at an impression sees only the
events before it: the values are point-in-time correct by construction. Every
piece of state is keyed by one entity (a post, an author, a viewer, a follow
edge), updated by one event and read in constant time per impression, apart
from the social proof, which intersects the viewer's followees with the
post's engagers. So a keyed streaming stage can hold it as it is. The
features, their keys and what the pipelines still need: docs/ranking.md.

``label_propagation`` turns the follow graph into communities (a compact
embedding trained offline, the community id of a user), which the viewer's
community affinity is keyed by.
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Mapping

import numpy as np

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

#: Columns ``SocialState.features`` returns, in order (ranking models name them so).
SOCIAL_FEATURES: tuple[str, ...] = (
    "followee_engagers_recent",    # the viewer's followees who engaged with the post recently
    "followee_viewers_recent",     # ... who saw it recently
    "post_engaged_velocity",       # engaged viewers in the last velocity window
    "post_views_velocity",         # views in the last velocity window
    "post_engaged_first_hour",     # engaged viewers in the post's first hour (so far)
    "post_engaged_total",
    "post_views_total",
    "post_rate_smoothed",          # the post's engagement rate, shrunk to its author's prior
    "author_quality_prior",        # the author's decayed engagement rate, shrunk to the mean
    "viewer_community_affinity",   # the viewer's decayed engagements with the author's community
    "viewer_community_share",      # that / the viewer's engagements with every community
)


@dataclasses.dataclass(frozen=True)
class SocialParams:
    """Windows and priors of the social features."""

    recent_ms: int = DAY_MS
    velocity_ms: int = 15 * MINUTE_MS
    first_ms: int = HOUR_MS
    half_life_ms: int = 7 * DAY_MS
    author_prior_views: float = 50.0   # pseudo-views of the global rate in an author's prior
    post_prior_views: float = 10.0     # pseudo-views of the author's prior in a post's rate

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"{f.name} must be positive")


class _Post:
    __slots__ = ("author", "created_at", "view_times", "engage_times", "viewers", "engagers")

    def __init__(self, author: int, created_at: int):
        self.author = author
        self.created_at = created_at
        self.view_times: list[int] = []
        self.engage_times: list[int] = []
        self.viewers: dict[int, int] = {}   # viewer -> first view time
        self.engagers: dict[int, int] = {}  # viewer -> first engagement time


class _Decayed:
    """A sum that halves every ``half_life_ms``: ``(value, as of)``."""

    __slots__ = ("value", "at")

    def __init__(self):
        self.value = 0.0
        self.at = 0

    def read(self, t: int, half_life_ms: int) -> float:
        return self.value * 2.0 ** (-(t - self.at) / half_life_ms) if self.value else 0.0

    def add(self, w: float, t: int, half_life_ms: int) -> None:
        if t >= self.at:
            self.value = self.read(t, half_life_ms) + w
            self.at = t
        else:  # a late event: its weight decayed to the sum's time
            self.value += w * 2.0 ** (-(self.at - t) / half_life_ms)


class SocialState:
    """The state behind ``SOCIAL_FEATURES`` (see the module doc)."""

    def __init__(self, params: SocialParams = SocialParams(),
                 community: Mapping[int, int] | None = None):
        self.params = params
        self.community = community or {}
        self.followees: dict[int, set[int]] = {}
        self.posts: dict[int, _Post] = {}
        self.author_engaged: dict[int, _Decayed] = {}
        self.author_views: dict[int, _Decayed] = {}
        self.viewer_community: dict[int, dict[int, _Decayed]] = {}
        self.views = 0
        self.engaged = 0

    # -- updates

    def follow(self, follower: int, followee: int, add: bool = True) -> None:
        edges = self.followees.setdefault(follower, set())
        if add:
            edges.add(followee)
        else:
            edges.discard(followee)

    def post_created(self, post: int, author: int, t: int) -> None:
        if post not in self.posts:
            self.posts[post] = _Post(author, t)

    def view(self, viewer: int, post: int, author: int, t: int) -> None:
        """A VIEW: counts once per viewer and post."""
        p = self._first(viewer, post, author, t, "viewers", "view_times")
        if p is not None:
            _get(self.author_views, p.author).add(1.0, t, self.params.half_life_ms)
            self.views += 1

    def engage(self, viewer: int, post: int, author: int, t: int) -> None:
        """A LIKE, COMMENT, SHARE or SAVE: counts once per viewer and post."""
        p = self._first(viewer, post, author, t, "engagers", "engage_times")
        if p is None:
            return
        hl = self.params.half_life_ms
        _get(self.author_engaged, p.author).add(1.0, t, hl)
        self.engaged += 1
        c = self.community.get(p.author)
        if c is not None:
            _get(self.viewer_community.setdefault(viewer, {}), c).add(1.0, t, hl)

    def _first(self, viewer: int, post: int, author: int, t: int, who: str, times: str
               ) -> _Post | None:
        """Record ``viewer``'s first ``who`` (viewers or engagers) of ``post`` at ``t``; the
        post, or None when the viewer was already counted."""
        p = self.posts.get(post)
        if p is None:  # engagement before (or without) its CREATED event
            p = self.posts[post] = _Post(author, t)
        seen = getattr(p, who)
        if viewer in seen:
            return None
        seen[viewer] = t
        bisect.insort(getattr(p, times), t)
        return p

    # -- reads

    def author_prior(self, author: int, t: int) -> float:
        """The author's decayed engagement rate, shrunk towards the global rate."""
        hl = self.params.half_life_ms
        engaged = self.author_engaged.get(author)
        views = self.author_views.get(author)
        return author_prior(engaged.read(t, hl) if engaged else 0.0,
                            views.read(t, hl) if views else 0.0,
                            self.engaged, self.views, self.params)

    def features(self, viewer: int, post: int, author: int, t: int) -> tuple[float, ...]:
        """``SOCIAL_FEATURES`` of ``viewer`` seeing ``post`` at ``t``, from the events
        applied so far that happened before ``t``."""
        prm = self.params
        p = self.posts.get(post)
        followees = self.followees.get(viewer, ())
        prior = self.author_prior(author if p is None else p.author, t)
        if p is None:
            social = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, prior)
        else:
            since = t - prm.recent_ms
            engagers = _recent(p.engagers, followees, since, t)
            viewers = _recent(p.viewers, followees, since, t)
            first_end = min(p.created_at + prm.first_ms, t)
            e_total = bisect.bisect_left(p.engage_times, t)
            v_total = bisect.bisect_left(p.view_times, t)
            social = (
                float(engagers), float(viewers),
                float(e_total - bisect.bisect_left(p.engage_times, t - prm.velocity_ms)),
                float(v_total - bisect.bisect_left(p.view_times, t - prm.velocity_ms)),
                float(bisect.bisect_left(p.engage_times, first_end)),
                float(e_total), float(v_total),
                smoothed_rate(e_total, v_total, prior, prm))
        c = self.community.get(author if p is None else p.author)
        mine = self.viewer_community.get(viewer) or {}
        affinity = mine[c].read(t, prm.half_life_ms) if c is not None and c in mine else 0.0
        total = sum(d.read(t, prm.half_life_ms) for d in mine.values())
        return social + (prior, *community_affinity(affinity, total))


def author_prior(engaged: float, views: float, engaged_all: float, views_all: float,
                 params: SocialParams) -> float:
    """An author's engagement rate from its decayed first engagements and first views,
    shrunk with ``author_prior_views`` pseudo-views towards the rate of everyone's
    (``engaged_all`` / ``views_all``, undecayed counts, smoothed by one in four)."""
    k = params.author_prior_views
    return (engaged + k * (engaged_all + 1.0) / (views_all + 4.0)) / (views + k)


def smoothed_rate(engaged: float, views: float, prior: float, params: SocialParams) -> float:
    """A post's engaged viewers per viewer, shrunk with ``post_prior_views`` pseudo-views
    towards its author's prior."""
    k = params.post_prior_views
    return (engaged + k * prior) / (views + k)


def community_affinity(affinity: float, total: float) -> tuple[float, float]:
    """``(viewer_community_affinity, viewer_community_share)`` from the viewer's decayed
    engagements with the author's community and with every community (share NaN when
    the viewer has none)."""
    return affinity, (affinity / total if total > 0 else math.nan)


def decayed(value: float, at: int, t: int, half_life_ms: int) -> float:
    """A decayed sum held as ``(value, at)`` read at ``t`` (or at ``at`` when ``t`` is
    earlier: a sum is never read before its last event)."""
    return value * 2.0 ** (-max(0, t - at) / half_life_ms) if value else 0.0


def _get(table: dict, key) -> _Decayed:
    d = table.get(key)
    if d is None:
        d = table[key] = _Decayed()
    return d


def _recent(times: dict[int, int], followees, since: int, before: int) -> int:
    """How many of ``followees`` have a time in ``[since, before)`` in ``times``."""
    small, large = (followees, times) if len(followees) < len(times) else (times, followees)
    return sum(1 for u in small if u in large and since <= times[u] < before)


def label_propagation(src: np.ndarray, dst: np.ndarray, seed: int = 0, rounds: int = 20
                      ) -> dict[int, int]:
    """Communities of the undirected graph ``src[i] - dst[i]``: ``{node: community}``.

    Each round, a random half of the nodes take the label most common among
    their neighbours (ties broken at random); halves keep it from oscillating.
    Communities are numbered 0.. by size, largest first.
    """
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    nodes, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    n = nodes.size
    if n == 0:
        return {}
    a, b = inverse[:src.size], inverse[src.size:]
    u, v = np.concatenate([a, b]), np.concatenate([b, a])
    rng = np.random.default_rng(seed)
    label = np.arange(n)
    for _round in range(rounds):
        pair = u * n + label[v]
        keys, counts = np.unique(pair, return_counts=True)
        node, lab = keys // n, keys % n
        score = counts + rng.random(counts.size)  # random tie-break
        order = np.lexsort((-score, node))
        first = np.ones(order.size, bool)
        first[1:] = node[order][1:] != node[order][:-1]
        best = np.full(n, -1)
        best[node[order][first]] = lab[order][first]
        if not ((best >= 0) & (best != label)).any():
            break  # stable: every node holds a most common label of its neighbours
        move = (rng.random(n) < 0.5) & (best >= 0)
        label = np.where(move, best, label)
    _, dense, sizes = np.unique(label, return_inverse=True, return_counts=True)
    rank = np.empty(sizes.size, np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(sizes.size)
    return dict(zip(nodes.tolist(), rank[dense].tolist()))
