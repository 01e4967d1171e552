"""Records that cross the Kafka IO boundary, and the one decode function.

``RecordBatch`` is what the Kafka source emits: the raw bytes of consecutive
records of one partition plus where they came from (``KafkaRecord`` is one of
them). ``decode_batch`` turns it into an ``EventBatch`` of typed events and a
``DeadLetter`` per record that is not a valid event: the original bytes, the
source coordinates, the error and the step, so the record can be inspected
and replayed from ``<topic>.dlq``. ``decode_record`` is the same decision for
one record, shared with ``feedbeam replay``, so every reader accepts and
rejects exactly the same bytes.

On the dead-letter topic the value and key are the original bytes, untouched
unless they would not fit in a Kafka message (``DeadLetter.truncated``: the
original size and SHA-256 then travel in headers); everything else travels in
headers (``DLQ_HEADERS``), so a consumer that only wants to replay a record
needs no feedbeam code. ``decode_batch`` also applies the semantic checks of
``schemas.validation`` when given limits (step ``validate``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable, Iterator, Sequence, Union

from schemas.codec import MalformedRecordError, WireCodec
from schemas.events import TOPIC_TYPES, Event, dlq_topic
from schemas.validation import VALIDATE_STEP, EventLimits, check_event

# Header names on dead-letter records, defined once for writers and readers.
H_TOPIC = "feedbeam.source.topic"
H_PARTITION = "feedbeam.source.partition"
H_OFFSET = "feedbeam.source.offset"
H_TIMESTAMP = "feedbeam.source.timestamp"
H_STEP = "feedbeam.error.step"
H_REASON = "feedbeam.error.reason"
H_ERROR = "feedbeam.error.message"
H_FAILED_AT = "feedbeam.error.time"
DLQ_HEADERS = (H_TOPIC, H_PARTITION, H_OFFSET, H_TIMESTAMP, H_STEP, H_REASON,
               H_ERROR, H_FAILED_AT)
# Only on a dead letter whose value was truncated to fit: the original's size and digest.
H_VALUE_SIZE = "feedbeam.value.size"
H_VALUE_SHA256 = "feedbeam.value.sha256"

#: ``partition`` and ``offset`` of a dead letter whose source record is not known
#: (an element re-encoded by a sink, or one derived from many records).
UNKNOWN = -1

DECODE_STEP = "decode"
_MAX_ERROR_CHARS = 2000
_SIZE_SAMPLES = 8  # values looked at by approx_bytes()
_PER_RECORD_BYTES = 24  # offset, timestamp and lengths in RecordBatchCoder's layout


def approx_bytes(values: Sequence[bytes | None]) -> int:
    """About how many bytes a batch of ``values`` takes encoded, from a few of them.

    Beam samples the encoded size of elements for its byte counters; encoding
    a whole batch to count it cost several percent of a read. This looks at
    ``_SIZE_SAMPLES`` values spread over the batch, so it is constant-time.
    """
    n = len(values)
    if not n:
        return _PER_RECORD_BYTES
    sample = values[::max(1, n // _SIZE_SAMPLES)]
    sampled = sum(len(v) for v in sample if v is not None)
    return n * _PER_RECORD_BYTES + sampled * n // len(sample)


@dataclasses.dataclass(frozen=True, slots=True)
class KafkaRecord:
    """One Kafka record as read: raw key and value plus its coordinates.

    ``timestamp_ms`` is the record's Kafka timestamp (CreateTime or
    LogAppendTime, whichever the topic uses).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class RecordBatch:
    """Consecutive records of one partition, as one poll returned them, in columns.

    ``offsets``, ``keys``, ``values`` and ``timestamps_ms`` are parallel, in
    offset order; ``timestamps_ms`` are the element times the source chose
    (Kafka timestamp or the event's own time). ``kafka_timestamps_ms`` holds
    the records' Kafka timestamps where they differ from the element times
    (None: they are the same).
    """

    topic: str
    partition: int
    offsets: Sequence[int]
    keys: Sequence[bytes | None]
    values: Sequence[bytes | None]
    timestamps_ms: Sequence[int]
    kafka_timestamps_ms: Sequence[int] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def kafka_timestamp(self, i: int) -> int:
        stamps = self.kafka_timestamps_ms
        return self.timestamps_ms[i] if stamps is None else stamps[i]

    def record(self, i: int) -> KafkaRecord:
        return KafkaRecord(self.topic, self.partition, self.offsets[i], self.keys[i],
                           self.values[i], self.kafka_timestamp(i))

    def records(self) -> Iterator[KafkaRecord]:
        return (self.record(i) for i in range(len(self.offsets)))

    def approx_bytes(self) -> int:
        return approx_bytes(self.values)


@dataclasses.dataclass(frozen=True, slots=True)
class EventBatch:
    """The typed events decoded from one ``RecordBatch``, in offset order.

    ``timestamps_ms[i]`` is the element time of ``events[i]``; ``offsets``,
    ``keys`` and ``values`` keep each event's source coordinates and original
    bytes, so a later step can still dead-letter one record of the batch.
    """

    topic: str
    partition: int
    events: Sequence[Event]
    timestamps_ms: Sequence[int]
    offsets: Sequence[int]
    keys: Sequence[bytes | None]
    values: Sequence[bytes | None]

    def __len__(self) -> int:
        return len(self.events)

    def record(self, i: int) -> KafkaRecord:
        """The source record of ``events[i]`` (for its dead letter)."""
        return KafkaRecord(self.topic, self.partition, self.offsets[i], self.keys[i],
                           self.values[i], self.timestamps_ms[i])

    def part(self, start: int, stop: int) -> "EventBatch":
        """The events ``[start, stop)`` as a batch of their own (coordinates kept)."""
        return EventBatch(self.topic, self.partition, self.events[start:stop],
                          self.timestamps_ms[start:stop], self.offsets[start:stop],
                          self.keys[start:stop], self.values[start:stop])

    def approx_bytes(self) -> int:
        """About what the batch takes pickled: its events' wire bytes, twice over
        (the typed events weigh about what the original values do)."""
        return 2 * approx_bytes(self.values)


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record a step could not process, with everything needed to replay it.

    ``topic``/``partition``/``offset`` name the source record (``UNKNOWN``
    partition and offset when a step no longer knows them); ``key`` and
    ``value`` are its original bytes; ``reason`` is short and machine-readable
    (e.g. ``wrong_magic``, ``too_late``); ``error`` is the human message.
    ``value_size`` and ``value_sha256`` are set only when ``value`` was cut
    short to fit a Kafka message (``truncated``): the original's length and
    digest, so it can be matched with the source record.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    step: str
    reason: str
    error: str
    failed_at_ms: int
    value_size: int | None = None
    value_sha256: str | None = None

    @classmethod
    def of(cls, record: KafkaRecord, step: str, reason: str, error: str,
           failed_at_ms: int | None = None) -> "DeadLetter":
        return cls(
            topic=record.topic, partition=record.partition, offset=record.offset,
            key=record.key, value=record.value, timestamp_ms=record.timestamp_ms,
            step=step, reason=reason, error=error[:_MAX_ERROR_CHARS],
            failed_at_ms=int(time.time() * 1000) if failed_at_ms is None else failed_at_ms)

    @property
    def dlq_topic(self) -> str:
        return dlq_topic(self.topic)

    @property
    def is_truncated(self) -> bool:
        return self.value_size is not None

    def truncated(self, keep_bytes: int) -> "DeadLetter":
        """This dead letter with at most ``keep_bytes`` of its value, recording the
        original's size and SHA-256 (a no-op when the value already fits; an
        already truncated letter keeps its original size and digest)."""
        value = self.value
        if value is None or len(value) <= keep_bytes:
            return self
        if self.is_truncated:
            return dataclasses.replace(self, value=value[:max(keep_bytes, 0)])
        return dataclasses.replace(
            self, value=value[:max(keep_bytes, 0)], value_size=len(value),
            value_sha256=hashlib.sha256(value).hexdigest())

    def headers(self) -> list[tuple[str, bytes]]:
        """Kafka headers carrying the metadata; the value stays the original bytes
        (or their head, with the original's size and digest, when truncated)."""
        headers = [
            (H_TOPIC, self.topic.encode()),
            (H_PARTITION, str(self.partition).encode()),
            (H_OFFSET, str(self.offset).encode()),
            (H_TIMESTAMP, str(self.timestamp_ms).encode()),
            (H_STEP, self.step.encode()),
            (H_REASON, self.reason.encode()),
            (H_ERROR, self.error.encode("utf-8", "replace")),
            (H_FAILED_AT, str(self.failed_at_ms).encode()),
        ]
        if self.is_truncated:
            headers += [(H_VALUE_SIZE, str(self.value_size).encode()),
                        (H_VALUE_SHA256, (self.value_sha256 or "").encode())]
        return headers

    @classmethod
    def from_kafka(cls, key: bytes | None, value: bytes | None,
                   headers: list[tuple[str, bytes]] | None) -> "DeadLetter":
        """Rebuild a dead letter read back from a ``.dlq`` topic."""
        h = {name: raw.decode("utf-8", "replace") for name, raw in headers or ()
             if raw is not None}
        missing = [name for name in DLQ_HEADERS if name not in h]
        if missing:
            raise ValueError(f"not a feedbeam dead letter: headers {missing} missing")
        return cls(
            topic=h[H_TOPIC], partition=int(h[H_PARTITION]), offset=int(h[H_OFFSET]),
            key=key, value=value, timestamp_ms=int(h[H_TIMESTAMP]), step=h[H_STEP],
            reason=h[H_REASON], error=h[H_ERROR], failed_at_ms=int(h[H_FAILED_AT]),
            value_size=int(h[H_VALUE_SIZE]) if H_VALUE_SIZE in h else None,
            value_sha256=h.get(H_VALUE_SHA256))


DecodeResult = Union[Event, DeadLetter]


def base_topic(topic: str, prefix: str = "") -> str:
    """The canonical event topic of a (possibly prefixed) topic name."""
    return topic[len(prefix):] if prefix and topic.startswith(prefix) else topic


def decode_record(codec: WireCodec, record: KafkaRecord, topic_prefix: str = "",
                  limits: EventLimits | None = None, now_ms: int | None = None) -> DecodeResult:
    """Decode ``record`` into its typed event, or a ``DeadLetter`` saying why not.

    The record's topic (less ``topic_prefix``) fixes the expected event type,
    so an event of another type on the wrong topic is rejected too. Only
    ``MalformedRecordError`` (the record's own fault) becomes a dead letter;
    anything else, such as an unreachable Schema Registry, propagates so the
    bundle is retried instead of good records being dead-lettered. Given
    ``limits``, a decoded event that breaks them (``schemas.validation``, at
    the wall clock ``now_ms``, default now) is a dead letter of step
    ``validate``.
    """
    expected = TOPIC_TYPES.get(base_topic(record.topic, topic_prefix))
    if record.value is None:
        return DeadLetter.of(record, DECODE_STEP, "null_value", "record has no value (tombstone)")
    try:
        event = codec.decode(record.value, expected)
    except MalformedRecordError as exc:
        return DeadLetter.of(record, DECODE_STEP, exc.reason, str(exc))
    if limits is not None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        problem = check_event(event, record.timestamp_ms, now, limits)
        if problem is not None:
            return DeadLetter.of(record, VALIDATE_STEP, problem.reason, problem.message, now)
    return event


def decode_batch(codec: WireCodec, batch: RecordBatch, topic_prefix: str = "",
                 limits: EventLimits | None = None,
                 now_ms: int | None = None) -> tuple[EventBatch, list[DeadLetter]]:
    """``decode_record`` over a whole batch: the events it accepts, in order, and a
    dead letter for each record it rejects. The expected type is looked up once,
    the clock read once."""
    expected = TOPIC_TYPES.get(base_topic(batch.topic, topic_prefix))
    decode = codec.decode
    if limits is not None and now_ms is None:
        now_ms = int(time.time() * 1000)
    kept: list[int] = []
    events: list[Event] = []
    dead: list[DeadLetter] = []
    for i, value in enumerate(batch.values):
        if value is None:
            dead.append(DeadLetter.of(batch.record(i), DECODE_STEP, "null_value",
                                      "record has no value (tombstone)"))
            continue
        try:
            event = decode(value, expected)
        except MalformedRecordError as exc:
            dead.append(DeadLetter.of(batch.record(i), DECODE_STEP, exc.reason, str(exc)))
            continue
        if limits is not None:
            problem = check_event(event, batch.kafka_timestamp(i), now_ms, limits)
            if problem is not None:
                dead.append(DeadLetter.of(batch.record(i), VALIDATE_STEP, problem.reason,
                                          problem.message, now_ms))
                continue
        events.append(event)
        kept.append(i)
    if len(kept) == len(batch):
        decoded = EventBatch(batch.topic, batch.partition, events, batch.timestamps_ms,
                             batch.offsets, batch.keys, batch.values)
    else:
        decoded = EventBatch(batch.topic, batch.partition, events,
                             [batch.timestamps_ms[i] for i in kept],
                             [batch.offsets[i] for i in kept], [batch.keys[i] for i in kept],
                             [batch.values[i] for i in kept])
    return decoded, dead


def decode_record_dict(codec: WireCodec, record: KafkaRecord,
                       topic_prefix: str = "") -> tuple[type, dict] | DeadLetter:
    """``decode_record`` without building the dataclass: ``(record type, Avro dict)``.

    For bulk readers that go straight to columns (``feedbeam replay`` to
    Parquet), where the frozen dataclass and its Enum lookups are about half
    the decode cost. Accepts and rejects exactly the records ``decode_record``
    does: the dict is in the reader schema, and ``from_avro`` cannot fail on
    such a dict as long as every reader-schema enum symbol is a member of the
    Python enum (``tests/unit/test_replay.py`` checks that for every type).
    """
    expected = TOPIC_TYPES.get(base_topic(record.topic, topic_prefix))
    if record.value is None:
        return DeadLetter.of(record, DECODE_STEP, "null_value", "record has no value (tombstone)")
    try:
        return codec.decode_dict(record.value, expected)
    except MalformedRecordError as exc:
        return DeadLetter.of(record, DECODE_STEP, exc.reason, str(exc))


def dict_decoder(codec: WireCodec, topic: str,
                 topic_prefix: str = "") -> Callable[[bytes | None], tuple[type, dict] | None]:
    """``decode_record_dict``'s accept path bound to one topic, for bulk readers.

    ``decode(value)`` returns ``(record type, Avro dict)`` for exactly the
    values ``decode_record_dict`` accepts on ``topic``, and None for the ones
    it rejects; the caller then builds the ``KafkaRecord`` and calls
    ``decode_record_dict`` for the ``DeadLetter``. Binding the topic once
    saves the per-record ``KafkaRecord`` and topic lookup, a third of the cost
    of replaying a topic to Parquet.
    """
    expected = TOPIC_TYPES.get(base_topic(topic, topic_prefix))
    decode = codec.decode_dict

    def accept(value: bytes | None) -> tuple[type, dict] | None:
        if value is None:
            return None
        try:
            return decode(value, expected)
        except MalformedRecordError:
            return None

    return accept
