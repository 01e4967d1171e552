"""The Kafka sink DoFn's delivery checks and retries, against a scripted fake producer.

The real producer is exercised in ``tests/integration/test_kafka_write.py``;
here a fake decides each delivery's fate so every retry path runs in
milliseconds and deterministically.
"""
from __future__ import annotations

import dataclasses
import pickle

import confluent_kafka
import pytest
from confluent_kafka import KafkaError, KafkaException

from pipelines.io import kafka_write
from pipelines.io.kafka_write import KafkaMessage, WriteToKafka, _KafkaWriteFn, is_transient

TIMEOUT = KafkaError(KafkaError._MSG_TIMED_OUT)
UNKNOWN = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
TOO_LARGE = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)


class FakeProducer:
    """Queues produced messages; ``flush``/``poll`` deliver them per ``fates``.

    ``fates[value]`` is a list of errors (None = delivered) consumed one per
    attempt; a value without fates is delivered.
    """

    instances: list["FakeProducer"] = []

    def __init__(self, config, fates=None, full_once=False, refuse=None):
        self.config = config
        self.fates = {k: list(v) for k, v in (fates or {}).items()}
        self.full_once = full_once
        self.refuse = refuse
        self.queue: list = []
        self.produced: list[tuple[str, bytes]] = []
        self.polls = 0
        FakeProducer.instances.append(self)

    def produce(self, topic, key=None, value=None, headers=None, on_delivery=None,
                timestamp=None):
        if self.full_once:
            self.full_once = False
            raise BufferError("Local: Queue full")
        if self.refuse is not None:
            raise KafkaException(self.refuse)
        self.produced.append((topic, value))
        self.queue.append((value, on_delivery))

    def poll(self, timeout=0):
        self.polls += 1
        self._deliver()
        return 0

    def flush(self, timeout=None):
        self._deliver()
        return 0

    def _deliver(self):
        queue, self.queue = self.queue, []
        for value, callback in queue:
            fates = self.fates.get(value)
            callback(fates.pop(0) if fates else None, None)


def _fn(monkeypatch, max_retries=3, resize=None, **fake) -> _KafkaWriteFn:
    FakeProducer.instances.clear()
    monkeypatch.setattr(confluent_kafka, "Producer", lambda config: FakeProducer(config, **fake))
    monkeypatch.setattr(kafka_write.time, "sleep", lambda s: None)
    fn = _KafkaWriteFn({"bootstrap.servers": "x"}, max_retries, 0.01, 1.0, "ns", None, resize)
    fn.setup()
    fn.start_bundle()
    return fn


def _messages(n, topic="out"):
    return [KafkaMessage(topic, b"k", b"v%d" % i, (("h", b"1"),), 1000 + i) for i in range(n)]


def test_all_delivered_in_one_pass(monkeypatch):
    fn = _fn(monkeypatch)
    for m in _messages(5):
        fn.process(m)
    fn.finish_bundle()
    assert len(FakeProducer.instances[0].produced) == 5


def test_transient_failures_are_produced_again_until_delivered(monkeypatch):
    fn = _fn(monkeypatch, fates={b"v1": [TIMEOUT, TIMEOUT]})
    for m in _messages(3):
        fn.process(m)
    fn.finish_bundle()
    assert [v for _, v in FakeProducer.instances[0].produced] == [b"v0", b"v1", b"v2", b"v1", b"v1"]


def test_transient_failures_beyond_max_retries_fail_the_bundle(monkeypatch):
    fn = _fn(monkeypatch, max_retries=2, fates={b"v0": [TIMEOUT] * 10})
    for m in _messages(2, topic="feeds"):
        fn.process(m)
    with pytest.raises(RuntimeError, match=r"1 message\(s\) not delivered after 2 retries.*"
                                           r"topic 'feeds'.*timed out"):
        fn.finish_bundle()
    assert [v for _, v in FakeProducer.instances[0].produced].count(b"v0") == 3


def test_permanent_failure_fails_at_once_naming_topic_and_count(monkeypatch):
    fn = _fn(monkeypatch, fates={b"v0": [UNKNOWN], b"v1": [UNKNOWN]})
    for m in _messages(3, topic="nope"):
        fn.process(m)
    with pytest.raises(RuntimeError, match=r"topic 'nope': 2 message\(s\), first errors:.*Unknown"):
        fn.finish_bundle()
    assert len(FakeProducer.instances[0].produced) == 3  # no retry of a permanent error
    fn.start_bundle()  # the next bundle starts clean
    fn.finish_bundle()


def test_refused_at_produce_time_is_reported(monkeypatch):
    fn = _fn(monkeypatch, refuse=KafkaError(KafkaError._UNKNOWN_TOPIC))
    fn.process(_messages(1, topic="gone")[0])
    with pytest.raises(RuntimeError, match="topic 'gone'"):
        fn.finish_bundle()


def test_full_queue_is_drained_by_polling(monkeypatch):
    fn = _fn(monkeypatch, full_once=True)
    fn.process(_messages(1)[0])
    fn.finish_bundle()
    producer = FakeProducer.instances[0]
    assert producer.produced == [("out", b"v0")] and producer.polls >= 2


def test_pickled_fn_keeps_config_only_and_defaults_apply(monkeypatch):
    fn = _fn(monkeypatch)
    clone = pickle.loads(pickle.dumps(fn))
    assert clone._deliveries is None
    config = FakeProducer.instances[0].config
    assert config["enable.idempotence"] is True and config["acks"] == "all"
    assert config["compression.type"] == "lz4" and config["message.timeout.ms"] == 30_000


def test_a_message_too_large_is_sent_once_more_resized(monkeypatch):
    def resize(message):
        return dataclasses.replace(message, value=message.value[:2])

    fn = _fn(monkeypatch, resize=resize, fates={b"v1": [TOO_LARGE]})
    for m in _messages(3):
        fn.process(m)
    fn.finish_bundle()
    assert [v for _, v in FakeProducer.instances[0].produced] == [b"v0", b"v1", b"v2", b"v1"[:2]]


def test_small_messages_refused_with_a_large_one_in_their_batch_are_sent_again(monkeypatch):
    # The broker refuses a whole record batch: every message in it fails "too large".
    def resize(message):
        return None if len(message.value) < 3 else dataclasses.replace(message, value=b"cut")

    fn = _fn(monkeypatch, resize=resize, fates={b"v0": [TOO_LARGE], b"big": [TOO_LARGE]})
    fn.process(_messages(1)[0])
    fn.process(KafkaMessage("out", b"k", b"big"))
    fn.finish_bundle()
    assert [v for _, v in FakeProducer.instances[0].produced] == [b"v0", b"big", b"v0", b"cut"]


def test_too_large_without_resize_or_still_too_large_fails(monkeypatch):
    fn = _fn(monkeypatch, fates={b"v0": [TOO_LARGE]})
    fn.process(_messages(1)[0])
    with pytest.raises(RuntimeError, match="too large"):
        fn.finish_bundle()
    fn = _fn(monkeypatch, resize=lambda m: dataclasses.replace(m, value=b"s"),
             fates={b"v0": [TOO_LARGE], b"s": [TOO_LARGE]})
    fn.process(_messages(1)[0])
    with pytest.raises(RuntimeError, match="1 message"):
        fn.finish_bundle()
    assert [v for _, v in FakeProducer.instances[0].produced] == [b"v0", b"s"]  # resized once


def test_is_transient():
    assert is_transient(TIMEOUT)
    assert is_transient(KafkaError(KafkaError.NOT_ENOUGH_REPLICAS))
    assert not is_transient(UNKNOWN)
    assert not is_transient(KafkaError(KafkaError._UNKNOWN_TOPIC))
    assert not is_transient(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))


def test_write_to_kafka_validates_its_arguments():
    with pytest.raises(ValueError, match="bootstrap.servers"):
        WriteToKafka({})
    with pytest.raises(ValueError, match="max_retries"):
        WriteToKafka({"bootstrap.servers": "x"}, max_retries=-1)
