"""Ranking decisions without Beam or stores: triggers, debounce, candidates, recency."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.fanout import DAY_MS
from stores.redis.feeds import edge_version
from domain.ranking import (
    GIVE_UP,
    GO,
    SETTLE,
    WAIT,
    Debounce,
    FollowWait,
    RankingPolicy,
    edge_versions_wanted,
    edges_not_applied,
    engagement_trigger,
    follow_gate,
    follow_trigger,
    merge_candidates,
    post_triggers,
    recency_scores,
    requests_from,
    simulate_debounce,
)
from schemas.events import (
    EngagementEvent,
    EngagementKind,
    FollowEvent,
    FollowKind,
    MediaType,
    PostEvent,
    PostEventKind,
)
from schemas.ranking import (
    ENGAGED,
    FOLLOW_CHANGED,
    UNFOLLOW_CHANGED,
    POST_CREATED,
    POST_DELETED,
    Candidate,
    RefreshRequest,
    Trigger,
)

T0 = 1_780_000_000_000


def engagement(kind, viewer=1, t=T0):
    return EngagementEvent(f"e-{kind.value}-{t}", t, kind, viewer, 9, 100, MediaType.PHOTO)


def test_engaging_kinds_trigger_the_viewer_and_views_do_not():
    for kind in (EngagementKind.LIKE, EngagementKind.COMMENT, EngagementKind.SHARE,
                 EngagementKind.SAVE):
        assert engagement_trigger(engagement(kind)) == Trigger(1, T0, ENGAGED)
    for kind in (EngagementKind.VIEW, EngagementKind.UNLIKE, EngagementKind.PROFILE_VIEW):
        assert engagement_trigger(engagement(kind)) is None


def test_follow_and_post_triggers():
    assert follow_trigger(FollowEvent("f", T0, FollowKind.UNFOLLOW, 3, 4)) == Trigger(
        3, T0, UNFOLLOW_CHANGED, author_id=4)
    assert follow_trigger(FollowEvent("f", T0, FollowKind.FOLLOW, 3, 4)) == Trigger(
        3, T0, FOLLOW_CHANGED, author_id=4)
    post = PostEvent("p", T0, PostEventKind.CREATED, 100, 9, T0 - 5, MediaType.REEL)
    # Follower 12 has not read for 31 days: inactive, skipped; 13 never read: active.
    triggers = post_triggers(post, [11, 12, 13], [T0 - DAY_MS, T0 - 31 * DAY_MS, None],
                             30 * DAY_MS)
    assert triggers == [Trigger(11, T0, POST_CREATED, 100, 9, T0 - 5, "REEL"),
                        Trigger(13, T0, POST_CREATED, 100, 9, T0 - 5, "REEL")]
    gone = PostEvent("d", T0 + 1, PostEventKind.DELETED, 100, 9, T0 - 5, MediaType.REEL)
    assert [t.reason for t in post_triggers(gone, [11], [None], DAY_MS)] == [POST_DELETED]


def test_requests_fold_triggers_and_a_delete_wins():
    req = requests_from(5, [
        Trigger(5, T0 + 10, POST_CREATED, 100, 9, T0, "PHOTO"),
        Trigger(5, T0 + 3, ENGAGED),
        Trigger(5, T0 + 20, POST_CREATED, 101, 9, T0 + 20, "VIDEO"),
        Trigger(5, T0 + 30, POST_DELETED, 100, 9, T0, "PHOTO"),
    ])
    assert req == RefreshRequest(5, T0 + 3, (Candidate(101, 9, T0 + 20, "VIDEO"),),
                                 frozenset({100}), 4)
    with pytest.raises(ValueError):
        requests_from(5, [])


def test_debounce_example():
    d = Debounce(settle_ms=500, interval_ms=5_000)
    # A burst at 0..300 settles into one refresh at 500; changes at 1000 and
    # 4000 wait for the cooldown to end at 5500; the cooldown after that sees
    # no change; a change at 20000 is refreshed 500 ms later.
    assert simulate_debounce(d, [0, 100, 300, 1000, 4000, 20_000]) == [
        (500, [0, 100, 300]), (5500, [1000, 4000]), (20_500, [20_000])]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60_000), max_size=40), st.integers(0, 3_000),
       st.integers(1, 10_000))
def test_debounce_properties(times, settle, interval):
    d = Debounce(settle, interval)
    refreshes = simulate_debounce(d, times)
    fired = [t for t, _ in refreshes]
    # At most one refresh per interval.
    assert all(b - a >= interval for a, b in zip(fired, fired[1:]))
    # Every change is covered exactly once, by a refresh after it, and waits
    # at most max(settle, interval).
    covered = [e for _, events in refreshes for e in events]
    assert sorted(covered) == sorted(times)
    for t, events in refreshes:
        assert events and all(e <= t <= e + max(settle, interval) for e in events)


def meta(author, created, media="PHOTO"):
    return {"author_id": author, "created_at": created, "media_type": media}


def test_merge_candidates():
    policy = RankingPolicy(max_candidates=4, max_age_days=1)
    now = T0
    pushed = [1, 2, 3, 4, 5]
    pulled = [6, 1]
    req = RefreshRequest(7, now - 50, new_posts=(Candidate(8, 44, now - 5, "REEL"),
                                                  Candidate(6, 33, now - 15, "VIDEO")),
                         deleted=frozenset({4}))
    m = {1: meta(11, now - 10), 2: meta(22, now - 20, "VIDEO"), 3: meta(11, now - 2 * DAY_MS),
         4: meta(11, now - 30), 5: None, 6: meta(33, now - 15, "VIDEO")}
    out = merge_candidates(pushed, pulled, req, m, tombstoned={2}, now_ms=now, policy=policy)
    # 2 tombstoned, 3 too old, 4 deleted by a trigger, 5 unknown; 8 from the
    # trigger (not stored yet); 1 pushed and pulled counts as pushed.
    assert out == [Candidate(8, 44, now - 5, "REEL"), Candidate(1, 11, now - 10, "PHOTO"),
                   Candidate(6, 33, now - 15, "VIDEO", pulled=True)]
    assert len(merge_candidates(list(range(10)), [], req,
                                {i: meta(1, now - i) for i in range(10)}, set(), now,
                                policy)) == 4


def test_recency_scores_order_newest_first():
    c = [Candidate(1, 1, T0 - 5, "PHOTO"), Candidate(2, 1, T0, "PHOTO")]
    assert list(recency_scores(c)) == [T0 - 5, T0]


def test_policy_validation():
    with pytest.raises(ValueError):
        RankingPolicy(top_k=0)
    with pytest.raises(ValueError):
        Debounce(settle_ms=-1)


def test_ranker_pool_shares_one_ranker_until_the_last_release():
    import dataclasses

    from pipelines.ranking_pool import RankerPool

    @dataclasses.dataclass(frozen=True)
    class Config:
        name: str

        def open(self, policy):
            return Ranker()

    class Ranker:
        closed = False

        def close(self):
            self.closed = True

    pool, policy = RankerPool(), RankingPolicy()
    a = pool.hold(Config("x"), policy)
    assert pool.hold(Config("x"), policy) is a and pool.hold(Config("y"), policy) is not a
    pool.release(Config("x"), policy)
    assert not a.closed
    pool.release(Config("x"), policy)
    assert a.closed
    assert pool.hold(Config("x"), policy) is not a  # a new one after the last release


def test_refresh_applier_answers_each_request_in_order_and_releases_the_ranker():
    import dataclasses
    import types

    from pipelines.ranking import RefreshConfig
    from schemas.ranking import RefreshOutcome

    class Ranker:
        models = types.SimpleNamespace(swaps=1)
        model_errors = 0
        closed = False

        def refresh(self, requests):  # as FeedRanker: one outcome per user, first-seen order
            users = list(dict.fromkeys(r.user_id for r in requests))
            return [RefreshOutcome(u, "v1", 1, 2, T0, T0 + 5) for u in users]

        def close(self):
            self.closed = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        name: str

        def open(self, policy):
            return Ranker()

    applier = RefreshConfig(Config("refresh-applier-test"), RankingPolicy()).open()
    ranker = applier._ranker
    out = applier.apply([RefreshRequest(1, T0), RefreshRequest(2, T0), RefreshRequest(1, T0 + 1)])
    # A user refreshed once: its outcome goes with its last request of the batch.
    assert [o and o.user_id for o in out] == [None, 2, 1]
    applier.close()
    assert ranker.closed


def test_follow_gate_waits_for_the_newest_version_of_each_edge():
    events = [FollowEvent("a", T0, FollowKind.FOLLOW, 3, 4),
              FollowEvent("b", T0 + 5, FollowKind.UNFOLLOW, 3, 4),
              FollowEvent("c", T0 + 1, FollowKind.FOLLOW, 3, 7)]
    triggers = [follow_trigger(e) for e in events] + [Trigger(3, T0, ENGAGED)]
    wanted = edge_versions_wanted(triggers)
    # The fan-out's own order (stores.redis.feeds.edge_version).
    assert wanted == {4: edge_version(events[1]), 7: edge_version(events[2])}
    assert edges_not_applied(wanted, {}) == [4, 7]
    # 4 applied only up to the follow: the unfollow is still missing.
    assert edges_not_applied(wanted, {4: edge_version(events[0]), 7: None}) == [4, 7]
    # A newer event of the edge counts as caught up (a replayed old edge).
    assert edges_not_applied(wanted, {4: edge_version(events[1]), 7: wanted[7] + 2}) == []
    assert edge_versions_wanted([Trigger(3, T0, ENGAGED)]) == {}


def test_follow_gate_decisions_and_backoff():
    wait = FollowWait(retry_ms=100, max_retry_ms=350, max_wait_ms=1_000)
    assert follow_gate(wait, [], None, T0) == GO
    assert follow_gate(wait, [4], None, T0) == WAIT
    assert follow_gate(wait, [4], T0, T0 + 999) == WAIT
    assert follow_gate(wait, [4], T0, T0 + 1_000) == GIVE_UP
    assert follow_gate(wait, [], T0, T0 + 5) == SETTLE  # arrived after a wait: the merge
    assert [wait.retry_delay(n) for n in range(1, 6)] == [100, 200, 350, 350, 350]
    with pytest.raises(ValueError):
        FollowWait(retry_ms=10, max_retry_ms=5)
