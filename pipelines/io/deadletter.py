"""Decode record batches into typed event batches, with a dead-letter output, and the DLQ sink.

::

    decoded = batches | 'DecodeBatches' >> DecodeBatches()
    decoded.events                  # PCollection[EventBatch], input timestamps kept
    decoded.dead_letters | 'WriteDLQ' >> WriteDeadLetters({"bootstrap.servers": ...})

``DecodeBatches`` adapts ``decode_batch()`` (``schemas/records.py``) and its
semantic checks (``schemas/validation.py``, step ``validate``).
``WriteDeadLetters`` writes each ``DeadLetter`` to ``<source topic>.dlq``
with the original key and value and the metadata in headers (a value too
large for a Kafka message is truncated, its size and SHA-256 in headers);
``DeadLetterProducer`` does the same outside a transform (the store sink's
error barrier); ``read_dead_letters()`` reads such a topic back (tests, ops
tooling). Design: ``docs/pipelines/kafka-io.md``.
"""
from __future__ import annotations

import dataclasses
import pickle
import time
import uuid
from typing import Any, Callable, Mapping, NamedTuple, Union

import apache_beam as beam
from apache_beam import coders
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection, TaggedOutput

from pipelines.io.kafka_write import Deliveries, KafkaMessage
from schemas.records import DeadLetter, EventBatch, RecordBatch, decode_batch
from schemas.codec import WireCodec
from schemas.validation import VALIDATE_STEP, EventLimits

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


def build_codec(codec_factory: CodecFactory) -> WireCodec:
    """The codec ``codec_factory`` stands for (built where it is used, never pickled)."""
    # A class (WireCodec itself) or a factory function is called; an instance
    # (which pickles as configuration only) is used as it is.
    if isinstance(codec_factory, type) or not hasattr(codec_factory, "decode"):
        return codec_factory()
    return codec_factory


class EventBatchCoder(coders.Coder):
    """Pickles an ``EventBatch`` as Beam's default did, but estimates its size
    without pickling it: Beam samples element sizes for its byte counters, and
    pickling a thousand typed events to count bytes cost 8% of a source + decode."""

    def encode(self, batch: EventBatch) -> bytes:
        return pickle.dumps(batch, pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> EventBatch:
        return pickle.loads(data)

    def estimate_size(self, batch: EventBatch) -> int:
        return batch.approx_bytes()

    def to_type_hint(self):
        return EventBatch


beam.coders.registry.register_coder(EventBatch, EventBatchCoder)


class _DecodeBatchFn(beam.DoFn):
    """``decode_batch`` as a DoFn: event batches on the main output, dead letters tagged."""

    def __init__(self, codec_factory: CodecFactory, topic_prefix: str,
                 limits: EventLimits | None = None):
        self._codec_factory = codec_factory
        self._topic_prefix = topic_prefix
        self._limits = limits
        self._codec = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_codec"] = None  # rebuilt in setup(); a registry client never travels
        state.pop("_reason_counters", None)
        return state

    def setup(self):
        self._codec = build_codec(self._codec_factory)
        self._decoded = Metrics.counter(DECODE_NAMESPACE, "decoded")
        self._dead = Metrics.counter(DECODE_NAMESPACE, "dead_letter")
        self._invalid = Metrics.counter(DECODE_NAMESPACE, "invalid")
        self._reason_counters: dict[str, Any] = {}

    def process(self, batch: RecordBatch):
        # Yielding bare values keeps the input element's timestamp and window.
        events, dead = decode_batch(self._codec, batch, self._topic_prefix, self._limits)
        for letter in dead:
            counter = self._reason_counters.get(letter.reason)
            if counter is None:
                counter = self._reason_counters[letter.reason] = Metrics.counter(
                    DECODE_NAMESPACE, f"dead_letter_{letter.reason}")
            counter.inc()
            yield TaggedOutput(_DEAD_LETTERS, letter)
        self._dead.inc(len(dead))
        self._invalid.inc(sum(letter.step == VALIDATE_STEP for letter in dead))
        if events.events:
            self._decoded.inc(len(events))
            yield events


class DecodeBatches(beam.PTransform):
    """``PCollection[RecordBatch]`` -> ``DecodedEvents(events, dead_letters)``.

    ``events`` holds one ``EventBatch`` per input batch with at least one good
    record (typed events in offset order, each with its record's time; the
    element keeps the input's timestamp, its oldest record's); ``dead_letters``
    holds a ``DeadLetter`` (step ``decode``) for every record that is not a
    valid event for its topic, and one (step ``validate``) for every event
    that breaks ``limits`` (``schemas.validation``; None: no checks).
    ``topic_prefix`` is stripped from topic names before the expected event
    type is looked up (test and tenant prefixes). Errors that are not the
    record's fault (an unreachable Schema Registry) are raised, so the bundle
    is retried rather than dead-lettered.

    Counters (namespace ``feedbeam.decode``): ``decoded``, ``dead_letter``
    (of either step), ``invalid`` (of step ``validate``) and
    ``dead_letter_<reason>``.
    """

    def __init__(self, codec_factory: CodecFactory = WireCodec, topic_prefix: str = "",
                 label: str | None = None, limits: EventLimits | None = EventLimits()):
        super().__init__(label)
        self._codec_factory = codec_factory
        self._topic_prefix = topic_prefix
        self._limits = limits

    def expand(self, batches) -> DecodedEvents:
        # Tagged outputs rather than ParDo.with_exception_handling: what is a dead
        # letter (MalformedRecordError only, with its reason) is decode_batch()'s
        # decision, and everything else must propagate to fail the bundle.
        outputs = (
            batches
            | "Decode" >> beam.ParDo(_DecodeBatchFn(self._codec_factory, self._topic_prefix,
                                                    self._limits))
            .with_input_types(RecordBatch)
            .with_output_types(EventBatch, **{_DEAD_LETTERS: DeadLetter})
            .with_outputs(_DEAD_LETTERS, main=_EVENTS)
        )
        return DecodedEvents(events=outputs[_EVENTS], dead_letters=outputs[_DEAD_LETTERS])


# What a Kafka message costs beyond its key, value and header bytes (record
# framing, varints), rounded up generously: a fitted dead letter must never
# come back "too large" from the producer's own check.
_MESSAGE_OVERHEAD = 1024
#: What is kept of a value when the broker refuses a dead letter as too large
#: even after it was fitted to the producer's limit (a topic with a lower
#: ``max.message.bytes``): enough to see the wire header and the record's start.
SHRUNK_VALUE_BYTES = 1024
DEFAULT_MAX_MESSAGE_BYTES = 1_000_000  # librdkafka's message.max.bytes default


def fit_dead_letter(dead_letter: DeadLetter, max_message_bytes: int) -> DeadLetter:
    """``dead_letter`` with its value truncated so that the message fits
    ``max_message_bytes`` (the original's size and SHA-256 go to headers);
    unchanged when it fits already."""
    if dead_letter.value is None:
        return dead_letter
    other = len(dead_letter.key or b"") + _MESSAGE_OVERHEAD + sum(
        len(name) + len(value) + 10 for name, value in dead_letter.truncated(0).headers())
    budget = max_message_bytes - other
    if len(dead_letter.value) <= budget:
        return dead_letter
    return dead_letter.truncated(max(budget, 0))


def to_kafka_message(dead_letter: DeadLetter,
                     max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES) -> KafkaMessage:
    """The ``.dlq`` record of ``dead_letter``: original key and value, metadata in headers.

    Its Kafka timestamp is the failure time, so the DLQ is ordered by when
    records failed; the source timestamp travels in a header. A value that
    would make the message larger than ``max_message_bytes`` is truncated
    (``fit_dead_letter``; None: never).
    """
    if max_message_bytes is not None:
        dead_letter = fit_dead_letter(dead_letter, max_message_bytes)
    return KafkaMessage(
        topic=dead_letter.dlq_topic, key=dead_letter.key, value=dead_letter.value,
        headers=tuple(dead_letter.headers()), timestamp_ms=dead_letter.failed_at_ms)


def shrink_dead_letter_message(message: KafkaMessage) -> KafkaMessage | None:
    """A ``.dlq`` message the broker refused as too large, with its value cut to
    ``SHRUNK_VALUE_BYTES`` (the original's size and digest in headers); None for
    a message that is not a feedbeam dead letter or has nothing left to cut."""
    try:
        letter = DeadLetter.from_kafka(message.key, message.value, list(message.headers))
    except ValueError:
        return None
    if letter.value is None or len(letter.value) <= SHRUNK_VALUE_BYTES:
        return None
    smaller = letter.truncated(SHRUNK_VALUE_BYTES)
    return dataclasses.replace(message, value=smaller.value, headers=tuple(smaller.headers()))


def missing_topic_hint(error_message: str) -> str:
    """``error_message`` of a failed dead-letter write, with what to do when the
    ``.dlq`` topic is missing (auto-creation is off)."""
    if "Unknown topic" not in error_message and "UNKNOWN_TOPIC" not in error_message:
        return error_message
    return (f"{error_message}. A dead-letter topic does not exist and topics are not "
            "created automatically: create it (`feedbeam topics create` with the job's "
            "--topic_prefix makes the event topics' .dlq twins). Nothing was lost: the "
            "bundle's offsets are not committed, so the job re-reads these records once it "
            "is restarted with the topic in place.")


class DeadLetterProducer:
    """Writes ``DeadLetter``s to their ``.dlq`` topics outside a Beam transform.

    ``send()`` queues one (fitted to the producer's message limit),
    ``settle()`` waits until all are written, as ``WriteDeadLetters`` does:
    transient failures retried, a letter the broker refuses as too large sent
    again truncated, anything else a ``RuntimeError`` (with the fix for a
    missing topic). Builds its producer on the first ``send()``, so a step
    that never dead-letters never connects.
    """

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int = 5,
                 metrics_namespace: str = DLQ_NAMESPACE):
        self._config = dict(producer_config)
        self._max_retries = max_retries
        self._namespace = metrics_namespace
        self._deliveries: Deliveries | None = None
        self._pending = 0

    def send(self, dead_letter: DeadLetter) -> None:
        if self._deliveries is None:
            self._deliveries = Deliveries(
                self._config, self._max_retries, metrics_namespace=self._namespace,
                per_topic_counter="dead_letters_written", resize=shrink_dead_letter_message)
        self._deliveries.produce(
            to_kafka_message(dead_letter, self._deliveries.max_message_bytes))
        self._pending += 1

    def settle(self) -> None:
        if not self._pending:
            return
        self._pending = 0
        try:
            self._deliveries.settle()
        except RuntimeError as exc:
            raise RuntimeError(missing_topic_hint(str(exc))) from exc

    def reset(self) -> None:
        self._pending = 0
        if self._deliveries is not None:
            self._deliveries.reset()

    def close(self) -> None:
        if self._deliveries is not None:
            self._deliveries.close()
            self._deliveries = None


class _DeadLetterWriteFn(beam.DoFn):
    """``DeadLetterProducer`` as a DoFn: letters queued in ``process``, settled per bundle."""

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int):
        self._config = dict(producer_config)
        self._max_retries = max_retries
        self._producer: DeadLetterProducer | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_producer"] = None  # built in setup(); a client never travels
        return state

    def setup(self):
        self._producer = DeadLetterProducer(self._config, self._max_retries)

    def start_bundle(self):
        self._producer.reset()

    def process(self, dead_letter: DeadLetter):
        self._producer.send(dead_letter)

    def finish_bundle(self):
        if self._producer is not None:
            self._producer.settle()

    def teardown(self):
        if self._producer is not None:
            self._producer.close()
            self._producer = None


class WriteDeadLetters(beam.PTransform):
    """Write a ``PCollection[DeadLetter]`` to each record's ``<topic>.dlq``.

    ``producer_config`` is a confluent-kafka config (at least
    ``bootstrap.servers``). The ``.dlq`` topics must exist (auto-creation is
    off): a missing one fails the bundle with a message saying so, and
    nothing is committed past the records until it exists. A letter too large
    for a Kafka message is truncated to fit (its original size and SHA-256 in
    headers; the source coordinates lead to the whole record). At-least-once:
    a retried bundle may write a dead letter twice; readers dedup on the
    source coordinates (topic, partition, offset, step). Counters (namespace
    ``feedbeam.dlq``): ``written``, ``retried``, ``resized``, ``failed`` and
    ``dead_letters_written.<dlq topic>``.
    """

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int = 5,
                 label: str | None = None):
        super().__init__(label)
        if "bootstrap.servers" not in producer_config:
            raise ValueError("producer_config needs 'bootstrap.servers'")
        self._fn = _DeadLetterWriteFn(producer_config, max_retries)

    def expand(self, dead_letters):
        return dead_letters | "WriteToKafka" >> beam.ParDo(self._fn).with_input_types(DeadLetter)


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
