"""Decode record batches into typed event batches, with a dead-letter output, and the DLQ sink.

::

    decoded = batches | 'DecodeBatches' >> DecodeBatches()
    decoded.events                  # PCollection[EventBatch], input timestamps kept
    decoded.dead_letters | 'WriteDLQ' >> WriteDeadLetters({"bootstrap.servers": ...})

``DecodeBatches`` adapts ``decode_batch()`` (``schemas/records.py``), so
pipelines and ``feedbeam replay`` accept and reject exactly the same bytes.
``WriteDeadLetters`` writes each ``DeadLetter`` to ``<source topic>.dlq``
with the original key and value untouched and the metadata in headers;
``read_dead_letters()`` reads such a topic back (tests, ops tooling).
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, Union

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection, TaggedOutput

from pipelines.io.kafka_write import KafkaMessage, WriteToKafka
from schemas.records import DeadLetter, EventBatch, RecordBatch, decode_batch
from schemas.codec import WireCodec

DECODE_NAMESPACE = "feedbeam.decode"
DLQ_NAMESPACE = "feedbeam.dlq"

_EVENTS = "events"
_DEAD_LETTERS = "dead_letters"

#: A codec, or a zero-argument callable (such as the ``WireCodec`` class) building one.
CodecFactory = Union[WireCodec, Callable[[], WireCodec]]


class DecodedEvents(NamedTuple):
    """The two outputs of ``DecodeBatches``."""

    events: PCollection        # PCollection[EventBatch]
    dead_letters: PCollection  # PCollection[DeadLetter]


def _build_codec(codec_factory: CodecFactory) -> WireCodec:
    # A class (WireCodec itself) or a factory function is called; an instance
    # (which pickles as configuration only) is used as it is.
    if isinstance(codec_factory, type) or not hasattr(codec_factory, "decode"):
        return codec_factory()
    return codec_factory


class _DecodeBatchFn(beam.DoFn):
    """``decode_batch`` as a DoFn: event batches on the main output, dead letters tagged."""

    def __init__(self, codec_factory: CodecFactory, topic_prefix: str):
        self._codec_factory = codec_factory
        self._topic_prefix = topic_prefix
        self._codec = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_codec"] = None  # rebuilt in setup(); a registry client never travels
        state.pop("_reason_counters", None)
        return state

    def setup(self):
        self._codec = _build_codec(self._codec_factory)
        self._decoded = Metrics.counter(DECODE_NAMESPACE, "decoded")
        self._dead = Metrics.counter(DECODE_NAMESPACE, "dead_letter")
        self._reason_counters: dict[str, Any] = {}

    def process(self, batch: RecordBatch):
        # Yielding bare values keeps the input element's timestamp and window.
        events, dead = decode_batch(self._codec, batch, self._topic_prefix)
        for letter in dead:
            counter = self._reason_counters.get(letter.reason)
            if counter is None:
                counter = self._reason_counters[letter.reason] = Metrics.counter(
                    DECODE_NAMESPACE, f"dead_letter_{letter.reason}")
            counter.inc()
            yield TaggedOutput(_DEAD_LETTERS, letter)
        self._dead.inc(len(dead))
        if events.events:
            self._decoded.inc(len(events))
            yield events


class DecodeBatches(beam.PTransform):
    """``PCollection[RecordBatch]`` -> ``DecodedEvents(events, dead_letters)``.

    ``events`` holds one ``EventBatch`` per input batch with at least one good
    record (typed events in offset order, each with its record's time; the
    element keeps the input's timestamp, its oldest record's); ``dead_letters``
    holds a ``DeadLetter`` (step ``decode``) for every record that is not a
    valid event for its topic. ``topic_prefix`` is stripped from topic names
    before the expected event type is looked up (test and tenant prefixes).
    Errors that are not the record's fault (an unreachable Schema Registry)
    are raised, so the bundle is retried rather than dead-lettered.

    Counters (namespace ``feedbeam.decode``): ``decoded``, ``dead_letter``
    and ``dead_letter_<reason>``.
    """

    def __init__(self, codec_factory: CodecFactory = WireCodec, topic_prefix: str = "",
                 label: str | None = None):
        super().__init__(label)
        self._codec_factory = codec_factory
        self._topic_prefix = topic_prefix

    def expand(self, batches) -> DecodedEvents:
        # Tagged outputs rather than ParDo.with_exception_handling: what is a dead
        # letter (MalformedRecordError only, with its reason) is decode_batch()'s
        # decision, and everything else must propagate to fail the bundle.
        outputs = (
            batches
            | "Decode" >> beam.ParDo(_DecodeBatchFn(self._codec_factory, self._topic_prefix))
            .with_input_types(RecordBatch)
            .with_output_types(EventBatch, **{_DEAD_LETTERS: DeadLetter})
            .with_outputs(_DEAD_LETTERS, main=_EVENTS)
        )
        return DecodedEvents(events=outputs[_EVENTS], dead_letters=outputs[_DEAD_LETTERS])


def to_kafka_message(dead_letter: DeadLetter) -> KafkaMessage:
    """The ``.dlq`` record of ``dead_letter``: original key and value, metadata in headers.

    Its Kafka timestamp is the failure time, so the DLQ is ordered by when
    records failed; the source timestamp travels in a header.
    """
    return KafkaMessage(
        topic=dead_letter.dlq_topic, key=dead_letter.key, value=dead_letter.value,
        headers=tuple(dead_letter.headers()), timestamp_ms=dead_letter.failed_at_ms)


class WriteDeadLetters(beam.PTransform):
    """Write a ``PCollection[DeadLetter]`` to each record's ``<topic>.dlq``.

    ``producer_config`` and the retry arguments are ``WriteToKafka``'s; the
    ``.dlq`` topics must exist (auto-creation is off). At-least-once: a
    retried bundle may write a dead letter twice; readers dedup on the source
    coordinates (topic, partition, offset, step). Counters (namespace
    ``feedbeam.dlq``): ``written``, ``retried``, ``failed`` and
    ``dead_letters_written.<dlq topic>``.
    """

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int = 5,
                 label: str | None = None, **write_options):
        super().__init__(label)
        self._write = WriteToKafka(
            producer_config, max_retries, metrics_namespace=DLQ_NAMESPACE,
            per_topic_counter="dead_letters_written", **write_options)

    def expand(self, dead_letters):
        return (
            dead_letters
            | "ToKafkaMessages" >> beam.Map(to_kafka_message)
            .with_input_types(DeadLetter).with_output_types(KafkaMessage)
            | "WriteToKafka" >> self._write
        )


def read_dead_letters(bootstrap: str, dlq_topic: str, timeout_s: float = 30.0) -> list[DeadLetter]:
    """Every dead letter on ``dlq_topic``, from the beginning to its current end.

    The end is the high watermark of each partition when the call starts, so
    the call returns even while writers keep writing. Records come back in
    partition, then offset order. Raises ``LookupError`` if the topic does
    not exist, ``TimeoutError`` if the end is not reached in ``timeout_s``,
    ``ValueError`` if a record lacks the dead-letter headers.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        # Partitions are assigned, not subscribed: the group is never joined
        # and no offsets are committed.
        "group.id": f"feedbeam-read-dlq-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
    })
    try:
        deadline = time.monotonic() + timeout_s
        partitions = _partitions(consumer, dlq_topic, deadline)
        ends: dict[int, int] = {}
        for partition in partitions:
            low, high = _watermarks(consumer, TopicPartition(dlq_topic, partition), deadline)
            if high > low:
                ends[partition] = high
        if not ends:
            return []
        consumer.assign([TopicPartition(dlq_topic, p, OFFSET_BEGINNING) for p in ends])
        by_partition: dict[int, list[DeadLetter]] = {p: [] for p in ends}
        pending = set(ends)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = sum(len(v) for v in by_partition.values())
                raise TimeoutError(
                    f"read {got} dead letters from {dlq_topic!r} in {timeout_s}s; "
                    f"partitions {sorted(pending)} not read to their end")
            msg = consumer.poll(min(1.0, remaining))
            if msg is None:
                # The last offsets may hold no record to deliver (e.g. a
                # transaction marker): the position still tells us we are done.
                for tp in consumer.position([TopicPartition(dlq_topic, p) for p in pending]):
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
                continue
            if msg.error() is not None:
                raise KafkaException(msg.error())
            partition = msg.partition()
            if partition not in pending:
                continue
            by_partition[partition].append(
                DeadLetter.from_kafka(msg.key(), msg.value(), msg.headers()))
            if msg.offset() + 1 >= ends[partition]:
                pending.discard(partition)
        return [dl for p in sorted(by_partition) for dl in by_partition[p]]
    finally:
        consumer.close()


_METADATA_GRACE_S = 3.0


def _partitions(consumer, topic: str, deadline: float) -> list[int]:
    """Partition ids of ``topic``; ``LookupError`` if it does not exist.

    A topic created a moment ago may not be in the broker's metadata yet, so
    "unknown topic" is believed only after a short grace period.
    """
    grace_end = min(deadline, time.monotonic() + _METADATA_GRACE_S)
    while True:
        remaining = max(0.1, deadline - time.monotonic())
        meta = consumer.list_topics(topic, timeout=remaining).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return sorted(meta.partitions)
        if time.monotonic() >= grace_end:
            detail = f": {meta.error}" if meta is not None and meta.error else ""
            raise LookupError(f"dead-letter topic {topic!r} does not exist{detail}")
        time.sleep(0.2)


def _watermarks(consumer, tp, deadline: float) -> tuple[int, int]:
    """``(low, high)`` offsets of ``tp``, waiting out a leader still being elected."""
    from confluent_kafka import KafkaError, KafkaException

    settling = (KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                KafkaError.UNKNOWN_TOPIC_OR_PART)
    while True:
        try:
            return consumer.get_watermark_offsets(
                tp, timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() not in settling and not error.retriable():
                raise
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"offsets of {tp.topic}[{tp.partition}] not available: {error}") from exc
            time.sleep(0.2)
