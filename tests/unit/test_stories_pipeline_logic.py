"""The stories pipeline's plain parts: options, timer wakeups, the applier."""
from __future__ import annotations

import dataclasses
import json

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from domain.stories import HOUR_MS, StoryPolicy, index_shards_of, timer_shard
from pipelines.common import StoreOptions
from pipelines.stories import (
    WATCH_S,
    MaterializeStories,
    StoriesOptions,
    _StoryApplier,
    expired_message,
    job_options,
    timer_wakeups,
)
from schemas.events import PostEvent, PostEventKind, StoryEvent, StoryEventKind
from schemas.records import EventBatch
from schemas.stories import StoryExpired, StoryOutcome
from stores.config import StoreConfig

P, V, D = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


def test_options_give_the_policy_and_the_shared_store_flags_the_stores():
    options = PipelineOptions(["--redis_url=redis://h:1/2", "--grace_s=30",
                               "--max_story_life_h=2", "--cassandra_keyspace=ks"])
    assert options.view_as(StoriesOptions).policy() == StoryPolicy(30_000, 7_200_000)
    assert dataclasses.replace(options.view_as(StoreOptions).config(),
                               restore_log=None) == StoreConfig(
        "redis://h:1/2", "fb", "127.0.0.1", 9042, "ks")
    defaults = PipelineOptions([]).view_as(StoriesOptions)
    assert (defaults.policy(), defaults.stories_max_batches, defaults.expiry_shards,
            defaults.expired_topic, defaults.no_sweep) == (StoryPolicy(), 8, 4, None, False)


def test_wakeups_carry_the_earliest_written_expiry_per_timer_key_and_hour():
    t = 1000 * HOUR_MS

    def outcome(story, action, expires):
        return StoryOutcome(f"e{story}", action, story, 1, expires, 0)

    outcomes = (outcome(16, "published", t + 50), outcome(32, "published", t + 10),
                outcome(48, "published", t + HOUR_MS + 5),   # the next hour: its own wakeup
                outcome(1, "published", t + 99), outcome(2, "tombstoned", t + 1),
                outcome(3, "viewed", t + 2), outcome(5, "deleted", t + 3))
    # 16, 32, 48 are index shard 0 (key 0 of 4); 1 and 5 are key 1; 2 and 3 key 2, 3.
    assert timer_wakeups(outcomes, 4) == [(0, t + 10), (0, t + HOUR_MS + 5), (1, t + 99)]
    assert timer_wakeups(outcomes, 1) == [(0, t + 10), (0, t + HOUR_MS + 5)]


def test_timer_keys_own_whole_index_shards():
    for shards in (1, 3, 4, 16):
        owned = [index_shards_of(k, shards) for k in range(shards)]
        assert sorted(s for o in owned for s in o) == list(range(16))
        for story in range(1000, 1100):
            assert story % 16 in owned[timer_shard(story, shards)]
    for bad in (0, 17):
        with pytest.raises(ValueError):
            MaterializeStories(StoreConfig(), expiry_shards=bad)


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


def batch(*events) -> EventBatch:
    n = len(events)
    return EventBatch("story-events", 0, list(events), [1] * n, list(range(n)), [None] * n,
                      [b""] * n)


def test_the_applier_applies_event_batches_at_once_and_counts_once_written():
    writer, counts = _FakeWriter(fail_once=True), _Counts()
    applier = _StoryApplier(writer, counts)
    batches = [batch(StoryEvent("a", 1, P, 1, 1),
                     PostEvent("p", 1, PostEventKind.CREATED, 1, 1, 1),
                     StoryEvent("b", 2, V, 1, 1, viewer_id=3)),
               batch(),
               batch(StoryEvent("c", 3, P, 2, 1))]
    with pytest.raises(TimeoutError):
        applier.apply(batches)
    assert counts.counts == {}       # the sink retries the batch: count it once, when written
    outcomes = applier.apply(batches)
    assert [[(o.event_id, o.action) for o in per] for per in outcomes] == [
        [("a", "published"), ("b", "view_unknown")], [], [("c", "published")]]
    # One writer call for all the batches' story events, in order.
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
