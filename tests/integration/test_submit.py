"""``feedbeam submit`` / ``status`` / ``cancel`` through the CLI, on Prism and on Flink.

The fan-out pipeline is submitted detached on each runner against the real
Kafka, Redis and Cassandra; a follow and a post produced to the job's topics
must reach the follower's feed in both stores; ``status`` must list the job;
``cancel`` must stop every process of it. (Offsets: on Prism the job commits
them, so ``status`` reaches lag 0; the Flink runner finalizes bundles only
with checkpointing, see the README, so there the check is on the stores.)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from pipelines.io.cassandra_store import CassandraFeedStore
from pipelines.io.redis_store import RedisFeedStore
from schemas.cassandra import migrate
from tests.integration.fanout_events import create, follow
from tests.integration.test_fanout import REPO, Topics
from tests.integration.test_kafka_source import flink_ready_or_fail

pytestmark = pytest.mark.integration


def cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def flink_running_jobs(stack) -> set[str]:
    """Ids of the jobs the Flink job server reports RUNNING."""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2 as api
    from apache_beam.portability.api import beam_job_api_pb2_grpc as api_grpc

    from infra.stack import flink_job_endpoint

    with grpc.insecure_channel(flink_job_endpoint(stack)) as channel:
        jobs = api_grpc.JobServiceStub(channel).GetJobs(api.GetJobsRequest(), timeout=30)
    return {j.job_id for j in jobs.job_info if j.state == api.JobState.RUNNING}


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


@pytest.mark.parametrize("runner", ["prism", "flink"])
def test_submit_status_cancel(runner, stack, kafka_topic, cassandra_session, keyspace,
                              key_prefix, tmp_path):
    if runner == "flink":
        flink_ready_or_fail(stack)
        running_before = flink_running_jobs(stack)
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    env = dict(os.environ, FEEDBEAM_STATE_DIR=str(tmp_path))
    group = f"g-{uuid.uuid4().hex[:8]}"
    submitted = cli(env, "submit", "fanout", "--runner", runner, "--detach",
                    f"--topic_prefix={topics.prefix}", f"--consumer_group={group}",
                    "--fallback_start=earliest", f"--redis_key_prefix={key_prefix}",
                    f"--cassandra_keyspace={keyspace}", "--push_threshold=100")
    assert submitted.returncode == 0, submitted.stderr + submitted.stdout
    job_id = submitted.stdout.split()[0]
    assert job_id.startswith("fanout-")
    redis = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    cassandra = CassandraFeedStore(cassandra_session, keyspace)
    try:
        now = int(time.time() * 1000)
        topics.send([follow(7, 70, now)])
        wait_until(lambda: redis.followers(70) == [7], 180, "the follow edge")
        topics.send([create(501, 70, now + 1)])
        wait_until(lambda: [p for p, _ in redis.feed(7, 10)] == [501], 120, "the pushed post")
        wait_until(lambda: [r[0] for r in cassandra.feed_page(7, 10, None, now + 1000)] == [501],
                   60, "the durable copy")

        status = cli(env, "status", "--interval=1")
        assert status.returncode == 0, status.stderr
        assert job_id in status.stdout and "running" in status.stdout
        if runner == "prism":
            wait_until(lambda: f"{group}: lag 0," in cli(env, "status", "--interval=0").stdout,
                       60, "lag 0 in status")
        pid = int(status.stdout.split(job_id)[1].split("pid")[1].split()[0])
    finally:
        cancelled = cli(env, "cancel", job_id)
        redis.close()
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"{job_id} stopped" in cancelled.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert job_id not in cli(env, "status", "--interval=0").stdout
    if runner == "flink":  # cancelled on the job server too, not left without its workers
        wait_until(lambda: flink_running_jobs(stack) <= running_before, 60,
                   "the Flink job to end")
