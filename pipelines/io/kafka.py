"""Reading Kafka in Beam: a splittable DoFn on confluent-kafka.

    batches = pipeline | 'ReadPosts' >> ReadFromKafka(config, ['post-events'])

emits one ``RecordBatch`` per partition per poll (at most ``batch_records``
records, or what arrived within ``batch_timeout_ms``), timestamped with the
oldest record's event time, on any portable runner (Prism locally, Flink for
scale). Design, offsets and event time: ``docs/pipelines/kafka-io.md``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import struct
import threading
import time
import uuid
from typing import Iterable, Mapping, Sequence

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas.records import RecordBatch
from schemas.codec import peek_event_time
from schemas.validation import EventLimits

log = logging.getLogger(__name__)

UNBOUNDED_STOP = 2**63 - 1
START_POLICIES = ("committed", "earliest", "latest")
PARTITION_WATERMARKS = ("auto", "shared", "own")
TIMESTAMP_POLICIES = ("kafka", "event")
#: How a caught-up partition's watermark follows the wall clock (``KafkaSourceConfig``).
IDLE_WATERMARKS = ("record", "clock")
_METRICS_NAMESPACE = "feedbeam.kafka"
# Partition reads come from Create/Impulse, so every record is in the global
# window. Emitting WindowedValues with this tuple skips the per-record window
# assignment Beam does for a TimestampedValue (about a tenth of the read's cost).
_GLOBAL_WINDOWS = (GlobalWindow(),)


# --------------------------------------------------------------------------- config


def recoverable(error) -> bool:
    """Whether a ``KafkaError`` from ``consume`` is one the client recovers from.

    Broker connection trouble (a broker down or restarting, all brokers
    down, name resolution, timeouts) is reported as an event, not retriable
    in librdkafka's sense, yet the client reconnects and the read resumes
    where it was: the job waits instead of failing. Fatal errors and
    partition errors (e.g. an unknown topic) end the read.
    """
    from confluent_kafka import KafkaError

    if error.fatal():
        return False
    return error.retriable() or error.code() in (
        KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE,
        KafkaError._TIMED_OUT, KafkaError._MSG_TIMED_OUT, KafkaError.NOT_COORDINATOR,
        KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION)


#: The shortest delay before an idle partition's next bundle.
MIN_IDLE_RESUME_MS = 20
#: A caught-up partition's wait (``idle_poll_ms``) looks this often whether another
#: partition of its read has records to read, and then ends: the wait blocks its whole
#: bundle, which may hold other partitions (Prism bundles a stage's residuals together).
#: Only partitions between two reads can be such a partition; while every other one is
#: being read by a bundle of its own, the wait looks at nothing and polls in slices of
#: ``IDLE_WAIT_LONG_SLICE_S`` (docs/pipelines/kafka-io.md: waits in one long
#: ``consume()`` once missed records that waits in 1 s calls read).
IDLE_WAIT_SLICE_S = 0.1
IDLE_WAIT_LONG_SLICE_S = 1.0
#: A cursor not read for this long is left out of that look (its partition may be read
#: elsewhere now).
RECENT_CURSOR_S = 30.0


def idle_resume_ms(config: "KafkaSourceConfig", quiet_since_ms: int, now_ms: int) -> int:
    """How long a caught-up partition waits before its next poll: a quarter of the time
    it has been quiet, between ``MIN_IDLE_RESUME_MS`` and ``config.idle_wait_ms``.

    Every resume costs the runner a bundle (Prism: a few ms of its CPU), so a
    partition quiet for minutes polls every ``idle_wait_ms``, while one whose
    records come every few hundred ms (any live traffic) is polled again within
    a fraction of that gap: the added latency stays a quarter of the gap."""
    quiet = max(0, now_ms - quiet_since_ms)
    return max(MIN_IDLE_RESUME_MS, min(config.idle_wait_ms, quiet // 4))


def idle_poll_s(config: "KafkaSourceConfig", quiet_since_ms: int, now_ms: int) -> float:
    """How long a caught-up partition's bundle waits for its next record: a quarter of
    the time it has been quiet, between ``idle_poll_ms`` and ``idle_poll_max_ms``.

    A record ends the wait at once, however long it is; what a longer wait delays is
    the idle partition's watermark (reported as its bundle ends), so event-time timers
    fire later while nothing arrives. Right after traffic the wait is ``idle_poll_ms``;
    a job idle for minutes costs one bundle per ``idle_poll_max_ms`` per partition."""
    quiet = max(0, now_ms - quiet_since_ms)
    return max(config.idle_poll_ms, min(config.idle_poll_max_ms, quiet // 4)) / 1000


@dataclasses.dataclass(frozen=True)
class KafkaSourceConfig:
    """How to read: client settings and the source's time and offset policy.

    ``consumer_config`` is passed to librdkafka as is (``bootstrap.servers``,
    ``group.id``, ``security.protocol``, SASL settings, ...); the source sets
    ``enable.auto.commit=false`` itself. ``start_from`` applies to partitions
    without a committed offset when it is ``committed``. ``event_limits`` are
    the semantic checks decode applies (``schemas.validation``); the source
    uses their ``max_ahead_ms`` to keep implausible times out of element
    timestamps. A caught-up partition is polled again after a quarter of the
    time it has been quiet, at most ``idle_wait_ms`` (``idle_resume_ms``); with
    ``idle_poll_ms`` on, its bundle waits for a record instead, for a quarter of the
    time it has been quiet, between ``idle_poll_ms`` and ``idle_poll_max_ms``
    (``idle_poll_s``).
    ``shared_watermarks``: each partition reports the least watermark of every
    partition of its read (``_SharedWatermarks``), for runners that take a
    stage's watermark from its latest bundle alone (Prism); only where every
    partition of a read runs in one worker process.

    ``idle_watermark``: how a caught-up partition's watermark follows the wall
    clock (less ``idle_skew_ms``). ``record``: from its last record, as far behind
    the clock as that record was when read, so that history produced in pieces
    is not made late by the pauses between them; after a backlog, a quiet
    partition stays behind by its last record's age and holds back every
    event-time timer downstream as long. ``clock``: behind the clock only by the
    delay the records read live showed (``_PartitionCursor.live_lag_ms``), so
    timers fire on time after a backlog; a piece of history produced after a
    pause is late. Pipelines that drop late data keep ``record``.
    """

    consumer_config: Mapping[str, str]
    start_from: str = "committed"
    fallback_start: str = "earliest"
    timestamp_policy: str = "kafka"
    max_out_of_orderness_ms: int = 0
    idle_skew_ms: int = 2_000
    rewind_ms: int = 0
    commit_offsets: bool = True
    max_records_per_bundle: int = 5_000
    max_bundle_ms: int = 1_000
    batch_records: int = 1_000
    batch_timeout_ms: int = 20
    idle_wait_ms: int = 2_000
    idle_poll_ms: int = 2_000
    idle_poll_max_ms: int = 8_000
    idle_watermark: str = "record"
    event_limits: EventLimits = EventLimits()
    shared_watermarks: bool = False

    def __post_init__(self):
        if self.start_from not in START_POLICIES:
            raise ValueError(f"start_from must be one of {START_POLICIES}, not {self.start_from!r}")
        if self.fallback_start not in ("earliest", "latest"):
            raise ValueError(f"fallback_start must be earliest or latest, not {self.fallback_start!r}")
        if self.timestamp_policy not in TIMESTAMP_POLICIES:
            raise ValueError(
                f"timestamp_policy must be one of {TIMESTAMP_POLICIES}, not {self.timestamp_policy!r}")
        if self.idle_watermark not in IDLE_WATERMARKS:
            raise ValueError(
                f"idle_watermark must be one of {IDLE_WATERMARKS}, not {self.idle_watermark!r}")
        if "bootstrap.servers" not in self.consumer_config:
            raise ValueError("consumer_config needs bootstrap.servers")
        if self.start_from == "committed" and "group.id" not in self.consumer_config:
            raise ValueError("start_from='committed' needs a group.id in consumer_config")
        for name in ("max_out_of_orderness_ms", "idle_skew_ms", "rewind_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_records_per_bundle < 1 or self.batch_records < 1:
            raise ValueError("max_records_per_bundle and batch_records must be >= 1")
        if min(self.batch_timeout_ms, self.idle_wait_ms, self.idle_poll_ms,
               self.idle_poll_max_ms) < 0:
            raise ValueError("batch_timeout_ms, idle_wait_ms, idle_poll_ms and "
                             "idle_poll_max_ms must be >= 0")

    def identity(self) -> tuple:
        """A hashable value equal for equal configs (the client settings are a dict);
        worked out once (an idle wait asks for it every ``IDLE_WAIT_SLICE_S``)."""
        known = self.__dict__.get("_identity")
        if known is None:
            known = tuple((f.name, tuple(sorted(getattr(self, f.name).items()))
                           if f.name == "consumer_config" else getattr(self, f.name))
                          for f in dataclasses.fields(self))
            object.__setattr__(self, "_identity", known)  # frozen: set past __setattr__
        return known

    def client_config(self) -> dict:
        """The librdkafka settings of every consumer the source creates."""
        config = {
            "group.id": "feedbeam-unused",  # librdkafka requires one even for assign()
            **dict(self.consumer_config),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": self.fallback_start,
        }
        return config


class KafkaReadOptions(PipelineOptions):
    """Beam options of every pipeline that reads Kafka."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--kafka_bootstrap", default="127.0.0.1:9092",
                            help="Kafka bootstrap servers")
        parser.add_argument("--consumer_group", default=None,
                            help="consumer group whose committed offsets the job resumes from "
                                 "(default: feedbeam-<pipeline>)")
        parser.add_argument("--consumer_config", action="append", default=[],
                            metavar="KEY=VALUE",
                            help="extra librdkafka consumer setting, e.g. security.protocol=SSL; "
                                 "repeatable")
        parser.add_argument("--topic_prefix", default="",
                            help="prefix of the topic names (isolated test or tenant topics)")
        parser.add_argument("--start_from", choices=START_POLICIES, default="committed",
                            help="where to start: the group's committed offsets (falling back to "
                                 "--fallback_start), or the earliest or latest offsets")
        parser.add_argument("--fallback_start", choices=("earliest", "latest"),
                            default="earliest",
                            help="start of partitions without a committed offset")
        parser.add_argument("--timestamp_policy", choices=TIMESTAMP_POLICIES, default="kafka",
                            help="element time: the Kafka record timestamp or the event's own "
                                 "event_time")
        parser.add_argument("--max_out_of_orderness_s", type=float, default=0.0,
                            help="how far behind the newest record of a partition its watermark "
                                 "stays")
        parser.add_argument("--idle_skew_s", type=float, default=2.0,
                            help="how far behind the wall clock an idle partition's "
                                 "watermark stays (besides its records' delay, see "
                                 "--idle_watermark)")
        parser.add_argument("--idle_watermark", choices=IDLE_WATERMARKS, default=None,
                            help="record: an idle partition's watermark follows the clock from "
                                 "its last record, as far behind as that record was when read "
                                 "(history produced in pieces is not made late); clock: behind "
                                 "the clock only by the delay of records read live (timers "
                                 "fire on time after a backlog); default: the pipeline's")
        parser.add_argument("--rewind_s", type=float, default=None,
                            help="on start, re-read this much event time before the committed "
                                 "offsets (the pipeline's state horizon)")
        parser.add_argument("--batch_records", type=int, default=1000,
                            help="records per element the source emits (one partition's poll)")
        parser.add_argument("--max_records_per_bundle", type=int, default=None,
                            help="records a bundle reads at most (default: the pipeline's, "
                                 "5,000 for most): a backlog is applied in batches up to this "
                                 "size, and offsets are committed once per bundle")
        parser.add_argument("--max_bundle_ms", type=int, default=None,
                            help="how long a bundle reads at most (default: the pipeline's, "
                                 "1,000 ms for most), the records' processing downstream "
                                 "included")
        parser.add_argument("--batch_timeout_ms", type=int, default=20,
                            help="a poll waits at most this long for --batch_records records: "
                                 "the latency batching adds at low rates")
        parser.add_argument("--idle_wait_ms", type=int, default=2000,
                            help="with --idle_poll_ms=0: the longest pause between polls of "
                                 "a quiet partition (a quarter of its quiet time, up to this): "
                                 "each poll costs the runner a bundle")
        parser.add_argument("--idle_poll_ms", type=int, default=2000,
                            help="a bundle of caught-up partitions waits this long for a "
                                 "record on any of them (returning within 0.1 s of one), so "
                                 "an idle job costs one bundle per this period per bundle of "
                                 "partitions; 0: short polls paced by --idle_wait_ms instead")
        parser.add_argument("--idle_poll_max_ms", type=int, default=8000,
                            help="a partition quiet for long waits longer, a quarter of its "
                                 "quiet time up to this (a record still ends the wait at "
                                 "once; its watermark, and event-time timers, move once per "
                                 "wait); --idle_poll_ms or less: waits never grow")
        parser.add_argument("--max_event_ahead_s", type=float, default=3600.0,
                            help="dead-letter an event whose times lie more than this far past "
                                 "its record's Kafka timestamp or the wall clock (clock skew "
                                 "allowed; catches µs/ns units)")
        parser.add_argument("--max_event_age_s", type=float, default=None,
                            help="dead-letter an event whose time lies more than this far "
                                 "before its record's Kafka timestamp (default: no limit; "
                                 "measured against the record, so replays of old topics stay "
                                 "valid)")
        parser.add_argument("--partition_watermarks", choices=PARTITION_WATERMARKS,
                            default="auto",
                            help="shared: every partition reports the least watermark of all "
                                 "partitions of its read (needed on Prism, which takes a "
                                 "stage's watermark from its latest bundle; all partitions "
                                 "must run in one worker process); own: each its own; auto: "
                                 "shared on Prism, own elsewhere")

    def source_config(self, default_group: str, default_rewind_s: float = 0.0,
                      default_idle_watermark: str = "record",
                      default_max_records_per_bundle: int = 5_000,
                      default_max_bundle_ms: int = 1_000) -> KafkaSourceConfig:
        """A ``KafkaSourceConfig`` from these options; ``default_*`` are the pipeline's."""
        extra = {}
        for item in self.consumer_config:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--consumer_config expects KEY=VALUE, got {item!r}")
            extra[key.strip()] = value.strip()
        rewind_s = default_rewind_s if self.rewind_s is None else self.rewind_s
        limits = EventLimits(
            max_ahead_ms=int(self.max_event_ahead_s * 1000),
            max_age_ms=None if self.max_event_age_s is None else int(self.max_event_age_s * 1000))
        return KafkaSourceConfig(
            consumer_config={"bootstrap.servers": self.kafka_bootstrap,
                             "group.id": self.consumer_group or default_group, **extra},
            start_from=self.start_from,
            fallback_start=self.fallback_start,
            timestamp_policy=self.timestamp_policy,
            max_out_of_orderness_ms=int(self.max_out_of_orderness_s * 1000),
            idle_skew_ms=int(self.idle_skew_s * 1000),
            rewind_ms=int(rewind_s * 1000),
            batch_records=self.batch_records,
            max_records_per_bundle=self.max_records_per_bundle or default_max_records_per_bundle,
            max_bundle_ms=self.max_bundle_ms or default_max_bundle_ms,
            batch_timeout_ms=self.batch_timeout_ms,
            idle_wait_ms=self.idle_wait_ms,
            idle_poll_ms=self.idle_poll_ms,
            idle_poll_max_ms=self.idle_poll_max_ms,
            idle_watermark=self.idle_watermark or default_idle_watermark,
            event_limits=limits,
            shared_watermarks=self._shared_watermarks(),
        )

    def _shared_watermarks(self) -> bool:
        if self.partition_watermarks != "auto":
            return self.partition_watermarks == "shared"
        from apache_beam.options.pipeline_options import StandardOptions

        return "prism" in str(self.view_as(StandardOptions).runner or "").lower()


# --------------------------------------------------------------------------- elements


@dataclasses.dataclass(frozen=True)
class PartitionRead:
    """One partition to read, from ``start`` to ``stop`` (exclusive; None: forever).

    ``committed_timestamp_ms``: the timestamp the group's last commit recorded
    for this partition, carried forward by commits made before a record is read.
    ``partitions``: how many partitions the read has (this one included), so a
    shared watermark waits until each has reported.
    """

    topic: str
    partition: int
    start: int
    stop: int | None = None
    committed_timestamp_ms: int | None = None
    partitions: int = 1


class RecordBatchCoder(coders.Coder):
    """Compact, deterministic encoding of ``RecordBatch`` (no pickling)."""

    _HEAD = struct.Struct(">iIB")  # partition, records, has Kafka timestamps
    _RECORD = struct.Struct(">qqii")  # offset, timestamp, key len, value len

    def encode(self, b: RecordBatch) -> bytes:
        topic = b.topic.encode()
        kafka_stamps = b.kafka_timestamps_ms
        parts = [struct.pack(">H", len(topic)), topic,
                 self._HEAD.pack(b.partition, len(b), kafka_stamps is not None)]
        pack = self._RECORD.pack
        for offset, key, value, ts in zip(b.offsets, b.keys, b.values, b.timestamps_ms):
            parts.append(pack(offset, ts, -1 if key is None else len(key),
                              -1 if value is None else len(value)))
            if key:
                parts.append(key)
            if value:
                parts.append(value)
        if kafka_stamps is not None:
            parts.append(struct.pack(f">{len(b)}q", *kafka_stamps))
        return b"".join(parts)

    def decode(self, data: bytes) -> RecordBatch:
        (topic_len,) = struct.unpack_from(">H", data)
        pos = 2 + topic_len
        topic = data[2:pos].decode()
        partition, n, has_kafka_stamps = self._HEAD.unpack_from(data, pos)
        pos += self._HEAD.size
        offsets, keys, values, stamps = [], [], [], []
        unpack, size = self._RECORD.unpack_from, self._RECORD.size
        for _ in range(n):
            offset, ts, key_len, value_len = unpack(data, pos)
            pos += size
            keys.append(None if key_len < 0 else data[pos:pos + key_len])
            pos += max(key_len, 0)
            values.append(None if value_len < 0 else data[pos:pos + value_len])
            pos += max(value_len, 0)
            offsets.append(offset)
            stamps.append(ts)
        kafka_stamps = list(struct.unpack_from(f">{n}q", data, pos)) if has_kafka_stamps else None
        return RecordBatch(topic, partition, offsets, keys, values, stamps, kafka_stamps)

    def estimate_size(self, b: RecordBatch) -> int:
        # Beam samples element sizes for its byte counters; encoding to count cost
        # several percent of a read (the first outputs of every bundle are sampled).
        return b.approx_bytes()

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return RecordBatch


beam.coders.registry.register_coder(RecordBatch, RecordBatchCoder)


# --------------------------------------------------------------------------- offsets


def _commit_metadata(max_timestamp_ms: int | None) -> str:
    """What a commit records beside the offset: the newest timestamp read, if any."""
    if max_timestamp_ms is None:
        return "{}"
    return json.dumps({"ts": max_timestamp_ms}, separators=(",", ":"))


def _committed_timestamp(metadata: str | None) -> int | None:
    """The timestamp a commit recorded; None when it recorded none (another tool,
    or a negative one: older versions wrote ``-1`` for partitions read idle)."""
    try:
        ts = int(json.loads(metadata)["ts"]) if metadata else None
    except (ValueError, KeyError, TypeError):
        return None  # committed by another tool: no rewind information
    return ts if ts is not None and ts >= 0 else None


def _retrying_transient(call, timeout_s: float, first_backoff_s: float = 0.2):
    """``call()``, again after a growing pause while it raises a ``KafkaException`` the
    client recovers from (``recoverable``), until ``timeout_s`` has passed; then the
    last error. A broker started moments ago answers a group's first offset fetch
    with NOT_COORDINATOR (or "load in progress") while it creates and loads
    ``__consumer_offsets``."""
    from confluent_kafka import KafkaError, KafkaException

    settling = (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE)
    deadline = time.monotonic() + timeout_s
    backoff = first_backoff_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if (not isinstance(error, KafkaError)
                    or not (recoverable(error) or error.code() in settling)
                    or time.monotonic() + backoff > deadline):
                raise
            log.warning("kafka source: %s; asking again in %.1fs", error.str(), backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)


def resolve_start_offsets(config: KafkaSourceConfig, topics: Sequence[str],
                          timeout_s: float = 30.0) -> list[PartitionRead]:
    """The partitions of ``topics`` and the offset each read starts at.

    ``committed``: the group's committed offset, moved back by ``rewind_ms``
    of event time when the commit recorded its timestamp; partitions with no
    commit start at ``fallback_start``. Raises ``LookupError`` for a topic
    the broker does not have.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(config.client_config())
    try:
        metadata = consumer.list_topics(timeout=timeout_s)
        partitions = []
        for topic in topics:
            meta = metadata.topics.get(topic)
            if meta is None or meta.error is not None:
                raise LookupError(
                    f"Kafka topic {topic!r} does not exist on "
                    f"{config.consumer_config['bootstrap.servers']} "
                    f"({meta.error if meta is not None else 'not in metadata'}); "
                    "create it with `feedbeam topics create`")
            partitions += [TopicPartition(topic, p) for p in sorted(meta.partitions)]

        bounds = {(tp.topic, tp.partition): _retrying_transient(
                      lambda tp=tp: consumer.get_watermark_offsets(tp, timeout=timeout_s),
                      timeout_s)
                  for tp in partitions}
        committed: dict[tuple[str, int], TopicPartition] = {}
        if config.start_from == "committed":
            for tp in _retrying_transient(lambda: consumer.committed(partitions,
                                                                     timeout=timeout_s),
                                          timeout_s):
                if tp.offset >= 0:
                    committed[(tp.topic, tp.partition)] = tp

        reads = []
        rewinds = []
        for tp in partitions:
            low, high = bounds[(tp.topic, tp.partition)]
            policy = config.start_from
            commit = committed.get((tp.topic, tp.partition))
            if policy == "committed" and commit is None:
                policy = config.fallback_start
            committed_ts = None
            if policy == "earliest":
                start = low
            elif policy == "latest":
                start = high
            else:
                start = min(max(commit.offset, low), high)
                committed_ts = _committed_timestamp(commit.metadata)
                if config.rewind_ms and committed_ts is not None:
                    rewinds.append((len(reads), TopicPartition(
                        tp.topic, tp.partition, max(committed_ts - config.rewind_ms, 0))))
            reads.append(PartitionRead(tp.topic, tp.partition, start,
                                       committed_timestamp_ms=committed_ts,
                                       partitions=len(partitions)))

        if rewinds:
            found = consumer.offsets_for_times([tp for _, tp in rewinds], timeout=timeout_s)
            for (index, _), tp in zip(rewinds, found):
                read = reads[index]
                # -1: no record at or after that time, so nothing to re-read.
                if 0 <= tp.offset < read.start:
                    reads[index] = dataclasses.replace(read, start=tp.offset)
        for read in reads:
            log.info("kafka source: %s[%d] starts at offset %d", read.topic, read.partition,
                     read.start)
        return reads
    finally:
        consumer.close()


# --------------------------------------------------------------------------- SDF


class _OffsetTracker(OffsetRestrictionTracker):
    """Offset-range tracker that only checkpoints, never splits a range in parts.

    A fractional split of an unbounded ``[start, 2**63)`` would hand a worker
    offsets far beyond the end of the partition, and two parts of a bounded
    range would read through the same pooled consumer of that partition at
    once. Runners (Prism does) ask for such splits to parallelise; refusing
    them keeps one reader per partition, Kafka's own unit of parallelism.
    """

    def try_split(self, fraction_of_remainder):
        if fraction_of_remainder != 0:
            return None
        return super().try_split(fraction_of_remainder)

    def is_bounded(self):
        return self._range.stop != UNBOUNDED_STOP


class _PartitionRestrictions(RestrictionProvider):
    def initial_restriction(self, element: PartitionRead) -> OffsetRange:
        stop = UNBOUNDED_STOP if element.stop is None else element.stop
        return OffsetRange(element.start, max(stop, element.start))

    def create_tracker(self, restriction: OffsetRange) -> _OffsetTracker:
        return _OffsetTracker(restriction)

    def restriction_size(self, element, restriction: OffsetRange) -> int:
        if restriction.stop == UNBOUNDED_STOP:
            return 1
        return restriction.size()

    def split(self, element, restriction):
        # One initial restriction per partition: Kafka's unit of parallelism.
        yield restriction


class _PartitionWatermark(ManualWatermarkEstimator):
    """A partition's own watermark (its state, what ``set_watermark`` moves), reported
    to the runner as no later than ``share``'s value when there is one."""

    def __init__(self, state):
        super().__init__(state)
        self._shared = None

    def own(self) -> Timestamp | None:
        return self.get_estimator_state()

    def share(self, shared: Timestamp) -> None:
        self._shared = shared

    def current_watermark(self):
        own = super().current_watermark()
        if self._shared is None or own is None:
            return own
        return min(own, self._shared)


class _WatermarkProvider(WatermarkEstimatorProvider):
    def initial_estimator_state(self, element, restriction):
        return MIN_TIMESTAMP

    def create_watermark_estimator(self, state):
        return _PartitionWatermark(state)


class _SharedWatermarks:
    """The latest own watermark of every partition of a read, per worker process.

    Prism sets a stage's output watermark from the residuals of the bundle that
    finished last, not from every pending residual: with one bundle per
    partition, a partition far ahead (a small one caught up, or idle and moving
    with the clock) would carry the watermark past the records another still has
    to read, and downstream those count as late. So each partition reports the
    least watermark of its read, and none until every partition has reported
    once. Only valid where all partitions of a read run in one process.

    A partition's mark is its watermark as its bundle starts (``report``): what
    the runner holds for it, its earlier bundles' records delivered. The watermark
    a bundle ends with is its own alone (``settle``), never a mark for the others
    while the runner may not have the bundle's records yet: a bundle finishing
    meanwhile would carry the stage past them (seen: 2,487 records of a replayed
    backlog dead-lettered as too late by the features job, the last ones of their
    partition, read in the same bundle as a record from now).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._marks: dict[str, dict[tuple[str, int], Timestamp]] = {}

    def report(self, read_id: str, element: PartitionRead, own: Timestamp) -> Timestamp:
        """A bundle of ``element`` starts with ``own``: the read's least watermark."""
        with self._lock:
            marks = self._marks.setdefault(read_id, {})
            marks[(element.topic, element.partition)] = own
            if len(marks) < element.partitions:
                return MIN_TIMESTAMP
            return min(marks.values())

    def settle(self, read_id: str, element: PartitionRead, own: Timestamp) -> Timestamp:
        """A bundle of ``element`` ends with ``own``: the least of it and the other
        partitions' marks (``own`` stays this bundle's until its next one starts)."""
        with self._lock:
            marks = self._marks.setdefault(read_id, {})
            key = (element.topic, element.partition)
            if len(marks.keys() | {key}) < element.partitions:
                return MIN_TIMESTAMP
            return min([own, *(m for k, m in marks.items() if k != key)])

    def finish(self, read_id: str, element: PartitionRead) -> None:
        """A bounded partition read to its end holds no one back any more."""
        with self._lock:
            self._marks.setdefault(read_id, {})[(element.topic, element.partition)] = \
                MAX_TIMESTAMP


_WATERMARKS = _SharedWatermarks()


@dataclasses.dataclass
class _PartitionCursor:
    """A worker's live consumer for one partition and what it has seen."""

    consumer: object
    next_offset: int
    #: The client that commits this partition's offsets (``_CursorPool.get``: one per
    #: source config, never a reading consumer).
    committer: object = None
    last_timestamp_ms: int | None = None
    last_record_wall_ms: int | None = None
    #: How far behind the wall clock the newest record of the last bundle read *live*
    #: (``live``) was when read: the producers' own delay, which an idle watermark
    #: keeps. None until such a bundle read records (then the idle watermark is the
    #: wall clock less ``idle_skew_ms``).
    live_lag_ms: int | None = None
    #: The last bundle ended on an empty poll (or an idle wait that got nothing): the
    #: next bundle's records arrived since, so how late they are is the producers' delay,
    #: not time spent queued behind a backlog.
    live: bool = False
    committed_offset: int = -1
    # What commits record as the position's timestamp before a record is read:
    # the previous commit's (``PartitionRead.committed_timestamp_ms``).
    carried_timestamp_ms: int | None = None
    #: When this worker opened the partition (wall ms): quiet time counts from here
    #: until a first record.
    opened_wall_ms: int = dataclasses.field(default_factory=lambda: int(time.time() * 1000))
    #: The partition had nothing more to read when its last bundle ended.
    caught_up: bool = False
    #: When a bundle last read the partition (monotonic s): set as its read starts and
    #: again as it ends (after an idle wait that may have lasted ``idle_poll_ms``).
    read_at: float = 0.0
    #: A bundle is reading the partition right now (from its read's start to its end,
    #: idle wait included): no other bundle waits on its behalf.
    reading: bool = False
    #: Held while the consumer is in ``consume()`` (``poll``). Others look at the consumer
    #: only when they can take it: a call on a consumer waits for a ``consume()`` running
    #: on it in another thread (``bench/probe_consumer_calls.py``: 2.7 s behind a 3 s wait).
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def poll(self, num_messages: int, timeout_s: float) -> list:
        """``consume()`` on the consumer, holding ``lock``."""
        with self.lock:
            return self.consumer.consume(num_messages=num_messages, timeout=timeout_s)

    def _end_read(self, topic: str, partition: int) -> bool | None:
        """Whether everything up to the end offset the consumer's last fetch saw is read
        (no broker round trip); None while that end is unknown (a new consumer before
        its first fetch). The consumer's position counts too: it moves past offsets
        that hold no record (a transaction's commit marker ends many partitions), the
        last record read does not."""
        from confluent_kafka import TopicPartition

        tp = TopicPartition(topic, partition)
        _, high = self.consumer.get_watermark_offsets(tp, cached=True)
        if high is None or high < 0:
            return None
        return self.next_offset >= high or self.consumer.position([tp])[0].offset >= high

    def records_waiting(self, topic: str, partition: int) -> bool:
        """Records the consumer knows of beyond what was read."""
        try:
            return self._end_read(topic, partition) is False
        except RuntimeError:  # closed meanwhile: its read ended
            return False

    def at_end(self, topic: str, partition: int) -> bool:
        """Everything up to the end offset the consumer's last fetch saw is read; False
        while that end is unknown."""
        return self._end_read(topic, partition) is True


class _CursorPool:
    """Process-wide consumers, one per (source config, partition).

    Runners create DoFn instances freely (Flink one per bundle processor, and
    many over a job's life), and every librdkafka client holds threads and
    thread-local storage, so consumers are not owned by a DoFn instance: they
    live here, are shared by every instance reading with the same config, and
    are closed when the last such instance is torn down.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users: dict[tuple, int] = {}  # config identity -> DoFn instances
        self._cursors: dict[tuple[tuple, str, int], _PartitionCursor] = {}
        self._committers: dict[tuple, object] = {}  # config identity -> its client

    def attach(self, config: KafkaSourceConfig) -> None:
        identity = config.identity()
        with self._lock:
            self._users[identity] = self._users.get(identity, 0) + 1

    def detach(self, config: KafkaSourceConfig) -> None:
        identity = config.identity()
        with self._lock:
            left = self._users.get(identity, 1) - 1
            if left > 0:
                self._users[identity] = left
                return
            self._users.pop(identity, None)
            closing = [k for k in self._cursors if k[0] == identity]
            clients = [self._cursors.pop(k).consumer for k in closing]
            committer = self._committers.pop(identity, None)
        for client in clients + ([committer] if committer is not None else []):
            try:
                client.close()
            except RuntimeError:  # already closed
                pass

    def _committer(self, config: KafkaSourceConfig):
        """The client that commits offsets for ``config``'s group (the lock held): one
        per config, not a reading consumer. A synchronous commit on a consumer waits
        until a ``consume()`` running on it in another thread returns, and a caught-up
        partition's bundle sits in ``consume()`` for up to ``idle_poll_ms``: its
        previous bundle's commit (the runner's finalization) would wait that long
        (measured: 2.7 s behind a 3 s wait, 1 ms on a client of its own)."""
        from confluent_kafka import Consumer

        identity = config.identity()
        client = self._committers.get(identity)
        if client is None:
            client = self._committers[identity] = Consumer(config.client_config())
        return client

    def between_reads(self, config: KafkaSourceConfig, besides: _PartitionCursor) -> list:
        """``(key, cursor)`` of every partition read with ``config`` in this process
        recently, other than ``besides``, that no bundle is reading right now: those
        that may wait in ``besides``' bundle for its idle wait to end."""
        identity, recent = config.identity(), time.monotonic() - RECENT_CURSOR_S
        with self._lock:
            return [(key, c) for key, c in self._cursors.items()
                    if key[0] == identity and c is not besides and not c.reading
                    and c.read_at >= recent]

    @staticmethod
    def records_waiting(others: list) -> bool:
        """Whether one of ``others`` (``between_reads``) has records waiting to be read."""
        for (_, topic, partition), cursor in others:
            # A partition polled in another bundle right now is that bundle's to wait for.
            if cursor.lock.acquire(blocking=False):
                try:
                    if cursor.records_waiting(topic, partition):
                        return True
                finally:
                    cursor.lock.release()
        return False

    def get(self, config: KafkaSourceConfig, topic: str, partition: int,
            start: int) -> _PartitionCursor:
        from confluent_kafka import Consumer, TopicPartition

        key = (config.identity(), topic, partition)
        with self._lock:
            cursor = self._cursors.get(key)
            if cursor is None:
                consumer = Consumer(config.client_config())
                consumer.assign([TopicPartition(topic, partition, start)])
                cursor = self._cursors[key] = _PartitionCursor(consumer, start,
                                                               self._committer(config))
            return cursor


_CURSORS = _CursorPool()


def _last_offset(messages) -> int:
    """The offset of the last record in ``messages`` (a poll); -1 if it holds none."""
    for message in reversed(messages):
        if message.error() is None:
            return message.offset()
    return -1


class _ReadPartitionFn(beam.DoFn):
    """Reads one partition's offset range; see the module docstring."""

    def __init__(self, config: KafkaSourceConfig, read_id: str):
        self._config = config
        self._read_id = read_id

    def setup(self):
        _CURSORS.attach(self._config)
        self._may_wait = True
        self._records = Metrics.counter(_METRICS_NAMESPACE, "records_read")
        self._bytes = Metrics.counter(_METRICS_NAMESPACE, "bytes_read")
        self._commits = Metrics.counter(_METRICS_NAMESPACE, "offsets_committed")
        self._commit_failures = Metrics.counter(_METRICS_NAMESPACE, "offset_commit_failures")

    def teardown(self):
        _CURSORS.detach(self._config)

    def start_bundle(self):
        self._may_wait = True  # until the bundle waited or emitted (``_idle_wait``)

    def _cursor(self, element: PartitionRead, start: int) -> _PartitionCursor:
        from confluent_kafka import TopicPartition

        cursor = _CURSORS.get(self._config, element.topic, element.partition, start)
        cursor.read_at = time.monotonic()
        if cursor.carried_timestamp_ms is None:
            cursor.carried_timestamp_ms = element.committed_timestamp_ms
        if cursor.next_offset != start:
            # The restriction moved (a split, a retried bundle): reposition.
            cursor.consumer.seek(TopicPartition(element.topic, element.partition, start))
            cursor.next_offset = start
        return cursor

    def _timestamp_ms(self, kafka_ts: int, value: bytes | None, latest_ms: int) -> int:
        """A record's element time: its Kafka timestamp or its event time, never
        past ``latest_ms`` (the wall clock plus the allowed skew).

        An event time outside what validation accepts (seconds, µs, ns, far
        future) is not used: the record will be dead-lettered, and its time
        must not move the watermark or overflow Beam's timestamps meanwhile.
        """
        if self._config.timestamp_policy == "event":
            event_ts = peek_event_time(value)
            if (event_ts is not None
                    and self._config.event_limits.min_event_time_ms <= event_ts <= latest_ms):
                return event_ts
        return kafka_ts if kafka_ts <= latest_ms else latest_ms

    def process(
        self,
        element: PartitionRead,
        tracker=beam.DoFn.RestrictionParam(_PartitionRestrictions()),
        watermark=beam.DoFn.WatermarkEstimatorParam(_WatermarkProvider()),
    ) -> Iterable[WindowedValue]:
        # Bounded reads commit nothing, so they ask for no bundle
        # finalization: a runner finalizes every bundle of a stage that
        # declares a finalizer, one more round trip per bundle.
        return self._read(element, tracker, watermark, None)

    def _read(self, element: PartitionRead, tracker, watermark, finalizer):
        cursor = self._cursor(element, tracker.current_restriction().start)
        cursor.reading = True
        try:
            yield from self._read_from(cursor, element, tracker, watermark, finalizer)
        finally:
            cursor.reading = False

    def _read_from(self, cursor: _PartitionCursor, element: PartitionRead, tracker, watermark,
                   finalizer):
        restriction = tracker.current_restriction()
        config = self._config
        if config.shared_watermarks:  # what a split during the bundle would report
            watermark.share(_WATERMARKS.report(self._read_id, element, watermark.own()))
        emitted = size = 0
        max_ts = None
        done = False
        timeout_s = config.batch_timeout_ms / 1000
        max_ahead_ms = config.event_limits.max_ahead_ms
        first, waited = self._idle_wait(cursor) if cursor.caught_up else ([], False)
        live, drained = cursor.live, False
        # The bundle's time counts from here; what the wait returned is always read.
        deadline = time.monotonic() + config.max_bundle_ms / 1000
        while first or ((emitted or not waited) and emitted < config.max_records_per_bundle
                        and time.monotonic() < deadline):
            messages = cursor.poll(
                min(config.batch_records, config.max_records_per_bundle - emitted) - len(first),
                timeout_s)
            if first:
                messages, first = first + messages, []
            if not messages:
                # An empty poll may only mean the prefetch ran dry in a backlog, or
                # that a new consumer has not fetched yet. Only ``clock`` asks.
                drained = (config.idle_watermark == "clock"
                           and cursor.at_end(element.topic, element.partition))
                break
            timeout_s = 0  # caught up once the fetched records are taken: end the bundle
            latest_ms = int(time.time() * 1000) + max_ahead_ms
            offsets, keys, values, stamps, kafka_stamps = [], [], [], [], []
            # Claiming the poll's last offset claims every offset before it. When that
            # claim fails, the range ends inside the poll: a split can only cut after
            # the last claim attempt, so the stop is final and what lies before it
            # is this restriction's.
            last = _last_offset(messages)
            stop = None
            if last >= 0 and not tracker.try_claim(last):
                stop = tracker.current_restriction().stop
                done = True
            for message in messages:
                error = message.error()
                if error is not None:
                    if not recoverable(error):
                        raise RuntimeError(
                            f"Kafka read of {element.topic}[{element.partition}] failed: {error}")
                    log.warning("kafka source: transient error on %s[%d]: %s",
                                element.topic, element.partition, error)
                    continue
                offset = message.offset()
                if stop is not None and offset >= stop:
                    break
                value = message.value()
                kafka_ts = message.timestamp()[1]
                offsets.append(offset)
                keys.append(message.key())
                values.append(value)
                stamps.append(self._timestamp_ms(kafka_ts, value, latest_ms))
                kafka_stamps.append(kafka_ts)
                if value:
                    size += len(value)
            if offsets:
                cursor.next_offset = offsets[-1] + 1
                emitted += len(offsets)
                self._may_wait = False  # these travel on only when the bundle ends
                oldest, newest = min(stamps), max(stamps)
                if max_ts is None or newest > max_ts:
                    max_ts = newest
                # Stamped with its oldest record: no record of the batch is behind the
                # element's time, and each keeps its own time once the batch is opened.
                # Kafka timestamps travel only where they differ (event time, clamped).
                yield WindowedValue(
                    RecordBatch(element.topic, element.partition, offsets, keys, values, stamps,
                                None if kafka_stamps == stamps else kafka_stamps),
                    Timestamp(micros=oldest * 1000), _GLOBAL_WINDOWS)
            if done:
                break
        # Read until now: an idle wait at the start may have taken most of a bundle.
        cursor.read_at = time.monotonic()
        if emitted:
            self._records.inc(emitted)
            self._bytes.inc(size)
            now_ms = int(time.time() * 1000)
            # The source's time never passes the wall clock: a record from a
            # skewed producer (or one validation will reject) must not make every
            # later record late, fire timers early or set a rewind point ahead.
            newest_ms = min(max_ts, now_ms)
            cursor.last_timestamp_ms = max(newest_ms, cursor.last_timestamp_ms or newest_ms)
            cursor.last_record_wall_ms = now_ms
            if live:
                cursor.live_lag_ms = now_ms - newest_ms
            self._advance(watermark, newest_ms - config.max_out_of_orderness_ms)
        if finalizer is not None:
            # Registered on every bundle, empty or not: Prism finalizes every
            # bundle of a finalizing stage and the SDK rejects a bundle that
            # registered nothing.
            finalizer.register(self._commit_callback(element, cursor, cursor.next_offset)
                               if config.commit_offsets else _no_commit)
        if done:
            self._end(element, cursor)
            return
        if restriction.stop != UNBOUNDED_STOP and cursor.next_offset >= restriction.stop:
            tracker.try_claim(restriction.stop)  # gaps (compaction, txn markers) end the range
            self._end(element, cursor)
            return
        caught_up = not emitted and self._advance_idle(element, cursor, watermark)
        cursor.caught_up = caught_up
        cursor.live = drained or (waited and not emitted)
        if config.shared_watermarks:
            watermark.share(_WATERMARKS.settle(self._read_id, element, watermark.own()))
        # A caught-up partition waits for its next record inside its next bundle
        # (idle_poll_ms), so it resumes at once; with that wait off it pauses between
        # polls instead. One with records on the way pauses too, except on Prism
        # (shared watermarks): Prism does not hold the watermark for a residual
        # deferred with a delay.
        pause = (not caught_up and not config.shared_watermarks) if config.idle_poll_ms \
            else (caught_up or not config.shared_watermarks)
        if not emitted and pause:
            quiet_since = cursor.last_record_wall_ms or cursor.opened_wall_ms
            tracker.defer_remainder(Duration(micros=idle_resume_ms(
                config, quiet_since, int(time.time() * 1000)) * 1000))
        else:
            tracker.defer_remainder()

    def _idle_wait(self, cursor: _PartitionCursor) -> tuple[list, bool]:
        """A caught-up partition waits here for its next record, up to ``idle_poll_ms``:
        blocked in librdkafka it costs nothing, while every bundle costs the runner and
        the worker a round trip (idle jobs polled by short bundles kept 10-15 % of a
        core busy). A record that comes is read at once. The wait holds up the rest of
        its bundle, so there is at most one per bundle, none once the bundle emitted
        records (a runner passes them on only when the bundle ends: a partition's
        records read just before another partition's wait reached their feeds 2 s
        late), none while another partition of the read has records waiting, and it
        ends when one gets some (looked at every ``IDLE_WAIT_SLICE_S`` while one is
        between two reads: only those can be later in this bundle; while none is, it
        polls in ``IDLE_WAIT_LONG_SLICE_S`` slices). Returns what it read and whether
        it waited."""
        config = self._config
        if (config.idle_poll_ms <= 0 or not self._may_wait
                or _CURSORS.records_waiting(_CURSORS.between_reads(config, cursor))):
            return [], False
        self._may_wait = False
        deadline = time.monotonic() + idle_poll_s(
            config, cursor.last_record_wall_ms or cursor.opened_wall_ms, int(time.time() * 1000))
        while True:
            remaining = deadline - time.monotonic()
            # Partitions that may sit later in this bundle; while there are none (every
            # other one is in a bundle of its own), nothing needs looking at.
            others = _CURSORS.between_reads(config, cursor)
            slice_s = IDLE_WAIT_SLICE_S if others else IDLE_WAIT_LONG_SLICE_S
            got = cursor.poll(1, max(0.0, min(slice_s, remaining)))
            if got or remaining <= slice_s or (others and _CURSORS.records_waiting(others)):
                return got, True

    def _end(self, element: PartitionRead, cursor: _PartitionCursor) -> None:
        """This restriction is done: the partition's read too when its range is (it holds
        no one back any more), else a split's residual reads on from here (and reports
        as its bundle starts)."""
        if (self._config.shared_watermarks and element.stop is not None
                and cursor.next_offset >= element.stop):
            _WATERMARKS.finish(self._read_id, element)

    def _advance(self, watermark, candidate_ms: int) -> None:
        candidate = Timestamp(micros=candidate_ms * 1000)
        current = watermark.own()
        if current is None or candidate > current:
            watermark.set_watermark(candidate)

    def _advance_idle(self, element: PartitionRead, cursor: _PartitionCursor, watermark) -> bool:
        """Move an idle, caught-up partition's watermark with the wall clock, less
        ``idle_skew_ms`` and its records' delay (``KafkaSourceConfig.idle_watermark``);
        False (and the watermark left alone) while records are waiting or the end is
        unknown."""
        if not cursor.at_end(element.topic, element.partition):
            return False
        now_ms = int(time.time() * 1000)
        if self._config.idle_watermark == "clock" or cursor.last_timestamp_ms is None:
            # Behind by the producers' delay as last seen live, never by how long a
            # backlog's records sat queued.
            behind_ms = cursor.live_lag_ms or 0
        else:
            behind_ms = cursor.last_record_wall_ms - cursor.last_timestamp_ms
        self._advance(watermark, now_ms - behind_ms - self._config.idle_skew_ms)
        return True

    def _commit_callback(self, element: PartitionRead, cursor: _PartitionCursor, offset: int):
        # A partition with no record read yet keeps the previous commit's
        # timestamp: recording none (or -1) would lose, or wrongly move, the
        # rewind point of the next start.
        timestamp_ms = (cursor.last_timestamp_ms if cursor.last_timestamp_ms is not None
                        else cursor.carried_timestamp_ms)

        def commit():
            from confluent_kafka import KafkaException, TopicPartition

            if offset <= cursor.committed_offset:
                return
            try:
                cursor.committer.commit(offsets=[TopicPartition(
                    element.topic, element.partition, offset,
                    metadata=_commit_metadata(timestamp_ms))], asynchronous=False)
            except KafkaException as exc:
                # The next bundle's commit covers this one; failing here only
                # means a restart re-reads a little more.
                self._commit_failures.inc()
                log.warning("kafka source: commit of %s[%d]@%d failed: %s",
                            element.topic, element.partition, offset, exc)
                return
            cursor.committed_offset = offset
            self._commits.inc()

        return commit


def _no_commit() -> None:
    """Finalization of a bundle whose source commits no offsets."""


class _UnboundedReadPartitionFn(_ReadPartitionFn):
    """The same read, marked unbounded, committing offsets on bundle finalization."""

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        element: PartitionRead,
        # The finalizer must come before the tracker: declared after it, Beam
        # 2.77 passes the tracker twice (by position and by keyword).
        finalizer=beam.DoFn.BundleFinalizerParam,
        tracker=beam.DoFn.RestrictionParam(_PartitionRestrictions()),
        watermark=beam.DoFn.WatermarkEstimatorParam(_WatermarkProvider()),
    ) -> Iterable[WindowedValue]:
        return self._read(element, tracker, watermark, finalizer)


class _ResolvePartitions(beam.DoFn):
    """At job start: list the partitions and resolve where each read begins."""

    def __init__(self, config: KafkaSourceConfig, topics: Sequence[str]):
        self._config = config
        self._topics = tuple(topics)

    def process(self, _):
        yield from resolve_start_offsets(self._config, self._topics)


# --------------------------------------------------------------------------- transform


class ReadFromKafka(beam.PTransform):
    """Read ``topics`` (unbounded) or explicit offset ranges (bounded).

    Args:
      config: client settings and policies (``KafkaSourceConfig``).
      topics: topics to read from the start policy onward, forever.
      ranges: instead of ``topics``, ``{topic: {partition: (start, stop)}}``
        offset ranges to read once (a bounded PCollection), as resolved by
        ``stores.kafka.offsets`` for replays and backfills.

    Returns a ``PCollection[RecordBatch]``, each stamped with its oldest record's time.
    """

    def __init__(self, config: KafkaSourceConfig, topics: Sequence[str] = (),
                 ranges: Mapping[str, Mapping[int, tuple[int, int]]] | None = None):
        super().__init__()
        if bool(topics) == bool(ranges):
            raise ValueError("give either topics (unbounded) or ranges (bounded)")
        self._config = config
        self._topics = tuple(topics)
        self._ranges = ranges
        self._read_id = uuid.uuid4().hex  # names this read's partitions in _SharedWatermarks

    def expand(self, pbegin):
        if self._ranges:
            spans = [(topic, partition, start, stop)
                     for topic, parts in sorted(self._ranges.items())
                     for partition, (start, stop) in sorted(parts.items()) if stop > start]
            reads = [PartitionRead(topic, partition, start, stop, partitions=len(spans))
                     for topic, partition, start, stop in spans]
            # Offsets of a bounded range are committed by no one: a replay
            # must not move the live pipeline's consumer group.
            config = dataclasses.replace(self._config, commit_offsets=False)
            return (pbegin
                    | "Partitions" >> beam.Create(reads)
                    | "ReadPartitions" >> beam.ParDo(_ReadPartitionFn(config, self._read_id))
                    .with_output_types(RecordBatch))
        return (pbegin
                | "Start" >> beam.Impulse()
                | "ResolvePartitions" >> beam.ParDo(_ResolvePartitions(self._config, self._topics))
                | "SpreadPartitions" >> beam.Reshuffle()
                | "ReadPartitions" >> beam.ParDo(_UnboundedReadPartitionFn(self._config,
                                                                          self._read_id))
                .with_output_types(RecordBatch))
