"""The semantic checks of decoded events (``schemas.validation``): each rule, its bounds, and
what must stay valid (replays of old topics, ids up to 2**62, producer clock skew)."""
from __future__ import annotations

import dataclasses

import pytest

from schemas import validation as v
from schemas.events import (
    EngagementEvent, EngagementKind, FollowEvent, FollowKind, MediaType, PostEvent,
    PostEventKind, StoryEvent, StoryEventKind,
)
from schemas.validation import EventLimits, check_event

NOW = 1_796_000_000_000        # the wall clock of these tests (late 2026)
T0 = 1_700_000_000_000         # an event time of 2023: a replayed topic
H = 3_600_000


def post(t=NOW, **changes) -> PostEvent:
    base = PostEvent("p1", t, PostEventKind.CREATED, post_id=10, author_id=7, created_at=t,
                     media_type=MediaType.REEL, caption_length=42, hashtags=("sun", "sea"))
    return dataclasses.replace(base, **changes)


def follow(t=NOW, **changes) -> FollowEvent:
    return dataclasses.replace(FollowEvent("f1", t, FollowKind.FOLLOW, 3, 7), **changes)


def story(t=NOW, **changes) -> StoryEvent:
    base = StoryEvent("s1", t, StoryEventKind.PUBLISHED, story_id=99, author_id=7, created_at=t,
                      expires_at=t + 24 * H, media_type=MediaType.PHOTO)
    return dataclasses.replace(base, **changes)


def view(t=NOW, **changes) -> EngagementEvent:
    base = EngagementEvent("e1", t, EngagementKind.VIEW, viewer_id=3, author_id=7, post_id=10,
                           media_type=MediaType.VIDEO, dwell_ms=1500)
    return dataclasses.replace(base, **changes)


def reason(event, record_ts=NOW, now=NOW, limits=EventLimits()) -> str | None:
    problem = check_event(event, record_ts, now, limits)
    return None if problem is None else problem.reason


def test_ordinary_events_of_every_type_are_valid():
    for event in (post(), follow(), story(), view(),
                  view(kind=EngagementKind.PROFILE_VIEW, post_id=None, media_type=None,
                       dwell_ms=None),
                  story(kind=StoryEventKind.VIEWED, viewer_id=5, created_at=None,
                        expires_at=None),
                  post(kind=PostEventKind.DELETED, created_at=NOW - 30 * 24 * H)):
        assert check_event(event, NOW, NOW) is None, event


def test_replays_of_old_topics_stay_valid_and_the_age_limit_is_off_by_default():
    # 2023 events on records written now (tests and backfills) or then (a replay).
    assert reason(post(T0), record_ts=NOW) is None
    assert reason(post(T0), record_ts=T0 + 5) is None
    # With an age limit, the event is measured against its record, not the clock.
    limits = EventLimits(max_age_ms=24 * H)
    assert reason(post(T0), record_ts=T0 + H, limits=limits) is None
    assert reason(post(T0), record_ts=T0 + 25 * H, limits=limits) == v.EVENT_TIME_TOO_OLD


@pytest.mark.parametrize("event_time, expected", [
    (NOW // 1000, v.EVENT_TIME_BEFORE_FLOOR),          # seconds
    (0, v.EVENT_TIME_BEFORE_FLOOR),
    (-5, v.EVENT_TIME_BEFORE_FLOOR),
    (NOW * 1000, v.EVENT_TIME_IN_FUTURE),              # microseconds
    (NOW * 1_000_000, v.EVENT_TIME_IN_FUTURE),         # nanoseconds
    (NOW + 30 * 365 * 24 * H, v.EVENT_TIME_IN_FUTURE),  # decades ahead
    (NOW + H + 1, v.EVENT_TIME_IN_FUTURE),
    (NOW + H, None),                                    # skew within the window
    (v.MIN_EVENT_TIME_MS, None),
])
def test_event_times_outside_the_window_are_refused(event_time, expected):
    assert reason(follow(event_time)) == expected


def test_the_window_is_bounded_by_the_record_timestamp_and_by_the_clock():
    # Ahead of the record it came in, though not of the clock: a replayed
    # topic whose events claim times after they were written.
    assert reason(follow(T0 + 2 * H), record_ts=T0) == v.EVENT_TIME_IN_FUTURE
    assert reason(follow(T0 + H), record_ts=T0) is None
    # A record timestamp ahead of the clock is itself refused.
    assert reason(follow(NOW), record_ts=NOW + 2 * H) == v.RECORD_TIME_IN_FUTURE
    # No Kafka timestamp (-1): only the clock bounds the event.
    assert reason(follow(NOW), record_ts=-1) is None
    assert reason(follow(NOW * 1000), record_ts=-1) == v.EVENT_TIME_IN_FUTURE
    # A configurable window.
    assert reason(follow(NOW + 10 * 60_000), limits=EventLimits(max_ahead_ms=60_000)) == \
        v.EVENT_TIME_IN_FUTURE


def test_other_instants_of_an_event_follow_the_same_bounds():
    assert reason(post(created_at=NOW * 1000)) == v.TIME_FIELD_OUT_OF_RANGE
    assert reason(post(created_at=NOW // 1000)) == v.TIME_FIELD_OUT_OF_RANGE
    assert reason(story(created_at=NOW * 1000, expires_at=NOW * 1000 + H)) == \
        v.TIME_FIELD_OUT_OF_RANGE


def test_negative_ids_are_refused_and_large_ones_are_not():
    assert reason(follow(follower_id=-1)) == v.NEGATIVE_ID
    assert reason(post(post_id=-10)) == v.NEGATIVE_ID
    assert reason(view(post_id=-2)) == v.NEGATIVE_ID
    assert reason(story(viewer_id=-3)) == v.NEGATIVE_ID
    assert reason(follow(followee_id=2**62)) is None
    assert reason(follow(follower_id=0, followee_id=2**63 - 1)) is None


def test_sizes_beyond_the_documented_limits_are_refused():
    assert reason(post(hashtags=tuple(("h%03d" % i) * 25 for i in range(600)))) == \
        v.TOO_MANY_HASHTAGS
    assert reason(post(hashtags=tuple(f"t{i}" for i in range(30)))) is None
    assert reason(post(hashtags=tuple(f"t{i}" for i in range(31)))) == v.TOO_MANY_HASHTAGS
    assert reason(post(hashtags=("x" * 100,))) is None
    assert reason(post(hashtags=("x" * 101,))) == v.HASHTAG_SIZE
    assert reason(post(hashtags=("",))) == v.HASHTAG_SIZE
    assert reason(post(caption_length=2200)) is None
    assert reason(post(caption_length=2201)) == v.CAPTION_LENGTH
    assert reason(post(caption_length=-1)) == v.CAPTION_LENGTH
    assert reason(follow(event_id="")) == v.EVENT_ID_SIZE
    assert reason(follow(event_id="e" * 128)) is None
    assert reason(follow(event_id="e" * 129)) == v.EVENT_ID_SIZE
    assert reason(view(dwell_ms=-1)) == v.DWELL_MS
    assert reason(view(dwell_ms=25 * H)) == v.DWELL_MS


def test_a_story_must_expire_after_its_creation_and_within_its_maximum_life():
    assert reason(story(expires_at=NOW)) == v.STORY_EXPIRES_BEFORE_CREATION
    assert reason(story(expires_at=NOW - H)) == v.STORY_EXPIRES_BEFORE_CREATION
    assert reason(story(created_at=None, expires_at=NOW - 1)) == v.STORY_EXPIRES_BEFORE_CREATION
    assert reason(story(expires_at=NOW + 30 * 24 * H)) is None
    assert reason(story(expires_at=NOW + 30 * 24 * H + 1)) == v.STORY_LIFE_TOO_LONG
    # Decades ahead: Cassandra's TTL would overflow; refused long before.
    assert reason(story(expires_at=NOW + 30 * 365 * 24 * H)) == v.STORY_LIFE_TOO_LONG
    # Without expires_at the default (created + 24 h) applies: nothing to check.
    assert reason(story(expires_at=None)) is None


def test_every_violation_carries_a_message_naming_the_value():
    problem = check_event(follow(NOW * 1000), NOW, NOW)
    assert problem.reason == v.EVENT_TIME_IN_FUTURE and str(NOW * 1000) in problem.message


def test_limits_refuse_negative_settings():
    with pytest.raises(ValueError, match="max_ahead_ms"):
        EventLimits(max_ahead_ms=-1)
    with pytest.raises(ValueError, match="max_event_id_chars"):
        EventLimits(max_event_id_chars=0)


def test_a_decoded_avro_dict_is_judged_as_the_event_it_would_make():
    from schemas.codec import WireCodec
    from schemas.validation import check_record

    codec = WireCodec()
    events = [post(), follow(), story(), view(), post(T0), post(created_at=NOW // 1000),
              follow(follower_id=-1), post(post_id=-10), view(post_id=-2), story(viewer_id=-3),
              post(hashtags=tuple(f"t{i}" for i in range(31))), post(hashtags=("",)),
              post(caption_length=2201), follow(event_id=""), follow(event_id="e" * 129),
              view(dwell_ms=-1), view(kind=EngagementKind.PROFILE_VIEW, post_id=None,
                                      media_type=None, dwell_ms=None),
              story(expires_at=NOW), story(created_at=None, expires_at=NOW - 1),
              story(expires_at=NOW + 30 * 24 * H + 1), story(expires_at=None),
              story(kind=StoryEventKind.VIEWED, viewer_id=5, created_at=None, expires_at=None),
              follow(NOW * 1000), follow(NOW // 1000), view(NOW + 2 * H)]
    limits = EventLimits(max_age_ms=H)
    seen = set()
    for event in events:
        record_type, record = codec.decode_dict(codec.encode(event))
        assert record_type is type(event)
        for record_ts, now in ((NOW, NOW), (-1, NOW), (NOW + 3 * H, NOW), (NOW - 2 * H, NOW)):
            expected = check_event(event, record_ts, now, limits)
            assert check_record(record_type, record, record_ts, now, limits) == expected, event
            seen.add(None if expected is None else expected.reason)
    # Every rule was met at least once, and so was a valid event.
    assert seen >= {None, v.NEGATIVE_ID, v.TIME_FIELD_OUT_OF_RANGE, v.TOO_MANY_HASHTAGS,
                    v.HASHTAG_SIZE, v.CAPTION_LENGTH, v.EVENT_ID_SIZE, v.DWELL_MS,
                    v.STORY_EXPIRES_BEFORE_CREATION, v.STORY_LIFE_TOO_LONG,
                    v.EVENT_TIME_IN_FUTURE, v.EVENT_TIME_BEFORE_FLOOR, v.EVENT_TIME_TOO_OLD,
                    v.RECORD_TIME_IN_FUTURE}


def _random_batch(rng, make, n: int):
    """``n`` events of one type, each with zero to two fields pushed past a rule, and
    Kafka timestamps near, ahead of, long before or unknown against ``NOW``."""
    import numpy as np

    edges = {
        "event_time": [NOW, NOW - 5 * H, T0, 1_700_000_000, NOW + 2 * H, NOW * 1000,
                       v.MIN_EVENT_TIME_MS - 1, v.MIN_EVENT_TIME_MS],
        "event_id": ["e1", "", "x" * 128, "x" * 129, "é" * 128],
        "viewer_id": [0, 3, -1, 2**62], "author_id": [7, -5, 0], "post_id": [10, None, -2],
        "dwell_ms": [None, 0, -1, 24 * H, 24 * H + 1], "follower_id": [3, -3],
        "followee_id": [7, -7, 0],
    }
    events = []
    for _ in range(n):
        event = make()
        for name in rng.choice(sorted(k for k in edges if hasattr(event, k)),
                               size=rng.integers(0, 3), replace=False):
            event = dataclasses.replace(event, **{name: edges[name][
                rng.integers(len(edges[name]))]})
        events.append(event)
    stamps = np.array([rng.choice([NOW, NOW - 1, NOW - 3 * H, NOW + 2 * H, T0, -1])
                       for _ in range(n)], dtype=np.int64)
    return events, stamps


@pytest.mark.parametrize("make", [view, follow])
@pytest.mark.parametrize("limits", [EventLimits(), EventLimits(max_age_ms=2 * H)])
def test_the_column_checks_flag_exactly_the_rows_check_event_rejects(make, limits):
    """``suspect_rows`` lets a replay check a batch's columns instead of each record;
    a row it passes is never checked again, so it must flag every row ``check_event``
    rejects, and (being the same rules) no other."""
    import numpy as np

    rng = np.random.default_rng(7)
    events, stamps = _random_batch(rng, make, 3000)

    def column(name):
        values = [getattr(e, name) for e in events]
        if name == "event_id":
            return np.array([len(x) for x in values])
        return np.array([np.nan if x is None else x for x in values],
                        dtype=np.float64 if None in values else np.int64)

    suspect = v.suspect_rows(type(events[0]), column, stamps, NOW, limits)
    rejected = np.array([check_event(e, int(ts), NOW, limits) is not None
                         for e, ts in zip(events, stamps)])
    assert 0.2 < rejected.mean() < 0.9  # both kinds in the batch
    assert (suspect == rejected).all(), [(events[i], stamps[i]) for i in
                                         np.flatnonzero(suspect != rejected)[:3]]


def test_posts_and_stories_are_checked_record_by_record():
    assert v.column_checked(EngagementEvent) and v.column_checked(FollowEvent)
    assert not v.column_checked(PostEvent) and not v.column_checked(StoryEvent)
    assert v.suspect_rows(PostEvent, None, [], NOW) is None
