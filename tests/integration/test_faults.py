"""Fault tests: the Kafka broker or Redis killed (-9) mid-stream, and a stream with bad records.

The fan-out job runs as its own process on Prism while events are produced
steadily; a server is killed with SIGKILL part-way and started again. When
the job's consumer group has committed the end of the topics, Redis and
Cassandra must equal the oracle computed from the events produced
(``expected_state``): nothing lost, nothing duplicated.

The killed servers are private to the test (own ports and data directories,
started with ``infra.stack`` like the shared ones), so killing them cannot
disturb anything else. The private Redis runs with ``appendfsync always``:
every write it acknowledged is on disk before the reply, so a kill -9 loses
none (with the default ``everysec`` up to a second of writes can go, and the
README's answer is ``feedbeam rebuild``). The killed job itself is covered by
``test_fanout.test_kill_and_restart_converges_to_the_oracle``.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis as redis_lib
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra import processes, services
from infra import stack as infra_stack
from domain.fanout import DAY_MS, FanoutPolicy, expected_state
from stores.cassandra.feeds import CassandraFeedStore
from pipelines.io.deadletter import read_dead_letters
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.session import migrate
from schemas.codec import WireCodec
from schemas.events import FollowEvent, PostEvent, dlq_topic
from tests.integration.test_fanout import REPO, _workload, durable_feeds, group_done, job_args
from tests.integration.test_read_events import _malformed
from tests.integration.test_kafka_source import _kill, _wait_for

pytestmark = pytest.mark.integration

POLICY = FanoutPolicy(push_threshold=8, celebrity_top_n=2, feed_cap=1000, timeline_cap=1000,
                      follow_merge_limit=50)
PARTITIONS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own, durable per write (AOF, fsync always), or with
    no persistence at all (``persistent=False``: a restart comes back empty)."""

    def __init__(self, directory, persistent: bool = True):
        self.port = free_port()
        self.persistent = persistent
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes" if self.persistent else "no",
             "--appendfsync", "always", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis_lib.Redis.from_url(self.url)
        _wait_for(lambda: self._ping(client), 30, "the private Redis")
        client.close()

    @staticmethod
    def _ping(client) -> bool:
        try:
            return client.ping()
        except redis_lib.ConnectionError:
            return False

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


@pytest.fixture
def private_kafka(stack, tmp_path):
    """A Kafka broker of the test's own (KRaft, own ports and log dirs)."""
    settings = dataclasses.replace(stack, state_dir=tmp_path / "state",
                                   kafka_port=free_port(), kafka_controller_port=free_port())
    infra_stack.up(settings, ["kafka"], resolve_flink=False)
    yield settings
    infra_stack.down(settings, ["kafka"])


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


class Stream:
    """The workload on ``bootstrap``'s topics, produced steadily from a thread."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.prefix = f"f{uuid.uuid4().hex[:8]}."
        admin = AdminClient({"bootstrap.servers": bootstrap})
        names = [self.prefix + t for t in (PostEvent.TOPIC, FollowEvent.TOPIC)]
        names += [dlq_topic(n) for n in names]
        for topic, future in admin.create_topics(
                [NewTopic(n, num_partitions=PARTITIONS, replication_factor=1) for n in names],
                operation_timeout=30).items():
            future.result(timeout=60)
        self.codec = WireCodec()
        # Idempotent producer, retrying for as long as a broker restart takes:
        # every event is delivered exactly once.
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5,
                                  "enable.idempotence": True,
                                  "delivery.timeout.ms": 300_000})
        self.events: list = []
        self.failed: list = []

    def send(self, events) -> None:
        for e in events:
            topic = self.prefix + e.TOPIC
            self.producer.produce(topic, self.codec.encode(e, topic), e.key,
                                  timestamp=e.event_time, on_delivery=self._delivered)
            self.events.append(e)
        self.producer.poll(0)

    def _delivered(self, err, msg) -> None:
        if err is not None:
            self.failed.append(err)

    def flush(self, timeout_s: float = 300) -> None:
        assert self.producer.flush(timeout_s) == 0, "events not delivered"
        assert not self.failed, f"deliveries failed: {self.failed[:3]}"

    def done(self, group: str) -> bool:
        try:
            return group_done(self.bootstrap, [self.prefix + PostEvent.TOPIC,
                                               self.prefix + FollowEvent.TOPIC],
                              PARTITIONS, group)
        except Exception:  # the broker is restarting: not done yet
            return False


def start_job(settings, stream: Stream, redis_url: str, key_prefix: str, keyspace: str,
              group: str, log_name: str) -> subprocess.Popen:
    args = job_args(settings, stream, key_prefix, keyspace, group, POLICY)
    args = [a for a in args if not a.startswith(("--redis_url=", "--kafka_bootstrap="))]
    args += [f"--redis_url={redis_url}", f"--kafka_bootstrap={stream.bootstrap}"]
    log = open(os.path.join(settings.state_dir, "logs", log_name), "ab")
    return subprocess.Popen([sys.executable, "-m", "pipelines.fanout", *args], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def assert_matches_oracle(stream: Stream, redis: RedisFeedStore, cassandra: CassandraFeedStore,
                          last_reads: dict[int, int]) -> None:
    expected = expected_state(stream.events, POLICY, last_reads)
    deleted = sorted(expected.deleted)
    not_deleted = [p for p, d in zip(deleted, redis.deleted(deleted)) if not d]
    assert not not_deleted, f"deletes not applied: {not_deleted}"
    users = range(1, 31)
    feeds = {u: redis.feed(u, 10_000) for u in users}
    wrong = {u: (sorted(set(feeds[u]) - set(expected.feeds.get(u, []))),
                 sorted(set(expected.feeds.get(u, [])) - set(feeds[u])))
             for u in users if feeds[u] != expected.feeds.get(u, [])}
    assert not wrong, f"feeds differ (user: (extra, missing)): {wrong}"
    assert durable_feeds(cassandra) == {u: ps for u, ps in expected.durable_feeds.items() if ps}
    for author in range(100, 109):
        assert redis.timeline(author, 10_000) == expected.timelines.get(author, [])
        assert redis.followers(author) == expected.followers.get(author, [])


def run_with_a_fault(settings, bootstrap: str, redis_url: str, cassandra_session, keyspace: str,
                     fault, restart, name: str) -> None:
    """Graph, then a steady stream; ``fault()`` part-way, ``restart()`` after a pause."""
    migrate(cassandra_session, keyspace)
    key_prefix = f"flt{uuid.uuid4().hex[:8]}"
    redis = RedisFeedStore.from_url(redis_url, key_prefix=key_prefix)
    cassandra = CassandraFeedStore(cassandra_session, keyspace)
    now = int(time.time() * 1000) - 600_000
    last_reads = {u: now - 45 * DAY_MS for u in (5, 17, 23)}
    for u, at in last_reads.items():
        redis.set_last_read(u, at)
        cassandra.set_last_read(u, at)  # where a restore of an emptied Redis finds them
    graph, events = _workload(now, random.Random(11))
    stream = Stream(bootstrap)
    group = f"g-{uuid.uuid4().hex[:8]}"
    stream.send(graph)
    stream.flush()
    job = start_job(settings, stream, redis_url, key_prefix, keyspace, group,
                    f"test-faults-{name}-{key_prefix}.log")
    try:
        _wait_for(lambda: stream.done(group), 120, "the graph")
        half = len(events) // 2

        def produce(batch):
            for i in range(0, len(batch), 20):
                stream.send(batch[i:i + 20])
                time.sleep(0.15)

        producer = threading.Thread(target=produce, args=(events[:half],))
        producer.start()
        producer.join()
        fault()
        stream.send(events[half:half + 40])  # produced while the server is down
        time.sleep(3.0)
        restart()
        produce(events[half + 40:])
        stream.flush()
        _wait_for(lambda: stream.done(group), 180, "the job to apply everything after the fault")
        assert job.poll() is None, "the job died instead of riding out the fault"
    finally:
        _kill(job)
    try:
        assert_matches_oracle(stream, redis, cassandra, last_reads)
    finally:
        redis.close()


def test_kafka_broker_killed_mid_stream(stack, private_kafka, cassandra_session, keyspace):
    settings = private_kafka
    (settings.state_dir / "logs").mkdir(parents=True, exist_ok=True)

    def kill_broker():
        pid = processes.running_pid(settings, "kafka")
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not services.kafka_ready(settings), 30, "the broker to die")

    run_with_a_fault(settings, settings.kafka_bootstrap, stack.redis_url, cassandra_session,
                     keyspace, kill_broker,
                     lambda: infra_stack.up(settings, ["kafka"], resolve_flink=False), "kafka")


def test_redis_killed_mid_stream(stack, private_redis, cassandra_session, keyspace):
    run_with_a_fault(stack, stack.kafka_bootstrap, private_redis.url, cassandra_session,
                     keyspace, private_redis.kill, private_redis.start, "redis")


def test_redis_restarted_empty_mid_stream(stack, tmp_path, cassandra_session, keyspace):
    """Redis without persistence killed and restarted: it comes back empty under the
    running fan-out, which restores it from Cassandra by itself and ends equal to the
    oracle (graph, feeds, timelines; the inactive users' last reads come back too)."""
    server = PrivateRedis(tmp_path / "redis", persistent=False)
    server.start()
    try:
        run_with_a_fault(stack, stack.kafka_bootstrap, server.url, cassandra_session, keyspace,
                         server.kill, server.start, "redis-empty")
    finally:
        server.stop()


# ---------------------------------------------------------------- malformed records


def test_ten_percent_malformed_records_all_dead_lettered(stack, cassandra_session, keyspace,
                                                         key_prefix, tmp_path):
    """Every malformed kind, 10% of the stream: each one in the DLQ with its bytes,
    every good event materialized as the oracle says."""
    migrate(cassandra_session, keyspace)
    stream = Stream(stack.kafka_bootstrap)
    now = int(time.time() * 1000) - 600_000
    graph, events = _workload(now, random.Random(5))
    stream.send(graph)
    codec = WireCodec()
    kinds = [value for _, value in _malformed(codec, codec.encode(events[0]))]
    bad = [kinds[i % len(kinds)] for i in range((len(graph) + len(events)) // 9)]
    topic = stream.prefix + PostEvent.TOPIC
    for i, value in enumerate(bad):
        stream.producer.produce(topic, value, key=f"bad{i}".encode())
    stream.send(events)
    stream.flush()
    group = f"g-{uuid.uuid4().hex[:8]}"
    job = start_job(stack, stream, stack.redis_url, key_prefix, keyspace, group,
                    f"test-faults-malformed-{key_prefix}.log")
    try:
        _wait_for(lambda: stream.done(group), 180, "the job to apply the stream")
    finally:
        _kill(job)
    share = len(bad) / (len(bad) + len(graph) + len(events))
    assert share >= 0.095, share
    dead = read_dead_letters(stack.kafka_bootstrap, dlq_topic(topic))
    assert sorted(d.value or b"" for d in dead) == sorted(bad)
    assert all(d.error and d.reason and d.topic == topic for d in dead)
    redis = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    try:
        assert_matches_oracle(stream, redis, CassandraFeedStore(cassandra_session, keyspace), {})
    finally:
        redis.close()
