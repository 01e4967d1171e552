"""``feedbeam submit`` / ``status`` / ``cancel`` through the CLI, on Prism and on Flink.

The fan-out pipeline is submitted detached on each runner against the real
Kafka, Redis and Cassandra; a follow and a post produced to the job's topics
must reach the follower's feed in both stores; ``status`` must list the job
and reach lag 0 (the source committed every offset); ``cancel`` must stop
every process of it. Flink finalizes bundles, which is when the source commits
offsets, only when a checkpoint completes: the Flink job runs with
``--checkpointing_interval`` (and so with the flag ``pipelines.runtime`` adds
for it; without that flag the source emitted nothing there).
"""
from __future__ import annotations

import time
import uuid

import pytest

from stores.cassandra.feeds import CassandraFeedStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.session import migrate
from tests.integration.cli_jobs import cli, submitted
from tests.integration.fanout_events import create, follow
from tests.integration.test_fanout import Topics

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("runner", ["prism", "flink"])
def test_submit_status_cancel(runner, stack, kafka_topic, cassandra_session, keyspace,
                              key_prefix, tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    group = f"g-{uuid.uuid4().hex[:8]}"
    redis = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    cassandra = CassandraFeedStore(cassandra_session, keyspace)
    checkpoints = ["--checkpointing_interval=2000"] if runner == "flink" else []
    with submitted(stack, tmp_path, runner, "fanout",
                   f"--topic_prefix={topics.prefix}", f"--consumer_group={group}",
                   "--fallback_start=earliest", f"--redis_key_prefix={key_prefix}",
                   f"--cassandra_keyspace={keyspace}", "--push_threshold=100",
                   *checkpoints) as job:
        now = int(time.time() * 1000)
        topics.send([follow(7, 70, now)])
        job.wait_until(lambda: redis.followers(70) == [7], 180, "the follow edge")
        topics.send([create(501, 70, now + 1)])
        job.wait_until(lambda: [p for p, _ in redis.feed(7, 10)] == [501], 120,
                       "the pushed post")
        job.wait_until(
            lambda: [r[0] for r in cassandra.feed_page(7, 10, None, now + 1000)] == [501],
            60, "the durable copy")

        status = cli(job.env, "status", "--interval=1")
        assert status.returncode == 0, status.stderr
        assert job.job_id in status.stdout and "running" in status.stdout
        job.wait_caught_up(group)
    redis.close()
