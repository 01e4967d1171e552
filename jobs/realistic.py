"""A realistic feed workload for ranking: communities, hidden post quality, decay, noise.

    workload = RealisticWorkload(RealisticConfig(seed=1, users=2000, days=4))
    for topic, key, event in workload.events():   # in emission order (some events late)
        ...
    workload.truth    # ImpressionTruth: the true engagement probability of every impression

Unlike ``jobs.workload`` (planted, directly observable preferences), nothing
here that drives engagement is a column of any feature: users belong to
latent communities that hold most of their follows and interest; a post's
quality is latent (its author's quality plus noise) and shows only through
the engagement it gets; the chance to engage decays with the post's age;
activity and posting are heavy-tailed; posts also reach non-followers
(exploration, mostly within the author's community, more for posts that are
doing well); a viewer is more likely to engage with a post their followees
engaged with; engagement comes after a delay, some of it after the label
window. The same config gives the same events. Model and constants:
docs/workload.md, "The realistic workload".
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from typing import Iterator, NamedTuple

import numpy as np

from jobs.workload import DAY_MS, HOUR_MS, MINUTE_MS
from schemas.events import (
    EngagementEvent,
    EngagementKind,
    Event,
    FollowEvent,
    FollowKind,
    MediaType,
    PostEvent,
    PostEventKind,
)

# Engagement logit: bias + quality + community interest + tie + viewer propensity
# - age decay + social proof (followees who engaged before).
BIAS = -3.0
W_QUALITY = 1.2
W_INTEREST = 1.4
W_TIE = 2.0
W_SOCIAL = 0.6
AGE_DECAY = 0.45            # per log1p(age in hours)
AUTHOR_QUALITY_SD = 0.5
POST_QUALITY_SD = 0.8
VIEWER_PROPENSITY_SD = 0.5
SECONDARY_INTEREST = 0.5    # interest in one other community (own community: 1)

# Exposure.
FOLLOWER_VIEW_SCALE = 0.9   # x the follower's activity
VIEW_DELAY_MEDIAN_MS, VIEW_DELAY_SIGMA = 40 * MINUTE_MS, 1.2
EXPLORE_DELAY_MEDIAN_MS, EXPLORE_DELAY_SIGMA = 3 * HOUR_MS, 0.8
EXPLORE_IN_COMMUNITY = 0.75

# Engagement kinds and delays.
P_LIKE, P_COMMENT, P_SHARE, P_SAVE = 0.85, 0.12, 0.05, 0.07
ENGAGE_DELAY_MEDIAN_MS, ENGAGE_DELAY_SIGMA = 40_000, 1.6
DWELL_BASE_MS = 4_000.0
MEDIA: tuple[MediaType, ...] = (MediaType.PHOTO, MediaType.VIDEO, MediaType.CAROUSEL,
                                MediaType.REEL)


@dataclasses.dataclass(frozen=True)
class RealisticConfig:
    """Every knob of the realistic workload (defaults: a run of about a minute)."""

    start_ms: int = 1_767_225_600_000
    seed: int = 1
    users: int = 2000
    communities: int = 10
    days: float = 4.0
    avg_following: float = 50.0
    in_community_follow: float = 0.8
    posts_per_user_day: float = 1.0
    explore_per_post: float = 8.0
    late_fraction: float = 0.02
    max_lateness_ms: int = 5 * MINUTE_MS
    graph_lead_ms: int = HOUR_MS

    @property
    def end_ms(self) -> int:
        return self.start_ms + int(self.days * DAY_MS)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad option."""
        if self.users < 20:
            raise ValueError(f"users must be at least 20, got {self.users}")
        if not 1 <= self.communities <= self.users // 10:
            raise ValueError(f"communities must be in 1..users/10, got {self.communities}")
        if not 1 <= self.avg_following <= (self.users - 1) / 4:
            raise ValueError(f"avg_following must be in 1..(users-1)/4, got "
                             f"{self.avg_following}")
        if self.days <= 0 or self.posts_per_user_day <= 0:
            raise ValueError("days and posts_per_user_day must be positive")
        if not 0 <= self.in_community_follow <= 1 or not 0 <= self.late_fraction <= 1:
            raise ValueError("in_community_follow and late_fraction must be in [0, 1]")


class ImpressionTruth(NamedTuple):
    """The true engagement probability ``p`` of each impression (viewer, post)."""

    viewer: np.ndarray
    post: np.ndarray
    p: np.ndarray


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class RealisticWorkload:
    """The latent world of one config and its events (built on construction, ~1 s per
    100k impressions). User ids are ``1..users``."""

    def __init__(self, config: RealisticConfig):
        config.validate()
        self.config = config
        digest = hashlib.blake2b(repr(dataclasses.astuple(config)).encode(),
                                 digest_size=8).hexdigest()
        self._id_prefix = f"r{digest}-"
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, 101]))
        self._build_users(rng)
        self._build_graph(rng)
        self._events: list[tuple[int, int, Event]] = []
        self._run(np.random.default_rng(np.random.SeedSequence([config.seed, 102])))

    # ------------------------------------------------------------------ the world

    def _build_users(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n, c = cfg.users, cfg.communities
        self.community = rng.choice(c, size=n, p=rng.dirichlet(np.full(c, 3.0)))
        self.interest = np.zeros((n, c))
        self.interest[np.arange(n), self.community] = 1.0
        second = (self.community + rng.integers(1, max(c, 2), n)) % c
        self.interest[np.arange(n), second] = np.maximum(
            self.interest[np.arange(n), second], SECONDARY_INTEREST if c > 1 else 1.0)
        self.popularity = (1.0 + rng.pareto(1.3, n)) * rng.lognormal(0.0, 0.4, n)
        self.activity = np.clip(rng.lognormal(math.log(0.3), 0.9, n), 0.01, 1.0)
        self.post_weight = rng.lognormal(0.0, 1.0, n)
        self.author_quality = rng.normal(0.0, AUTHOR_QUALITY_SD, n)
        self.propensity = rng.normal(0.0, VIEWER_PROPENSITY_SD, n)
        self.media_mix = rng.dirichlet(np.full(len(MEDIA), 0.8), n)

    def _build_graph(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n = cfg.users
        members = [np.flatnonzero(self.community == k) for k in range(cfg.communities)]
        cdfs = [np.cumsum(self.popularity[m]) for m in members]
        all_cdf = np.cumsum(self.popularity)
        mu = math.log(cfg.avg_following) - 0.7 ** 2 / 2
        degree = np.clip(np.rint(rng.lognormal(mu, 0.7, n)), 1, n // 4).astype(np.int64)
        following: list[np.ndarray] = []
        for u in range(n):
            k = int(degree[u])
            inside = rng.random(2 * k + 4) < cfg.in_community_follow
            m, cdf = members[self.community[u]], cdfs[self.community[u]]
            pick_in = m[np.searchsorted(cdf, rng.random(inside.size) * cdf[-1], side="right")
                        .clip(0, m.size - 1)]
            pick_out = np.searchsorted(all_cdf, rng.random(inside.size) * all_cdf[-1],
                                       side="right").clip(0, n - 1)
            picks = np.where(inside, pick_in, pick_out)
            picks = picks[picks != u]
            _, first = np.unique(picks, return_index=True)
            following.append(picks[np.sort(first)][:k])
        self.following = following
        self.followee_sets = [frozenset(f.tolist()) for f in following]
        followers: list[list[int]] = [[] for _ in range(n)]
        for u, fs in enumerate(following):
            for a in fs.tolist():
                followers[a].append(u)
        self.followers = [np.array(f, dtype=np.int64) for f in followers]
        # Tie strength of each edge (viewer u -> author a): mostly weak, a few close.
        self.tie = {}
        for u, fs in enumerate(following):
            strength = rng.beta(1.2, 6.0, fs.size)
            close = rng.random(fs.size) < 0.06
            strength[close] = rng.beta(6.0, 2.0, int(close.sum()))
            for a, s in zip(fs.tolist(), strength.tolist()):
                self.tie[(u, a)] = s

    # ------------------------------------------------------------------ the run

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):010d}"

    def _run(self, rng: np.random.Generator) -> None:
        cfg = self.config
        n = cfg.users
        self._ids = itertools.count()
        order = itertools.count()  # ties of emission time keep creation order
        out = self._events

        def emit(event: Event) -> None:
            at = event.event_time
            if cfg.late_fraction and rng.random() < cfg.late_fraction:
                at += int(rng.integers(1, cfg.max_lateness_ms + 1))
            out.append((at, next(order), event))

        edges = [(u, int(a)) for u, fs in enumerate(self.following) for a in fs]
        t0 = cfg.start_ms - cfg.graph_lead_ms
        for i, j in enumerate(rng.permutation(len(edges)).tolist()):
            u, a = edges[j]
            t = t0 + i * cfg.graph_lead_ms // max(len(edges), 1)
            out.append((t, next(order), FollowEvent(self._next_id(), t, FollowKind.FOLLOW,
                                                    u + 1, a + 1)))

        count = int(rng.poisson(n * cfg.posts_per_user_day * cfg.days))
        weight_cdf = np.cumsum(self.post_weight)
        authors = np.searchsorted(weight_cdf, rng.random(count) * weight_cdf[-1],
                                  side="right").clip(0, n - 1)
        times = np.sort(cfg.start_ms + rng.integers(0, cfg.end_ms - cfg.start_ms, count))
        post_base = int(hashlib.blake2b(self._id_prefix.encode(), digest_size=3).hexdigest(),
                        16) << 30
        truth: tuple[list, list, list] = ([], [], [])
        for i, (a, t) in enumerate(zip(authors.tolist(), times.tolist())):
            mix = np.cumsum(self.media_mix[a])
            media = MEDIA[min(int(np.searchsorted(mix, rng.random() * mix[-1], side="right")),
                              len(MEDIA) - 1)]
            emit(PostEvent(self._next_id(), t, PostEventKind.CREATED, post_base + i, a + 1, t,
                           media))
            self._expose(rng, a, post_base + i, t, media, emit, truth)
        out.sort(key=lambda r: (r[0], r[1]))
        self.truth = ImpressionTruth(np.array(truth[0], np.int64), np.array(truth[1], np.int64),
                                     np.array(truth[2], np.float64))

    def _expose(self, rng, a: int, post_id: int, t: int, media: MediaType, emit,
                truth: tuple[list, list, list]) -> None:
        """The impressions and engagement of one post (``truth``: viewer, post and true
        probability of each impression, appended)."""
        cfg = self.config
        quality = self.author_quality[a] + rng.normal(0.0, POST_QUALITY_SD)
        followers = self.followers[a]
        seen = followers[rng.random(followers.size)
                         < FOLLOWER_VIEW_SCALE * self.activity[followers]]
        delay = rng.lognormal(math.log(VIEW_DELAY_MEDIAN_MS), VIEW_DELAY_SIGMA, seen.size)
        # Exploration favours posts that do well: a noisy view of their quality.
        k = int(rng.poisson(cfg.explore_per_post * 2 * _sigmoid(quality + rng.normal(0, 0.5))))
        inside = rng.random(k) < EXPLORE_IN_COMMUNITY
        pool = np.flatnonzero(self.community == self.community[a])
        explore = np.where(inside, pool[rng.integers(0, pool.size, k)],
                           rng.integers(0, cfg.users, k))
        explore = np.setdiff1d(explore, np.append(followers, a))
        viewers = np.concatenate([seen, explore])
        delay = np.concatenate([delay, rng.lognormal(math.log(EXPLORE_DELAY_MEDIAN_MS),
                                                     EXPLORE_DELAY_SIGMA, explore.size)])
        view_t = (t + 1000 + delay).astype(np.int64)
        order = np.argsort(view_t, kind="stable")
        viewers, view_t = viewers[order], view_t[order]
        keep = view_t < cfg.end_ms
        viewers, view_t = viewers[keep], view_t[keep]
        c = self.community[a]
        tie = np.array([self.tie.get((int(v), a), 0.0) for v in viewers.tolist()])
        base = (BIAS + W_QUALITY * quality + W_INTEREST * self.interest[viewers, c]
                + W_TIE * tie + self.propensity[viewers]
                - AGE_DECAY * np.log1p((view_t - t) / HOUR_MS))
        u = rng.random((6, viewers.size))
        engage_delay = rng.lognormal(math.log(ENGAGE_DELAY_MEDIAN_MS), ENGAGE_DELAY_SIGMA,
                                     viewers.size).astype(np.int64)
        engaged_at: dict[int, int] = {}  # viewer -> engagement time, for social proof
        for i, (v, vt) in enumerate(zip(viewers.tolist(), view_t.tolist())):
            followees = self.followee_sets[v]
            proof = sum(1 for w, at in engaged_at.items() if at < vt and w in followees)
            p = float(_sigmoid(base[i] + W_SOCIAL * math.log1p(proof)))
            truth[0].append(v + 1)
            truth[1].append(post_id)
            truth[2].append(p)
            dwell = int(DWELL_BASE_MS * math.exp(0.4 * (base[i] - BIAS) + rng.normal(0, 0.5)))
            emit(EngagementEvent(self._next_id(), vt, EngagementKind.VIEW, v + 1, a + 1,
                                 post_id, media, max(300, min(dwell, 120_000))))
            if u[0, i] >= p:
                continue
            at = vt + dwell + int(engage_delay[i])
            engaged_at[v] = at
            if at >= cfg.end_ms:
                continue
            kinds = [k for k, flag in ((EngagementKind.COMMENT, u[2, i] < P_COMMENT),
                                       (EngagementKind.SHARE, u[3, i] < P_SHARE),
                                       (EngagementKind.SAVE, u[4, i] < P_SAVE)) if flag]
            if u[1, i] < P_LIKE or not kinds:
                kinds.insert(0, EngagementKind.LIKE)
            for j, kind in enumerate(kinds):
                emit(EngagementEvent(self._next_id(), at + j * 7_000, kind, v + 1, a + 1,
                                     post_id, media))

    # ------------------------------------------------------------------ output

    def events(self) -> Iterator[tuple[str, bytes, Event]]:
        """``(topic, key, event)`` in emission order: event time, except the late
        share, emitted up to ``max_lateness_ms`` after it."""
        for _, _, event in self._events:
            yield event.TOPIC, event.key, event
