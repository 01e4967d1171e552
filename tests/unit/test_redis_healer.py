"""The jobs' check for a Redis that lost its data (``stores.restore.RedisHealer``) and the
fan-out's use of it, on an in-memory stand-in for the generation marker and its lock:
one restorer at a time, the others wait for its token, a failed restore is a transient
error, and a batch Redis was lost under is applied again before its durable copy."""
from __future__ import annotations

import pytest

from pipelines.fanout import _FanoutApplier
from stores.fanout import FanoutBatch
from stores.restore import RedisHealer, RedisNotRestored
from stores.retry import is_transient


class _Keys:
    prefix = "t"


class FakeGeneration:
    """``RedisGeneration`` in memory: ``token`` is the marker, ``holder`` the lock."""

    lock_ttl_ms = 60_000
    keys = _Keys()

    def __init__(self, token: str | None = None):
        self.token = token
        self.holder: str | None = None
        self.marks = 0
        self.reads = 0

    def read(self):
        self.reads += 1
        return self.token

    def mark(self, token=None):
        self.marks += 1
        self.token = token or f"g{self.marks}"
        return self.token

    def try_lock(self, holder):
        if self.holder is None:
            self.holder = holder
            return True
        return False

    def extend(self, holder):
        return self.holder == holder

    def unlock(self, holder):
        if self.holder == holder:
            self.holder = None


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def healer(generation, restore, clock=None, wait_s=10.0):
    clock = clock or Clock()
    return RedisHealer(generation, restore, poll_s=1.0, wait_s=wait_s, clock=clock,
                       sleep=clock.sleep)


def test_a_marked_redis_costs_one_read_and_no_restore():
    generation, restored = FakeGeneration("g0"), []
    h = healer(generation, restored.append)
    assert h.check() == "g0" and generation.reads == 1 and restored == [] and h.restores == 0


def test_a_lost_redis_is_restored_under_the_lock_then_marked():
    generation = FakeGeneration(None)
    seen = []

    def restore(bar):
        seen.append(generation.holder)   # restored while holding the lock
        bar.update(3)

    h = healer(generation, restore)
    token = h.check()
    assert token == generation.token == "g1" and h.restores == 1
    assert seen and seen[0] is not None and generation.holder is None  # released after


def test_a_job_that_finds_the_lock_taken_waits_for_the_token():
    generation = FakeGeneration(None)
    generation.holder = "another job"
    clock = Clock()

    def sleep(s):  # the other job finishes its restore while we wait
        clock.now += s
        if clock.now >= 3:
            generation.token, generation.holder = "theirs", None

    h = RedisHealer(generation, lambda bar: pytest.fail("restored twice"), poll_s=1.0,
                    wait_s=10.0, clock=clock, sleep=sleep)
    assert h.check() == "theirs" and h.restores == 0


def test_waiting_too_long_or_a_failed_restore_is_a_transient_error():
    generation = FakeGeneration(None)
    generation.holder = "a job that hangs"
    with pytest.raises(RedisNotRestored) as waited:
        healer(generation, lambda bar: None, wait_s=5.0).check()
    assert is_transient(waited.value)

    def broken(bar):
        raise ValueError("no such table")

    generation = FakeGeneration(None)
    with pytest.raises(RedisNotRestored, match="no such table") as failed:
        healer(generation, broken).check()
    # Retried, never dead-lettered: nothing is wrong with the batch's records.
    assert is_transient(failed.value)
    assert generation.token is None and generation.holder is None


def test_a_restore_that_lost_its_lock_midway_runs_again():
    generation = FakeGeneration(None)
    runs = []

    def restore(bar):
        runs.append(1)
        if len(runs) == 1:
            generation.holder = None   # Redis lost again: the lock went with it

    h = healer(generation, restore)
    assert h.check() == "g1" and len(runs) == 2 and generation.marks == 1


class FakeFanout:
    """``FeedFanout.apply_to_redis`` that loses Redis (the marker) during chosen calls."""

    def __init__(self, generation: FakeGeneration, lose_on: set[int]):
        self.generation, self.lose_on, self.calls = generation, lose_on, 0

    def apply_to_redis(self, events):
        self.calls += 1
        if self.calls in self.lose_on:
            self.generation.token = None
        return FanoutBatch([None] * len(events))


def test_a_batch_redis_was_lost_under_is_applied_again_after_the_restore():
    generation = FakeGeneration("g0")
    restores = []
    fanout = FakeFanout(generation, lose_on={1})
    applier = _FanoutApplier.__new__(_FanoutApplier)
    applier._fanout = fanout
    applier._healer = healer(generation, restores.append)
    applier._counters = type("C", (), {"inc": lambda self, name, n=1: None})()
    batch = applier._apply_to_redis(["e1", "e2"])
    # Applied, lost, restored, applied again on the new generation.
    assert fanout.calls == 2 and len(restores) == 1 and generation.token == "g1"
    assert len(batch.outcomes) == 2


def test_a_batch_another_job_restored_under_is_applied_again_without_a_restore():
    generation = FakeGeneration("g0")

    class Swapping(FakeFanout):
        def apply_to_redis(self, events):
            self.calls += 1
            if self.calls == 1:
                generation.token = "restored by the stories job"
            return FanoutBatch([None] * len(events))

    fanout = Swapping(generation, set())
    applier = _FanoutApplier.__new__(_FanoutApplier)
    applier._fanout = fanout
    applier._healer = healer(generation, lambda bar: pytest.fail("not ours to restore"))
    applier._counters = type("C", (), {"inc": lambda self, name, n=1: None})()
    applier._apply_to_redis(["e1"])
    assert fanout.calls == 2


def test_a_story_batch_redis_was_lost_under_reaches_cassandra_from_the_restored_redis():
    """The stories' Cassandra writes follow from the batch's Redis results: results
    made while Redis was lost (a view of a story Redis no longer held) must not decide
    them; the batch is written to Redis again after the restore."""
    from schemas.events import StoryEvent, StoryEventKind
    from stores.stories import StoryWriter

    generation, steps = FakeGeneration("g0"), []

    class Redis:
        def apply(self, events, now, fallback):
            steps.append("redis")
            if steps.count("redis") == 1:
                generation.token = None  # lost while the batch was written
                return ["lost"] * len(events)
            return ["published"] * len(events)

    class Cassandra:
        def write_decided(self, writes, now):
            steps.append(("cassandra", sum(len(w.publishes) for w in writes)))

    writer = StoryWriter(Redis(), Cassandra(), clock=lambda: 0)
    h = healer(generation, lambda bar: steps.append("restore"))
    event = StoryEvent("s1", 0, StoryEventKind.PUBLISHED, 9, 4, created_at=0)
    [outcome] = writer.apply([event], redis_whole=h.write_whole)
    assert steps == ["redis", "restore", "redis", ("cassandra", 1)]
    assert outcome.action == "published" and h.reruns == 1 and h.restores == 1


# -- run_whole: the features and ranking jobs' check -----------------------------------


def test_run_whole_reads_the_marker_once_per_call_while_redis_keeps_it():
    generation = FakeGeneration("g0")
    h = healer(generation, lambda bar: None)
    assert [h.run_whole(lambda: n) for n in range(3)] == [0, 1, 2]
    # One read before the first call, then one after each call's work.
    assert generation.reads == 4 and h.reruns == 0 and h.restores == 0


def test_work_redis_was_lost_under_runs_again_on_the_restored_redis():
    generation, runs = FakeGeneration("g0"), []
    h = healer(generation, lambda bar: runs.append("restore"))

    def work():
        runs.append("work")
        if len(runs) == 1:
            generation.token = None  # lost while the work read it
        return len(runs)

    assert h.run_whole(work) == 3
    assert runs == ["work", "restore", "work"]
    assert h.restores == 1 and h.reruns == 1 and generation.token == "g1"


def test_a_restore_by_another_job_between_two_calls_is_noticed():
    generation, runs = FakeGeneration("g0"), []
    h = healer(generation, lambda bar: runs.append("restore"))
    h.run_whole(lambda: runs.append("first"))
    generation.token = "restored-by-the-fan-out"   # lost and restored since the last call
    h.run_whole(lambda: runs.append("work"))
    assert runs == ["first", "work", "work"]      # run again: its reads may be of the loss
    assert h.reruns == 1 and h.restores == 0


class FakeRanked:
    def __init__(self):
        self.written = []

    def write_many(self, feeds):
        self.written.append(list(feeds))


def test_the_ranker_writes_only_a_ranking_made_on_a_whole_redis():
    from domain.ranking import RankingPolicy
    from schemas.ranked import RankedFeed
    from schemas.ranking import RefreshRequest
    from stores.ranker import FeedRanker, Ranking

    generation = FakeGeneration("g0")
    h = healer(generation, lambda bar: None)
    ranked = FakeRanked()
    ranker = FeedRanker(None, None, ranked, None, RankingPolicy(), clock=lambda: 1.0, healer=h)
    ranks = []

    def rank(requests, now_ms):
        ranks.append(now_ms)
        if len(ranks) == 1:
            generation.token = None  # the candidates came from a Redis being wiped
        cols = type("Cols", (), {"offsets": [0, 0], "unstored": None})()
        return Ranking(f"v{len(ranks)}", cols, [RankedFeed(7, (), f"v{len(ranks)}", now_ms)])

    ranker.rank = rank
    outcomes = ranker.refresh([RefreshRequest(7, 500)])
    assert len(ranks) == 2 and h.restores == 1
    assert [[f.model_version for f in feeds] for feeds in ranked.written] == [["v2"]]
    assert [o.model_version for o in outcomes] == ["v2"]


def test_triggers_are_queued_again_when_redis_was_lost_under_them():
    from domain.ranking import RankingPolicy
    from stores.ranker import TriggerWriter

    generation, calls = FakeGeneration("g0"), []
    h = healer(generation, lambda bar: calls.append("restore"))
    writer = TriggerWriter(None, None, None, RankingPolicy(), healer=h)

    def apply(events):
        calls.append(list(events))
        if len(calls) == 1:
            generation.token = None  # the audiences read were of a wiped graph
        return "result"

    writer._apply = apply
    assert writer.apply([1, 2]) == "result"
    assert calls == [[1, 2], "restore", [1, 2]]


# -- the fan-out's restore waits for its durable log ------------------------------------


def test_waiting_for_a_group_ends_when_it_commits_the_targets_or_at_the_timeout():
    from stores.kafka.lag import wait_caught_up

    targets = {("log", 0): 10, ("log", 1): 4, ("log", 2): 0}
    commits = iter([{("log", 0): 3}, {("log", 0): 8, ("log", 1): 4},
                    {("log", 0): 10, ("log", 1): 4}])
    clock, polls = Clock(), []
    behind = wait_caught_up(lambda: next(commits), targets, timeout_s=10.0, poll_s=1.0,
                            on_poll=lambda: polls.append(clock.now), clock=clock,
                            sleep=clock.sleep)
    assert behind == 0 and polls == [0.0, 1.0]   # partition 2 is empty: nothing to wait for
    clock = Clock()
    behind = wait_caught_up(lambda: {("log", 0): 7}, targets, timeout_s=3.0, poll_s=1.0,
                            clock=clock, sleep=clock.sleep)
    assert behind == 3 + 4 and clock.now == 3.0


class FakeCatchUp:
    group, topics, timeout_s = "g-durable", ("fanout-durable",), 5.0

    def __init__(self, steps: list, behind: int = 0):
        self.steps, self.behind = steps, behind

    def each(self):
        return [self]

    def wait(self, on_poll):
        on_poll()
        self.steps.append("wait")
        return self.behind


@pytest.mark.parametrize("behind", [0, 12])
def test_the_restore_reads_cassandra_after_the_durable_log_is_applied(monkeypatch, behind):
    import contextlib

    from stores import restore as restore_module
    from stores.config import StoreConfig
    from stores.restore import CassandraRestore

    steps, bar_updates = [], []

    @contextlib.contextmanager
    def open_restore(stores, settings):
        steps.append("open")
        yield "ctx"

    monkeypatch.setattr(restore_module, "open_restore", open_restore)
    monkeypatch.setattr(restore_module, "restore",
                        lambda ctx, views, progress: steps.append("restore") or {})

    class Bar:
        def update(self, n=1):
            bar_updates.append(n)

    CassandraRestore(StoreConfig(), catch_up=FakeCatchUp(steps, behind))(Bar())
    # Waited first (keeping the lock: bar updates), then read; a timeout only logs.
    assert steps == ["wait", "open", "restore"] and bar_updates == [0]


def test_the_fan_out_waits_for_its_durable_group_only_with_a_durable_log():
    from pipelines.io.durable_log import DurableLog
    from stores.kafka.lag import LogCatchUp

    producer = {"bootstrap.servers": "k:9092"}
    assert DurableLog("t.fanout-durable", producer).catch_up() is None
    assert DurableLog("t.fanout-durable", producer, "g-durable", 0).catch_up() is None
    assert DurableLog("t.fanout-durable", producer, "g-durable", 30).catch_up() == LogCatchUp(
        "k:9092", "g-durable", ("t.fanout-durable",), 30)


@pytest.mark.parametrize("pipeline", ["stories", "features", "ranking"])
def test_every_job_s_restore_waits_for_the_durable_logs(pipeline):
    """A restore run by the stories, features or ranking job reads Cassandra only after
    the fan-out's and the stories' durable steps applied their logs, as one run by
    the fan-out does."""
    import importlib

    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.common import StoreOptions
    from stores.kafka.lag import LogCatchUp
    from stores.restore import RestoreSettings, open_healer

    importlib.import_module(f"pipelines.{pipeline}")
    args = ["--kafka_bootstrap=k:9092", "--topic_prefix=t.", f"--consumer_group=g-{pipeline}"]
    stores = PipelineOptions(args).view_as(StoreOptions).config()
    expected = LogCatchUp("k:9092", "feedbeam-fanout-durable", ("t.fanout-durable",), 60.0,
                          also=(LogCatchUp("k:9092", "feedbeam-stories-durable",
                                           ("t.stories-durable",), 60.0),))
    assert stores.restore_log == expected
    class Client:  # what RedisGeneration needs of a redis-py client at construction
        def register_script(self, text):
            return text

    healer = open_healer(stores, RestoreSettings(), Client())
    assert healer._restore.catch_up == expected
    renamed = PipelineOptions(args + ["--fanout_consumer_group=f1", "--restore_log_wait_s=5",
                                      "--stories_consumer_group=s1"])
    assert [(w.group, w.topics, w.timeout_s) for w in
            renamed.view_as(StoreOptions).config().restore_log.each()] == [
        ("f1-durable", ("t.fanout-durable",), 5.0), ("s1-durable", ("t.stories-durable",), 5.0)]
    off = PipelineOptions(args + ["--restore_log_wait_s=0"])
    assert off.view_as(StoreOptions).config().restore_log is None


def test_the_fan_out_job_passes_its_durable_group_and_wait():
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import common, fanout

    captured = []
    original = fanout.FanOutToFollowerFeeds.__init__

    def capture(self, stores, policy, max_batch=500, freshness_log_s=60.0, durable_log=None):
        captured.append((durable_log, stores.restore_log))
        original(self, stores, policy, max_batch, freshness_log_s, durable_log)

    options = PipelineOptions(["--consumer_group=g1", "--restore_log_wait_s=7",
                               "--topic_prefix=t."])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fanout, "ensure_log_topics", lambda *a, **k: [])
        m.setattr(fanout.FanOutToFollowerFeeds, "__init__", capture)
        fanout.build(beam.Pipeline(options=options), options)
    [(durable, wait)] = captured
    assert (durable.topic, durable.group, durable.restore_wait_s) == (
        "t.fanout-durable", "g1" + common.DURABLE_GROUP_SUFFIX, 7.0)
    # Its restore waits for its own durable group, then for the stories' log.
    assert [(w.group, w.topics, w.timeout_s) for w in wait.each()] == [
        ("g1-durable", ("t.fanout-durable",), 7.0),
        ("feedbeam-stories-durable", ("t.stories-durable",), 7.0)]


@pytest.mark.parametrize("copy", ["log", "inline"])
def test_the_stories_job_passes_its_durable_log_and_waits_for_its_own_group(copy):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import stories

    captured = []
    original = stories.MaterializeStories.__init__

    def capture(self, stores, *args, **kwargs):
        captured.append((stores.restore_log, kwargs["durable"]))
        original(self, stores, *args, **kwargs)

    options = PipelineOptions(["--consumer_group=s1", "--restore_log_wait_s=7",
                               "--topic_prefix=t.", f"--durable_copy={copy}"])
    with pytest.MonkeyPatch.context() as m:
        m.setattr(stories, "ensure_log_topics", lambda *a, **k: [])
        m.setattr(stories.MaterializeStories, "__init__", capture)
        stories.build(beam.Pipeline(options=options), options)
    [(wait, durable)] = captured
    fanout_wait = ("feedbeam-fanout-durable", ("t.fanout-durable",), 7.0)
    if copy == "inline":
        assert durable is None
        assert [(w.group, w.topics, w.timeout_s) for w in wait.each()] == [fanout_wait]
        return
    assert (durable.log.topic, durable.log.group, durable.source.consumer_config["group.id"],
            durable.source.start_from) == (
        "t.stories-durable", "s1-durable", "s1-durable", "committed")
    assert [(w.group, w.topics, w.timeout_s) for w in wait.each()] == [
        ("s1-durable", ("t.stories-durable",), 7.0), fanout_wait]
