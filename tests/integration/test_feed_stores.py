"""The feed stores against the real Redis and Cassandra: newer-wins graph edges,
tombstones, capped feeds, bucketed pages and idempotent replays.

Run: ``.venv/bin/python -m pytest tests/integration/test_feed_stores.py``
"""
from __future__ import annotations

import pytest

from stores.cassandra.feeds import CassandraFeedStore
from stores.redis.feeds import RedisFeedStore
from schemas.cassandra import FEED_BUCKET_MS, time_bucket
from stores.cassandra.session import migrate
from schemas.events import FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind
from schemas.keys import KeyLayout

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
FOLLOW, UNFOLLOW = FollowKind.FOLLOW, FollowKind.UNFOLLOW


def edge(kind: FollowKind, follower: int, followee: int, t: int) -> FollowEvent:
    return FollowEvent(f"f-{kind.value}-{follower}-{followee}-{t}", t, kind, follower, followee)


def post(kind: PostEventKind, post_id: int, author: int = 3, created: int = T0,
         t: int | None = None) -> PostEvent:
    return PostEvent(f"p-{kind.value}-{post_id}", created if t is None else t, kind, post_id,
                     author, created, MediaType.VIDEO, 12, ("cats", "dogs"))


@pytest.fixture
def redis_store(redis_client, key_prefix) -> RedisFeedStore:
    return RedisFeedStore(redis_client, KeyLayout(key_prefix))


@pytest.fixture
def cassandra_store(cassandra_session, keyspace) -> CassandraFeedStore:
    migrate(cassandra_session, keyspace)
    return CassandraFeedStore(cassandra_session, keyspace)


@pytest.fixture(params=["redis", "cassandra"])
def store(request):
    """Each backend in turn, for behaviour both must share."""
    return request.getfixturevalue(f"{request.param}_store")


# -- social graph -------------------------------------------------------------------


def test_edges_converge_out_of_order_and_on_redelivery(store):
    # UNFOLLOW@t2 arrives before the FOLLOW@t1 it cancels: not following.
    store.apply_edges([edge(UNFOLLOW, 10, 1, T0 + 2)])
    store.apply_edges([edge(FOLLOW, 10, 1, T0 + 1)])
    assert store.followers(1) == [] and store.following(10) == []
    # A later FOLLOW@t3 wins.
    store.apply_edges([edge(FOLLOW, 10, 1, T0 + 3)])
    assert store.followers(1) == [10] and store.following(10) == [1]
    # Redelivery of everything, newest first, changes nothing.
    store.apply_edges([edge(FOLLOW, 10, 1, T0 + 3), edge(UNFOLLOW, 10, 1, T0 + 2),
                       edge(FOLLOW, 10, 1, T0 + 1)])
    assert store.followers(1) == [10] and store.following(10) == [1]
    # Same event time: the unfollow wins, whichever comes first (as Cassandra's tombstone).
    store.apply_edges([edge(FOLLOW, 11, 1, T0 + 5), edge(UNFOLLOW, 11, 1, T0 + 5)])
    store.apply_edges([edge(UNFOLLOW, 12, 1, T0 + 5), edge(FOLLOW, 12, 1, T0 + 5)])
    assert store.followers(1) == [10]
    # Oldest follow first, counts, both directions.
    store.apply_edges([edge(FOLLOW, 14, 1, T0 + 9), edge(FOLLOW, 13, 1, T0 + 8),
                       edge(FOLLOW, 10, 2, T0 + 9)])
    assert store.followers(1) == [10, 13, 14]
    assert store.follower_count(1) == 3 and store.follower_count(99) == 0
    assert store.following(10) == [1, 2]


def test_redis_edges_report_membership_changes(redis_store):
    changed = redis_store.apply_edges([
        edge(FOLLOW, 10, 1, T0 + 1),    # new follower
        edge(FOLLOW, 10, 1, T0 + 1),    # redelivered: no-op
        edge(FOLLOW, 10, 1, T0 + 4),    # newer follow: applied, membership unchanged
        edge(UNFOLLOW, 10, 1, T0 + 2),  # older than the last applied: no-op
        edge(UNFOLLOW, 10, 1, T0 + 6),  # removes
    ])
    assert changed == [True, False, False, False, True]
    assert redis_store.apply_edges([]) == []


def test_redis_top_followers_skip_users_who_no_longer_follow(redis_store):
    redis_store.apply_edges([edge(FOLLOW, f, 1, T0 + f) for f in (10, 11, 12, 13)])
    assert redis_store.top_followers(1, 3) == []  # no engagement recorded yet
    redis_store.set_follower_engagement(1, {10: 1.0, 11: 5.0, 12: 3.0, 13: 4.0, 99: 9.0})
    redis_store.apply_edges([edge(UNFOLLOW, 13, 1, T0 + 50)])
    assert redis_store.top_followers(1, 2) == [11, 12]  # 99 never followed, 13 left
    assert redis_store.top_followers(1, 10) == [11, 12, 10]
    assert redis_store.top_followers(1, 0) == []


def test_cassandra_stored_follower_count_newer_wins(cassandra_store):
    cassandra_store.apply_edges([edge(FOLLOW, f, 1, T0) for f in (10, 11)])
    assert cassandra_store.follower_count(1) == 2  # counted: nothing stored yet
    cassandra_store.set_follower_count(1, 40_000, at_ms=T0 + 10)
    cassandra_store.set_follower_count(1, 39_000, at_ms=T0 + 5)  # older: ignored
    assert cassandra_store.follower_count(1) == 40_000


# -- posts ----------------------------------------------------------------------------


def test_tombstone_wins_over_a_replayed_create(store):
    created = post(PostEventKind.CREATED, 100, created=T0)
    redis = isinstance(store, RedisFeedStore)  # only Redis reports whether it wrote
    assert store.put_post(created) is (True if redis else None)
    assert store.deleted([100, 101]) == [False, False]
    store.tombstone_post(post(PostEventKind.DELETED, 100, created=T0, t=T0 + 60_000))
    assert store.put_post(created) is (False if redis else None)  # replay after the delete
    assert store.deleted([100]) == [True]
    assert store.posts([100]) == [None]
    # A delete that arrives before its create also sticks.
    store.tombstone_post(post(PostEventKind.DELETED, 101, t=T0 + 60_000))
    store.put_post(post(PostEventKind.CREATED, 101))
    assert store.deleted([100, 101, 102]) == [True, True, False]


def test_post_metadata_hydrates_the_same_from_both_stores(redis_store, cassandra_store):
    created = post(PostEventKind.CREATED, 100, author=4, created=T0 + 7)
    for s in (redis_store, cassandra_store):
        s.put_post(created)
    expected = {"post_id": 100, "author_id": 4, "created_at": T0 + 7, "media_type": "VIDEO",
                "caption_length": 12, "hashtags": ("cats", "dogs"), "deleted": False}
    assert redis_store.posts([100, 5]) == [expected, None]
    assert cassandra_store.posts([100, 5]) == [expected, None]


def test_redis_tombstone_returns_what_cleanup_needs(redis_store):
    redis_store.put_post(post(PostEventKind.CREATED, 100, author=4, created=T0))
    deleted = post(PostEventKind.DELETED, 100, author=4, created=T0, t=T0 + 5)
    before = redis_store.tombstone_post(deleted)
    assert before["author_id"] == 4 and before["created_at"] == T0 and not before["deleted"]
    again = redis_store.tombstone_post(deleted)  # a retried bundle can redo its cleanup
    assert (again["author_id"], again["created_at"], again["deleted"]) == (4, T0, True)
    unknown = redis_store.tombstone_post(post(PostEventKind.DELETED, 200, author=6, created=T0))
    assert (unknown["author_id"], unknown["created_at"]) == (6, T0)


def test_redis_tombstones_are_logged_for_serving_after_they_are_written(redis_store):
    """Each batch of tombstones adds one entry naming its posts to the log serving
    workers follow (``KeyLayout.deleted_posts``); a re-delivered delete logs again."""
    key = redis_store.keys.deleted_posts()
    redis_store.tombstone_posts([post(PostEventKind.DELETED, pid, created=T0, t=T0 + 5)
                                 for pid in (300, 301)])
    redis_store.tombstone_post(post(PostEventKind.DELETED, 300, created=T0, t=T0 + 5))
    entries = redis_store.client.xrange(key)
    assert [fields for _, fields in entries] == [{b"posts": b"300,301"}, {b"posts": b"300"}]
    assert redis_store.deleted([300, 301]) == [True, True]
    assert redis_store.tombstone_posts([]) == [] and len(redis_store.client.xrange(key)) == 2
    assert key not in redis_store.dump()  # a meta key: not a view two runs compare


# -- feeds, timelines, activity (Redis) ---------------------------------------------------


def test_redis_push_caps_to_the_newest(redis_store):
    users = list(range(1, 26))
    for i in range(5):
        assert redis_store.push(users, 100 + i, T0 + i, cap=3, chunk_size=7) == 25
    redis_store.push(users, 104, T0 + 4, cap=3)  # re-delivered: no duplicate
    for uid in (1, 13, 25):
        assert redis_store.feed(uid, 10) == [(104, T0 + 4), (103, T0 + 3), (102, T0 + 2)]
    redis_store.push(users, 90, T0 - 100, cap=3)  # older than everything kept: trimmed away
    assert redis_store.feed(5, 10)[-1] == (102, T0 + 2)
    assert redis_store.feed(5, 2) == [(104, T0 + 4), (103, T0 + 3)]
    assert redis_store.feed(5, 10, max_score=T0 + 3) == [(103, T0 + 3), (102, T0 + 2)]
    assert redis_store.feed(5, 10, max_score=T0 + 3, exclusive=True) == [(102, T0 + 2)]
    assert redis_store.feed(999, 10) == []


def test_redis_push_many_remove_and_merge(redis_store):
    assert redis_store.push_many([(1, 100, T0), (1, 101, T0 + 1), (2, 100, T0)], cap=10) == 3
    redis_store.remove_from_feeds([1, 2, 3], [100, 555])
    assert redis_store.feed(1, 10) == [(101, T0 + 1)] and redis_store.feed(2, 10) == []
    redis_store.merge_into_feed(1, [(200, T0 + 20), (201, T0 + 21), (202, T0 - 5)], cap=3)
    assert redis_store.feed(1, 10) == [(201, T0 + 21), (200, T0 + 20), (101, T0 + 1)]


def test_redis_timeline_and_last_reads(redis_store):
    for i in range(4):
        redis_store.add_to_timeline(3, 100 + i, T0 + i, cap=3)
    redis_store.remove_from_timeline(3, [(102, T0 + 2)], cap=1)
    assert redis_store.timeline(3, 10) == [(103, T0 + 3), (101, T0 + 1)]
    assert redis_store.timeline(3, 1) == [(103, T0 + 3)]
    # What an unfollow removes: the timeline and what was deleted from it.
    assert redis_store.timeline_and_deleted(3, 10) == [(103, T0 + 3), (102, T0 + 2),
                                                       (101, T0 + 1)]
    redis_store.remove_from_timeline(3, [(101, T0 + 1)], cap=1)  # deleted set capped at 1
    assert redis_store.timeline_and_deleted(3, 10) == [(103, T0 + 3), (102, T0 + 2)]
    redis_store.set_last_read(1, T0 + 10)
    redis_store.set_last_read(1, T0 + 5)  # older read arriving late: ignored
    redis_store.set_last_read(3, T0)
    assert redis_store.last_reads([1, 2, 3]) == [T0 + 10, None, T0]
    assert redis_store.last_reads(list(range(1, 2500)))[:3] == [T0 + 10, None, T0]


# -- feeds, timelines, activity (Cassandra) -------------------------------------------------


def test_cassandra_feed_pages_across_buckets(cassandra_store):
    now = T0 + 2 * FEED_BUCKET_MS
    old_week, new_week = now - FEED_BUCKET_MS, now  # two different buckets
    assert time_bucket(old_week) != time_bucket(new_week)
    posts = [(100, old_week), (101, old_week + 1), (102, new_week - 2), (103, new_week - 1)]
    for pid, created in posts:
        cassandra_store.push([1, 2], pid, author_id=pid % 7, created_at_ms=created)
    cassandra_store.push([1], 103, author_id=103 % 7, created_at_ms=new_week - 1)  # redelivered

    page1 = cassandra_store.feed_page(1, 3, before=None, now_ms=now)
    assert page1 == [(103, new_week - 1, 5), (102, new_week - 2, 4), (101, old_week + 1, 3)]
    page2 = cassandra_store.feed_page(1, 3, before=page1[-1][:2], now_ms=now)
    assert page2 == [(100, old_week, 2)]
    assert cassandra_store.feed_page(1, 3, before=page2[-1][:2], now_ms=now) == []
    assert cassandra_store.feed_page(1, 10, before=None, now_ms=now, max_buckets=1) == page1[:2]

    # Unfollow/delete removes; a replayed push does not bring it back, a later event does.
    cassandra_store.remove_from_feeds([1, 2], 102, created_at_ms=new_week - 2, at_ms=now)
    cassandra_store.push([1], 102, author_id=4, created_at_ms=new_week - 2)
    assert [p for p, _, _ in cassandra_store.feed_page(1, 10, None, now)] == [103, 101, 100]
    cassandra_store.push([1], 102, author_id=4, created_at_ms=new_week - 2, at_ms=now + 1)
    assert [p for p, _, _ in cassandra_store.feed_page(1, 10, None, now)] == [103, 102, 101, 100]
    assert [p for p, _, _ in cassandra_store.feed_page(2, 10, None, now)] == [103, 101, 100]


def test_cassandra_timeline_and_last_reads(cassandra_store):
    now = T0 + FEED_BUCKET_MS
    for pid, created in ((100, T0), (101, T0 + 1), (102, now - 1)):
        cassandra_store.add_to_timeline(3, pid, created, MediaType.PHOTO.value)
    cassandra_store.remove_from_timeline(3, 101, T0 + 1)
    cassandra_store.add_to_timeline(3, 101, T0 + 1, "PHOTO")  # replayed create: stays removed
    assert cassandra_store.timeline(3, 10, now_ms=now) == [(102, now - 1), (100, T0)]
    assert cassandra_store.timeline(3, 1, now_ms=now) == [(102, now - 1)]
    assert cassandra_store.timeline(3, 10, now_ms=now, max_buckets=1) == [(102, now - 1)]
    cassandra_store.set_last_read(1, T0 + 10)
    cassandra_store.set_last_read(1, T0 + 5)
    assert cassandra_store.last_reads([1, 2]) == [T0 + 10, None]


# -- replay idempotency -----------------------------------------------------------------


def _apply_workload(redis_store: RedisFeedStore, cassandra_store: CassandraFeedStore,
                    reverse: bool) -> None:
    edges = [edge(FOLLOW, 10, 1, T0), edge(FOLLOW, 11, 1, T0 + 1), edge(UNFOLLOW, 10, 1, T0 + 2),
             edge(FOLLOW, 10, 2, T0 + 3), edge(FOLLOW, 12, 1, T0 + 4)]
    created = [post(PostEventKind.CREATED, 100 + i, created=T0 + i) for i in range(3)]
    deleted = post(PostEventKind.DELETED, 101, created=T0 + 1, t=T0 + 50)
    if reverse:
        edges.reverse()
    for s in (redis_store, cassandra_store):
        s.apply_edges(edges)
        for p in created:
            s.put_post(p)
        s.tombstone_post(deleted)
        s.set_last_read(11, T0 + 9)
    for p in created:
        redis_store.push([11, 12], p.post_id, p.created_at, cap=2)
        redis_store.add_to_timeline(3, p.post_id, p.created_at, cap=10)
        cassandra_store.push([11, 12], p.post_id, 3, p.created_at)
        cassandra_store.add_to_timeline(3, p.post_id, p.created_at, "VIDEO")
    redis_store.remove_from_feeds([11, 12], [101])
    redis_store.remove_from_timeline(3, [(101, T0 + 1)], cap=10)
    cassandra_store.remove_from_feeds([11, 12], 101, T0 + 1, at_ms=T0 + 50)
    cassandra_store.remove_from_timeline(3, 101, T0 + 1, at_ms=T0 + 50)
    cassandra_store.set_follower_count(1, 2, at_ms=T0 + 4)


def test_replaying_the_same_operations_leaves_identical_dumps(redis_store, cassandra_store):
    _apply_workload(redis_store, cassandra_store, reverse=False)
    first_redis, first_cassandra = redis_store.dump(), cassandra_store.dump()
    assert first_redis[redis_store.keys.followers(1)] == [("11", T0 + 1), ("12", T0 + 4)]
    # cap 2 kept 101 and 102, then the delete removed 101
    assert first_redis[redis_store.keys.home_feed(11)] == [("102", T0 + 2)]
    assert len(first_cassandra["home_feed_by_user"]) == 4
    assert {r["follower_id"] for r in first_cassandra["followers_by_user"] if r["user_id"] == 1} \
        == {11, 12}

    _apply_workload(redis_store, cassandra_store, reverse=True)  # replay, edges out of order
    assert redis_store.dump() == first_redis
    assert cassandra_store.dump() == first_cassandra


def test_connect_retries_an_unreachable_cassandra_then_raises(caplog):
    from cassandra.cluster import NoHostAvailable

    from tests.integration.serving_harness import free_port

    port = free_port()  # nothing listens there
    with caplog.at_level("WARNING", logger="schemas.cassandra"):
        with pytest.raises(NoHostAvailable):
            CassandraFeedStore.connect("127.0.0.1", port, "feedbeam", connect_wait_s=2.5)
    retries = [r for r in caplog.records if "not available" in r.getMessage()]
    assert len(retries) >= 2 and all(str(port) in r.getMessage() for r in retries)


# -- a Redis that loses its scripts mid-batch -----------------------------------------


def test_a_batch_survives_the_server_losing_its_scripts(tmp_path):
    """The server forgets its scripts (as in a restart) after the pipeline loaded them
    and before it runs them: the batch is run again instead of failing the bundle."""
    import threading
    import time

    import redis as redis_lib

    from stores.redis.client import new_client
    from tests.integration.test_faults import PrivateRedis

    server = PrivateRedis(tmp_path / "redis")
    server.start()
    try:
        def run_batch(client):
            script = client.register_script("return redis.call('INCR', KEYS[1])")
            pipe = client.pipeline(transaction=False)
            pipe.blpop(["never-filled"], timeout=1)  # holds the batch on the server for 1 s
            script(keys=["runs"], client=pipe)
            flusher = threading.Timer(0.3, lambda: redis_lib.Redis.from_url(server.url)
                                      .script_flush())
            flusher.start()
            try:
                return pipe.execute()
            finally:
                flusher.join()

        plain = redis_lib.Redis.from_url(server.url)
        with pytest.raises(redis_lib.exceptions.NoScriptError):
            run_batch(plain)  # redis-py alone: the bundle would fail
        safe = new_client(server.url)
        started = time.monotonic()
        assert run_batch(safe) == [None, 1]
        assert time.monotonic() - started >= 2.0  # it ran twice: BLPOP waited both times
        assert int(safe.get("runs")) == 1
        plain.close()
        safe.close()
    finally:
        server.stop()


# -- the fan-out's batch steps (Redis) and followed celebrities (both stores) -----------


def test_followee_side_reports_state_crossings_and_what_to_merge_or_remove(redis_store):
    s = redis_store
    s.add_to_timelines([(1, 100, T0), (1, 101, T0 + 1), (1, 102, T0 + 2)], cap=10)
    s.remove_from_timeline(1, [(102, T0 + 2)], cap=10)  # deleted: in the deleted set
    edges = [edge(FOLLOW, 10, 1, T0 + 5), edge(FOLLOW, 11, 1, T0 + 6),
             edge(FOLLOW, 10, 1, T0 + 4),                 # older than the first: no-op
             edge(UNFOLLOW, 11, 1, T0 + 7)]
    states = s.apply_followee_edges(edges, [(1, 0), (5, 0), (5, 0), (0, 5)], push_threshold=2)
    assert [(st.status, st.member, st.followers, st.cross) for st in states] == [
        (1, True, 1, 0), (1, True, 2, 1), (-1, True, 2, 1), (1, False, 1, -1)]
    # states[2]: the crossing up is still pending (not settled), so it is reported again
    assert states[0].entries == [(101, T0 + 1)]                      # newest live, limit 1
    assert states[1].entries == [(101, T0 + 1), (100, T0)]
    assert states[2].entries == [(101, T0 + 1), (100, T0)]            # still a member
    assert sorted(states[3].entries) == [(100, T0), (101, T0 + 1), (102, T0 + 2)]
    assert s.celebrities([1, 2]) == [False, False]                   # crossed up, then down
    s.apply_followee_edges([edge(FOLLOW, 12, 1, T0 + 8)], [(0, 0)], push_threshold=2)
    assert s.celebrities([1]) == [True] and s.followers(1) == [10, 12]


def test_followed_celebrities_follow_the_edges_and_the_flag(redis_store, cassandra_store):
    s = redis_store
    out = s.apply_follower_edges([edge(FOLLOW, 10, 1, T0), edge(FOLLOW, 10, 2, T0 + 1),
                                  edge(FOLLOW, 10, 3, T0 + 2)], [True, False, None])
    assert out == [T0, T0 + 1, T0 + 2] and s.following(10) == [1, 2, 3]
    assert s.followed_celebrities([10, 11]) == {10: [1], 11: []}
    # A crossing adds the account where the user follows it, and only there.
    assert s.set_followed_celebrity(2, [10, 11], add=True) == [T0 + 1, None]
    assert s.followed_celebrities([10, 11]) == {10: [1, 2], 11: []}
    s.apply_follower_edges([edge(UNFOLLOW, 10, 1, T0 + 9)], [None])  # an unfollow always leaves
    assert s.followed_celebrities([10]) == {10: [2]}
    assert s.set_followed_celebrity(2, [10], add=False) == [None]
    assert s.followed_celebrities([10]) == {10: []}
    s.restore_followed_celebrities([(10, 3, T0 + 2), (11, 3, T0 + 3)])
    assert s.followed_celebrities([10, 11]) == {10: [3], 11: [3]} and s.celebrities([3]) == [True]

    c = cassandra_store
    c.set_followed_celebrity([(10, T0), (11, T0 + 3)], 3, at_ms=T0 + 100)
    c.set_followed_celebrity([(10, T0)], 4, at_ms=T0 + 100)
    c.remove_followed_celebrity([11], 3, at_ms=T0 + 50)  # older than the add: loses
    assert c.followed_celebrities([10, 11, 12]) == {10: [3, 4], 11: [3], 12: []}
    c.remove_followed_celebrity([10, 11], 3, at_ms=T0 + 200)
    assert c.followed_celebrities([10, 11]) == {10: [4], 11: []}
    assert sorted(c.scan_followed_celebrities()) == [(10, 4, T0)]


def test_post_steps_push_targets_and_recheck(redis_store):
    s = redis_store
    s.apply_edges([edge(FOLLOW, u, 1, T0 + u) for u in (10, 11, 12)]
                  + [edge(FOLLOW, u, 2, T0 + u) for u in (10, 11)])
    s.set_follower_engagement(1, {12: 5.0, 99: 9.0})
    targets = s.add_posts_to_timelines([(1, 100, T0), (2, 200, T0 + 1), (1, 101, T0 + 2)],
                                       cap=10, push_threshold=3, top_n=2)
    assert targets[2][:3] == (True, [10, 11], [])        # below the threshold: all followers
    assert targets[1][:3] == (False, [12], [10, 11])     # at it: engaged, then the oldest
    assert targets[1].unfollows == targets[2].unfollows == b""   # never unfollowed
    assert s.timeline(1, 10) == [(101, T0 + 2), (100, T0)] and s.timeline(2, 10) == [(200, T0 + 1)]
    s.apply_edges([edge(UNFOLLOW, 11, 2, T0 + 50)])
    unfollows = {a: t.unfollows for a, t in targets.items()}
    gone = s.push_posts([(2, [10, 11], 200, T0 + 1), (1, [], 100, T0)], cap=5,
                        unfollows=unfollows)
    assert gone == [[11], []]
    gone = s.push_posts([(2, [10, 11], 200, T0 + 1)], cap=5)   # no counters: every push checked
    assert gone == [[11]]
    assert s.feed(10, 10) == [(200, T0 + 1)] and s.feed(11, 10) == [(200, T0 + 1)]
    s.merge_into_feeds([(10, [(100, T0), (101, T0 + 2)]), (13, [(101, T0 + 2)]), (14, [])],
                       cap=2)
    assert s.feed(10, 10) == [(101, T0 + 2), (200, T0 + 1)] and s.feed(13, 10) == [(101, T0 + 2)]
    assert s.remove_entries([(10, [101, 555]), (11, [200]), (13, [])]) == 2
    assert s.feed(10, 10) == [(200, T0 + 1)] and s.feed(11, 10) == []
    reached = s.remove_posts_from_timelines([(1, 100, T0)], cap=10, scope=1, top_n=2)
    assert reached == [[10, 12]]                          # the oldest 1, then the engaged
    assert s.timeline_and_deleted(1, 10) == [(101, T0 + 2), (100, T0)]
    assert s.timeline(1, 10) == [(101, T0 + 2)]
    assert s.celebrity_targets([1, 2], 2) == {1: ([12], [10, 11]), 2: ([], [10])}
    metas = s.tombstone_posts([post(PostEventKind.DELETED, 300, author=2, created=T0)])
    assert metas[0]["author_id"] == 2 and s.deleted([300]) == [True]


def test_unfollow_counter_moves_only_with_an_unfollow(redis_store):
    """A push checks its targets only when an unfollow of its author was applied
    since its followers were read: the counter read with them tells."""
    s = redis_store
    s.apply_edges([edge(FOLLOW, u, 1, T0 + u) for u in (10, 11)] + [edge(FOLLOW, 10, 2, T0)])
    first = s.add_posts_to_timelines([(1, 100, T0), (2, 200, T0)], cap=10,
                                     push_threshold=100, top_n=2)
    stamps = {a: t.unfollows for a, t in first.items()}
    assert stamps == {1: b"", 2: b""}
    # Neither a follow nor an unfollow of someone who did not follow moves it.
    s.apply_edges([edge(FOLLOW, 12, 1, T0 + 20), edge(UNFOLLOW, 13, 1, T0 + 20)])
    assert s.client.get(s.keys.unfollowed(1)) is None
    # Unchanged counters: no member test, so a target that never followed stays.
    assert s.push_posts([(1, [10, 99], 100, T0), (2, [10], 200, T0)], cap=5,
                        unfollows=stamps) == [[], []]
    assert s.feed(99, 10) == [(100, T0)]
    # An unfollow applied after the read moves author 1's counter only; its pushes
    # are checked, author 2's are not.
    s.apply_edges([edge(UNFOLLOW, 11, 1, T0 + 30)])
    moved = s.client.get(s.keys.unfollowed(1))
    assert moved is not None and s.client.get(s.keys.unfollowed(2)) is None
    assert s.push_posts([(1, [10, 11, 99], 101, T0 + 1), (2, [10], 201, T0 + 1)], cap=5,
                        unfollows=stamps) == [[11, 99], []]
    # It starts at the server's time in microseconds, grows by one per unfollow and
    # expires (a day) after the last.
    assert int(moved) > T0 * 1000
    s.apply_edges([edge(FOLLOW, 11, 1, T0 + 40)])
    s.apply_edges([edge(UNFOLLOW, 11, 1, T0 + 50)])
    assert int(s.client.get(s.keys.unfollowed(1))) == int(moved) + 1
    assert 0 < s.client.ttl(s.keys.unfollowed(1)) <= 86_400
    # Read again with the followers, it is the new value, and nothing is checked.
    again = s.add_posts_to_timelines([(1, 102, T0 + 2)], cap=10, push_threshold=100, top_n=2)
    assert again[1].unfollows == s.client.get(s.keys.unfollowed(1))
    assert s.push_posts([(1, [10, 98], 102, T0 + 2)], cap=5,
                        unfollows={1: again[1].unfollows}) == [[]]
    # Bookkeeping, not data: outside what dump() compares.
    assert not any("unfollowed" in key for key in s.dump())


def test_the_recheck_reads_every_target_past_one_zmscore(redis_store):
    """The member test of a post with more targets than one ZMSCORE slice (4,000)."""
    s = redis_store
    followers = list(range(1_000, 5_500))
    s.apply_edges([edge(FOLLOW, u, 1, T0) for u in followers])
    s.apply_edges([edge(UNFOLLOW, u, 1, T0 + 1) for u in (1_000, 4_999, 5_499)])
    targets = [*followers, 77]
    gone = s.push_posts([(1, targets, 100, T0)], cap=5)
    assert gone == [[1_000, 4_999, 5_499, 77]]


def test_a_merge_of_more_posts_than_one_zadd_takes(redis_store):
    """The merge script adds a feed's posts 2,000 at a time: all of them, then the cap."""
    s = redis_store
    entries = [(100 + i, T0 + i) for i in range(4_500)]
    s.merge_into_feeds([(10, entries), (11, entries[:3])], cap=4_000)
    assert s.feed(10, 5_000) == sorted(entries, key=lambda e: -e[1])[:4_000]
    assert s.feed(11, 10) == sorted(entries[:3], key=lambda e: -e[1])


def _zcard_calls(client) -> int:
    return client.info("commandstats").get("cmdstat_zcard", {}).get("calls", 0)


def test_pushes_grouped_by_feed_leave_the_feeds_of_pushes_post_by_post(redis_client, key_prefix):
    """Written feed by feed (one ZADD and one trim per feed) or post by post, a batch
    leaves the same capped feeds, post ids beyond a double's precision included."""
    per_post = RedisFeedStore(redis_client, KeyLayout(key_prefix + "p"),
                              group_pushes_from=float("inf"))
    by_feed = RedisFeedStore(redis_client, KeyLayout(key_prefix + "f"), group_pushes_from=0)
    big = 2**62
    users = range(1, 9)
    earlier = [(1, list(users), big, T0 + 50), (1, [1, 2], big + 1, T0 - 50)]
    batch = [(1, [u for u in users if u % 2 == 0], big + 10, T0 + 10),
             (2, [1, 2, 3], big + 11, T0 + 60),
             (3, [], big + 12, T0 + 70),
             (1, [2, 4, 5, 7, 8], big + 13, T0 - 60),            # older than what is kept
             (2, [1, 2, 3], big + 11, T0 + 60),                  # twice in the batch
             (4, [3, 4, 5, 6, 7, 8], big + 14, T0 + 20)]
    calls = {}
    unfollows = dict.fromkeys(range(1, 5), b"")   # none: no member test
    for store in (per_post, by_feed):
        store.push_posts(earlier, cap=3, unfollows=unfollows)
        redis_client.config_resetstat()
        assert store.push_posts(batch, cap=3, chunk_size=3,
                                unfollows=unfollows) == [[]] * len(batch)
        calls[store] = _zcard_calls(redis_client)
    assert calls == {per_post: sum(len(t) for _, t, _, _ in batch), by_feed: len(users)}
    for user in users:
        assert by_feed.feed(user, 10) == per_post.feed(user, 10)
        assert len(by_feed.feed(user, 10)) <= 3
    assert by_feed.feed(2, 10) == [(big + 11, T0 + 60), (big, T0 + 50), (big + 10, T0 + 10)]


def test_a_batch_is_pushed_feed_by_feed_from_two_posts_a_feed(redis_store):
    """The default: feed by feed once the batch's feeds get two posts each on
    average, post by post below that."""
    s, client = redis_store, redis_store.client
    client.config_resetstat()
    s.push_posts([(1, [10, 11, 12], 100, T0), (1, [10, 11, 12], 101, T0 + 1)], cap=5,
                 unfollows={1: b""})
    assert _zcard_calls(client) == 3
    client.config_resetstat()
    s.push_posts([(1, [10, 11, 12], 102, T0 + 2), (1, [10, 11, 13], 103, T0 + 3)], cap=5,
                 unfollows={1: b""})
    assert _zcard_calls(client) == 6
    assert s.feed(10, 10) == [(103, T0 + 3), (102, T0 + 2), (101, T0 + 1), (100, T0)]
    assert s.feed(13, 10) == [(103, T0 + 3)]


def test_a_feed_gets_more_posts_of_a_batch_than_one_zadd_takes(redis_store):
    """Grouped by feed, a feed's posts go 2,000 to a ZADD: all of them, then the cap."""
    s = redis_store
    pushes = [(1, [10], 100 + i, T0 + i) for i in range(4_500)] + [(1, [11], 99, T0)]
    assert s.push_posts(pushes, cap=4_000, unfollows={1: b""}) == [[]] * len(pushes)
    assert s.feed(10, 5_000) == [(100 + i, T0 + i) for i in reversed(range(500, 4_500))]
    assert s.feed(11, 10) == [(99, T0)]
