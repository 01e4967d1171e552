"""Ranking decisions without Beam or stores: triggers, audiences, viral levels, debounce,
candidates (one user and a batch), the queue's trigger text, claim handling, recency."""
from __future__ import annotations

import pytest
import numpy as np
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
    ViralPolicy,
    edge_versions_wanted,
    edges_not_applied,
    engagement_trigger,
    follow_gate,
    follow_trigger,
    merge_candidates,
    post_audience,
    post_triggers,
    recency_scores,
    requests_from,
    select_candidates,
    simulate_debounce,
    viral_level,
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
    VIRAL,
    Candidate,
    ClaimedRefreshes,
    PostTable,
    RefreshRequest,
    Trigger,
    decode_pending,
    encode_triggers,
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
    assert post_triggers(post, [11, 13]) == [Trigger(11, T0, POST_CREATED, 100, 9, T0 - 5, "REEL"),
                                             Trigger(13, T0, POST_CREATED, 100, 9, T0 - 5, "REEL")]
    gone = PostEvent("d", T0 + 1, PostEventKind.DELETED, 100, 9, T0 - 5, MediaType.REEL)
    assert [t.reason for t in post_triggers(gone, [11])] == [POST_DELETED]


def test_post_audience_skips_inactive_and_caps_the_work():
    policy = RankingPolicy(push_threshold=10, inactive_days=30, post_refresh_cap=3)
    # Below the threshold: every active follower; 12 has not read for 31 days, 13 never.
    reads = [T0 - DAY_MS, T0 - 31 * DAY_MS, None]
    assert post_audience(3, [11, 12, 13], reads, T0, policy) == [11, 13]
    # More active followers than the cap: the most recent readers first, never-read last.
    followers = [21, 22, 23, 24, 25]
    reads = [T0 - 5 * DAY_MS, None, T0 - DAY_MS, T0 - 2 * DAY_MS, T0 - 3 * DAY_MS]
    assert post_audience(5, followers, reads, T0, policy) == [23, 24, 25]
    # At or above the threshold the order given (most engaged first) decides.
    assert post_audience(10_000, followers, reads, T0, policy) == [21, 22, 23]
    assert post_audience(5, followers, reads, T0,
                         RankingPolicy(push_threshold=10, post_refresh_cap=0)) == []


def test_viral_levels_rise_by_the_factor():
    policy = ViralPolicy(min_engagements=50, factor=2.0)
    level = lambda **counts: viral_level({f"{k}_1h": v for k, v in counts.items()}, policy)  # noqa: E731
    assert level(like=49) == 0
    assert level(like=30, comment=20) == 1       # 50 engagements
    assert level(like=99) == 1 and level(like=100) == 2 and level(like=50, share=350) == 4
    assert level(view=10_000) == 0                # views are not engagements
    assert viral_level({"like_1h": 1e6}, ViralPolicy(min_engagements=0)) == 0   # off
    with pytest.raises(ValueError):
        ViralPolicy(factor=1.0)


def test_queue_text_round_trips_every_trigger_kind():
    triggers = [Trigger(3, T0, POST_CREATED, 5, 6, T0 - 1, "PHOTO"),
                Trigger(3, T0 + 1, POST_DELETED, 5, 6, T0 - 1, ""),
                Trigger(3, T0 + 2, FOLLOW_CHANGED, author_id=9),
                Trigger(3, T0 + 3, UNFOLLOW_CHANGED, author_id=9),
                Trigger(3, T0 + 4, ENGAGED), Trigger(3, T0 + 5, VIRAL, 5, 6)]
    text = "#4\n" + encode_triggers(triggers[:3]) + "#11\n" + encode_triggers(triggers[3:])
    assert decode_pending(3, text) == (11, triggers)
    assert decode_pending(3, "") == (0, [])
    with pytest.raises(ValueError):
        decode_pending(3, "#1\nx12\n")


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
    d = Debounce(settle_ms=500, interval_ms=5_000, burst=1)
    # burst 1: a burst at 0..300 settles into one refresh at 500; changes at 1000
    # and 4000 wait for the cool-down to end at 5500; a change at 20000 is
    # refreshed 500 ms later.
    assert simulate_debounce(d, [0, 100, 300, 1000, 4000, 20_000]) == [
        (500, [0, 100, 300]), (5500, [1000, 4000]), (20_500, [20_000])]
    # burst 2: the change at 1000 has a token left and goes after its settle; then
    # the bucket is empty until 5500 (full again at 10500: 500 + 2 * 5000).
    d = Debounce(settle_ms=500, interval_ms=5_000, burst=2)
    assert simulate_debounce(d, [0, 100, 1000, 4000, 6000]) == [
        (500, [0, 100]), (1500, [1000]), (5500, [4000]), (10_500, [6000])]
    assert d.due(0, None) == 500 and d.due(0, 20_000) == 15_000 and d.refreshed(None, 7) == 5007


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60_000), max_size=40), st.integers(0, 3_000),
       st.integers(1, 10_000), st.integers(1, 4))
def test_debounce_properties(times, settle, interval, burst):
    d = Debounce(settle, interval, burst)
    refreshes = simulate_debounce(d, times)
    fired = [t for t, _ in refreshes]
    # The bucket: at most burst refreshes, plus one per interval, in any window.
    for i, a in enumerate(fired):
        for j in range(i, len(fired)):
            assert j - i + 1 <= burst + (fired[j] - a) // interval
    # Every change is covered exactly once, by a refresh after it, and waits at
    # most its settle or, when the bucket is empty, burst intervals.
    covered = [e for _, events in refreshes for e in events]
    assert sorted(covered) == sorted(times)
    for t, events in refreshes:
        assert events and all(e <= t <= e + max(settle, burst * interval) for e in events)
        assert t - events[0] == settle or t - events[0] > settle  # never before its settle


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


@st.composite
def batches(draw):
    """Random stores and requests for three users: unknown, tombstoned, old, deleted,
    pushed and pulled at once, and trigger posts the store does not know."""
    ids = list(range(1, 25))
    meta, tombstoned = {}, set()
    for i in ids:
        kind = draw(st.sampled_from(["live", "live", "live", "unknown", "tombstoned"]))
        if kind == "tombstoned":
            tombstoned.add(i)
            meta[i] = None
        elif kind == "live":
            meta[i] = {"author_id": draw(st.integers(1, 4)),
                       "created_at": T0 - draw(st.sampled_from([5, 10, 10, 20, 2 * DAY_MS])),
                       "media_type": draw(st.sampled_from(["PHOTO", "REEL"]))}
    users, pushed, pulled, requests = [7, 8, 9], [], [], []
    for u in users:
        pushed.append(draw(st.lists(st.sampled_from(ids), max_size=10)))
        pulled.append(draw(st.lists(st.sampled_from(ids), max_size=5)))
        new = draw(st.lists(st.sampled_from(ids + [100, 101]), max_size=3, unique=True))
        requests.append(RefreshRequest(
            u, T0, tuple(Candidate(p, 5, T0 - draw(st.integers(0, 30)), "VIDEO") for p in new),
            frozenset(draw(st.lists(st.sampled_from(ids), max_size=3)))))
    return users, pushed, pulled, requests, meta, tombstoned


@settings(max_examples=200, deadline=None)
@given(batches(), st.integers(1, 6))
def test_select_candidates_is_merge_candidates_for_a_whole_batch(batch, max_candidates):
    users, pushed, pulled, requests, meta, tombstoned = batch
    policy = RankingPolicy(max_candidates=max_candidates, max_age_days=1)
    stored = sorted(meta)
    table = PostTable(
        np.array(stored, np.int64),
        np.array([meta[i]["author_id"] if meta[i] else 0 for i in stored], np.int64),
        np.array([meta[i]["created_at"] if meta[i] else 0 for i in stored], np.int64),
        np.array([meta[i]["media_type"] if meta[i] else "" for i in stored], dtype=object),
        np.array([2 if i in tombstoned else 1 for i in stored], np.int8))
    cols = select_candidates(users, pushed, pulled, requests, table, T0, policy)
    assert cols.users == tuple(users)
    # The distinct posts it hands on are np.unique's of the rows it kept.
    posts, post_at = np.unique(cols.post_id, return_inverse=True)
    assert cols.posts.tolist() == posts.tolist() and cols.post_at.tolist() == post_at.tolist()
    for k in range(len(users)):
        assert cols.of(k) == merge_candidates(pushed[k], pulled[k], requests[k], meta,
                                              tombstoned, T0, policy)
        # Only a trigger brings a post the store does not hold (stored rows need metadata).
        a, b = cols.offsets[k], cols.offsets[k + 1]
        assert ({int(p) for p in cols.post_id[a:b][cols.unstored[a:b]]}
                == {c.post_id for c in cols.of(k) if c.post_id not in meta})


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


class _Queue:
    """``RefreshQueue.finish`` recorded (the claim handling's only queue call)."""

    def __init__(self):
        self.finished = []

    def finish(self, shard, done, deferred, now_ms):
        self.finished.append((shard, list(done), list(deferred)))


class _Ranker:
    """A ``FeedRanker`` stand-in: the fan-out's graph holds ``edges``; ``refresh``
    records its requests (one outcome per user, first-seen order)."""

    def __init__(self, edges=None):
        import types

        self.refreshed = []
        self.models = types.SimpleNamespace(swaps=1)
        self.model_errors = 0
        self.carried = 0
        self.closed = False
        self.healer = None  # no generation check (FeedRanker without a RedisHealer)
        edges = edges or {}
        self.candidates = types.SimpleNamespace(edge_versions=lambda wanted: {
            u: {f: edges.get((u, f)) for f in fs} for u, fs in wanted.items()})

    def refresh(self, requests):
        from schemas.ranking import RefreshOutcome

        self.refreshed += requests
        return [RefreshOutcome(r.user_id, "v1", 1, 2, r.changed_at_ms, T0 + 5, r.triggers)
                for r in requests]

    def close(self):
        self.closed = True


def test_claims_refresh_behind_the_follow_gate_and_release_what_they_covered():
    from stores.ranker import ClaimRefresher

    edge = follow_trigger(FollowEvent("f", T0, FollowKind.FOLLOW, 2, 4))
    text = lambda *ts: "#7\n" + encode_triggers(ts)  # noqa: E731
    claim = ClaimedRefreshes(shard=1, claimed_at_ms=T0, users=[1, 2, 3, 5, 9],
                             payloads=[text(Trigger(1, T0 - 3, ENGAGED),
                                            Trigger(1, T0 - 9, POST_CREATED, 70, 4, T0 - 9, "")),
                                       text(edge), text(edge._replace(user_id=3)), "",
                                       "#3\nzzz\n"],
                             waits=["", "", "", "", ""])
    queue, wait = _Queue(), FollowWait(retry_ms=100, max_retry_ms=400, max_wait_ms=1_000)
    ranker = _Ranker(edges={(3, 4): edge_version(FollowEvent("f", T0, FollowKind.FOLLOW, 3, 4))})
    result = ClaimRefresher(ranker, queue, wait, wall=lambda: T0 / 1000).apply([claim])
    # 2's follow is not in the graph yet: put off with its triggers; 3's is; 5's
    # triggers were dropped (a full payload) and 9's are unreadable, but both are
    # still refreshed (9's text is dropped: it would fail every claim).
    assert [r.user_id for r in ranker.refreshed] == [1, 3, 5, 9]
    assert ranker.refreshed[0] == RefreshRequest(1, T0 - 9, (Candidate(70, 4, T0 - 9, ""),),
                                                 frozenset(), 2)
    assert [o.user_id for o in result.outcomes] == [1, 3, 5, 9] and result.waits == 1
    assert queue.finished == [(1, [(1, 7), (3, 7), (5, 0), (9, 3)], [(2, T0 + 100, f"{T0},1")])]
    # Checked again later, still missing: the wait keeps its start and backs off;
    # past max_wait the refresh goes ahead.
    again = claim._replace(users=[2], payloads=[text(edge)], waits=[f"{T0},1"])
    ClaimRefresher(ranker, queue, wait, wall=lambda: (T0 + 500) / 1000).apply([again])
    assert queue.finished[-1] == (1, [], [(2, T0 + 700, f"{T0},2")])
    late = ClaimRefresher(ranker, queue, wait, wall=lambda: (T0 + 1_000) / 1000).apply([again])
    assert late.give_ups == 1 and queue.finished[-1] == (1, [(2, 7)], [])
    # The edge arrives after a wait: one more retry_ms for the fan-out's merge, then go.
    ranker.candidates.edge_versions = lambda wanted: {2: {4: edge_version(
        FollowEvent("f", T0, FollowKind.FOLLOW, 2, 4))}}
    ClaimRefresher(ranker, queue, wait, wall=lambda: (T0 + 800) / 1000).apply([again])
    assert queue.finished[-1] == (1, [], [(2, T0 + 900, "")])
    settled = again._replace(waits=[""])
    ClaimRefresher(ranker, queue, wait, wall=lambda: (T0 + 900) / 1000).apply([settled])
    assert queue.finished[-1] == (1, [(2, 7)], [])


def test_refresh_applier_answers_each_claim_and_releases_the_ranker():
    import dataclasses

    from pipelines.ranking import RefreshConfig

    @dataclasses.dataclass(frozen=True)
    class Config:
        name: str

        def open(self, policy):
            return ranker

    import types

    ranker = _Ranker()
    ranker.candidates.feeds = types.SimpleNamespace(
        client=types.SimpleNamespace(register_script=lambda script: None), keys=None)
    config = RefreshConfig(Config("refresh-applier-test"), RankingPolicy(), follow_wait=None)
    applier = config.open()
    applier._claims.queue = _Queue()
    line = lambda ago: "#1\n" + encode_triggers([Trigger(0, T0 - ago, ENGAGED)])  # noqa: E731
    # Claimed 100 ms before the stand-in ranker writes (at T0 + 5), changes 300-900 ms
    # before that.
    claims = [ClaimedRefreshes(0, T0 - 95, [1, 2], [line(900), line(600)], ["", ""]),
              ClaimedRefreshes(1, T0 - 95, [3], [line(300)], [""])]
    out = applier.apply(claims)
    assert [[o.user_id for o in outcomes] for outcomes in out] == [[1, 2], [3]]
    # Each refresh's latency, and its part before the claim (histogram buckets are
    # upper bounds, a few % wide).
    assert len(applier._wait_ms) == len(applier._latency_ms) == 3
    for q, wait, latency in ((0.0, 205, 305), (1.0, 805, 905)):
        assert wait <= applier._wait_ms.quantile(q) <= wait * 1.1
        assert latency <= applier._latency_ms.quantile(q) <= latency * 1.1
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


class _Armed:
    """The drain's state and timer, recorded."""

    def __init__(self):
        self.value, self.timer = None, None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value

    def clear(self):
        self.value = None

    def set(self, timestamp):
        self.timer = timestamp.micros // 1000


def test_the_drain_looks_again_soon_while_a_claim_is_out(monkeypatch):
    """A claim's refresh may put users off (the follow gate) while its users are
    leased, when the queue's next time is the lease end: the
    drain wakes within the settle time then, not at the lease end (30 s), and at the
    queue's own next time once nothing is out."""
    import types

    from pipelines import ranking
    from stores.ranker import QueueConfig
    from stores.redis.refresh_queue import Claim

    monkeypatch.setattr(ranking, "_now_ms", lambda: T0)
    fn = ranking._DrainFn(None, QueueConfig(debounce=Debounce(settle_ms=500)), max_users=2,
                          gather_ms=50)
    fn._claims = types.SimpleNamespace(inc=lambda: None)

    def drain(*claims):
        script = list(claims)
        fn._queue = types.SimpleNamespace(claim=lambda shard, now, limit: script.pop(0))
        state = _Armed()
        handed = list(fn.on_drain(shard=1, armed=state, drain=state))
        return [len(c.users) for c in handed], state.timer

    def claim(users, next_at, leased):
        return Claim(ClaimedRefreshes(1, T0, users, [""] * len(users), [""] * len(users)),
                     next_at, leased)

    assert drain(claim([7], T0 + 30_000, True)) == ([1], T0 + 500)
    assert drain(claim([], T0 + 30_000, True)) == ([], T0 + 500)  # an earlier claim is out
    assert drain(claim([], T0 + 1_000, False)) == ([], T0 + 1_000)
    assert drain(claim([], None, False)) == ([], None)
    # Full claims go on (up to max_claims); the last one decides.
    assert drain(claim([7, 8], T0 + 30_000, True), claim([9], T0 + 200, True)) \
        == ([2, 1], T0 + 200)


def test_remembered_posts_join_a_request_while_young():
    """The posts a user's last ranking had only from triggers (``carried_posts``) join
    its next request as new posts, unless too old or carried by the request itself."""
    from stores.redis.candidates import _with_carried

    request = RefreshRequest(1, T0, (Candidate(70, 4, T0 - 9, "PHOTO"),))
    held = {b"70": b"4:1:PHOTO", b"71": b"5:%d:REEL" % (T0 - 5), b"72": b"5:%d:VIDEO" % (T0 - 61)}
    out = _with_carried(request, held, since_ms=T0 - 60)
    assert out.new_posts == (Candidate(70, 4, T0 - 9, "PHOTO"), Candidate(71, 5, T0 - 5, "REEL"))
    assert out._replace(new_posts=()) == request._replace(new_posts=())
    assert _with_carried(request, {}, T0) is request


def test_the_packed_sort_key_orders_as_lexsort_and_falls_back_to_it():
    from domain.ranking import _order

    rng = np.random.default_rng(4)
    group, major, minor = rng.integers(0, 50, 2000), rng.integers(0, 300, 2000), \
        rng.integers(0, 3, 2000)
    expected = np.lexsort((minor, major, group))
    for majors in (300, 1 << 60):   # the key fits; it would not: lexsort itself
        got = _order(major, minor, group, majors, 3, 50)
        keys = np.stack([group, major, minor])
        assert (keys[:, got] == keys[:, expected]).all()
