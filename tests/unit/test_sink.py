"""The batching store sink's error barrier (``pipelines.io.sink``), with a stand-in applier and
dead-letter producer: a permanent error is isolated to the elements at fault, which go to the
DLQ; the rest is applied; transient errors are still retried; a store at fault fails loudly."""
from __future__ import annotations

import pickle

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as _TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from pipelines.io import sink
from pipelines.io.sink import ApplyInBatches, BatchSinkFn, DeadLetterTarget
from schemas.codec import WireCodec
from schemas.events import FollowEvent, FollowKind, PostEvent, PostEventKind
from schemas.records import UNKNOWN, EventBatch
from stores.retry import RetryPolicy

T0 = 1_700_000_000_000
NS = "feedbeam.test"
NO_WAIT = RetryPolicy(attempts=3, first_delay_s=0.0, max_delay_s=0.0)


class Poison(ValueError):
    """What a store raises for one bad element (say Cassandra's InvalidRequest)."""


class StoreDown(Exception):
    """A permanent error of the store itself, whatever the elements."""


def _poisoned(element) -> bool:
    if isinstance(element, EventBatch):
        return any(_poisoned(e) for e in element.events)
    return getattr(element, "event_id", str(element)).startswith("bad")


class FakeApplier:
    """Applies a batch unless it holds a poisoned element (then nothing of it is applied).

    ``transient``: how many calls fail with a transient error first; ``down``:
    every call fails with ``StoreDown``.
    """

    def __init__(self, transient: int = 0, down: bool = False):
        self.applied: list = []
        self.calls = 0
        self.transient = transient
        self.down = down

    def apply(self, batch):
        import redis

        self.calls += 1
        if self.transient:
            self.transient -= 1
            raise redis.ConnectionError("blip")
        if self.down:
            raise StoreDown("keyspace does not exist")
        if any(_poisoned(e) for e in batch):
            raise Poison("Batch too large")
        self.applied.extend(batch)
        return [("ok", e) for e in batch]

    def close(self):
        pass


class FakeApplierConfig:
    def __init__(self, applier: FakeApplier):
        self.applier = applier

    def open(self):
        return self.applier


class FakeDeadLetters:
    """Stands in for ``DeadLetterProducer``: records what is sent and settled."""

    instances: list["FakeDeadLetters"] = []

    def __init__(self, producer_config):
        self.config = producer_config
        self.sent = []
        self.settled = []
        FakeDeadLetters.instances.append(self)

    def send(self, letter):
        self.sent.append(letter)

    def settle(self):
        self.settled.append(len(self.sent))

    def reset(self):
        pass

    def close(self):
        pass


@pytest.fixture
def dead_letters(monkeypatch):
    FakeDeadLetters.instances.clear()
    monkeypatch.setattr(sink, "DeadLetterProducer", FakeDeadLetters)
    return FakeDeadLetters.instances


TARGET = DeadLetterTarget({"bootstrap.servers": "x"}, topic_prefix="t1.")


def _follow(i: int, event_id: str | None = None) -> FollowEvent:
    return FollowEvent(event_id or f"f{i}", T0 + i, FollowKind.FOLLOW, i, 1000 + i)


def _run(fn: BatchSinkFn, elements) -> list:
    """One bundle through ``fn``: the outputs' values."""
    fn.setup()
    fn.start_bundle()
    out = []
    for e in elements:
        out += list(fn.process(e, Timestamp(micros=T0 * 1000), GlobalWindow()))
    out += list(fn.finish_bundle())
    return [wv.value for wv in out]


def test_one_poisonous_event_goes_to_the_dlq_and_the_rest_is_applied(dead_letters):
    applier = FakeApplier()
    events = [_follow(i) for i in range(10)]
    events[6] = _follow(6, "bad-6")
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, max_batch=100, retry=NO_WAIT,
                     dead_letters=TARGET)
    outputs = _run(fn, events)
    good = [e for e in events if not _poisoned(e)]
    assert sorted(applied.event_id for applied in applier.applied) == sorted(
        e.event_id for e in good)
    assert sorted(o[1].event_id for o in outputs) == sorted(e.event_id for e in good)
    (producer,) = dead_letters
    (letter,) = producer.sent
    # A bare event has no bytes and no coordinates: re-encoded, marked unknown.
    assert (letter.topic, letter.partition, letter.offset) == ("t1.follow-events", UNKNOWN,
                                                               UNKNOWN)
    assert WireCodec().decode(letter.value) == events[6] and letter.key == events[6].key
    assert (letter.step, letter.reason) == (NS, sink.APPLY_FAILED)
    assert "Poison" in letter.error and "Batch too large" in letter.error
    assert letter.dlq_topic == "t1.follow-events.dlq"
    assert producer.settled == [1]  # written before the bundle ends
    # Isolation is a bisection, not one call per element.
    assert applier.calls < 2 * len(events)


def test_an_event_batch_is_split_down_to_the_bad_record_with_its_original_bytes(dead_letters):
    codec = WireCodec()
    events = [_follow(i) for i in range(7)]
    events[3] = _follow(3, "bad-3")
    values = [codec.encode(e) for e in events]
    batch = EventBatch("t1.follow-events", 2, events, [T0 + i for i in range(7)],
                       [100 + i for i in range(7)], [e.key for e in events], values)
    applier = FakeApplier()
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, retry=NO_WAIT, dead_letters=TARGET)
    outputs = _run(fn, [batch])
    applied = [e for part in applier.applied for e in part.events]
    assert [e.event_id for e in applied] == [e.event_id for i, e in enumerate(events) if i != 3]
    # One output per applied part, each carrying the part it came from.
    assert sorted(e.event_id for _, part in outputs for e in part.events) == sorted(
        e.event_id for e in applied)
    (letter,) = dead_letters[0].sent
    assert (letter.topic, letter.partition, letter.offset, letter.value) == (
        "t1.follow-events", 2, 103, values[3])


def test_an_element_that_is_no_event_goes_to_the_namespace_dlq(dead_letters):
    applier = FakeApplier()
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, retry=NO_WAIT, dead_letters=TARGET)
    _run(fn, ["ok-1", "bad-request", "ok-2"])
    assert applier.applied == ["ok-1", "ok-2"]
    (letter,) = dead_letters[0].sent
    assert letter.dlq_topic == f"t1.{NS}.dlq" and letter.value == repr("bad-request").encode()
    assert letter.offset == UNKNOWN


def test_transient_errors_are_retried_whole_not_isolated(dead_letters):
    applier = FakeApplier(transient=2)
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, retry=NO_WAIT, dead_letters=TARGET)
    _run(fn, [_follow(i) for i in range(4)])
    assert applier.calls == 3 and len(applier.applied) == 4
    assert dead_letters[0].sent == []
    # Past the policy's attempts the transient error fails the bundle, nothing dead-lettered.
    import redis

    applier = FakeApplier(transient=10)
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, retry=NO_WAIT, dead_letters=TARGET)
    with pytest.raises(redis.ConnectionError):
        _run(fn, [_follow(1)])
    assert dead_letters[1].sent == []


def test_without_a_target_a_permanent_error_fails_the_bundle_as_before():
    applier = FakeApplier()
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, retry=NO_WAIT)
    with pytest.raises(Poison):
        _run(fn, [_follow(1), _follow(2, "bad-2")])
    assert applier.applied == [] and applier.calls == 1


def test_a_store_failing_every_element_fails_loudly_instead_of_dead_lettering_the_stream(
        dead_letters):
    applier = FakeApplier(down=True)
    target = DeadLetterTarget({"bootstrap.servers": "x"}, max_consecutive=5)
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, max_batch=100, retry=NO_WAIT,
                     dead_letters=target)
    with pytest.raises(RuntimeError, match="6 elements in a row.*StoreDown"):
        _run(fn, [_follow(i) for i in range(20)])
    assert len(dead_letters[0].sent) == 5


def test_a_success_between_poisonous_elements_resets_the_breaker(dead_letters):
    applier = FakeApplier()
    target = DeadLetterTarget({"bootstrap.servers": "x"}, max_consecutive=2)
    fn = BatchSinkFn(FakeApplierConfig(applier), NS, max_batch=2, retry=NO_WAIT,
                     dead_letters=target)
    elements = []
    for i in range(5):  # batches of two: one bad, one good
        elements += [_follow(i, f"bad-{i}"), _follow(100 + i)]
    _run(fn, elements)
    assert len(dead_letters[0].sent) == 5 and len(applier.applied) == 5


def test_the_target_from_pipeline_options_uses_the_kafka_settings_and_prefix():
    options = PipelineOptions(["--kafka_bootstrap=h:1", "--topic_prefix=p.",
                               "--consumer_config=security.protocol=SSL",
                               "--consumer_config=session.timeout.ms=9000"])
    target = DeadLetterTarget.from_options(options)
    assert target.topic_prefix == "p."
    assert target.producer_config["bootstrap.servers"] == "h:1"
    assert target.producer_config["security.protocol"] == "SSL"
    assert "group.id" not in target.producer_config  # consumer-only settings stay out
    assert "session.timeout.ms" not in target.producer_config
    with pytest.raises(ValueError, match="dead_letters"):
        ApplyInBatches(FakeApplierConfig(FakeApplier()), NS, dead_letters="kafka")


def test_the_fn_pickles_its_target_and_not_its_clients(dead_letters):
    fn = BatchSinkFn(FakeApplierConfig(FakeApplier()), NS, dead_letters=TARGET)
    clone = pickle.loads(pickle.dumps(fn))
    assert clone._target == TARGET
    assert not hasattr(clone, "_dlq")


class _Count(beam.DoFn):
    def process(self, element):
        yield element[1].event_id


def test_apply_in_batches_on_a_pipeline_with_the_target_from_its_options(dead_letters):
    # The runner applies with its own copy of the applier; the outputs and the
    # stand-in producer (one class, in this process) show what happened.
    applier = FakeApplier()
    events = [PostEvent(f"p{i}", T0 + i, PostEventKind.CREATED, i, 7, T0 + i) for i in range(6)]
    events[2] = PostEvent("bad-2", T0 + 2, PostEventKind.CREATED, 2, 7, T0 + 2)
    options = PipelineOptions(["--runner=FnApiRunner", "--topic_prefix=x."])
    with _TestPipeline(options=options) as p:
        out = (p | beam.Create(events)
               | ApplyInBatches(FakeApplierConfig(applier), NS, dead_letters=sink.FROM_OPTIONS)
               | beam.ParDo(_Count()))
        assert_that(out, equal_to([e.event_id for e in events if e.event_id != "bad-2"]))
    letters = [letter for producer in dead_letters for letter in producer.sent]
    assert [(d.topic, WireCodec().decode(d.value).event_id) for d in letters] == [
        ("x.post-events", "bad-2")]


def test_partial_polls_apply_early_once_the_source_caught_up_and_not_in_a_backlog():
    from pipelines.io.sink import PartialPolls

    class Poll:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

    early = PartialPolls(full=1000, after=3)
    assert not early([Poll(1000), Poll(5)])               # fewer than `after` buffered
    assert early([Poll(1000), Poll(5), Poll(7)])
    assert not early([Poll(1000)] * 40)                   # a backlog fills max_batch
    assert early([Poll(1000)] * 40 + [Poll(999)])         # its end is applied at once
