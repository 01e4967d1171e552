"""Social features: point in time, followees only, velocity, priors, communities."""
from __future__ import annotations

import math

import numpy as np
import pytest

from domain.social_features import (
    SOCIAL_FEATURES,
    SocialParams,
    SocialState,
    label_propagation,
)

MIN = 60_000
HOUR = 60 * MIN
F = {name: i for i, name in enumerate(SOCIAL_FEATURES)}


def test_social_proof_counts_the_viewers_followees_before_the_impression_only():
    s = SocialState(SocialParams(recent_ms=10 * HOUR))
    for followee in (2, 3, 4):
        s.follow(1, followee)
    s.follow(1, 4, add=False)
    s.post_created(100, author=9, t=0)
    s.engage(2, 100, 9, t=MIN)        # a followee
    s.engage(4, 100, 9, t=2 * MIN)    # unfollowed
    s.engage(7, 100, 9, t=3 * MIN)    # a stranger
    s.view(3, 100, 9, t=4 * MIN)
    s.engage(3, 100, 9, t=30 * MIN)   # at the impression: not yet
    row = s.features(1, 100, 9, t=30 * MIN)
    assert row[F["followee_engagers_recent"]] == 1
    assert row[F["followee_viewers_recent"]] == 1
    later = s.features(1, 100, 9, t=30 * MIN + 1)
    assert later[F["followee_engagers_recent"]] == 2
    # Outside the recent window, engagement no longer counts.
    assert s.features(1, 100, 9, t=MIN + 10 * HOUR + 1)[F["followee_engagers_recent"]] == 1


def test_velocity_first_hour_and_totals():
    s = SocialState(SocialParams(velocity_ms=15 * MIN, first_ms=HOUR))
    s.post_created(100, 9, t=0)
    for i, t in enumerate((5 * MIN, 50 * MIN, 70 * MIN, 80 * MIN)):
        s.view(10 + i, 100, 9, t - 1)
        s.engage(10 + i, 100, 9, t)
    s.engage(10, 100, 9, 81 * MIN)    # the same viewer again: counted once
    row = s.features(1, 100, 9, t=85 * MIN)
    assert row[F["post_engaged_velocity"]] == 2            # 70 and 80 min
    assert row[F["post_engaged_first_hour"]] == 2          # 5 and 50 min
    assert row[F["post_engaged_total"]] == 4 and row[F["post_views_total"]] == 4
    assert s.features(1, 100, 9, t=6 * MIN)[F["post_engaged_total"]] == 1


def test_author_prior_shrinks_towards_the_mean_and_drives_a_new_posts_rate():
    p = SocialParams(author_prior_views=10.0, post_prior_views=5.0)
    s = SocialState(p)
    for i in range(40):  # author 9 engages everyone, author 8 nobody
        for author, post in ((9, 100), (8, 200)):
            s.view(i, post, author, t=i)
            if author == 9:
                s.engage(i, post, author, t=i)
    good, bad = s.author_prior(9, 100), s.author_prior(8, 100)
    assert 0.5 < good < 1.0 and 0.0 < bad < 0.5
    s.post_created(300, 9, t=100)
    row = s.features(1, 300, 9, t=101)  # no engagement of its own yet: the author's prior
    assert row[F["post_rate_smoothed"]] == pytest.approx(good)
    assert row[F["author_quality_prior"]] == pytest.approx(good)


def test_community_affinity_and_share_decay_and_split_by_community():
    half_life = HOUR
    s = SocialState(SocialParams(half_life_ms=half_life), community={9: 0, 8: 1, 7: 0})
    s.engage(1, 100, 9, t=0)
    s.engage(1, 200, 8, t=0)
    s.engage(1, 201, 8, t=0)
    row = s.features(1, 300, 7, t=HOUR)  # author 7 is in community 0, like author 9
    assert row[F["viewer_community_affinity"]] == pytest.approx(0.5)
    assert row[F["viewer_community_share"]] == pytest.approx(1 / 3)
    assert math.isnan(s.features(2, 300, 7, t=HOUR)[F["viewer_community_share"]])


def test_label_propagation_separates_two_cliques_joined_by_one_edge():
    a = [(i, j) for i in range(6) for j in range(6) if i < j]
    b = [(i + 10, j + 10) for i, j in a]
    edges = np.array(a + b + [(0, 10)])
    labels = label_propagation(edges[:, 0], edges[:, 1], seed=1)
    assert len({labels[i] for i in range(6)}) == 1
    assert len({labels[i + 10] for i in range(6)}) == 1
    assert labels[0] != labels[10]


def test_params_must_be_positive():
    with pytest.raises(ValueError, match="velocity_ms"):
        SocialParams(velocity_ms=0)
