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
from stores.fanout import FeedStores
from tests.integration.fanout_events import U, create, delete, follow

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


@pytest.fixture
def stores(stack, cassandra_session, keyspace, key_prefix):
    migrate(cassandra_session, keyspace)
    config = StoreConfig(stack.redis_url, key_prefix, stack.host, stack.cassandra_port, keyspace)
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
            assert_that(outcomes | beam.Map(lambda o: (o.event_id, o.action, o.feeds)),
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
