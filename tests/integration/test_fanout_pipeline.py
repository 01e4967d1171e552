"""FanOutToFollowerFeeds on a TestPipeline (FnApiRunner) against the real Redis and Cassandra.

Bounded ``Create`` inputs in one bundle, applied in order, so each test knows
exactly which events ran before which. Marked integration: the transform's
whole job is writing the stores.
"""
from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines.fanout import FanOutToFollowerFeeds
from domain.fanout import DAY_MS, FanoutPolicy
from stores.cassandra.feeds import CassandraFeedStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.session import migrate
from stores.config import StoreConfig
from stores.fanout import FeedFanout, FeedStores
from tests.integration.fanout_events import U, create, delete, follow

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


@pytest.fixture
def stores(stack, cassandra_session, keyspace, key_prefix):
    migrate(cassandra_session, keyspace)
    config = StoreConfig(stack.redis_url, key_prefix, stack.cassandra_host, stack.cassandra_port, keyspace)
    opened = FeedStores.open(config)
    yield config, opened.redis, opened.cassandra
    opened.close()


def run_events(config: StoreConfig, policy: FanoutPolicy, events, expected_actions=None):
    options = PipelineOptions(["--runner=FnApiRunner"])
    with test_pipeline.TestPipeline(options=options) as p:
        outcomes = (p
                    | "Events" >> beam.Create(events)
                    | "FanOut" >> FanOutToFollowerFeeds(config, policy))
        if expected_actions is not None:
            assert_that(outcomes | beam.FlatMap(lambda os: [(o.event_id, o.action, o.feeds)
                                                            for o in os]),
                        equal_to(expected_actions))


def feed_ids(redis: RedisFeedStore, user: int) -> list[int]:
    return [p for p, _ in redis.feed(user, 10_000)]


def durable_feed(cassandra: CassandraFeedStore, user: int) -> set[int]:
    return {r["post_id"] for r in cassandra.dump()["home_feed_by_user"] if r["user_id"] == user}


def test_push_celebrity_inactive_and_cap(stores):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=1, feed_cap=2, timeline_cap=10)
    redis.set_last_read(3, T0 - 40 * DAY_MS)  # inactive
    redis.set_last_read(1, T0)
    edges = [follow(1, 100, T0), follow(3, 100, T0 + 1),           # 100: 2 followers -> push
             follow(2, 200, T0), follow(1, 200, T0 + 1), follow(3, 200, T0 + 2)]  # 200: celebrity
    posts = [create(11, 100, T0 + 10), create(12, 100, T0 + 11), create(13, 100, T0 + 12),
             create(21, 200, T0 + 13)]
    # A follow of an active user merges (nothing yet), of an inactive one is
    # skipped; user 1 is not among celebrity 200's top 1.
    expected = [(edges[0].event_id, "merge", 0), (edges[1].event_id, "skipped_inactive", 0),
                (edges[2].event_id, "merge", 0), (edges[3].event_id, "edge", 0),
                (edges[4].event_id, "skipped_inactive", 0)] + [
        ("c11", "push", 1), ("c12", "push", 1), ("c13", "push", 1),  # user 3 inactive
        ("c21", "celebrity", 1)]                                      # top 1 = user 2 (oldest)
    run_events(config, policy, edges + posts, expected)

    assert feed_ids(redis, 1) == [13, 12]            # capped at 2, newest kept
    assert durable_feed(cassandra, 1) == {11, 12, 13}  # durable copy is not capped
    assert feed_ids(redis, 3) == [] and durable_feed(cassandra, 3) == set()
    assert feed_ids(redis, 2) == [21]                # celebrity's top-1 follower
    assert [p for p, _ in redis.timeline(200, 10)] == [21]
    assert [p for p, _ in redis.timeline(100, 10)] == [13, 12, 11]
    assert redis.followers(200) == [2, 1, 3]
    assert cassandra.follower_count(200) == 3 and cassandra.follower_count(100) == 2


def test_unfollow_follow_delete_and_no_resurrection(stores):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=10, feed_cap=100)
    run_events(config, policy, [
        follow(1, 100, T0), create(11, 100, T0 + 10), create(12, 100, T0 + 20)])
    assert feed_ids(redis, 1) == [12, 11]

    # Unfollow: the followee's posts leave the feed (both stores).
    run_events(config, policy, [follow(1, 100, T0 + 30, U)],
               [(f"UNFOLLOW-1-100-{T0 + 30}", "remove", 2)])
    assert feed_ids(redis, 1) == [] and durable_feed(cassandra, 1) == set()

    # An older FOLLOW arriving late loses to the unfollow: nothing comes back.
    run_events(config, policy, [follow(1, 100, T0 + 25)],
               [(f"FOLLOW-1-100-{T0 + 25}", "edge", 0)])
    assert feed_ids(redis, 1) == []

    # Re-follow: recent posts merged into both stores (Cassandra row written
    # at the follow's time, so it beats the unfollow's removal).
    run_events(config, policy, [follow(1, 100, T0 + 40)],
               [(f"FOLLOW-1-100-{T0 + 40}", "merge", 2)])
    assert feed_ids(redis, 1) == [12, 11] and durable_feed(cassandra, 1) == {11, 12}

    # Delete: gone from feed, timeline and Cassandra; a replayed CREATED is refused.
    run_events(config, policy, [delete(12, 100, T0 + 20, T0 + 50)], [("d12", "delete", 1)])
    run_events(config, policy, [create(12, 100, T0 + 20)], [("c12", "tombstoned", 0)])
    assert feed_ids(redis, 1) == [11] and durable_feed(cassandra, 1) == {11}
    assert [p for p, _ in redis.timeline(100, 10)] == [11]
    assert redis.deleted([12]) == [True] and cassandra.deleted([12]) == [True]

    # A new follower does not get the deleted post merged in.
    run_events(config, policy, [follow(2, 100, T0 + 60)])
    assert feed_ids(redis, 2) == [11] and durable_feed(cassandra, 2) == {11}


def test_replaying_the_same_events_changes_nothing(stores):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=1, feed_cap=3)
    events = [follow(1, 100, T0), follow(2, 100, T0 + 1), follow(3, 100, T0 + 2),
              follow(1, 200, T0), create(1, 100, T0 + 5), create(2, 200, T0 + 6),
              create(3, 200, T0 + 7), follow(2, 200, T0 + 8), follow(1, 200, T0 + 9, U),
              delete(3, 200, T0 + 7, T0 + 10), create(4, 200, T0 + 11)]
    run_events(config, policy, events)
    first = (redis.dump(), cassandra.dump())
    run_events(config, policy, events)
    run_events(config, policy, list(reversed(events))[:4])  # a partial, out-of-order replay
    assert (redis.dump(), cassandra.dump()) == first


def test_an_edge_event_superseded_in_its_batch_has_no_outcome(stores):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=10)
    run_events(config, policy, [create(11, 100, T0)])
    edges = [follow(1, 100, T0 + 10), follow(2, 100, T0 + 10), follow(1, 100, T0 + 20, U)]
    run_events(config, policy, edges, [(edges[1].event_id, "merge", 1),
                                       (edges[2].event_id, "remove", 1)])
    assert feed_ids(redis, 1) == [] and feed_ids(redis, 2) == [11]
    assert redis.followers(100) == [2] and cassandra.follower_count(100) == 1


def test_followed_celebrities_follow_edges_and_threshold_crossings(stores):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=1)
    users = [1, 2, 3, 4]

    def followed():
        hot, durable = redis.followed_celebrities(users), cassandra.followed_celebrities(users)
        assert hot == durable, (hot, durable)
        return {u: cs for u, cs in hot.items() if cs}

    run_events(config, policy, [follow(1, 100, T0), follow(2, 100, T0 + 1), follow(1, 200, T0 + 2)])
    assert followed() == {} and redis.celebrities([100]) == [False]
    # The third follower crosses the threshold: every follower has 100 now.
    run_events(config, policy, [follow(3, 100, T0 + 3)])
    assert followed() == {1: [100], 2: [100], 3: [100]} and redis.celebrities([100]) == [True]
    # A follow of a celebrity brings it along; an unfollow takes it out.
    run_events(config, policy, [follow(4, 100, T0 + 4)])
    assert followed() == {1: [100], 2: [100], 3: [100], 4: [100]}
    run_events(config, policy, [follow(4, 100, T0 + 5, U)])
    assert followed() == {1: [100], 2: [100], 3: [100]}
    # Below the threshold again: gone from every follower's set.
    run_events(config, policy, [follow(3, 100, T0 + 6, U)])
    assert followed() == {} and redis.celebrities([100]) == [False]
    # Up and down within one batch leaves nothing behind.
    run_events(config, policy, [follow(3, 100, T0 + 7), follow(2, 100, T0 + 8, U)])
    assert followed() == {}


def test_a_crossing_cut_short_by_a_crash_is_carried_out_by_the_replay(stores):
    """The batch that crossed the threshold wrote Redis but died before its durable
    copy: the crossing stays pending, and the batch's replay finishes it in both stores."""
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=2)
    FeedFanout(redis, cassandra, policy).apply([follow(1, 100, T0)])
    events = [follow(2, 100, T0 + 1)]
    crashed = FeedFanout(redis, None, policy).apply_to_redis(events)  # never settled
    assert crashed.crossings == {100: True}
    assert redis.followed_celebrities([1, 2]) == {1: [100], 2: [100]}
    assert cassandra.followed_celebrities([1, 2]) == {1: [], 2: []}
    assert redis.client.get(redis.keys.celebrity(100)) == b"+"   # pending

    FeedFanout(redis, cassandra, policy).apply(events)           # the replay
    assert cassandra.followed_celebrities([1, 2]) == {1: [100], 2: [100]}
    assert redis.client.get(redis.keys.celebrity(100)) == b"1"
    assert redis.celebrities([100]) == [True]


def test_a_crossing_by_a_concurrent_batch_is_not_undone(stores):
    """Batch X follows a celebrity; batch Y, running between X's two sides of the
    edge, takes the account below the threshold. X's own follower-side write then
    lands after Y's removals; X reads the flag again and takes it back out."""
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=2)
    fanout = FeedFanout(redis, cassandra, policy)
    fanout.apply([follow(1, 100, T0), follow(2, 100, T0 + 1)])
    assert redis.followed_celebrities([1, 2]) == {1: [100], 2: [100]}

    class Interleaved(RedisFeedStore):
        def apply_follower_edges(self, *args, **kwargs):
            fanout.apply([follow(1, 100, T0 + 3, U), follow(2, 100, T0 + 4, U)])  # batch Y
            return super().apply_follower_edges(*args, **kwargs)

    x = FeedFanout(Interleaved(redis.client, redis.keys), cassandra, policy)
    x.apply([follow(3, 100, T0 + 2)])                                          # batch X
    assert redis.followers(100) == [3] and redis.celebrities([100]) == [False]
    assert redis.followed_celebrities([1, 2, 3]) == {1: [], 2: [], 3: []}
    assert cassandra.followed_celebrities([1, 2, 3]) == {1: [], 2: [], 3: []}
