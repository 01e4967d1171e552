"""The fan-out decisions as plain functions, and its durable write records (no Beam, no servers)."""
from __future__ import annotations

import contextlib

import pytest

from domain.fanout import (
    DAY_MS,
    FanoutPolicy,
    FreshnessHistogram,
    active_users,
    chunks,
    edge_effect,
    expected_state,
    is_active,
    is_push_author,
    latest_per_edge,
    live_entries,
    percentile_of,
    runs_by_type,
    select_celebrity_targets,
)
from schemas.events import FollowEvent, FollowKind, PostEvent, PostEventKind
from schemas.fanout import (
    CelebrityAdd,
    CelebrityRemove,
    Edge,
    FeedAdd,
    FeedRemove,
    FollowerCount,
    MalformedDurableWrites,
    Post,
    PostTombstone,
    TimelineAdd,
    TimelineRemove,
    decode_durable_writes,
    encode_durable_writes,
)
from stores.fanout import DurableFeedWriter

F, U = FollowKind.FOLLOW, FollowKind.UNFOLLOW


def follow(follower, followee, t, kind=F, eid=None):
    return FollowEvent(eid or f"f{follower}-{followee}-{t}", t, kind, follower, followee)


def post(pid, author, t, kind=PostEventKind.CREATED):
    return PostEvent(f"p{pid}-{kind.value}", t, kind, pid, author, created_at=t if
                     kind is PostEventKind.CREATED else 0)


def test_push_below_threshold_pull_at_and_above():
    policy = FanoutPolicy(push_threshold=5)
    assert is_push_author(0, policy) and is_push_author(4, policy)
    assert not is_push_author(5, policy) and not is_push_author(6, policy)


def test_celebrity_targets_engaged_first_then_follow_order():
    assert select_celebrity_targets([], [1, 2, 3, 4], 2) == [1, 2]
    assert select_celebrity_targets([4, 9], [1, 2, 3, 4], 3) == [4, 9, 1]
    assert select_celebrity_targets([4], [4, 1], 5) == [4, 1]
    assert select_celebrity_targets([1], [1, 2], 0) == []


def test_delete_scope_covers_threshold_and_top_n():
    assert FanoutPolicy(push_threshold=10, celebrity_top_n=3).delete_scope == 10
    assert FanoutPolicy(push_threshold=2, celebrity_top_n=3).delete_scope == 3


def test_active_rule_is_relative_to_the_event_and_never_read_is_active():
    now = 100 * DAY_MS
    inactive_ms = 30 * DAY_MS
    assert is_active(None, now, inactive_ms)
    assert is_active(now - inactive_ms, now, inactive_ms)
    assert not is_active(now - inactive_ms - 1, now, inactive_ms)
    assert is_active(now + 5, now, inactive_ms)  # read after the post
    users = [1, 2, 3, 4]
    reads = dict(zip(users, [None, now, now - 31 * DAY_MS, now - 29 * DAY_MS]))
    assert active_users(users, reads, now, inactive_ms) == [1, 2, 4]
    assert active_users([4, 2, 1], reads, now, inactive_ms) == [4, 2, 1]   # order kept
    with pytest.raises(KeyError):
        active_users([5], reads, now, inactive_ms)


def test_chunks():
    assert [list(c) for c in chunks(list(range(7)), 3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunks([], 3)) == []
    with pytest.raises(ValueError):
        list(chunks([1], 0))


def test_runs_by_type_keeps_order():
    a, b, c, d = follow(1, 2, 1), follow(1, 3, 2), post(9, 2, 3), follow(4, 2, 4)
    assert list(runs_by_type([a, b, c, d])) == [(FollowEvent, [a, b]), (PostEvent, [c]),
                                                (FollowEvent, [d])]
    assert list(runs_by_type([])) == []


def test_latest_per_edge_unfollow_wins_ties():
    f1, u2, f3 = follow(1, 2, 10), follow(1, 2, 20, U), follow(1, 2, 15)
    assert latest_per_edge([f1, u2, f3]) == [u2]
    tie_f, tie_u = follow(1, 2, 30), follow(1, 2, 30, U)
    assert latest_per_edge([tie_u, tie_f]) == [tie_u]
    assert latest_per_edge([tie_f, tie_u]) == [tie_u]
    other = follow(5, 2, 1)
    assert latest_per_edge([f1, other]) == [f1, other]


def test_edge_effect_follows_the_applied_state():
    assert edge_effect(follow(1, 2, 5), following_now=True) == "merge"
    assert edge_effect(follow(1, 2, 5), following_now=False) is None  # lost to a newer unfollow
    assert edge_effect(follow(1, 2, 5, U), following_now=False) == "remove"  # also on replay
    assert edge_effect(follow(1, 2, 5, U), following_now=True) is None


def test_live_entries_drops_deleted_and_limits():
    entries = [(5, 500.0), (4, 400.0), (3, 300.0)]
    assert live_entries(entries, [False, True, False], 5) == [(5, 500), (3, 300)]
    assert live_entries(entries, [False, False, False], 2) == [(5, 500), (4, 400)]


def test_freshness_histogram_percentiles_and_periods():
    h = FreshnessHistogram(period_s=60, now_s=0)
    for ms in range(1, 101):
        h.add(ms)
    assert len(h) == 100
    assert 49 <= h.quantile(0.5) <= 52
    assert 98 <= h.quantile(0.99) <= 102
    assert not h.due(59.9) and h.due(60)
    count, p50, p99 = h.flush(60)
    assert count == 100 and p50 <= p99
    assert h.flush(120) is None and len(h) == 0
    h.add(0)
    assert h.quantile(0.5) == 0.0


def test_percentile_of():
    assert percentile_of([1, 2, 3, 4], 0.5) == 2
    assert percentile_of([1, 2, 3, 4], 0.99) == 4


def test_oracle_push_celebrity_inactive_delete_unfollow():
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=1, feed_cap=2, timeline_cap=2)
    t = 1_000_000
    events = [
        # author 100: followers 1, 2 (push); author 200: followers 1, 2, 3 (celebrity, top 1 = 3)
        follow(1, 100, t), follow(2, 100, t + 1),
        follow(3, 200, t), follow(1, 200, t + 1), follow(2, 200, t + 2),
        follow(4, 100, t + 3), follow(4, 100, t + 4, U),  # unfollowed: nothing
        post(1, 100, t + 10), post(2, 100, t + 11), post(3, 100, t + 12),
        post(4, 200, t + 13), post(5, 200, t + 14),
        post(3, 100, t + 20, PostEventKind.DELETED),
    ]
    state = expected_state(events, policy, last_reads={2: t - 40 * DAY_MS})
    assert state.followers == {100: [1, 2], 200: [3, 1, 2]}
    assert state.feeds == {1: [(2, t + 11), (1, t + 10)], 3: [(5, t + 14), (4, t + 13)]}
    assert state.durable_feeds == {1: {1, 2}, 3: {4, 5}}
    assert state.timelines == {100: [(2, t + 11), (1, t + 10)], 200: [(5, t + 14), (4, t + 13)]}
    assert state.deleted == {3}
    assert state.followed_celebrities == {3: {200}, 1: {200}, 2: {200}}


def test_policy_validation():
    with pytest.raises(ValueError):
        FanoutPolicy(feed_cap=0)
    with pytest.raises(ValueError):
        FanoutPolicy(inactive_days=0)
    assert FanoutPolicy(inactive_days=1).inactive_ms == DAY_MS


# -- durable writes: the records the Redis step ships to the durable step ---------------

WRITES = [
    Edge(1, 2, 1_000, True), Edge(3, 2, 1_001, False), FollowerCount(2, 40, 1_001),
    Post(9, 2, 900, "PHOTO", 12, ("a", "b"), 901), PostTombstone(8, 2, 800, 950),
    TimelineAdd(2, 9, 900, "VIDEO"), TimelineRemove(2, 8, 800),
    FeedAdd((1, 4, 5), 9, 2, 900, 1_002), FeedRemove((3,), 9, 900, 1_003),
    CelebrityAdd(((1, 1_000), (4, 990)), 2, 1_004), CelebrityRemove((3,), 2, 1_005),
]


def test_durable_writes_round_trip_every_record_type():
    (record,) = encode_durable_writes(WRITES)
    assert decode_durable_writes(record) == WRITES
    assert {type(w) for w in decode_durable_writes(record)} == {type(w) for w in WRITES}


def test_large_fan_outs_are_split_across_records():
    big = FeedAdd(tuple(range(1, 2501)), 9, 2, 900, 1_002)
    records = encode_durable_writes([Edge(1, 2, 1_000, True), big, TimelineRemove(2, 8, 800)],
                                    max_ids=1000)
    decoded = [w for r in records for w in decode_durable_writes(r)]
    assert len(records) >= 3 and all(len(r) < 20_000 for r in records)
    assert [w.user_ids for w in decoded if isinstance(w, FeedAdd)] == [
        tuple(range(1, 1001)), tuple(range(1001, 2001)), tuple(range(2001, 2501))]
    assert decoded[0] == Edge(1, 2, 1_000, True) and decoded[-1] == TimelineRemove(2, 8, 800)
    assert encode_durable_writes([]) == []


@pytest.mark.parametrize("value, reason", [
    (b"", "empty"),
    (b"\x00\x01binary", "not_json"),
    (b'{"v": 99, "w": []}', "bad_format"),
    (b'[1, 2]', "bad_format"),
    (b'{"v": 1, "w": [["?", 1]]}', "bad_write"),
    (b'{"v": 1, "w": [["e", 1, 2, 3]]}', "bad_write"),             # a field missing
    (b'{"v": 1, "w": [["e", 1, 2, "3", true]]}', "bad_write"),     # a time that is text
    (b'{"v": 1, "w": [["e", 1, 2, 3, 1]]}', "bad_write"),          # follow must be a bool
    (b'{"v": 1, "w": [["f", [1, "x"], 9, 2, 900, 5]]}', "bad_write"),
    (b'{"v": 1, "w": [["s", [[1]], 2, 5]]}', "bad_write"),          # a pair of one
    (b'{"v": 1, "w": [["p", 9, 2, 900, 7, 12, [], 901]]}', "bad_write"),  # media not a string
])
def test_malformed_durable_log_records_say_why(value, reason):
    with pytest.raises(MalformedDurableWrites) as info:
        decode_durable_writes(value)
    assert info.value.reason == reason


class _RecordingCassandra:
    """What ``DurableFeedWriter`` calls on a ``CassandraFeedStore``, recorded."""

    def __init__(self):
        self.calls = []
        self.blocks = 0

    def deferred(self):
        self.blocks += 1
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_durable_writer_applies_each_record_once_and_keeps_the_newest_count():
    cassandra = _RecordingCassandra()
    older = FollowerCount(2, 39, 999)
    n = DurableFeedWriter(cassandra).apply(WRITES + [older])
    assert n == len(WRITES) + 1 and cassandra.blocks == 1
    by_name = {}
    for name, args, kwargs in cassandra.calls:
        by_name.setdefault(name, []).append((args, kwargs))
    assert by_name["write_edges"] == [(([Edge(1, 2, 1_000, True), Edge(3, 2, 1_001, False)],),
                                       {})]
    (counts,), _ = by_name["set_follower_counts"][0]
    assert list(counts) == [FollowerCount(2, 40, 1_001)]   # the older count is not written
    assert by_name["push"] == [(((1, 4, 5), 9, 2, 900), {"at_ms": 1_002})]
    assert by_name["remove_from_feeds"] == [(((3,), 9, 900), {"at_ms": 1_003})]
    assert by_name["set_followed_celebrity"] == [((((1, 1_000), (4, 990)), 2, 1_004), {})]
    assert by_name["remove_followed_celebrity"] == [(((3,), 2, 1_005), {})]
    (post,), _ = by_name["put_post"][0]
    assert (post.post_id, post.author_id, post.media_type.value, post.hashtags,
            post.event_time) == (9, 2, "PHOTO", ("a", "b"), 901)
    (tomb,), _ = by_name["tombstone_post"][0]
    assert (tomb.post_id, tomb.created_at, tomb.event_time) == (8, 800, 950)
    assert by_name["add_to_timeline"] == [((2, 9, 900, "VIDEO"), {})]
    assert by_name["remove_from_timeline"] == [((2, 8, 800), {})]
    with pytest.raises(TypeError):
        DurableFeedWriter(_RecordingCassandra()).apply(["not a write"])


def test_a_batch_of_the_fanout_ends_at_its_post_limit_whatever_its_follows():
    from pipelines.fanout import BATCH_POSTS, BUNDLE_RECORDS, PostsAtMost
    from schemas.records import EventBatch

    def poll(topic, n):
        return EventBatch(topic, 0, [None] * n, [0] * n, list(range(n)), [None] * n, [None] * n)

    early = PostsAtMost(limit=100)
    assert not early([poll("x.follow-events", 5_000)] * 10)  # a bundle of follows: whole
    assert not early([poll("x.post-events", 60), poll("x.follow-events", 500)])
    assert early([poll("x.post-events", 60), poll("x.follow-events", 500),
                  poll("x.post-events", 40)])
    assert early([post(i, 1, 1_000) for i in range(100)])     # single events count too
    assert not early([post(i, 1, 1_000) for i in range(99)])
    assert BATCH_POSTS < BUNDLE_RECORDS
