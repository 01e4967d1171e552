"""The stories pipeline's plain parts: options, event runs, timer commands and steps."""
from __future__ import annotations

import json

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.stories import (
    WATCH_S,
    StoriesOptions,
    StoryStoreConfig,
    _runs,
    expired_message,
    expiry_command,
    job_options,
)
from domain.stories import StoryPolicy, parse_timer_tag, timer_shard, timer_tag
from schemas.events import StoryEvent, StoryEventKind
from schemas.stories import ExpiryCommand, StoryExpired, StoryOutcome

P, V, D = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


def test_options_parse_beside_the_fanout_options():
    options = PipelineOptions(["--redis_url=redis://h:1/2", "--grace_s=30",
                               "--max_story_life_h=2", "--cassandra_keyspace=ks"])
    assert options.get_all_options()["redis_url"] == "redis://h:1/2"
    stories = options.view_as(StoriesOptions)
    assert stories.stores() == StoryStoreConfig(
        "redis://h:1/2", "fb", "127.0.0.1", 9042, "ks", StoryPolicy(30_000, 7_200_000))


def test_runs_keep_order_and_group_consecutive_kinds():
    events = [StoryEvent(str(i), i, kind, 1, 1) for i, kind in enumerate([P, P, V, D, D, V, P])]
    runs = _runs(events)
    assert [(kind, [e.event_id for e in run]) for kind, run in runs] == [
        (P, ["0", "1"]), (V, ["2"]), (D, ["3", "4"]), (V, ["5"]), (P, ["6"])]


def test_expiry_commands_of_outcomes():
    def outcome(action):
        return StoryOutcome("e", action, 5, 2, 1000, 10)

    assert expiry_command(outcome("published")) == ExpiryCommand(5, 2, 1000, False)
    assert expiry_command(outcome("deleted")) == ExpiryCommand(5, 2, 1000, True)
    for action in ("tombstoned", "expired", "beyond_horizon", "viewed", "view_unknown"):
        assert expiry_command(outcome(action)) is None


def test_expired_message_is_json_keyed_by_author():
    msg = expired_message("t.stories-expired", StoryExpired(5, 2, 1000, 1500))
    assert (msg.topic, msg.key, msg.timestamp_ms) == ("t.stories-expired", b"2", 1500)
    assert json.loads(msg.value) == {"story_id": 5, "author_id": 2, "expires_at": 1000,
                                     "removed_at": 1500}


def test_job_options_keep_watching_a_streaming_job():
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    options = job_options(["--grace_s=5"])
    assert options.view_as(StandardOptions).streaming
    assert options.view_as(PortableOptions).job_server_timeout == WATCH_S
    assert job_options(["--job_server_timeout=60"]).view_as(
        PortableOptions).job_server_timeout == 60


def test_timer_tags_round_trip_and_shards_spread():
    assert parse_timer_tag(timer_tag(123456789012, 42, 1_800_000_000_000)) == (
        123456789012, 42, 1_800_000_000_000)
    assert {timer_shard(s, 64) for s in range(1000, 1640)} == set(range(64))
