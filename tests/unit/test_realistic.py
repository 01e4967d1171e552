"""The realistic workload: deterministic, communities, hidden quality, truth per impression."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from jobs.realistic import RealisticConfig, RealisticWorkload
from schemas.events import EngagementEvent, EngagementKind, FollowEvent, PostEvent

TINY = RealisticConfig(seed=5, users=300, communities=4, days=1.0, avg_following=20,
                       posts_per_user_day=1.0, late_fraction=0.05)


@pytest.fixture(scope="module")
def world():
    w = RealisticWorkload(TINY)
    return w, [e for _, _, e in w.events()]


def test_same_seed_same_events_and_truth(world):
    w, events = world
    again = RealisticWorkload(TINY)
    assert [e for _, _, e in again.events()] == events
    assert np.array_equal(again.truth.p, w.truth.p)
    other = RealisticWorkload(dataclasses.replace(TINY, seed=6))
    assert [e for _, _, e in other.events()][:50] != events[:50]


def test_truth_has_one_probability_per_first_view(world):
    w, events = world
    views = [(e.viewer_id, e.post_id) for e in events
             if type(e) is EngagementEvent and e.kind is EngagementKind.VIEW]
    assert len(views) == len(set(views)) == len(w.truth.p)
    assert set(zip(w.truth.viewer.tolist(), w.truth.post.tolist())) == set(views)
    assert ((w.truth.p > 0) & (w.truth.p < 1)).all()
    # Engagement follows its probability: impressions that were engaged had higher p.
    engaged = {(e.viewer_id, e.post_id) for e in events
               if type(e) is EngagementEvent and e.kind is not EngagementKind.VIEW}
    hit = np.array([(v, p) in engaged for v, p in zip(w.truth.viewer.tolist(),
                                                       w.truth.post.tolist())])
    assert w.truth.p[hit].mean() > 2 * w.truth.p[~hit].mean()


def test_follows_and_engagement_stay_mostly_inside_communities(world):
    w, events = world
    c = w.community
    follows = [(e.follower_id - 1, e.followee_id - 1) for e in events if type(e) is FollowEvent]
    inside = np.mean([c[a] == c[b] for a, b in follows])
    assert inside > 0.7
    likes = [(e.viewer_id - 1, e.author_id - 1) for e in events
             if type(e) is EngagementEvent and e.kind is EngagementKind.LIKE]
    assert np.mean([c[a] == c[b] for a, b in likes]) > inside - 0.05


def test_some_events_arrive_late_and_activity_is_heavy_tailed(world):
    _, events = world
    times = np.array([e.event_time for e in events if type(e) is not FollowEvent])
    assert (np.diff(times) < 0).sum() > 10  # emitted after later events
    views = collections.Counter(e.viewer_id for e in events
                                if type(e) is EngagementEvent and e.kind is EngagementKind.VIEW)
    counts = np.array(sorted(views.values(), reverse=True))
    assert counts[: len(counts) // 10].sum() > 0.25 * counts.sum()  # top 10% of viewers


def test_engagement_comes_after_the_view_and_posts_before_both(world):
    _, events = world
    created = {e.post_id: e.event_time for e in events if type(e) is PostEvent}
    first_view = {}
    for e in events:
        if type(e) is EngagementEvent and e.kind is EngagementKind.VIEW:
            first_view.setdefault((e.viewer_id, e.post_id), e.event_time)
    for e in events:
        if type(e) is EngagementEvent and e.kind is not EngagementKind.VIEW:
            assert e.event_time > first_view[(e.viewer_id, e.post_id)] > created[e.post_id]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="communities"):
        RealisticWorkload(dataclasses.replace(TINY, communities=100))
    with pytest.raises(ValueError, match="users"):
        RealisticWorkload(dataclasses.replace(TINY, users=5))
