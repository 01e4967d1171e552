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
from schemas.events import MediaType, PostEvent, PostEventKind, StoryEvent, StoryEventKind
from schemas.records import EventBatch
from schemas.stories import StoryDurableWrites, StoryExpired, StoryOutcome, decode_story_writes
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
            defaults.expired_topic, defaults.no_sweep) == (StoryPolicy(), 50, 4, None, False)


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
    """``StoryWriter``'s two steps as far as the applier sees them: every publish is
    accepted, every view unknown; fails transiently once if told."""

    def __init__(self, fail_once: bool = False):
        self.fail_once = fail_once
        self.applied: list[list[StoryEvent]] = []
        self.durable: list[StoryDurableWrites] = []

    def apply_to_redis(self, events, redis_whole=None):
        self.applied.append(list(events))
        if self.fail_once:
            self.fail_once = False
            raise TimeoutError("transient")
        outcomes = [StoryOutcome(e.event_id, "published" if e.kind is P else "view_unknown",
                                 e.story_id, e.author_id, None, e.event_time) for e in events]
        return outcomes, StoryDurableWrites(tuple(e for e in events if e.kind is P))

    def write_durable(self, writes):
        self.durable.append(writes)


class _FakeLog:
    """``LogWriter`` as far as the applier sees it: what it was given to deliver."""

    def __init__(self):
        self.values: list[bytes] = []

    def write(self, values):
        self.values += values


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
                             "events_view_unknown": 1, "durable_writes": 2}
    # Inline: Cassandra's writes in the same batch, those the Redis step decided.
    assert [[e.event_id for e in w.publishes] for w in writer.durable] == [["a", "c"]]


def test_with_a_durable_log_the_applier_logs_the_cassandra_writes_instead():
    writer, log = _FakeWriter(), _FakeLog()
    applier = _StoryApplier(writer, _Counts(), log_writer=log)
    applier.apply([batch(StoryEvent("a", 1, P, 1, 1, created_at=1, media_type=MediaType.PHOTO),
                         StoryEvent("b", 2, V, 1, 1, viewer_id=3)),
                   batch(StoryEvent("c", 3, P, 2, 1))])
    assert writer.durable == []
    [writes] = [decode_story_writes(v) for v in log.values]
    assert [(e.story_id, e.event_time, e.media_type) for e in writes.publishes] == [
        (1, 1, MediaType.PHOTO), (2, 3, None)]
    assert writes.views == () and writes.removals == ()


class _FakeCassandra:
    """``CassandraStoryStore.write_decided`` as the durable applier calls it; the stored
    viewers of a deleted story are ``[99]``."""

    def __init__(self):
        self.calls = []

    def write_decided(self, writes, now_ms):
        removals = [dataclasses.replace(r, viewers=(*r.viewers, 99)) if r.deleted else r
                    for w in writes for r in w.removals]
        self.calls.append(([e.story_id for w in writes for e in w.publishes],
                           [e.story_id for w in writes for e, _, _ in w.views],
                           [(r.story_id, r.viewers) for r in removals]))


def test_the_durable_applier_writes_in_chunks_and_returns_what_each_batch_published():
    from pipelines.stories import _StoryDurableApplier
    from schemas.stories import DurableRemoval

    def pub(story, at, expires=None):
        return StoryEvent("", at, P, story, 1, created_at=at, expires_at=expires)

    view = (StoryEvent("", 5, V, 1, 1, viewer_id=9), 1, 10**6)
    first = [StoryDurableWrites((pub(1, 5, 99),), (view,)),
             StoryDurableWrites((), (), (DurableRemoval(7, 1, 50), DurableRemoval(
                 8, 1, 60, (3,), deleted=True)))]
    second = [StoryDurableWrites((pub(2, 6), pub(3, 7, 77)))]
    cassandra = _FakeCassandra()
    applier = _StoryDurableApplier(cassandra, chunk=3)
    published = applier.apply([first, second])
    # Per record batch, each publish with its expiry (its own, else created + 24 h).
    assert published == [((1, 99),), ((2, 6 + 24 * HOUR_MS), (3, 77))]
    # Chunks close once they hold 3 writes: every write once, in order; a delete's
    # removal with the viewers Cassandra keeps too.
    assert cassandra.calls == [([1], [1], [(7, ()), (8, (3, 99))]), ([2, 3], [], [])]


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


def test_the_durable_step_gives_way_while_the_redis_step_drains_and_no_longer():
    from stores.kafka.lag import wait_while_behind
    from tests.unit.test_redis_healer import Clock

    def run(reads, **kw):
        clock, it = Clock(), iter(reads)
        args = dict(max_behind=100, max_wait_s=30.0, stall_s=5.0, poll_s=1.0)
        args.update(kw)
        return wait_while_behind(lambda: next(it), clock=clock, sleep=clock.sleep, **args)

    # Within reach at once: no wait.
    assert run([(100, (5,))]) == (0, None)
    # Behind and draining (offsets moving): waits until within reach.
    assert run([(900, (1,)), (600, (4,)), (300, (7,)), (50, (9,))]) == (3.0, None)
    # Behind but not moving (stopped, or waiting for a restore itself): gives up
    # after stall_s and says where it stalled ...
    assert run([(900, (1,))] * 10) == (5.0, (1,))
    # ... so the next batch does not wait again while it stays there (a restore that
    # waits for this step would otherwise get one batch per stall_s) ...
    assert run([(900, (1,))] * 10, stalled_at=(1,)) == (0, (1,))
    # ... and waits again once it moves.
    assert run([(900, (2,)), (900, (3,)), (90, (4,))], stalled_at=(1,)) == (2.0, None)
    # Draining a long backlog: never more than max_wait_s per batch.
    assert run([(900, (i,)) for i in range(100)], max_wait_s=12.0) == (12.0, None)
