"""The features pipeline's aggregation rules, driven directly (no Beam), against hand counts."""
from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.features import (
    CANCEL,
    COMMENT,
    LIKE,
    POST_CREATED,
    SHARE,
    UNLIKE,
    VIEW,
    AuthorStage,
    FeatureParams,
    FirstStage,
    Item,
    PostState,
    ViewerStage,
    ViewerState,
    WindowState,
    decay_add,
    event_of,
    first_stage_key,
    parse_weights,
)
from schemas.events import EngagementEvent, EngagementKind, MediaType
from schemas.features import POST_FEATURES, engagement_rank

M = 60_000
H = 60 * M
T0 = 1_700_002_800_000  # on an hour boundary
P = FeatureParams()


def item(kind, minute, viewer=7, post=100, author=45, media=0, dwell=-1, like_t=-1):
    return Item(kind, T0 + minute * M, viewer, author, post, media, dwell, like_t)


def latest(values):
    """{(entity, name): (valid_at, value)} keeping the newest (valid_at, version)."""
    out = {}
    for v in values:
        key = (v.entity_type, v.entity_id, v.name)
        if key not in out or (v.valid_at_ms, v.version) > out[key][:2]:
            out[key] = (v.valid_at_ms, v.version, v.value)
    return {k: (at, value) for k, (at, _, value) in out.items()}


def by_name(values, at=None):
    return {v.name: v.value for v in values if at is None or v.valid_at_ms == at}


class Driver:
    """Runs FirstStage like the DoFn: apply events, fire the key's timers in order."""

    def __init__(self, params=P, key=100):
        self.stage = FirstStage(params)
        self.state = PostState()
        self.key = key
        self.out = []
        self.forwarded = []

    def send(self, event_id, it):
        outcome = self.stage.apply(self.state, event_id, it)
        self.out += outcome.features
        self.forwarded += outcome.forward
        return outcome.status

    def watermark(self, minute):
        """Fire every timer up to T0 + minute, as the runner would."""
        until = T0 + minute * M
        while True:
            at = self.stage.next_timer(self.state)
            if at is None or at > until:
                return
            self.out += self.stage.fire(self.state, self.key, at)


def test_on_time_counts_fire_at_window_ends_and_drain_to_zero():
    d = Driver()
    for i, (kind, minute) in enumerate([(VIEW, 1), (VIEW, 2), (LIKE, 2), (COMMENT, 3),
                                        (VIEW, 12), (SHARE, 14)]):
        assert d.send(f"e{i}", item(kind, minute, viewer=i)) == "counted"
    d.watermark(10)
    first = by_name(d.out, T0 + 5 * M)
    assert set(first) == set(POST_FEATURES)  # the first emission has every name
    assert (first["view_1h"], first["like_1h"], first["comment_1h"], first["share_1h"]) == \
        (2, 1, 1, 0)
    assert first["engagement_rate_1h"] == 1.0 and first["view_24h"] == 2
    d.watermark(15)
    # Only what changed at the 15-minute window end (its bucket is [10, 15)); the
    # rates stay 3 engagements / 3 views = 1.0.
    assert by_name(d.out, T0 + 15 * M) == {"view_1h": 3, "share_1h": 1, "view_24h": 3,
                                           "share_24h": 1}
    d.watermark(65)  # bucket [0, 5) leaves the 1 h window at 65
    # (the 1 h rate stays 1.0: one share over one view)
    assert by_name(d.out, T0 + 65 * M) == {"view_1h": 1, "like_1h": 0, "comment_1h": 0}
    d.watermark(25 * 60)
    final = latest(d.out)
    assert {name: value for (_, _, name), (_, value) in final.items()} == \
        {name: 0.0 for name in POST_FEATURES}
    assert final[("post", "100", "share_24h")][0] == T0 + (24 * 60 + 15) * M
    d.watermark(48 * 60)
    assert FirstStage.empty(d.state) or not d.state.window.buckets


def test_a_key_without_state_judges_lateness_by_timers_of_other_keys():
    d = Driver()
    d.send("e1", item(LIKE, 1))
    d.watermark(3 * 60)  # fires 5, 65 and the dedup expiry at 130 (a slide after 125)
    assert d.stage.observed_wm == T0 + 130 * M
    other = PostState()
    assert d.stage.apply(other, "x", item(LIKE, 10, post=200)).status == "too_late"
    assert d.stage.apply(other, "y", item(LIKE, 70, post=200)).status == "counted"
    fresh = Driver()
    assert fresh.stage.apply(PostState(), "x", item(LIKE, 10, post=200)).status == "counted"


def test_duplicate_event_id_counts_once():
    d = Driver()
    assert d.send("e1", item(LIKE, 1)) == "counted"
    assert d.send("e1", item(LIKE, 1)) == "duplicate"
    d.watermark(5)
    assert by_name(d.out)["like_1h"] == 1
    assert len(d.forwarded) == 1


def test_late_event_updates_its_windows_with_a_newer_version():
    d = Driver()
    d.send("e1", item(LIKE, 1, viewer=1))
    d.send("e2", item(LIKE, 7, viewer=2))
    d.watermark(30)
    assert latest(d.out)[("post", "100", "like_1h")] == (T0 + 10 * M, 2)
    assert d.send("late", item(LIKE, 3, viewer=3)) == "late"
    values = latest(d.out)
    # The windows ending at 5 and 10 were emitted; both are re-emitted including it.
    like = sorted((v.valid_at_ms, v.version, v.value) for v in d.out if v.name == "like_1h")
    # Versions count the events in the 24 h window: the late one raises them.
    assert like == [(T0 + 5 * M, 1, 1), (T0 + 5 * M, 2, 2), (T0 + 10 * M, 2, 2),
                    (T0 + 10 * M, 3, 3)]
    assert values[("post", "100", "like_1h")] == (T0 + 10 * M, 3)
    d.watermark(70)
    assert latest(d.out)[("post", "100", "like_1h")] == (T0 + 70 * M, 0)


def test_too_late_event_is_not_counted():
    d = Driver()
    d.send("e1", item(LIKE, 1))
    d.watermark(65)
    assert d.state.window.known_wm == T0 + 65 * M
    assert d.send("old", item(LIKE, 4, viewer=9)) == "too_late"  # 4 + 60 < 65
    assert d.send("ok", item(LIKE, 6, viewer=9)) == "late"  # 6 + 60 >= 65
    assert "old" not in d.state.seen


def test_unlike_cancels_the_like_from_its_time_on_in_either_order():
    for order in (("like", "unlike"), ("unlike", "like")):
        d = Driver()
        events = {"like": ("l", item(LIKE, 2)), "unlike": ("u", item(UNLIKE, 12))}
        d.send("other", item(LIKE, 3, viewer=8))
        for name in order:
            d.send(*events[name])
        d.watermark(20)
        like = [(v.valid_at_ms, v.value) for v in d.out if v.name == "like_1h"]
        assert like == [(T0 + 5 * M, 2), (T0 + 15 * M, 1)], order
        cancels = [f for f in d.forwarded if f.kind == CANCEL]
        assert cancels == [item(CANCEL, 12, like_t=T0 + 2 * M)], order
        d.watermark(70)  # both likes leave the window: 0, not -1
        assert latest(d.out)[("post", "100", "like_1h")] == (T0 + 65 * M, 0)


def test_unlike_without_a_like_changes_nothing():
    d = Driver()
    outcome = d.stage.apply(d.state, "u", item(UNLIKE, 2))
    assert outcome.unmatched_unlike and outcome.forward == []
    d.send("other", item(VIEW, 2))
    d.watermark(5)
    assert by_name(d.out)["like_1h"] == 0


def test_profile_views_and_posts_pass_through_to_the_other_stages():
    d = Driver(key=first_stage_key(item(5, 1, post=-1)))
    assert d.key == -46
    d.send("pv", item(5, 1, post=-1))
    d.watermark(10)
    assert d.out == [] and [f.kind for f in d.forwarded] == [5]
    d.watermark(3 * 60)
    assert d.send("pv-old", item(5, 1, viewer=3, post=-1)) == "too_late"
    post = Driver()
    post.send("p", item(POST_CREATED, 1, viewer=-1))
    post.watermark(5)
    assert by_name(post.out) == {name: 0.0 for name in POST_FEATURES}
    # Creation read after the post's first engagement was emitted: its zeros still appear.
    late = Driver()
    late.send("v", item(VIEW, 12))
    late.watermark(20)
    late.send("p", item(POST_CREATED, 1, viewer=-1))
    assert by_name(late.out, T0 + 5 * M) == {name: 0.0 for name in POST_FEATURES}


def test_dedup_ids_are_forgotten_after_the_horizon_and_then_too_late():
    d = Driver()
    d.send("e1", item(LIKE, 1))
    d.watermark(4 * 60)
    assert "e1" not in d.state.seen
    assert d.send("e1", item(LIKE, 1)) == "too_late"


def test_author_stage_rate_and_posts_over_seven_days():
    stage, state = AuthorStage(P), WindowState()
    out = []
    for it in (item(POST_CREATED, 5), item(VIEW, 10), item(VIEW, 11), item(LIKE, 12),
               item(COMMENT, 13), item(CANCEL, 20, like_t=T0 + 12 * M), item(POST_CREATED, 70)):
        out += stage.apply(state, 45, it)
    while (at := stage.next_timer(state)) is not None:
        out += stage.fire(state, 45, at)
    hours = {(v.name, (v.valid_at_ms - T0) // H): v.value for v in out}
    assert hours[("engagement_rate_7d", 1)] == 0.5  # (like + comment - unlike) / 2 views
    assert hours[("posts_7d", 1)] == 1 and hours[("posts_7d", 2)] == 2
    assert hours[("posts_7d", 7 * 24 + 1)] == 1 and hours[("posts_7d", 7 * 24 + 2)] == 0
    assert hours[("engagement_rate_7d", 7 * 24 + 1)] == 0.0
    assert AuthorStage.empty(state)


def test_decay_add_is_a_decayed_sum():
    hl = 10
    e = decay_add(None, 8.0, 0, hl)
    decay_add(e, 1.0, 20, hl)
    assert e == [pytest.approx(3.0), 20, 2]
    decay_add(e, 4.0, 10, hl)  # older: added decayed to valid_at; one more event
    assert e == [pytest.approx(5.0), 20, 3]


def _affinity(items, params=P):
    stage, state = ViewerStage(params), ViewerState()
    out = []
    for it in items:
        stage.apply(state, it)
    while (at := stage.next_timer(state)) is not None and at < T0 + 1000 * H:
        out += stage.fire(state, 7, at)
        if state.flush_at is None:
            break
    return latest(out)


def test_affinity_weights_decay_and_cancel():
    hl = P.half_life_ms
    items = [item(VIEW, 0, dwell=5_000), item(LIKE, 1), item(SHARE, 2, author=46, media=1),
             item(CANCEL, 3, like_t=T0 + 1 * M)]
    got = _affinity(items)
    at = T0 + 3 * M
    expected_45 = 0.25 * math.exp2(-3 * M / hl)  # view at half the reference dwell; like gone
    assert got[("viewer_author", "7:45", "affinity")] == (at, pytest.approx(expected_45))
    assert got[("viewer_author", "7:46", "affinity")] == (T0 + 2 * M, pytest.approx(3.0))
    assert got[("viewer_media", "7:PHOTO", "affinity")] == (at, pytest.approx(expected_45))
    assert got[("viewer_media", "7:VIDEO", "affinity")] == (T0 + 2 * M, pytest.approx(3.0))


@settings(max_examples=60, deadline=None)
@given(st.permutations([item(LIKE, 0), item(COMMENT, 90), item(VIEW, 30, dwell=20_000),
                        item(CANCEL, 200, like_t=T0), item(SHARE, 5 * 24 * 60)]))
def test_affinity_does_not_depend_on_arrival_order(order):
    params = FeatureParams(half_life_ms=2 * 24 * H)
    got = _affinity(order, params)[("viewer_author", "7:45", "affinity")]
    hl = params.half_life_ms
    end = T0 + 5 * 24 * H
    expected = (2 * math.exp2(-(end - T0 - 90 * M) / hl) + 0.5 * math.exp2(-(end - T0 - 30 * M) / hl)
                + 3.0)
    assert got == (end, pytest.approx(expected))


def test_engagement_rank_orders_like_decayed_affinity():
    hl = 7 * 24 * H
    pairs = [(1.0, T0), (3.0, T0 - 7 * 24 * H), (0.4, T0 + 24 * H)]
    now = T0 + 30 * 24 * H
    by_rank = sorted(pairs, key=lambda p: engagement_rank(p[0], p[1], hl))
    by_decayed = sorted(pairs, key=lambda p: p[0] * math.exp2(-(now - p[1]) / hl))
    assert by_rank == by_decayed
    assert engagement_rank(0.0, T0, hl) is None


def test_params_and_weights_validate():
    assert parse_weights("like=2, view=0")[LIKE] == 2.0
    with pytest.raises(ValueError, match="affinity weight"):
        parse_weights("poke=1")
    with pytest.raises(ValueError, match="divide"):
        FeatureParams(slide_ms=7 * M)
    with pytest.raises(ValueError):
        FeatureParams(allowed_lateness_ms=-1)


def test_items_round_trip_to_events():
    e = EngagementEvent("x", T0, EngagementKind.VIEW, 7, 45, 100, MediaType.REEL, 1234)
    from domain.features import engagement_item

    assert event_of("x", engagement_item(e)) == e
    profile = EngagementEvent("y", T0, EngagementKind.PROFILE_VIEW, 7, 45)
    assert event_of("y", engagement_item(profile)) == profile
    assert list(itertools.islice(iter(engagement_item(profile)), 8))[4:7] == [-1, -1, -1]


def test_shard_agenda_keeps_one_time_per_key():
    from domain.features import Shard, shard_of

    shard = Shard()
    shard.schedule(1, 10)
    shard.schedule(2, 10)
    shard.schedule(3, 5)
    shard.schedule(3, 20)  # moved
    assert shard.next_time() == 10 and shard.agenda == {10: {1, 2}, 20: {3}}
    assert shard.due(10) == [1, 2] and shard.next_time() == 20
    shard.schedule(3, None)
    assert shard.next_time() is None and shard.scheduled == {}
    assert sorted({shard_of(k, 16) for k in range(1000)}) == list(range(16))
