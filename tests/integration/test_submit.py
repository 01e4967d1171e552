"""``feedbeam submit`` / ``status`` / ``cancel`` / ``clean`` through the CLI, on Prism and Flink.

The fan-out pipeline is submitted detached on each runner against the real
Kafka, Redis and Cassandra, its options spelled as the CLI documents them
(dashes); a follow and a post produced to the job's topics must reach the
follower's feed in both stores; ``status`` must list the job and reach lag 0
(the source committed every offset); ``cancel`` must stop every process of it.
Flink finalizes bundles, which is when the source commits offsets, only when a
checkpoint completes: the Flink job runs with ``--checkpointing-interval`` (an
option only Flink's job server lists, and so with the flag ``pipelines.runtime``
adds for it; without that flag the source emitted nothing there).

``test_an_isolated_run_by_hand`` is the walk-through of docs/operations.md: an
isolated run's topics, keyspace and job, its scoped status, a SIGKILL that
status reports as dead, cancel and clean.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from stores.cassandra.feeds import CassandraFeedStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.session import migrate
from infra.install import prism_binary
from jobs import clean
from jobs.submit import proc_stat
from tests.integration.cli_jobs import SubmittedJob, cli, job_pid, submitted
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
    checkpoints = ["--checkpointing-interval=2000"] if runner == "flink" else []
    with submitted(stack, tmp_path, runner, "fanout",
                   f"--topic-prefix={topics.prefix}", f"--consumer-group={group}",
                   "--fallback-start=earliest", f"--redis-key-prefix={key_prefix}",
                   f"--cassandra-keyspace={keyspace}", "--push-threshold=100",
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


def test_an_isolated_run_by_hand(stack, cassandra_session, tmp_path):
    """Topics, keyspace, job, scoped status, a kill, cancel and clean, all by the CLI."""
    topics = Topics(stack, lambda partitions, name: name)  # `topics create` makes them
    prefix = topics.prefix
    run, group = prefix[:-1], f"{prefix[:-1]}-fanout"
    isolation = ["--topic-prefix", prefix, "--consumer-group", group,
                 "--redis-key-prefix", run, "--cassandra-keyspace", run]
    env = dict(os.environ, FEEDBEAM_STATE_DIR=str(tmp_path))
    pid = None
    try:
        for step in (["topics", "create", "--topic-prefix", prefix, "--partitions", "2"],
                     ["migrate", "--cassandra-keyspace", run]):
            done = cli(env, *step, timeout=300)  # a migration's DDL is slow on a busy node
            assert done.returncode == 0, done.stderr
        started = cli(env, "submit", "fanout", "--detach", *isolation, "--push-threshold=100",
                      "--fallback-start=earliest", f"--prism-location={prism_binary(stack)}")
        assert started.returncode == 0, started.stderr + started.stdout
        job = SubmittedJob(env, started.stdout.split()[0],
                           started.stdout.split(" log ")[1].split()[0])
        pid = job_pid(env, job.job_id)

        redis = RedisFeedStore.from_url(stack.redis_url, key_prefix=run)
        now = int(time.time() * 1000)
        topics.send([follow(7, 70, now), create(501, 70, now + 1)])
        job.wait_until(lambda: [p for p, _ in redis.feed(7, 10)] == [501], 240,
                       "the pushed post in the run's Redis keys")
        cassandra = CassandraFeedStore(cassandra_session, run)
        job.wait_until(
            lambda: [r[0] for r in cassandra.feed_page(7, 10, None, now + 1000)] == [501],
            60, "the durable copy in the run's keyspace")
        redis.close()

        job.wait_caught_up(group, 60, "--topic-prefix", prefix)
        scoped = cli(env, "status", "--topic-prefix", prefix, "--interval=0").stdout
        assert job.job_id in scoped and "running" in scoped and f"topic prefix '{prefix}'" in scoped
        assert f"{group}: lag 0," in scoped
        other = cli(env, "status", "--topic-prefix", "nosuch.", "--interval=0").stdout
        assert job.job_id not in other and group not in other
        by_group = cli(env, "status", "--consumer-group", group, "--interval=0").stdout
        assert f"{group}: lag 0," in by_group and f"{prefix}post-events[0]" in by_group

        os.kill(pid, signal.SIGKILL)  # its submit is long gone: nobody may reap it
        job.wait_until(lambda: "DEAD" in cli(env, "status", job.job_id, "--interval=0").stdout,
                       30, "status to show the killed job as dead")
        cancelled = cli(env, "cancel", "fanout", "--topic-prefix", prefix)
        assert cancelled.returncode == 0, cancelled.stderr
        assert f"{job.job_id} had already exited; record removed" in cancelled.stdout
        assert _live_in_group(pid) == []  # its private Prism went with it
        pid = None

        cleaned = cli(env, "clean", *isolation)
        assert cleaned.returncode == 0, cleaned.stderr
        assert "topics: removed" in cleaned.stdout and f"{prefix}post-events.dlq" in cleaned.stdout
        assert f"consumer groups: removed {group}" in cleaned.stdout
        assert f"keyspace {run}: removed" in cleaned.stdout
        admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
        assert not [t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix)]
    finally:
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        clean.clean(stack, topic_prefix=prefix, groups=[group], key_prefix=run, keyspace=run)



def _live_in_group(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that still run (zombies do not)."""
    pids = (int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit())
    return [pid for pid in pids
            if (stat := proc_stat(pid)) and stat.pgid == pgid and stat.state not in "ZX"]
