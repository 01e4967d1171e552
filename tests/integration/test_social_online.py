"""The social features online (``stores.redis.social``) equal the offline replay
(``domain.social_features.SocialState``) on the same events, on the local Redis."""
from __future__ import annotations

import numpy as np
import pytest

from domain.features import COMMENT, LIKE, PROFILE_VIEW, SAVE, SHARE, UNLIKE, VIEW
from domain.social_features import HOUR_MS, MINUTE_MS, SOCIAL_FEATURES, SocialState
from schemas.events import FollowEvent, FollowKind
from schemas.keys import KeyLayout
from stores.redis.feeds import RedisFeedStore
from stores.redis.social import SocialFacts, SocialReader

T0 = 1_780_000_000_000
USERS = 40
POSTS = 30


def _workload(seed: int):
    rng = np.random.default_rng(seed)
    follows = {(int(a), int(b)) for a, b in rng.integers(1, USERS + 1, (400, 2)) if a != b}
    author = {p: int(rng.integers(1, USERS + 1)) for p in range(1, POSTS + 1)}
    created = {p: T0 + int(rng.integers(0, 3 * HOUR_MS)) for p in author}
    community = {u: int(rng.integers(0, 4)) for u in range(1, USERS + 1) if u % 7}
    n = 4000
    kinds = rng.choice([VIEW, VIEW, VIEW, LIKE, COMMENT, SHARE, SAVE, UNLIKE, PROFILE_VIEW], n)
    post = rng.integers(1, POSTS + 1, n)
    # Engagements after their post's creation, in time order, spread over two days
    # (past the 24 h social-proof window and the 15 min velocity window).
    t = np.sort(T0 + 3 * HOUR_MS + rng.integers(0, 48 * HOUR_MS, n))
    t[rng.random(n) < 0.05] -= 2 * HOUR_MS  # some before the first hour's end
    t = np.maximum(t, np.array([created[p] for p in post.tolist()]) + 1)
    order = np.argsort(t, kind="stable")
    viewer = rng.integers(1, USERS + 1, n)
    post[kinds == PROFILE_VIEW] = -1
    cols = [kinds[order], t[order], viewer[order], post[order],
            np.array([author.get(p, 0) for p in post[order].tolist()])]
    return sorted(follows), author, created, community, cols


def test_online_social_features_equal_the_offline_replay(redis_client, key_prefix):
    follows, author, created, community, (kind, t, viewer, post, post_author) = _workload(3)
    keys = KeyLayout(key_prefix)
    RedisFeedStore(redis_client, keys).apply_edges(
        [FollowEvent(f"f{i}", T0, FollowKind.FOLLOW, a, b) for i, (a, b) in enumerate(follows)])
    offline = SocialState(community=community)
    for a, b in follows:
        offline.follow(a, b)
    for p, a in author.items():
        offline.post_created(p, a, created[p])
    facts, reader = SocialFacts(redis_client, keys, chunk_size=7), SocialReader(redis_client, keys)

    posts = np.array(sorted(author))
    checkpoints = [T0 + h * HOUR_MS + 7 * MINUTE_MS for h in (4, 9, 26, 40, 52)]
    done = 0
    compared = 0
    largest = np.zeros(len(SOCIAL_FEATURES))
    for at in checkpoints:
        end = int(np.searchsorted(t, at))
        for lo in range(done, end, 250):  # batches as the pipeline's, one applied twice
            hi = min(lo + 250, end)
            batch = [c[lo:hi] for c in (kind, t, viewer, post, post_author)]
            facts.apply(*batch)
            if lo == done:
                assert facts.apply(*batch) == 0  # a replay records no new first
        for k, when, v, p, a in zip(*(c[done:end].tolist()
                                      for c in (kind, t, viewer, post, post_author))):
            if p < 0:
                continue
            if k == VIEW:
                offline.view(v, p, a, when)
            elif k in (LIKE, COMMENT, SHARE, SAVE):
                offline.engage(v, p, a, when)
        done = end

        viewers = list(range(1, USERS + 1))
        row_viewer = np.repeat(np.arange(USERS), len(posts))
        row_post = np.tile(posts, USERS)
        online = reader.rows(viewers, row_viewer, row_post,
                             np.array([author[p] for p in row_post.tolist()]),
                             np.array([created[p] for p in row_post.tolist()]), at, community)
        expected = np.array([offline.features(v, p, author[p], at)
                             for v, p in zip(np.repeat(viewers, len(posts)).tolist(),
                                             row_post.tolist())])
        np.testing.assert_allclose(online, expected, rtol=1e-9, atol=1e-12,
                                   err_msg=f"at checkpoint {at}")
        compared += len(online)
        largest = np.fmax(largest, np.nanmax(np.abs(expected), axis=0))
    assert compared == len(checkpoints) * USERS * POSTS
    # The comparison saw every feature take values: not all zeros or NaN.
    assert (largest > 0).all(), dict(zip(SOCIAL_FEATURES, largest))


def test_a_post_nobody_saw_reads_as_its_authors_prior(redis_client, key_prefix):
    keys = KeyLayout(key_prefix)
    facts, reader = SocialFacts(redis_client, keys), SocialReader(redis_client, keys)
    offline = SocialState()
    kind, t = np.array([VIEW, LIKE, VIEW]), np.array([T0, T0 + 5, T0 + 9])
    viewer, post, by = np.array([1, 1, 2]), np.array([10, 10, 10]), np.array([5, 5, 5])
    assert facts.apply(kind, t, viewer, post, by) == 3
    offline.view(1, 10, 5, T0)
    offline.engage(1, 10, 5, T0 + 5)
    offline.view(2, 10, 5, T0 + 9)
    at = T0 + HOUR_MS
    row = reader.rows([3], np.array([0]), np.array([11]), np.array([5]), np.array([T0]), at, {})
    expected = offline.features(3, 11, 5, at)
    np.testing.assert_allclose(row[0], expected, rtol=1e-12)
    assert row[0][SOCIAL_FEATURES.index("post_rate_smoothed")] == pytest.approx(
        row[0][SOCIAL_FEATURES.index("author_quality_prior")])
    assert np.isnan(row[0][SOCIAL_FEATURES.index("viewer_community_share")])


def test_a_social_model_served_without_facts_is_said_once(redis_client, key_prefix, caplog):
    reader = SocialReader(redis_client, KeyLayout(key_prefix))
    args = ([3], np.array([0]), np.array([11]), np.array([5]), np.array([T0]), T0 + HOUR_MS, {})
    with caplog.at_level("WARNING", logger="stores.redis.social"):
        first = reader.rows(*args)
        reader.rows(*args)
    assert len(caplog.records) == 1 and "no social facts" in caplog.records[0].message
    # Read as a post nobody saw by an author nobody saw: the global prior only.
    assert first[0][SOCIAL_FEATURES.index("author_quality_prior")] == pytest.approx(0.25)
