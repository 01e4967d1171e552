"""The training set: impressions, labels, and point-in-time features without future leakage."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.training_set import (
    TrainingSetConfig,
    build_training_set,
    events_table,
    impressions_and_labels,
    query_groups,
    time_split,
)
from stores.files.feature_log import write_feature_log
from domain.ranking_features import FEATURE_NAMES
from schemas.events import EngagementEvent, EngagementKind, MediaType, PostEvent, PostEventKind
from schemas.features import FeatureValue

T0 = 1_780_000_000_000
MIN = 60_000
K = EngagementKind
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


def eng(eid, t, kind, viewer, post=100, author=9, media=MediaType.PHOTO):
    return EngagementEvent(eid, t, kind, viewer, author, post, media)


def created(post, author, t, media=MediaType.PHOTO):
    return PostEvent(f"c{post}", t, PostEventKind.CREATED, post, author, t, media)


def tables(engagements, posts):
    return events_table(engagements, EngagementEvent), events_table(posts, PostEvent)


def test_impressions_are_first_views_and_labels_follow_the_window():
    e, _ = tables([
        eng("v1", T0 + 10 * MIN, K.VIEW, 1),
        eng("v1", T0 + 10 * MIN, K.VIEW, 1),                 # duplicate delivery: counted once
        eng("l1", T0 + 11 * MIN, K.LIKE, 1),                 # within the hour: positive
        eng("v2", T0 + 20 * MIN, K.VIEW, 2),
        eng("l2", T0 + 2 * 60 * MIN, K.LIKE, 2),             # after the window: negative
        eng("s2", T0 + 19 * MIN, K.SAVE, 2),                 # before the view: negative
        eng("v3", T0 + 30 * MIN, K.VIEW, 3),
        eng("v3b", T0 + 40 * MIN, K.VIEW, 3),                # a second view: same impression
        eng("c3", T0 + 35 * MIN, K.COMMENT, 3),
        eng("v4", T0 + 50 * MIN, K.VIEW, 4),
        eng("u4", T0 + 51 * MIN, K.UNLIKE, 4),               # not an engagement
        eng("p4", T0 + 52 * MIN, K.PROFILE_VIEW, 4, post=None, media=None),
    ], [])
    imp = impressions_and_labels(e, label_window_ms=60 * MIN)
    assert imp.column("viewer_id").to_pylist() == [1, 2, 3, 4]
    assert imp.column("ts_ms").to_pylist() == [T0 + 10 * MIN, T0 + 20 * MIN, T0 + 30 * MIN,
                                               T0 + 50 * MIN]
    assert imp.column("label").to_pylist() == [1, 0, 1, 0]


def test_features_are_read_as_of_just_before_the_impression(tmp_path):
    log = tmp_path / "features"
    write_feature_log(log, [
        FeatureValue("post", "100", "like_1h", 1.0, T0 + 5 * MIN),
        FeatureValue("post", "100", "like_1h", 7.0, T0 + 10 * MIN),   # at the impression: not yet
        FeatureValue("post", "100", "like_1h", 9.0, T0 + 15 * MIN),
        FeatureValue("author", "9", "posts_7d", 3.0, T0 - MIN),
        FeatureValue("viewer_author", "1:9", "affinity", 2.0, T0),
        FeatureValue("viewer_author", "1:9", "affinity", 50.0, T0 + 11 * MIN),  # the label's like
        FeatureValue("viewer_media", "1:PHOTO", "affinity", 3.0, T0),
        FeatureValue("viewer_media", "1:VIDEO", "affinity", 1.0, T0),
    ])
    e, p = tables([eng("v1", T0 + 10 * MIN, K.VIEW, 1), eng("l1", T0 + 11 * MIN, K.LIKE, 1),
                   eng("v2", T0 + 20 * MIN, K.VIEW, 2),
                   eng("v9", T0 + 20 * MIN, K.VIEW, 2, post=555)],  # post unknown: dropped
                  [created(100, 9, T0)])
    half_life = 60 * MIN
    ts = build_training_set(e, p, str(log), TrainingSetConfig(label_window_ms=60 * MIN,
                                                                half_life_ms=half_life))
    assert len(ts) == 2 and ts.dropped == 1
    assert list(ts.labels) == [1, 0] and list(ts.created_at) == [T0, T0]
    x = ts.features
    assert x.shape == (2, len(FEATURE_NAMES)) and x.dtype == np.float32
    assert list(x[:, COL["post_like_1h"]]) == [1.0, 9.0]
    assert math.isnan(x[0, COL["post_share_1h"]])          # never logged: missing
    assert list(x[:, COL["author_posts_7d"]]) == [3.0, 3.0]
    # Viewer 1's affinity decayed from T0 to the impression (10 min of a 60 min
    # half-life); the value written by the labelled like is not visible.
    assert x[0, COL["viewer_author_affinity"]] == pytest.approx(2.0 * 2 ** (-10 / 60), rel=1e-6)
    assert x[1, COL["viewer_author_affinity"]] == 0.0       # viewer 2: none
    photo = 3.0 * 2 ** (-10 / 60)
    assert x[0, COL["viewer_media_affinity"]] == pytest.approx(photo, rel=1e-6)
    assert x[0, COL["viewer_media_share"]] == pytest.approx(0.75, rel=1e-6)
    assert math.isnan(x[1, COL["viewer_media_share"]])
    assert list(x[:, COL["post_age_min"]]) == [10.0, 20.0]
    assert list(x[:, COL["media_PHOTO"]]) == [1.0, 1.0] and x[0, COL["media_REEL"]] == 0.0


def test_no_feature_value_is_from_the_future(tmp_path):
    # Random logs and impressions: every feature equals the newest logged
    # value valid strictly before its impression (brute force), or is missing.
    rng = np.random.default_rng(3)
    log = tmp_path / "features"
    values, posts, events = [], [], []
    for post in range(1, 6):
        posts.append(created(post, 9, T0))
        for _ in range(8):
            values.append(FeatureValue("post", str(post), "view_24h",
                                       float(rng.integers(0, 1000)),
                                       T0 + int(rng.integers(0, 120)) * MIN))
    write_feature_log(log, values)
    for i in range(60):
        t = T0 + int(rng.integers(0, 120)) * MIN
        events.append(eng(f"v{i}", t, K.VIEW, viewer=i, post=int(rng.integers(1, 6))))
    ts = build_training_set(*tables(events, posts), str(log),
                            TrainingSetConfig(label_window_ms=MIN))
    assert len(ts) == 60
    for row in range(len(ts)):
        seen = [(v.valid_at_ms, v.value) for v in values
                if v.entity_id == str(ts.post_id[row]) and v.valid_at_ms < ts.ts_ms[row]]
        got = ts.features[row, COL["post_view_24h"]]
        if seen:
            newest = max(t for t, _ in seen)
            assert got in {v for t, v in seen if t == newest}
        else:
            assert math.isnan(got)


def test_time_split_keeps_label_windows_out_of_the_held_out_period():
    ts = np.array([0, 10, 40, 50, 60, 90])
    train, held_out = time_split(ts, split_at_ms=60, label_window_ms=15)
    assert list(ts[train]) == [0, 10, 40] and list(ts[held_out]) == [60, 90]


def test_censored_rows_are_left_out_of_training_and_evaluation_alike():
    # Label window 15; data ends at 100: the row at 90 cannot have its label yet,
    # like the row at 50 cannot be trained on before the split at 60.
    ts = np.array([0, 10, 40, 50, 60, 84, 85, 90])
    train, held_out = time_split(ts, split_at_ms=60, label_window_ms=15, end_ms=100)
    assert list(ts[train]) == [0, 10, 40] and list(ts[held_out]) == [60, 84, 85]


def test_query_groups_start_at_the_held_out_start_and_absorb_a_short_tail():
    viewer = np.array([1, 1, 1, 1, 2, 2])
    ts = np.array([100, 123, 124, 150, 100, 160])
    # Periods of 24 from 100 up to 160: [100, 124), then [124, 160] (12 left over joins it).
    g = query_groups(viewer, ts, 24, origin_ms=100, end_ms=160)
    assert g[0] == g[1] != g[2] == g[3]
    assert g[4] != g[5] and len(set(g.tolist())) == 4
    # Shorter than a period: a single group per viewer.
    g = query_groups(viewer, ts, 1000, origin_ms=100, end_ms=161)
    assert len(set(g[:4].tolist())) == 1 and g[0] != g[4]


def test_truth_is_joined_by_viewer_and_post(tmp_path):
    e, p = tables([eng("v1", T0 + MIN, K.VIEW, 1), eng("v2", T0 + 2 * MIN, K.VIEW, 2),
                   eng("v3", T0 + 3 * MIN, K.VIEW, 3)], [created(100, 9, T0)])
    (tmp_path / "features").mkdir()
    ts = build_training_set(e, p, str(tmp_path / "features"))
    assert ts.end_ms == T0 + 3 * MIN and np.isnan(ts.p_true).all()
    ts = ts.with_truth(np.array([3, 1, 7]), np.array([100, 100, 100]), np.array([.3, .1, .7]))
    assert ts.p_true[0] == .1 and math.isnan(ts.p_true[1]) and ts.p_true[2] == .3
    sub = ts.take(np.array([False, True, True]))
    assert len(sub) == 2 and sub.p_true[1] == .3 and sub.end_ms == ts.end_ms
    wider = ts.with_columns(["extra"], np.ones((3, 1)))
    assert wider.features.shape == (3, len(FEATURE_NAMES) + 1)
    assert wider.feature_names[-1] == "extra"


def test_social_columns_count_only_followees_engagement_before_each_impression(tmp_path):
    from jobs.training_set import with_social_features
    from domain.social_features import SOCIAL_FEATURES
    from schemas.events import FollowEvent, FollowKind

    rng = np.random.default_rng(7)
    follows = [FollowEvent(f"f{v}-{u}", T0 - MIN, FollowKind.FOLLOW, v, u)
               for v in range(1, 13) for u in range(1, 13) if v != u and rng.random() < 0.4]
    followees = {}
    for f in follows:
        followees.setdefault(f.follower_id, set()).add(f.followee_id)
    events = []
    for i in range(200):
        t = T0 + int(rng.integers(0, 180)) * MIN
        viewer, post = int(rng.integers(1, 13)), int(rng.integers(1, 4))
        kind = K.VIEW if rng.random() < 0.6 else K.LIKE
        events.append(eng(f"e{i}", t, kind, viewer, post=post))
    e, p = tables(events, [created(post, 9, T0) for post in range(1, 4)])
    (tmp_path / "features").mkdir()
    ts = build_training_set(e, p, str(tmp_path / "features"))
    social = with_social_features(ts, e, p, events_table(follows, FollowEvent))
    col = social.feature_names.index("followee_engagers_recent")
    assert social.feature_names[-len(SOCIAL_FEATURES):] == SOCIAL_FEATURES
    assert social.features.shape[1] == len(FEATURE_NAMES) + len(SOCIAL_FEATURES)
    for row in range(len(social)):
        v, post, t = social.viewer_id[row], social.post_id[row], social.ts_ms[row]
        engagers = {x.viewer_id for x in events if x.kind is K.LIKE and x.post_id == post
                    and x.event_time < t and x.viewer_id in followees.get(v, ())}
        assert social.features[row, col] == len(engagers)
    total = social.feature_names.index("post_engaged_total")
    assert social.features[:, total].max() > 0
