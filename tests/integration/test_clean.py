"""``feedbeam clean`` against the real Kafka, Redis and Cassandra.

A run's names (topics under a prefix and a neighbour prefix sharing its stem,
consumer groups, thousands of Redis keys beside a neighbour key prefix, a
keyspace) are made; ``clean`` must remove exactly the run's, print them, and
refuse the default deployment's names and a run a live job still uses.
"""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from confluent_kafka.admin import AdminClient

from infra.errors import UserFacingError
from jobs import clean
from jobs.submit import JobRecord, proc_stat
from jobs.topics import create_topics, feed_topics
from stores.cassandra.session import create_keyspace
from stores.kafka.lag import commit_offsets
from tests.integration.cli_jobs import cli

pytestmark = pytest.mark.integration


@pytest.fixture
def names(stack):
    """A run's names and a neighbour's; whatever is left of both is removed at the end."""
    stem = f"c{uuid.uuid4().hex[:10]}"
    run = dict(prefix=f"{stem}.", group=f"{stem}-fanout", auto=f"{stem}-fanout-durable",
               mixed=f"{stem}-mixed", keys=stem, keyspace=f"{stem}_ks")
    neighbour = dict(prefix=f"{stem}z.", keys=f"{stem}z")
    yield run, neighbour
    for prefix, keys in ((run["prefix"], run["keys"]), (neighbour["prefix"], neighbour["keys"])):
        clean.clean(stack, topic_prefix=prefix, groups=[run["group"], run["mixed"]],
                    key_prefix=keys)
    clean.clean(stack, keyspace=run["keyspace"])


def _topics(admin, prefix: str) -> set[str]:
    return {t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix)}


def _groups(admin) -> set[str]:
    return {g.group_id for g in admin.list_consumer_groups(request_timeout=30).result().valid}


def _keyspace_exists(session, name: str) -> bool:
    return session.execute("SELECT keyspace_name FROM system_schema.keyspaces "
                           "WHERE keyspace_name = %s", (name,)).one() is not None


def test_clean_removes_exactly_what_the_run_created(stack, names, redis_client,
                                                    cassandra_session, tmp_path):
    run, neighbour = names
    env = dict(os.environ, FEEDBEAM_STATE_DIR=str(tmp_path))
    made = cli(env, "topics", "create", "--topic-prefix", run["prefix"], "--partitions", "1")
    assert made.returncode == 0, made.stderr
    durable = run["prefix"] + "fanout-durable"  # a topic of the run beyond the event topics
    create_topics(stack.kafka_bootstrap, [durable, neighbour["prefix"] + "post-events"], 1)
    post, follow = run["prefix"] + "post-events", run["prefix"] + "follow-events"
    commit_offsets(stack.kafka_bootstrap, run["group"], {(post, 0): 0, (follow, 0): 0})
    commit_offsets(stack.kafka_bootstrap, run["auto"], {(durable, 0): 0})  # not named: found
    commit_offsets(stack.kafka_bootstrap, run["mixed"],
                   {(post, 0): 0, (neighbour["prefix"] + "post-events", 0): 0})
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2 * clean.UNLINK_BATCH + 500):  # several SCAN/UNLINK batches
        pipe.set(f"{run['keys']}:feed:{{u:{i}}}", i)
    for i in range(20):
        pipe.set(f"{neighbour['keys']}:feed:{{u:{i}}}", i)
    pipe.execute()
    create_keyspace(cassandra_session, run["keyspace"])
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    run_topics = set(feed_topics(run["prefix"])) | {durable}
    assert _topics(admin, run["prefix"]) == run_topics

    argv = ["clean", "--topic-prefix", run["prefix"], "--consumer-group", run["group"],
            "--group", "never-there-" + run["group"], "--redis-key-prefix", run["keys"],
            "--cassandra-keyspace", run["keyspace"]]
    dry = cli(env, *argv, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"topics: would remove {len(run_topics)}: " in dry.stdout
    assert f"redis keys {run['keys']}:*: would remove 2,500" in dry.stdout
    assert _topics(admin, run["prefix"]) == run_topics
    assert len(list(redis_client.scan_iter(match=f"{run['keys']}:*", count=1000))) == 2500

    done = cli(env, *argv)
    assert done.returncode == 0, done.stderr
    assert f"topics: removed {len(run_topics)}: {', '.join(sorted(run_topics))}" in done.stdout
    assert (f"consumer groups: removed {run['group']}, {run['auto']}; "
            f"not there: never-there-{run['group']}") in done.stdout
    assert f"redis keys {run['keys']}:*: removed 2,500" in done.stdout
    assert f"keyspace {run['keyspace']}: removed" in done.stdout

    assert _topics(admin, run["prefix"]) == set()
    assert _topics(admin, neighbour["prefix"]) == {neighbour["prefix"] + "post-events"}
    groups = _groups(admin)
    assert run["group"] not in groups and run["auto"] not in groups
    assert run["mixed"] in groups  # it also read the neighbour's topic
    assert list(redis_client.scan_iter(match=f"{run['keys']}:*")) == []
    assert len(list(redis_client.scan_iter(match=f"{neighbour['keys']}:*"))) == 20
    assert not _keyspace_exists(cassandra_session, run["keyspace"])

    again = cli(env, *argv)  # nothing left: says so, still succeeds
    assert again.returncode == 0, again.stderr
    assert f"keyspace {run['keyspace']}: not there" in again.stdout
    assert f"topics: none starting with '{run['prefix']}'" in again.stdout


def test_the_default_deployments_names_need_yes_production(stack, tmp_path):
    env = dict(os.environ, FEEDBEAM_STATE_DIR=str(tmp_path))
    refused = cli(env, "clean", "--redis-key-prefix", "fb", "--topic-prefix", "",
                  "--consumer-group", "feedbeam-fanout", "--cassandra-keyspace", "feedbeam")
    assert refused.returncode == 2
    assert ("refusing to remove what the default deployment uses (the unprefixed topics, "
            "group feedbeam-fanout, Redis key prefix fb, keyspace feedbeam) without "
            "--yes-production") in refused.stderr
    for one in (dict(key_prefix="fb"), dict(topic_prefix=""), dict(keyspace="feedbeam"),
                dict(groups=["feedbeam-ranking"])):
        with pytest.raises(UserFacingError, match="without --yes-production"):
            clean.clean(stack, **one)


def test_clean_refuses_names_a_running_job_uses_and_odd_names(stack, tmp_path, names):
    run, _ = names
    env = dict(os.environ, FEEDBEAM_STATE_DIR=str(tmp_path))
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        JobRecord("fanout-x", "fanout", "prism", job.pid, "now", "/dev/null", run["group"],
                  [run["prefix"] + "post-events"], ["-m", "pipelines.fanout",
                                                    f"--redis_key_prefix={run['keys']}"],
                  run["prefix"], proc_stat(job.pid).start_ticks).save(stack_state(tmp_path))
        for argv in (["--topic-prefix", run["prefix"]], ["--redis-key-prefix", run["keys"]],
                     ["--group", run["group"]]):
            refused = cli(env, "clean", *argv)
            assert refused.returncode == 2 and "running jobs use these names: fanout-x" in \
                refused.stderr, refused.stderr
    finally:
        job.kill()
        job.wait()
    assert cli(env, "clean", "--topic-prefix", run["prefix"]).returncode == 0  # it ended
    for argv, why in ((["--cassandra-keyspace", "system_auth"], "Cassandra's own keyspace"),
                      (["--cassandra-keyspace", "Bad-Name"], "bad keyspace name"),
                      (["--redis-key-prefix", "a*"], "bad Redis key prefix"),
                      ([], "name what to remove")):
        refused = cli(env, "clean", *argv)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr


def stack_state(tmp_path):
    """The settings of a CLI run with ``FEEDBEAM_STATE_DIR=tmp_path``."""
    import dataclasses

    from infra.settings import StackSettings

    return dataclasses.replace(StackSettings.from_env(), state_dir=tmp_path)
