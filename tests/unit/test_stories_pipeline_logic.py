"""The stories pipeline's plain parts: options, event runs, timer commands, the applier."""
from __future__ import annotations

import json

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from domain.stories import StoryPolicy, parse_timer_tag, timer_shard, timer_tag
from pipelines.common import StoreOptions
from pipelines.stories import (
    WATCH_S,
    StoriesOptions,
    _StoryApplier,
    expired_message,
    expiry_command,
    job_options,
)
from schemas.events import PostEvent, PostEventKind, StoryEvent, StoryEventKind
from schemas.stories import ExpiryCommand, StoryExpired, StoryOutcome
from stores.config import StoreConfig
from stores.stories import _runs

P, V, D = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


def test_options_give_the_policy_and_the_shared_store_flags_the_stores():
    options = PipelineOptions(["--redis_url=redis://h:1/2", "--grace_s=30",
                               "--max_story_life_h=2", "--cassandra_keyspace=ks"])
    assert options.view_as(StoriesOptions).policy() == StoryPolicy(30_000, 7_200_000)
    assert options.view_as(StoreOptions).config() == StoreConfig(
        "redis://h:1/2", "fb", "127.0.0.1", 9042, "ks")
    defaults = PipelineOptions([]).view_as(StoriesOptions)
    assert (defaults.policy(), defaults.stories_max_batch, defaults.expiry_shards,
            defaults.expired_topic, defaults.no_sweep) == (StoryPolicy(), 500, 64, None, False)


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


class _FakeWriter:
    """``StoryWriter.apply`` as far as the applier sees it; fails transiently once if told."""

    def __init__(self, fail_once: bool = False):
        self.fail_once = fail_once
        self.applied: list[list[StoryEvent]] = []

    def apply(self, events):
        self.applied.append(list(events))
        if self.fail_once:
            self.fail_once = False
            raise TimeoutError("transient")
        return [StoryOutcome(e.event_id, "published" if e.kind is P else "view_unknown",
                             e.story_id, e.author_id, None, e.event_time) for e in events]


class _Counts:
    """``pipelines.common.Counters`` that remembers what it counted."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def inc(self, name: str, n: int = 1) -> None:
        if n:
            self.counts[name] = self.counts.get(name, 0) + n


def test_the_applier_outputs_one_outcome_per_story_event_in_order_and_counts_once_written():
    writer, counts = _FakeWriter(fail_once=True), _Counts()
    applier = _StoryApplier(writer, counts)
    batch = [StoryEvent("a", 1, P, 1, 1), PostEvent("p", 1, PostEventKind.CREATED, 1, 1, 1),
             StoryEvent("b", 2, V, 1, 1, viewer_id=3), StoryEvent("c", 3, P, 2, 1)]
    with pytest.raises(TimeoutError):
        applier.apply(batch)
    assert counts.counts == {}       # the sink retries the batch: count it once, when written
    outcomes = applier.apply(batch)
    assert [None if o is None else (o.event_id, o.action) for o in outcomes] == [
        ("a", "published"), None, ("b", "view_unknown"), ("c", "published")]
    assert [e.event_id for e in writer.applied[-1]] == ["a", "b", "c"]
    assert counts.counts == {"events_not_story": 1, "events_published": 2,
                             "events_view_unknown": 1}


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
