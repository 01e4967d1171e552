"""The ranking pipeline end to end: Kafka -> Prism (fan-out + ranking) -> Redis + Cassandra.

One streaming job runs both the fan-out (pushes, timelines, graph) and the
ranking pipeline (each with its own consumer group) over the test's own topics.
The test produces a graph, posts, an engagement and a delete, and waits for
each change to show in the ranked feed read back through ``RankedFeedStore``:
first ranked by recency (no model), then by a model promoted into the model
directory while the job runs (picked up without a restart). The ranking job
alone: a follow's refresh waits for the fan-out's graph; and killed with
SIGKILL while such refreshes wait, restarted, it refreshes every one of them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import Producer

from infra.install import prism_binary
from pipelines import fanout, ranking
from stores.redis.features import OnlineFeatureStore
from stores.redis.social import SocialFacts
from domain.features import LIKE
from stores.files.models import ModelRegistry
from stores.ranked import RankedFeedStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.feeds import CassandraFeedStore
from stores.cassandra.session import migrate
from schemas.codec import WireCodec
from schemas.events import (
    EngagementEvent,
    EngagementKind,
    FollowEvent,
    MediaType,
    PostEvent,
    PostEventKind,
)
from schemas.features import FeatureValue
from schemas.keys import KeyLayout
from schemas.ranking import RECENCY_VERSION, RefreshRequest
from domain.ranking import RankingPolicy
from stores.config import StoreConfig
from stores.ranker import QueueConfig, RankingConfig
from tests.integration.fanout_events import follow
from tests.integration.ranking_models import promote_toy_model
from tests.integration.test_fanout import Topics as GroupTopics
from tests.integration.test_kafka_source import _cancel, _kill, _wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 2
VIEWER, CELEB = 1, 99
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Topics:
    def __init__(self, stack, kafka_topic):
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        for t in (PostEvent.TOPIC, FollowEvent.TOPIC, EngagementEvent.TOPIC):
            kafka_topic(PARTITIONS, name=self.prefix + t)
        self.codec = WireCodec()
        self.producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "linger.ms": 5})

    def send(self, events) -> None:
        for e in events:
            topic = self.prefix + e.TOPIC
            self.producer.produce(topic, self.codec.encode(e, topic), e.key,
                                  timestamp=e.event_time)
        assert self.producer.flush(30) == 0


def post(pid, author, t, media=MediaType.PHOTO, kind=PostEventKind.CREATED):
    return PostEvent(f"{kind.value}-{pid}", t, kind, pid, author, t, media)


def test_ranked_feeds_follow_the_stream_and_a_new_model(stack, kafka_topic, cassandra_session,
                                                        keyspace, key_prefix, tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    model_dir = tmp_path / "models"
    args = [
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--topic_prefix={topics.prefix}",
        "--fallback_start=earliest", "--idle_skew_s=0.5",
        f"--redis_url={stack.redis_url}", f"--redis_key_prefix={key_prefix}",
        f"--cassandra_host={stack.host}", f"--cassandra_port={stack.cassandra_port}",
        f"--cassandra_keyspace={keyspace}", "--push_threshold=3", "--celebrity_top_n=0",
        f"--model_dir={model_dir}", "--model_poll_s=0.5", "--settle_s=0.2", "--debounce_s=1",
        "--top_k=4", "--max_per_author=2",
    ]
    options = PipelineOptions(args + [f"--consumer_group=g-{uuid.uuid4().hex[:8]}"])
    pipeline = beam.Pipeline(options=options)
    fanout.build(pipeline, options)
    # Its own consumer group: the two reads share the post and follow topics.
    ranking_options = PipelineOptions(args + [f"--consumer_group=g-{uuid.uuid4().hex[:8]}"])
    ranking.build(pipeline, ranking_options)

    feeds = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    reader = RankedFeedStore(feeds.client, feeds.keys,
                             CassandraFeedStore(cassandra_session, keyspace))
    features = OnlineFeatureStore(feeds.client, feeds.keys)

    def ranked_ids():
        feed = reader.read(VIEWER)
        return None if feed is None else [e.post_id for e in feed.entries]

    now = int(time.time() * 1000)
    result = pipeline.run()
    try:
        # The graph: the viewer follows 10, 11 and the celebrity 99 (3 followers).
        topics.send([follow(VIEWER, a, now) for a in (10, 11, CELEB)]
                    + [follow(u, CELEB, now + 1) for u in (2, 3)])
        _wait_for(lambda: ranked_ids() == [], 120, "the follows' refresh (no posts yet)", result)
        assert reader.read(VIEWER).model_version == RECENCY_VERSION
        # The ranking reads a post's followers from the graph the fan-out
        # keeps; the two run as separate stages, so the fan-out may still be
        # applying the follows (a post racing its author's new follower is
        # ranked at the follower's next change, as the module doc says).
        _wait_for(lambda: all(VIEWER in feeds.followers(a) for a in (10, 11, CELEB)), 60,
                  "the fan-out's graph", result,
                  state=lambda: {a: feeds.followers(a) for a in (10, 11, CELEB)})

        # Posts: 10 posts three times, 11 once (a REEL), the celebrity once
        # (pulled from its timeline, never pushed to the viewer).
        t = int(time.time() * 1000)
        topics.send([post(110, 11, t, MediaType.REEL), post(990, CELEB, t + 1)]
                    + [post(100 + i, 10, t + 10 + i) for i in range(3)])
        _wait_for(lambda: sorted(ranked_ids() or []) == [100, 101, 102, 110, 990], 60,
                  "the posts in the ranked feed", result,
                  state=lambda: (ranked_ids(), feeds.feed(VIEWER, 100)))
        feed = reader.read(VIEWER)
        assert feed.model_version == RECENCY_VERSION
        assert [e.post_id for e in feed.entries] == [102, 990, 101, 110, 100]  # newest, diverse
        assert 990 not in [p for p, _ in feeds.feed(VIEWER, 100)]

        # A model arrives in the directory; the viewer likes the REEL and gets
        # an affinity to its author: the next refresh uses the new model.
        version = promote_toy_model(ModelRegistry(model_dir), "viewer_author_affinity")
        # A worker re-reads `latest` at most every --model_poll_s (0.5 s), lazily: a
        # refresh of another user just before the promotion would let the like's
        # refresh, if it came within 0.5 s, use the old model, and nothing triggers
        # the viewer again. After this wait any refresh sees the new version.
        time.sleep(1.0)
        features.write([FeatureValue("viewer_author", f"{VIEWER}:11", "affinity", 0.9,
                                     int(time.time() * 1000))])
        t = int(time.time() * 1000)
        topics.send([EngagementEvent(f"like-{t}", t, EngagementKind.LIKE, VIEWER, 11, 110,
                                     MediaType.REEL)])
        # The fan-out may still be behind on the posts (the ranking ranked them from
        # their triggers): the like's refresh ranks them all the same (carried).
        _wait_for(lambda: (reader.read(VIEWER).model_version, ranked_ids()[:1])
                  == (version, [110]), 60, "a refresh with the promoted model", result,
                  state=lambda: (reader.read(VIEWER), feeds.feed(VIEWER, 100)))
        assert sorted(ranked_ids()) == [100, 101, 102, 110, 990]

        # A delete leaves the ranked feed.
        topics.send([post(101, 10, t + 5, kind=PostEventKind.DELETED)])
        _wait_for(lambda: 101 not in ranked_ids(), 60, "the delete in the ranked feed", result)

        # A model on the social features too: followee 11 liked post 102 (a fact as the
        # features pipeline's social sink records it), and the viewer's next refresh
        # ranks 102 first by its social proof.
        social = promote_toy_model(ModelRegistry(model_dir), "followee_engagers_recent",
                                   at_ms=t + 1, community={10: 0, 11: 1, CELEB: 1})
        time.sleep(1.0)
        t = int(time.time() * 1000)
        SocialFacts(feeds.client, feeds.keys).apply(
            np.array([LIKE]), np.array([t - 1000]), np.array([11]), np.array([102]),
            np.array([10]))
        topics.send([EngagementEvent(f"like-{t}", t, EngagementKind.LIKE, VIEWER, CELEB, 990,
                                     MediaType.PHOTO)])
        _wait_for(lambda: (reader.read(VIEWER).model_version, ranked_ids()[:1])
                  == (social, [102]), 60, "a refresh with the social model", result,
                  state=lambda: reader.read(VIEWER))
    finally:
        _cancel(result)
    durable = reader.read_durable(VIEWER)
    assert durable == reader.read(VIEWER)
    assert sorted(e.post_id for e in durable.entries) == [100, 102, 110, 990]
    feeds.close()


def test_a_follow_refresh_waits_for_the_fan_out(stack, kafka_topic, cassandra_session, keyspace,
                                                key_prefix, tmp_path):
    """The ranking job alone, ahead of a fan-out that has not applied a follow yet (a
    backlog): the follower's refresh is held until the graph has the edge, then ranks
    what the fan-out merged. Without the wait it would rank an empty feed and nothing
    would refresh the user again."""
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    options = PipelineOptions([
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--topic_prefix={topics.prefix}",
        f"--consumer_group=g-{uuid.uuid4().hex[:8]}", "--fallback_start=earliest",
        "--idle_skew_s=0.5", f"--redis_url={stack.redis_url}",
        f"--redis_key_prefix={key_prefix}", f"--cassandra_host={stack.host}",
        f"--cassandra_port={stack.cassandra_port}", f"--cassandra_keyspace={keyspace}",
        f"--model_dir={tmp_path / 'models'}", "--settle_s=0.2", "--debounce_s=1",
        "--follow_retry_s=0.5", "--follow_max_retry_s=1",
    ])
    pipeline = beam.Pipeline(options=options)
    ranking.build(pipeline, options)
    feeds = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    reader = RankedFeedStore(feeds.client, feeds.keys,
                             CassandraFeedStore(cassandra_session, keyspace))
    result = pipeline.run()
    try:
        t = int(time.time() * 1000)
        edge, first = follow(VIEWER, 10, t), post(100, 10, t + 1)
        topics.send([edge, first])
        # The job reads both at once; the post finds no followers in the graph, the
        # follow's refresh is due after 0.2 s but the edge is not there yet.
        time.sleep(8)
        assert reader.read(VIEWER) is None
        # The fan-out catches up: the edge, then the merge of the followee's posts.
        feeds.apply_edges([edge])
        feeds.put_post(first)
        feeds.merge_into_feed(VIEWER, [(first.post_id, first.created_at)], cap=100)
        _wait_for(lambda: (reader.read(VIEWER) or None) and
                  [e.post_id for e in reader.read(VIEWER).entries] == [100], 60,
                  "the held refresh with the merged post", result,
                  state=lambda: reader.read(VIEWER))
    finally:
        _cancel(result)
        feeds.close()


def test_kill_9_while_refreshes_wait_on_the_graph_loses_none(stack, kafka_topic, cassandra_session,
                                                             keyspace, key_prefix, tmp_path):
    """Six users follow two authors who post; the fan-out has not applied the follows,
    so their refreshes wait in the queue (the follow gate). The job is killed with
    SIGKILL (runner state and all); the fan-out catches up while it is down; the
    restarted job, with no new event to read, refreshes each of the six to what an
    uninterrupted job would have ranked once the graph held the edges: the waiting
    refreshes were in Redis, not in the dead runner."""
    migrate(cassandra_session, keyspace)
    topics = GroupTopics(stack, kafka_topic,
                         (PostEvent.TOPIC, FollowEvent.TOPIC, EngagementEvent.TOPIC))
    group = f"g-{uuid.uuid4().hex[:8]}"
    args = [
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--topic_prefix={topics.prefix}",
        f"--consumer_group={group}", "--fallback_start=earliest", "--idle_skew_s=0.5",
        f"--redis_url={stack.redis_url}", f"--redis_key_prefix={key_prefix}",
        f"--cassandra_host={stack.host}", f"--cassandra_port={stack.cassandra_port}",
        f"--cassandra_keyspace={keyspace}", f"--model_dir={tmp_path / 'models'}",
        "--settle_s=0.2", "--debounce_s=1", "--follow_retry_s=0.5", "--follow_max_retry_s=1",
        "--refresh_shards=2", "--refresh_lease_s=5"]
    log = open(os.path.join(stack.state_dir, "logs", f"test-ranking-{key_prefix}.log"), "ab")

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "pipelines.ranking", *args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    feeds = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    reader = RankedFeedStore(feeds.client, feeds.keys,
                             CassandraFeedStore(cassandra_session, keyspace))
    queue = QueueConfig(shards=2).open(feeds.client, KeyLayout(key_prefix))
    followers, authors, others = [1, 2, 3, 4, 5, 6], [10, 11], [7, 8]
    t = int(time.time() * 1000)
    edges = [follow(u, a, t) for u in followers for a in authors]
    posts = [post(100 + i, authors[i % 2], t + 1 + i) for i in range(5)]
    likes = [EngagementEvent(f"like-{u}", t, EngagementKind.LIKE, u, 10, 100, MediaType.PHOTO)
             for u in others]
    topics.send(edges + posts + likes)

    def waiting() -> bool:
        held = queue.pending()
        return all(held.get(u, {}).get("wait") for u in followers)

    job = start()
    try:
        # The others' refreshes went through (the job runs); the followers' wait.
        _wait_for(lambda: all(reader.read(u) is not None for u in others), 240,
                  "the likes' refreshes", state=queue.pending)
        _wait_for(lambda: waiting() and topics.done(group), 60,
                  "the follows' refreshes waiting and their offsets committed",
                  state=queue.pending)
    finally:
        _kill(job)
    assert all(reader.read(u) is None for u in followers)

    # The fan-out catches up while the job is down: the edges, the posts, the pushes.
    feeds.apply_edges(edges)
    for p in posts:
        feeds.put_post(p)
    for u in followers:
        feeds.merge_into_feed(u, [(p.post_id, p.created_at) for p in posts], cap=100)
    ranker = RankingConfig(StoreConfig(stack.redis_url, key_prefix, stack.host,
                                       stack.cassandra_port, keyspace),
                           model_dir=str(tmp_path / "models")).open(RankingPolicy())
    now = int(time.time() * 1000)
    expected = {f.user_id: [e.post_id for e in f.entries] for f in ranker.rank(
        [RefreshRequest(u, now) for u in followers], now).feeds}
    ranker.close()
    assert all(len(ids) == 5 for ids in expected.values())

    def ranked() -> dict:
        return {u: (f.model_version, [e.post_id for e in f.entries])
                for u in followers if (f := reader.read(u)) is not None}

    job = start()
    try:
        _wait_for(lambda: ranked() == {u: (RECENCY_VERSION, expected[u]) for u in followers},
                  240, "every waiting refresh after the restart",
                  state=lambda: (ranked(), queue.pending()))
        _wait_for(lambda: queue.pending() == {}, 60, "an empty queue", state=queue.pending)
    finally:
        _kill(job)
        log.close()
    assert {u: reader.read_durable(u) for u in followers} == {u: reader.read(u)
                                                              for u in followers}
    feeds.close()
