"""The stories rules without Beam or stores: lifetimes, refusals, tray order, index buckets."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.stories import (
    HOUR_MS,
    StoryPolicy,
    assemble_tray,
    expiry_bucket,
    publish_refusal,
    removal_timestamp_us,
    story_expiry,
    sweep_buckets,
    ttl_seconds,
    write_timestamp_us,
)
from schemas.events import STORY_TTL_MS, StoryEvent, StoryEventKind
from schemas.stories import StoryMeta

T0 = 1_700_000_000_000
POLICY = StoryPolicy(grace_ms=HOUR_MS, max_life_ms=48 * HOUR_MS)


def pub(created: int | None = T0, expires: int | None = None, at: int = T0) -> StoryEvent:
    return StoryEvent("e", at, StoryEventKind.PUBLISHED, 1, 2, created_at=created,
                      expires_at=expires)


def test_expiry_defaults_to_created_plus_a_day():
    assert story_expiry(pub()) == T0 + STORY_TTL_MS
    assert story_expiry(pub(expires=T0 + 5)) == T0 + 5
    assert story_expiry(pub(created=None, at=T0 + 7)) == T0 + 7 + STORY_TTL_MS


def test_ttl_reaches_expiry_plus_grace_and_never_beyond():
    assert ttl_seconds(T0 + 10_000, T0, POLICY) == 10 + 3600
    assert ttl_seconds(T0 + 10_001, T0, POLICY) == 10 + 3600 + 1   # rounded up
    assert ttl_seconds(T0 - HOUR_MS, T0, POLICY) == 0               # grace over: write nothing


@given(st.integers(0, 2**40), st.integers(1, 2**30))
def test_removal_shadows_every_accepted_write(event_time, life):
    expires = event_time + life
    assert write_timestamp_us(event_time, expires) < removal_timestamp_us(expires)
    # Even a write whose event time is past expiry (never accepted) stays below.
    assert write_timestamp_us(expires + 5, expires) < removal_timestamp_us(expires)


def test_publish_refusals():
    assert publish_refusal(pub(), T0, POLICY) is None
    assert publish_refusal(pub(), T0 + STORY_TTL_MS, POLICY) == "expired"
    assert publish_refusal(pub(expires=T0), T0 - 1, POLICY) == "expired"   # expires at its own time
    assert publish_refusal(pub(expires=T0 + 49 * HOUR_MS), T0, POLICY) == "beyond_horizon"


def meta(story: int, author: int, created: int, expires: int) -> StoryMeta:
    return StoryMeta(story, author, created, expires)


def test_tray_order_and_filtering():
    now = T0
    stories = {
        1: [meta(12, 1, now - 10, now + 5), meta(11, 1, now - 30, now + 5)],
        2: [meta(21, 2, now - 20, now + 5)],
        3: [meta(31, 3, now - 5, now)],          # expired exactly now
        4: [meta(41, 4, now - 1, now + 5)],      # seen
        5: [meta(51, 9, now - 1, now + 5)],      # wrong author: ignored
    }
    tray = assemble_tray([4, 1, 2, 3, 5, 1], stories, seen={41, 11}, now_ms=now, limit=10)
    assert [(e.author_id, e.unseen, e.latest_created_at) for e in tray] == [
        (1, 1, now - 10), (2, 1, now - 20), (4, 0, now - 1)]
    assert [(s.story_id, s.seen) for s in tray[0].stories] == [(11, True), (12, False)]
    assert assemble_tray([1, 2], stories, (), now, limit=1)[0].author_id == 1
    assert assemble_tray([1], stories, (), now, limit=0) == []


def test_tray_ties_break_by_author_id():
    stories = {a: [meta(a * 10, a, T0 - 1, T0 + 1)] for a in (3, 1, 2)}
    assert [e.author_id for e in assemble_tray([3, 1, 2], stories, (), T0, 10)] == [1, 2, 3]


def test_sweep_buckets_cover_grace_back_and_horizon_ahead():
    buckets = sweep_buckets(T0, POLICY)
    assert buckets[0] == expiry_bucket(T0 - HOUR_MS)
    assert buckets[-1] == expiry_bucket(T0 + 48 * HOUR_MS)
    assert buckets == list(range(buckets[0], buckets[-1] + 1))


def test_policy_validation():
    with pytest.raises(ValueError):
        StoryPolicy(grace_ms=10)
    with pytest.raises(ValueError):
        StoryPolicy(max_life_ms=1000)


def story_event(kind: StoryEventKind, story: int, at: int, viewer: int | None = None,
                expires: int | None = None) -> StoryEvent:
    return StoryEvent(f"{kind.value}-{story}-{viewer}-{at}", at, kind, story, 1,
                      viewer_id=viewer, created_at=at if kind is StoryEventKind.PUBLISHED else None,
                      expires_at=expires)


def test_oracle_follows_publish_view_delete_expiry():
    from domain.stories import expected_stories

    P, V, D = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED
    events = [
        story_event(V, 1, T0, viewer=5),                 # before its publish: ignored
        story_event(P, 1, T0, expires=T0 + 100),
        story_event(V, 1, T0 + 1, viewer=5), story_event(V, 1, T0 + 2, viewer=5),
        story_event(V, 1, T0 + 100, viewer=6),           # at expiry: late
        story_event(P, 2, T0, expires=T0 + 100),
        story_event(V, 2, T0 + 1, viewer=5),
        story_event(D, 2, T0 + 3),
        story_event(P, 2, T0, expires=T0 + 100),         # redelivered after delete
        story_event(V, 2, T0 + 4, viewer=6),             # after delete
        story_event(P, 3, T0, expires=T0 + 10),          # expires before now
        story_event(V, 3, T0 + 1, viewer=5),
        story_event(P, 4, T0, expires=T0 + 49 * HOUR_MS),  # beyond the horizon
        story_event(D, 9, T0),                           # unknown
    ]
    got = expected_stories(events, T0 + 50, POLICY)
    assert set(got.live) == {1} and got.live[1].views == 1
    assert got.viewers == {1: {5}} and got.seen == {5: {1}}
    assert got.removed == {2, 3}


def test_pending_keeps_the_earliest_expiry_per_hour_bucket():
    from domain.stories import add_pending

    t = 1000 * HOUR_MS
    pending: dict[int, int] = {}
    assert add_pending(pending, t + 50)
    assert add_pending(pending, t + 10)            # earlier in the same hour
    assert not add_pending(pending, t + 30)        # later: nothing to change
    assert not add_pending(pending, t + 10)        # again (a redelivery)
    assert add_pending(pending, t + HOUR_MS + 1)   # another hour
    assert pending == {1000: t + 10, 1001: t + HOUR_MS + 1}


def test_a_round_reads_the_due_buckets_and_leaves_what_it_found():
    from domain.stories import due_buckets, settle_pending

    t = 1000 * HOUR_MS
    pending = {999: t - 5, 1000: t + 10, 1001: t + HOUR_MS + 7, 1003: t + 3 * HOUR_MS}
    assert due_buckets(pending, t + 20) == [999, 1000]
    assert due_buckets(pending, t - 6) == [999]
    # Drained through t + 20; the bucket of the bound still holds t + 40.
    assert settle_pending(pending, t + 20, {1000: t + 40}) == {
        1000: t + 40, 1001: t + HOUR_MS + 7, 1003: t + 3 * HOUR_MS}
    # Nothing left in it: the bucket goes; later ones stay untouched.
    assert settle_pending(pending, t + 20, {}) == {1001: t + HOUR_MS + 7, 1003: t + 3 * HOUR_MS}
    # A round cut short (too many due) keeps what may still be due, even in the past.
    assert settle_pending(pending, t - 6, {999: t - 5}) == {
        999: t - 5, 1000: t + 10, 1001: t + HOUR_MS + 7, 1003: t + 3 * HOUR_MS}
    # Something found at or before the drained time cannot be pending.
    assert settle_pending({1000: t}, t + 5, {1000: t + 5}) == {}
