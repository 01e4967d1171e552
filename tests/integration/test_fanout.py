"""The fan-out pipeline end to end: Kafka -> Prism -> Redis + Cassandra.

Each test owns its topics (``<prefix>post-events``, ``<prefix>follow-events``),
a Redis key prefix and a migrated keyspace. Streaming jobs never end by
themselves: a test waits until the job's consumer group has committed the end
of both topics (offsets are committed only after a bundle's writes are done),
then cancels or kills it.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import Consumer, Producer, TopicPartition

from infra.install import prism_binary
from pipelines import common, fanout
from domain.fanout import DAY_MS, FanoutPolicy, expected_state
from pipelines.io.deadletter import read_dead_letters
from stores.cassandra.feeds import CassandraFeedStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.session import migrate
from schemas.codec import WireCodec
from schemas.events import FollowEvent, PostEvent, StoryEvent, dlq_topic
from tests.integration.fanout_events import U, create, delete, follow
from tests.integration.test_kafka_source import _cancel, _kill, _wait_for

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTITIONS = 2


class Topics:
    """A test's topics (by default the fan-out's two, plus its durable log) under a
    unique prefix, a producer of typed events and the group-progress check."""

    def __init__(self, stack, kafka_topic, topics=(PostEvent.TOPIC, FollowEvent.TOPIC)):
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        self.bootstrap = stack.kafka_bootstrap
        self.names = [kafka_topic(PARTITIONS, name=self.prefix + t) for t in topics]
        for log in {_DURABLE_LOGS[t] for t in topics if t in _DURABLE_LOGS}:
            # Created here so the fixture deletes them (the job would create them).
            kafka_topic(PARTITIONS, name=self.prefix + log)
            kafka_topic(1, name=dlq_topic(self.prefix + log))
        self.codec = WireCodec()
        self.producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        self.events: list[PostEvent | FollowEvent] = []

    def send(self, events) -> None:
        for e in events:
            topic = self.prefix + e.TOPIC
            self.producer.produce(topic, self.codec.encode(e, topic), e.key,
                                  timestamp=e.event_time)
            self.events.append(e)
        assert self.producer.flush(30) == 0

    def done(self, group: str) -> bool:
        """Whether ``group`` has committed the end of every partition (and, for the
        fan-out, its durable step the end of the durable log)."""
        return group_done(self.bootstrap, self.names, PARTITIONS, group)


#: The event topics of the jobs with a durable log, and that log.
_DURABLE_LOGS = {PostEvent.TOPIC: fanout.DURABLE_LOG_TOPIC,
                 StoryEvent.TOPIC: common.STORIES_DURABLE_LOG_TOPIC}


def group_done(bootstrap: str, topics: list[str], partitions: int, group: str) -> bool:
    """Whether ``group`` has committed the end of every partition of ``topics`` and,
    when they are the fan-out's or the stories' and the job's durable log exists,
    whether the durable step's group has committed the end of that log: the
    Cassandra copy is then complete too (the log's end cannot move once the
    events' offsets are committed)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        if not _committed_ends(consumer, [TopicPartition(t, p) for t in topics
                                          for p in range(partitions)]):
            return False
        logs = [t[:-len(event)] + log for t in topics for event, log in _DURABLE_LOGS.items()
                if t.endswith(event)]
        if not logs:
            return True
        meta = consumer.list_topics(timeout=10).topics.get(logs[0])
        if meta is None or not meta.partitions:
            return True
    finally:
        consumer.close()
    durable = Consumer({"bootstrap.servers": bootstrap,
                        "group.id": group + common.DURABLE_GROUP_SUFFIX})
    try:
        return _committed_ends(durable, [TopicPartition(logs[0], p) for p in meta.partitions])
    finally:
        durable.close()


def _committed_ends(consumer, parts: list[TopicPartition]) -> bool:
    committed = {(tp.topic, tp.partition): tp.offset
                 for tp in consumer.committed(parts, timeout=10)}
    for tp in parts:
        _, high = consumer.get_watermark_offsets(tp, timeout=10)
        if high > 0 and committed[(tp.topic, tp.partition)] < high:
            return False
    return True


def job_args(stack, topics: Topics, key_prefix: str, keyspace: str, group: str,
             policy: FanoutPolicy) -> list[str]:
    return [
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--consumer_group={group}",
        f"--topic_prefix={topics.prefix}", "--fallback_start=earliest",
        f"--redis_url={stack.redis_url}", f"--redis_key_prefix={key_prefix}",
        f"--cassandra_host={stack.host}", f"--cassandra_port={stack.cassandra_port}",
        f"--cassandra_keyspace={keyspace}",
        f"--push_threshold={policy.push_threshold}", f"--celebrity_top_n={policy.celebrity_top_n}",
        f"--feed_cap={policy.feed_cap}", f"--timeline_cap={policy.timeline_cap}",
        f"--follow_merge_limit={policy.follow_merge_limit}",
        f"--inactive_days={policy.inactive_days}",
    ]


def start_in_process(args: list[str]):
    options = PipelineOptions(args)
    pipeline = beam.Pipeline(options=options)
    fanout.build(pipeline, options)
    return pipeline.run()


@pytest.fixture
def env(stack, kafka_topic, cassandra_session, keyspace, key_prefix):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    redis_store = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    cassandra_store = CassandraFeedStore(cassandra_session, keyspace)
    yield topics, redis_store, cassandra_store, key_prefix, keyspace
    redis_store.close()


def feed_ids(redis: RedisFeedStore, user: int) -> list[int]:
    return [p for p, _ in redis.feed(user, 10_000)]


def durable_feeds(cassandra: CassandraFeedStore) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for row in cassandra.dump()["home_feed_by_user"]:
        out.setdefault(row["user_id"], set()).add(row["post_id"])
    return out


def test_push_pull_propagation_and_replay(stack, env):
    topics, redis, cassandra, key_prefix, keyspace = env
    policy = FanoutPolicy(push_threshold=5, celebrity_top_n=2, feed_cap=3, timeline_cap=10)
    now = int(time.time() * 1000) - 60_000
    redis.set_last_read(9, now - 40 * DAY_MS)  # user 9 is inactive
    celeb, alice, bob = 1000, 2000, 3000
    group = f"g-{uuid.uuid4().hex[:8]}"
    result = start_in_process(job_args(stack, topics, key_prefix, keyspace, group, policy))
    try:
        # Phase 1, the graph: celebrity with 6 followers (top 2 by age: 1, 2),
        # alice with 3 (one inactive), bob with 1.
        topics.send([follow(u, celeb, now + u) for u in (1, 2, 3, 4, 5, 6)]
                    + [follow(1, alice, now), follow(2, alice, now + 1), follow(9, alice, now + 2),
                       follow(7, bob, now)])
        _wait_for(lambda: topics.done(group), 90, "the graph", result)
        # Phase 2, posts.
        topics.send([create(1, alice, now + 100), create(2, alice, now + 101),
                     create(3, alice, now + 102), create(4, alice, now + 103),
                     create(5, celeb, now + 104), create(6, bob, now + 105)])
        _wait_for(lambda: topics.done(group), 60, "the posts", result)

        assert feed_ids(redis, 1) == [5, 4, 3]        # alice's + celeb's (top 2), capped at 3
        assert feed_ids(redis, 2) == [5, 4, 3]
        assert feed_ids(redis, 3) == []               # celeb follower outside the top 2
        assert feed_ids(redis, 9) == []               # inactive
        assert feed_ids(redis, 7) == [6]
        assert [p for p, _ in redis.timeline(celeb, 10)] == [5]
        assert [p for p, _ in redis.timeline(alice, 10)] == [4, 3, 2, 1]
        assert durable_feeds(cassandra) == {1: {1, 2, 3, 4, 5}, 2: {1, 2, 3, 4, 5}, 7: {6}}

        # Phase 3: user 2 unfollows alice, post 6 is deleted, user 8 follows bob
        # (merge), and a replayed create of post 6 comes after its delete; a record
        # that is not a durable write lands in the durable log.
        log = topics.prefix + fanout.DURABLE_LOG_TOPIC
        topics.producer.produce(log, b"not a durable write", b"k")
        topics.send([follow(2, alice, now + 200, U), follow(8, bob, now + 201),
                     delete(6, bob, now + 105, now + 202), create(6, bob, now + 105),
                     create(7, bob, now + 203)])
        _wait_for(lambda: topics.done(group), 60, "the changes", result)
    finally:
        _cancel(result)
    (dead,) = read_dead_letters(stack.kafka_bootstrap, dlq_topic(log))
    assert (dead.value, dead.reason, dead.topic) == (b"not a durable write", "not_json", log)

    assert feed_ids(redis, 2) == [5]
    assert feed_ids(redis, 7) == [7] and feed_ids(redis, 8) == [7]
    assert redis.deleted([6]) == [True] and cassandra.deleted([6]) == [True]
    assert [p for p, _ in redis.timeline(bob, 10)] == [7]
    assert durable_feeds(cassandra) == {1: {1, 2, 3, 4, 5}, 2: {5}, 7: {7}, 8: {7}}
    assert redis.followers(celeb) == [1, 2, 3, 4, 5, 6]

    # Replay everything with a new consumer group from the earliest offsets.
    before = (redis.dump(), cassandra.dump())
    replay_group = f"g-{uuid.uuid4().hex[:8]}"
    replay = start_in_process(
        job_args(stack, topics, key_prefix, keyspace, replay_group, policy)
        + ["--start_from=earliest"])
    try:
        _wait_for(lambda: topics.done(replay_group), 90, "the replay", replay)
    finally:
        _cancel(replay)
    assert (redis.dump(), cassandra.dump()) == before


def _workload(now: int, rng: random.Random):
    """A graph, then a stream of posts, deletes, follows and unfollows.

    Built so the final state cannot depend on processing order (see
    ``expected_state``): the celebrity stays above the threshold and keeps its
    top 2, authors post fewer than ``follow_merge_limit`` posts, feeds stay
    below the cap.
    """
    celeb, authors, users = 100, list(range(101, 109)), list(range(1, 31))
    graph = [follow(u, celeb, now + u) for u in users[:12]]
    edges = set()
    for a in authors:
        for u in rng.sample(users, 4):
            edges.add((u, a))
    graph += [follow(u, a, now + 20 + i) for i, (u, a) in enumerate(sorted(edges))]
    stream, pid, t = [], 0, now + 1000
    live: list[PostEvent] = []
    for step in range(240):
        t += 5
        r = rng.random()
        if r < 0.75 or not live:
            pid += 1
            author = celeb if rng.random() < 0.15 else rng.choice(authors)
            p = create(pid, author, t)
            live.append(p)
            stream.append(p)
        elif r < 0.85:
            p = live.pop(rng.randrange(len(live)))
            stream.append(delete(p.post_id, p.author_id, p.created_at, t))
        elif r < 0.93:
            stream.append(follow(rng.choice(users), rng.choice(authors), t))
        else:
            u, a = sorted(edges)[rng.randrange(len(edges))]
            stream.append(follow(u, a, t, U))
    return graph, stream


def test_kill_and_restart_converges_to_the_oracle(stack, env):
    topics, redis, cassandra, key_prefix, keyspace = env
    policy = FanoutPolicy(push_threshold=8, celebrity_top_n=2, feed_cap=1000,
                          timeline_cap=1000, follow_merge_limit=50)
    now = int(time.time() * 1000) - 600_000  # event times in the (recent) past
    last_reads = {u: now - 45 * DAY_MS for u in (5, 17, 23)}
    for u, at in last_reads.items():
        redis.set_last_read(u, at)
    graph, stream = _workload(now, random.Random(7))
    group = f"g-{uuid.uuid4().hex[:8]}"
    args = job_args(stack, topics, key_prefix, keyspace, group, policy)
    log = open(os.path.join(stack.state_dir, "logs", f"test-fanout-{key_prefix}.log"), "ab")

    def start():
        return subprocess.Popen([sys.executable, "-m", "pipelines.fanout", *args], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    topics.send(graph)
    first = start()
    try:
        _wait_for(lambda: topics.done(group), 90, "the graph")

        def produce_steadily():
            for i in range(0, len(stream), 20):
                topics.send(stream[i:i + 20])
                time.sleep(0.2)

        producer = threading.Thread(target=produce_steadily)
        producer.start()
        _wait_for(lambda: len(topics.events) > len(graph) + 60
                  and any(redis.timeline(a, 1) for a in range(100, 109)), 60,
                  "the first posts to land")
    finally:
        _kill(first)  # mid-stream
    producer.join()
    assert not topics.done(group), "the kill came after the last event"

    second = start()
    try:
        _wait_for(lambda: topics.done(group), 120, "the restarted job to catch up")
    finally:
        _kill(second)

    expected = expected_state(topics.events, policy, last_reads)
    users = range(1, 31)
    assert {u: [(p, s) for p, s in redis.feed(u, 10_000)] for u in users} == \
        {u: expected.feeds.get(u, []) for u in users}
    assert durable_feeds(cassandra) == {u: ps for u, ps in expected.durable_feeds.items() if ps}
    for author in range(100, 109):
        assert redis.timeline(author, 10_000) == expected.timelines.get(author, [])
        assert redis.followers(author) == expected.followers.get(author, [])
    assert all(redis.deleted(sorted(expected.deleted)))
    celebrities = {u: set(expected.followed_celebrities.get(u, ())) for u in users}
    assert {u: set(cs) for u, cs in redis.followed_celebrities(list(users)).items()} == celebrities
    assert {u: set(cs) for u, cs in cassandra.followed_celebrities(list(users)).items()} \
        == celebrities
