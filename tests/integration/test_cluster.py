"""The oracle tests of the fan-out, stories and features, unmodified, on the cluster topology.

The same test functions as on the single stack, collected here again with the
fixtures pointed at the cluster topology (``conftest.checked_stack`` starts it:
``feedbeam infra up --topology cluster``): a Redis Cluster of 3 masters, 2
Cassandra nodes with each test's keyspace at replication factor 2 (writes at
LOCAL_QUORUM), and a Flink session cluster (one JobManager, two TaskManagers)
that the jobs submitted on ``flink`` run on at parallelism 2; the API's feed and
story tests read through the slot-routing asyncio client; the ranking stores'
refreshes (candidates and features of many users per batched read, split by slot),
the social facts' batch scripts and reads against the offline replay
and the fan-out and ranking jobs on Flink. Then a kill -9 of
one TaskManager while a stories job runs: the job restarts on the slots left
and the view still ends as the oracle says.

Run: ``.venv/bin/python -m pytest -m cluster tests/integration/test_cluster.py``
(the cluster stays up afterwards; ``feedbeam infra down --topology cluster``
stops it).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from infra import cluster, processes
from infra.settings import StackSettings
from stores.cassandra.session import migrate, new_cluster, replication_factor
from tests.conftest import checked_stack
from tests.integration.test_fanout_pipeline import (
    stores,
    test_a_crossing_by_a_concurrent_batch_is_not_undone,
    test_a_crossing_cut_short_by_a_crash_is_carried_out_by_the_replay,
    test_an_edge_event_superseded_in_its_batch_has_no_outcome,
    test_followed_celebrities_follow_edges_and_threshold_crossings,
    test_push_celebrity_inactive_and_cap,
    test_replaying_the_same_events_changes_nothing,
    test_unfollow_follow_delete_and_no_resurrection,
)
from tests.integration.test_features import (
    test_pipeline_matches_the_oracle_in_every_store,
)
from tests.integration.test_pipelines_on_runners import (
    test_features as test_features_on_the_flink_cluster,
)
from tests.integration.test_serving_api import (
    api,
    test_feed_merges_pushed_and_pulled_posts_hydrated,
    test_inactive_and_lost_feeds_are_rebuilt_on_read,
    test_pagination_is_stable_while_new_posts_arrive,
    test_ranked_feed_pages_survive_a_reranking,
    test_story_tray_and_mark_seen,
)
from tests.integration.test_pipelines_on_runners import (
    test_ranking as test_ranking_on_the_flink_cluster,
)
from tests.integration.test_pipelines_on_runners import (
    test_stories as test_stories_on_the_flink_cluster,
)
from tests.integration.test_ranking_refresh import (
    stores_of,
    test_a_social_model_scores_with_the_online_social_features,
    test_a_batch_ranks_each_user_as_a_refresh_of_that_user_alone,
    test_a_celebrity_post_refreshes_a_bounded_audience,
    test_a_post_going_viral_moves_up_in_the_feeds_that_hold_it,
    test_model_scores_candidates_and_a_new_version_is_picked_up,
    world,
)
from tests.integration.test_social_online import (
    test_online_social_features_equal_the_offline_replay,
)
from tests.integration.test_stories_pipeline import (
    test_publish_view_delete_and_expiry_at_the_watermark,
)

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

#: The tests and fixtures imported above, collected here again on the clusters.
__all__ = [
    "stores", "api", "world", "stores_of",
    "test_push_celebrity_inactive_and_cap", "test_unfollow_follow_delete_and_no_resurrection",
    "test_replaying_the_same_events_changes_nothing",
    "test_an_edge_event_superseded_in_its_batch_has_no_outcome",
    "test_followed_celebrities_follow_edges_and_threshold_crossings",
    "test_a_crossing_cut_short_by_a_crash_is_carried_out_by_the_replay",
    "test_a_crossing_by_a_concurrent_batch_is_not_undone",
    "test_publish_view_delete_and_expiry_at_the_watermark",
    "test_pipeline_matches_the_oracle_in_every_store",
    "test_feed_merges_pushed_and_pulled_posts_hydrated",
    "test_pagination_is_stable_while_new_posts_arrive",
    "test_inactive_and_lost_feeds_are_rebuilt_on_read",
    "test_ranked_feed_pages_survive_a_reranking", "test_story_tray_and_mark_seen",
    "test_features_on_the_flink_cluster", "test_stories_on_the_flink_cluster",
    "test_ranking_on_the_flink_cluster",
    "test_model_scores_candidates_and_a_new_version_is_picked_up",
    "test_a_batch_ranks_each_user_as_a_refresh_of_that_user_alone",
    "test_a_celebrity_post_refreshes_a_bounded_audience",
    "test_a_post_going_viral_moves_up_in_the_feeds_that_hold_it",
    "test_a_social_model_scores_with_the_online_social_features",
    "test_online_social_features_equal_the_offline_replay",
]


@pytest.fixture(scope="module")
def stack() -> StackSettings:
    """The cluster topology, started if it is not running."""
    return checked_stack(dataclasses.replace(StackSettings.from_env(), topology="cluster"))


@pytest.fixture(scope="module")
def cassandra_session(stack):
    session_cluster = new_cluster(stack.cassandra_host, stack.cassandra_port)
    yield session_cluster.connect()
    session_cluster.shutdown()


@pytest.fixture
def runner() -> str:
    """The jobs of ``test_pipelines_on_runners`` run on the Flink session cluster."""
    return "flink"


def test_the_fixtures_are_the_cluster_topology(stack, redis_client, cassandra_session, keyspace):
    """What every test here relies on: three masters sharing the slots, two Cassandra
    nodes and the test's keyspace replicated to both, two TaskManagers registered."""
    from stores.redis.client import ScriptSafeRedisCluster

    assert isinstance(redis_client, ScriptSafeRedisCluster)
    assert len(redis_client.get_primaries()) == 3 and cluster.redis_cluster_ok(stack)
    hosts = {h.address for h in cassandra_session.cluster.metadata.all_hosts() if h.is_up}
    assert hosts == set(cluster.cassandra_hosts(stack))
    migrate(cassandra_session, keyspace)
    assert replication_factor(cassandra_session, keyspace) == 2
    assert sorted(cluster.registered_taskmanagers(stack)) == list(cluster.TASKMANAGERS)
    # `up` again starts nothing: every server keeps its process.
    from infra import stack as infra_stack

    pids = {name: processes.running_pid(stack, name) for name in cluster.CLUSTER_SERVICES}
    assert None not in pids.values()
    infra_stack.up(stack)
    assert {name: processes.running_pid(stack, name) for name in pids} == pids


def test_fanout_on_the_flink_cluster(stack, kafka_topic, cassandra_session, keyspace,
                                    key_prefix, tmp_path):
    """The fan-out job submitted to the Flink session cluster (``feedbeam submit
    --runner flink``: parallelism 2): edge, pushed post and durable copy, then lag 0."""
    from tests.integration.test_submit import test_submit_status_cancel

    test_submit_status_cancel("flink", stack, kafka_topic, cassandra_session, keyspace,
                              key_prefix, tmp_path)


def test_batched_hash_reads_span_slots(redis_client, key_prefix):
    """The ranking's batched HMGETs and GETs (``HashReads``) name keys of many slots: on
    the cluster each goes to its node, and the replies come back in the order queued."""
    from redis.crc import key_slot

    from stores.redis.multiread import HashReads

    keys = [f"{key_prefix}:{{h{i}}}" for i in range(40)]
    assert len({key_slot(k.encode()) for k in keys}) > 10
    for i, key in enumerate(keys):
        redis_client.hset(key, mapping={"a": i, "b": -i})
    strings = [f"{key_prefix}:s{{h{i}}}" for i in range(40)]
    for i, key in enumerate(strings[::2]):
        redis_client.set(key, b"\x80" * i)
    with HashReads(redis_client) as reads:
        same = reads.same(keys, ["b", "a", "absent"])
        each = reads.each(keys, [["a"] if i % 2 else ["b", "a"] for i in range(40)])
        picked = reads.pick(keys[:2], ["a", "b"], [1, 0], [0, 0, 2])
        values = reads.strings(strings)
        reads.send()
        assert reads.take_strings(values) == [None if i % 2 else b"\x80" * (i // 2)
                                              for i in range(40)]
        assert reads.take(same) == [[str(-i).encode(), str(i).encode(), None]
                                    for i in range(40)]
        assert reads.take(each) == [[str(i).encode()] if i % 2 else
                                    [str(-i).encode(), str(i).encode()] for i in range(40)]
        assert reads.take(picked) == [[], [b"-1", b"1"]]


def _running_flink_jobs(stack) -> list[dict]:
    answer = cluster.flink_rest(stack, "/jobs/overview") or {}
    return [j for j in answer.get("jobs", []) if j["state"] == "RUNNING"]


def _failures(stack, jid: str) -> str:
    """The job's exception history as the JobManager tells it, one line per failure."""
    answer = cluster.flink_rest(stack, f"/jobs/{jid}/exceptions") or {}
    entries = answer.get("exceptionHistory", {}).get("entries", [])
    return "\n".join(f"{e['timestamp']} {e.get('taskName') or '-'}: "
                     f"{e['stacktrace'].splitlines()[0]}" for e in entries) or "(none)"


def test_a_job_survives_a_killed_taskmanager(stack, kafka_topic, cassandra_session, keyspace,
                                             key_prefix, tmp_path):
    """kill -9 of a TaskManager running a stories job: Flink restarts the job from its
    last checkpoint on the other TaskManager's slots, and the oracle's view (a story
    published after the kill, in the tray with its view) still shows up in both stores."""
    from domain.stories import StoryPolicy
    from schemas.events import MediaType, StoryEvent, StoryEventKind
    from stores.cassandra.stories import CassandraStoryStore
    from stores.redis.stories import RedisStoryStore
    from tests.integration.cli_jobs import submitted
    from tests.integration.test_fanout import Topics
    from tests.integration.test_pipelines_on_runners import (FIRST_S, isolated, new_group,
                                                             now_ms)

    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic, (StoryEvent.TOPIC,))
    policy = StoryPolicy(grace_ms=600_000)
    redis = RedisStoryStore.from_url(stack.redis_url, key_prefix, policy)
    cassandra = CassandraStoryStore(cassandra_session, keyspace, policy)
    author, viewer = 5, 7

    def publish(story_id: int, t: int) -> list[StoryEvent]:
        return [StoryEvent(f"pub-{story_id}", t, StoryEventKind.PUBLISHED, story_id, author,
                           created_at=t, expires_at=t + 3600_000, media_type=MediaType.PHOTO),
                StoryEvent(f"view-{story_id}", t + 1, StoryEventKind.VIEWED, story_id, author,
                           viewer_id=viewer)]

    def tray(reader) -> list[tuple[int, bool]]:
        entries = reader.tray(viewer, [author], now_ms(), limit=10)
        return sorted((s.story_id, s.seen) for e in entries for s in e.stories)

    victim = cluster.TASKMANAGERS[0]
    try:
        with submitted(stack, tmp_path, "flink", "stories",
                       *isolated("flink", topics, new_group(), key_prefix, keyspace),
                       "--idle_skew_s=1", f"--grace_s={policy.grace_ms / 1000}") as job:
            topics.send(publish(601, now_ms()))
            for reader in (redis, cassandra):
                job.wait_until(lambda: tray(reader) == [(601, True)], FIRST_S,
                               f"the first story in the tray ({type(reader).__name__})")
            (running,) = _running_flink_jobs(stack)
            detail = cluster.flink_rest(stack, f"/jobs/{running['jid']}") or {}
            assert detail.get("vertices") and max(v["parallelism"] for v in detail["vertices"]) == 2
            pid = processes.running_pid(stack, victim)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            job.wait_until(lambda: victim not in cluster.registered_taskmanagers(stack), 60,
                           f"the JobManager to drop {victim}")
            killed_at = time.monotonic()
            topics.send(publish(602, now_ms()))
            try:
                for reader in (redis, cassandra):
                    job.wait_until(lambda: tray(reader) == [(601, True), (602, True)], FIRST_S,
                                   f"the story published after the kill "
                                   f"({type(reader).__name__})")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nFlink's failures of the job:\n"
                                     f"{_failures(stack, running['jid'])}") from None
            print(f"recovered {time.monotonic() - killed_at:.0f} s after {victim} was dropped")
            assert len(_running_flink_jobs(stack)) == 1
    finally:
        redis.close()
        # Bring the TaskManager back for the tests after this one.
        from infra import stack as infra_stack
        infra_stack.up(stack, [victim])
