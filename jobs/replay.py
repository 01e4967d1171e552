"""``feedbeam replay``: a topic's time or offset range to a Parquet dataset.

    feedbeam replay engagement-events --from 2024-05-01T10:00Z --to 2024-05-01T12:00Z --out /tmp/eng
    feedbeam replay engagement-events --from-offset 0 --to-offset 5000 --out /tmp/eng
    feedbeam replay test1.post-events --partition-offsets "0:10-200,2:0-" --out /tmp/posts

What is read: the range is resolved to per-partition offset ranges
``[start, stop)`` by ``stores.kafka.offsets`` (see there for how a time range
maps to offsets through Kafka's time index), printed, and read exactly:
each partition is assigned and seeked by itself (no consumer group, nothing
committed) and consumed until its stop offset. Open ends are fixed at resolve
time, so re-running with the printed ``--partition-offsets`` reproduces a
replay even after producers wrote more.

Decoding is ``schemas.records.dict_decoder`` / ``decode_record_dict``,
the dict twins of the pipelines' ``decode_record``: the same records are
accepted and rejected, and a rejected one becomes the same ``DeadLetter``.
The topic's event type comes from its name less ``--topic-prefix`` (derived
from the name when not given: ``t1.post-events`` -> prefix ``t1.``).

Output, under ``--out``::

    date=2024-05-01/hour=10/part-00002-000000050000.parquet   rows of one partition and
                                                              offset chunk in that hour
    _dead_letters/part-00002-000000050000.parquet             records that did not decode
    _replay.json                                              topic, ranges and counts

The ``date``/``hour`` (UTC) come from each event's ``event_time``; the columns
are the Avro fields (Arrow types: ``stores.files.parquet``), ``_event_ts``
and the source coordinates ``_partition``, ``_offset``, ``_kafka_timestamp``.
Dead letters keep the original key and value bytes, the coordinates, the
reason and the error. ``pyarrow.dataset.dataset(out, partitioning="hive")``
reads the events and skips the ``_``-prefixed files.

Determinism: two replays of the same range write byte-identical files.
Records are cut into fixed chunks by offset (``offset // --batch``, so a
chunk's bounds do not depend on where the range starts); a chunk's rows go to
one file per event hour, named by partition and chunk start offset, in offset
order; no file carries a wall-clock time (dead letters omit ``failed_at``).

Memory: all partitions are read at once; decoded rows are turned into Arrow
columns after every fetch, and a chunk is written as soon as its partition
moves past it, so about ``partitions x --batch`` rows are held, as Arrow.

Pipeline re-runs
----------------
``--pipeline fanout`` re-runs the fan-out pipeline over the range instead of
writing Parquet::

    feedbeam replay post-events --from 2024-05-01T10:00Z --to 2024-05-01T12:00Z --pipeline fanout
    feedbeam replay t1.follow-events --partition-offsets "0:0-" --pipeline fanout \
        --redis_key_prefix=t1 --cassandra_keyspace=t1 --push_threshold=1000

The range is resolved exactly as for Parquet and handed to the pipeline as
``--replay_ranges``; it runs in batch mode (Prism by default, or the runner
given after the pipeline's name, with any other Beam or pipeline option),
reads only that range of TOPIC and commits no offsets, so the live job's
consumer group does not move. A pipeline reads several topics (fanout: post-events and
follow-events); TOPIC must be one of them and only its range is replayed.
Its effects depend on what the other topic already put in the stores: replay
post-events over a graph that is in the stores (replaying follow-events, or
running the live job, puts it there). Every fan-out write is idempotent, so
replaying a range the live job already applied leaves the same state. Dead
letters of the range go to ``<TOPIC>.dlq`` again (the pipeline's read step
always writes them; they carry the source offset, so repeats are
recognizable). Printed at the end: records in the range = events decoded +
dead letters (from the pipeline's counters), then every fan-out counter.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import logging
import re
import shutil
import sys
import time
from pathlib import Path

from infra.settings import StackSettings
from infra.errors import UserFacingError
from stores.kafka import offsets as kafka_offsets
from schemas.records import (
    DeadLetter, KafkaRecord, base_topic, decode_record_dict, dict_decoder,
)
from schemas.events import TOPIC_TYPES, TOPICS, dlq_topic

log = logging.getLogger(__name__)

DEFAULT_BATCH = 50_000
MANIFEST = "_replay.json"
DEAD_LETTER_DIR = "_dead_letters"

#: Consumer settings for bounded reads: no group membership or commits (the
#: group id is required by librdkafka but never joined, since partitions are
#: assigned), EOF events to end a partition early, big fetches, and an
#: error instead of a silent reset if a start offset was deleted meanwhile.
CONSUMER_CONFIG: dict[str, object] = {
    "group.id": "feedbeam-replay",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,
    "auto.offset.reset": "error",
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 16 * 1024 * 1024,
    "queued.max.messages.kbytes": 256 * 1024,
}
_CONSUME_BATCH = 5_000
_STALL_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- options


def parse_time(text: str, option: str) -> int:
    """An ISO 8601 time (naive means UTC, ``Z`` allowed) or epoch ms -> ms."""
    s = text.strip()
    if re.fullmatch(r"\d+", s):
        return int(s)
    try:
        when = dt.datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UserFacingError(
            f"bad {option} {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) or epoch ms") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


@dataclasses.dataclass(frozen=True)
class RangeSpec:
    """What the user asked for, before it is resolved against the topic.

    ``kind`` is ``"time"`` (``start``/``stop`` in ms), ``"offset"`` (the same
    offsets in every partition) or ``"partitions"`` (``partitions`` maps
    partition -> (from, to)); None means an open end.
    """

    kind: str
    start: int | None = None
    stop: int | None = None
    partitions: dict[int, tuple[int | None, int | None]] | None = None


def range_from_args(args: argparse.Namespace) -> RangeSpec:
    """The one range the options name; ``UserFacingError`` for none or a mix."""
    given = {
        "time": args.from_time is not None or args.to_time is not None,
        "offset": args.from_offset is not None or args.to_offset is not None,
        "partitions": args.partition_offsets is not None,
    }
    kinds = [k for k, v in given.items() if v]
    if not kinds:
        raise UserFacingError("give a range: --from/--to (times), --from-offset/--to-offset, "
                              "or --partition-offsets")
    if len(kinds) > 1:
        raise UserFacingError("give one kind of range: --from/--to, --from-offset/--to-offset "
                              "and --partition-offsets do not mix")
    kind = kinds[0]
    if kind == "time":
        start = None if args.from_time is None else parse_time(args.from_time, "--from")
        stop = None if args.to_time is None else parse_time(args.to_time, "--to")
        if start is not None and stop is not None and start >= stop:
            raise UserFacingError(f"--from {args.from_time} is not before --to {args.to_time}")
        return RangeSpec("time", start, stop)
    if kind == "offset":
        for name, value in (("--from-offset", args.from_offset),
                            ("--to-offset", args.to_offset)):
            if value is not None and value < 0:
                raise UserFacingError(f"{name} must be >= 0, got {value}")
        if (args.from_offset is not None and args.to_offset is not None
                and args.from_offset > args.to_offset):
            raise UserFacingError(
                f"--from-offset {args.from_offset} is after --to-offset {args.to_offset}")
        return RangeSpec("offset", args.from_offset, args.to_offset)
    try:
        return RangeSpec("partitions",
                         partitions=kafka_offsets.parse_partition_offsets(args.partition_offsets))
    except kafka_offsets.OffsetRangeError as exc:
        raise UserFacingError(f"--partition-offsets: {exc}") from None


def event_type_for_topic(topic: str, topic_prefix: str | None = None) -> tuple[type, str]:
    """``(event type, topic prefix)`` of a topic name; the prefix is derived if None."""
    if topic_prefix is not None:
        record_type = TOPIC_TYPES.get(base_topic(topic, topic_prefix))
        if record_type is None or not topic.startswith(topic_prefix):
            raise UserFacingError(
                f"topic {topic!r} less prefix {topic_prefix!r} is not an event topic "
                f"({', '.join(TOPICS)})")
        return record_type, topic_prefix
    for canonical in TOPICS:
        if topic.endswith(canonical):
            return TOPIC_TYPES[canonical], topic[:-len(canonical)]
    raise UserFacingError(
        f"cannot tell the event type of topic {topic!r}: its name must be an event topic "
        f"({', '.join(TOPICS)}), optionally prefixed (test1.post-events)")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out``; with ``overwrite``, empty it if it is an earlier replay's."""
    if out.exists() and not out.is_dir():
        raise UserFacingError(f"--out {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserFacingError(f"--out {out} is not empty; pass --overwrite to replace an "
                              f"earlier replay there, or choose another directory")
    if not (out / MANIFEST).exists():
        raise UserFacingError(f"--out {out} is not empty and is not a replay output (no "
                              f"{MANIFEST}); refusing to delete it even with --overwrite")
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---------------------------------------------------------------- writing


@dataclasses.dataclass
class ReplayResult:
    """Counts of one replay; ``reconciles`` says whether every record is accounted for."""

    topic: str
    ranges: dict[int, tuple[int, int]]
    records_read: int = 0
    rows_written: int = 0
    dead_letters: int = 0
    dead_letters_to_kafka: int = 0
    files: int = 0
    rows_per_dir: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    read_per_partition: collections.Counter = dataclasses.field(
        default_factory=collections.Counter)

    @property
    def records_in_range(self) -> int:
        return kafka_offsets.total_records(self.ranges)

    @property
    def offset_gaps(self) -> int:
        """Offsets in range with no record (compacted away, transaction markers)."""
        return self.records_in_range - self.records_read

    @property
    def reconciles(self) -> bool:
        return (self.records_read == self.rows_written + self.dead_letters
                and self.offset_gaps >= 0)

    def reconciliation(self) -> str:
        line = (f"records in range {self.records_in_range} = rows written {self.rows_written}"
                f" + dead letters {self.dead_letters}")
        if self.offset_gaps:
            line += f" + offsets without a record {self.offset_gaps}"
        return line + ("" if self.reconciles else
                       f"  MISMATCH: {self.records_read} records were read")

    def manifest(self, record_type: type, complete: bool) -> dict:
        return {
            "topic": self.topic, "event_type": record_type.__name__, "complete": complete,
            "ranges": {str(p): list(r) for p, r in sorted(self.ranges.items())},
            "records_in_range": self.records_in_range, "records_read": self.records_read,
            "rows_written": self.rows_written, "dead_letters": self.dead_letters,
            "rows_per_dir": dict(sorted(self.rows_per_dir.items())),
        }


class _Columns:
    """Turns decoded Avro dicts into Arrow tables and writes a chunk's files."""

    def __init__(self, out: Path, record_type: type, result: ReplayResult, dlq_sink=None):
        import numpy as np
        import pyarrow as pa

        from stores.files import parquet
        from schemas.codec import reader_schema

        self._np, self._pa, self._pq = np, pa, parquet
        self.out = out
        self.result = result
        self.dlq_sink = dlq_sink
        self.schema = parquet.event_schema(reader_schema(record_type))
        n_avro = len(self.schema) - 1 - len(parquet.SOURCE_COLUMNS)
        self._struct = pa.struct(list(self.schema)[:n_avro])
        self._event_time_index = self.schema.get_field_index("event_time")
        self._dictionary = parquet.enum_columns(self.schema)

    def table(self, partition: int, rows: list[dict], offsets: list[int],
              timestamps: list[int]):
        """The rows as a table of the event schema (``_event_ts`` and source columns added)."""
        np, pa = self._np, self._pa
        columns = pa.array(rows, type=self._struct).flatten()
        columns += [
            columns[self._event_time_index].cast(self._pq.EVENT_TS.type),
            pa.array(np.full(len(rows), partition, dtype=np.int32)),
            pa.array(offsets, pa.int64()),
            pa.array(timestamps, pa.int64()),
        ]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def write_chunk(self, name: str, tables: list, dead: list[DeadLetter]) -> None:
        """One file per event hour for the rows, one for the dead letters, all named ``name``."""
        np, pa, parquet = self._np, self._pa, self._pq
        if tables:
            table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            hours = np.floor_divide(table.column("event_time").to_numpy(), parquet.HOUR_MS)
            unique = np.unique(hours)
            in_order = bool(np.all(hours[1:] >= hours[:-1]))
            firsts = np.searchsorted(hours, unique) if in_order else None
            for i, hour in enumerate(unique):
                if len(unique) == 1:
                    part = table
                elif in_order:  # the usual case: a contiguous run of offsets per hour
                    end = firsts[i + 1] if i + 1 < len(unique) else len(hours)
                    part = table.slice(firsts[i], end - firsts[i])
                else:  # late events: pick the hour's rows, still in offset order
                    part = table.take(np.flatnonzero(hours == hour))
                directory = parquet.hive_dir(int(hour))
                parquet.write_table(part, self.out / directory / name, self._dictionary)
                self.result.rows_per_dir[directory] += part.num_rows
                self.result.files += 1
            self.result.rows_written += table.num_rows
        if dead:
            parquet.write_table(pa.Table.from_pydict({
                "topic": [d.topic for d in dead], "partition": [d.partition for d in dead],
                "offset": [d.offset for d in dead],
                "timestamp_ms": [d.timestamp_ms for d in dead],
                "key": [d.key for d in dead], "value": [d.value for d in dead],
                "step": [d.step for d in dead], "reason": [d.reason for d in dead],
                "error": [d.error for d in dead],
            }, schema=parquet.DEAD_LETTER_SCHEMA), self.out / DEAD_LETTER_DIR / name)
            self.result.files += 1
            self.result.dead_letters += len(dead)
            if self.dlq_sink is not None:
                for d in dead:
                    self.dlq_sink.send(d)


class _Partition:
    """Read state of one partition: its range, the current chunk and its staged rows.

    Decoded rows collect in plain lists and are turned into Arrow after every
    ``consume`` call (``stage``), so a chunk waiting for its last records
    costs tens of bytes per row, whatever the number of partitions.
    """

    __slots__ = ("partition", "start", "stop", "read", "done", "chunk_start", "chunk_end",
                 "rows", "offsets", "timestamps", "tables", "dead")

    def __init__(self, partition: int, start: int, stop: int):
        self.partition, self.start, self.stop = partition, start, stop
        self.read = 0
        self.done = False
        self.chunk_start = self.chunk_end = -1
        self.rows, self.offsets, self.timestamps = [], [], []
        self.tables: list = []
        self.dead: list[DeadLetter] = []

    def stage(self, columns: _Columns) -> None:
        if self.rows:
            self.tables.append(columns.table(self.partition, self.rows, self.offsets,
                                             self.timestamps))
            self.rows, self.offsets, self.timestamps = [], [], []

    def end_chunk(self, columns: _Columns) -> None:
        self.stage(columns)
        if self.tables or self.dead:
            columns.write_chunk(f"part-{self.partition:05d}-{self.chunk_start:012d}.parquet",
                                self.tables, self.dead)
        self.tables, self.dead = [], []

    def next_chunk(self, columns: _Columns, offset: int, batch: int) -> None:
        self.end_chunk(columns)
        self.chunk_start = offset - offset % batch
        self.chunk_end = self.chunk_start + batch


class KafkaDeadLetterSink:
    """Produces dead letters to ``<topic>.dlq`` with ``DeadLetter.headers()``."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 15.0):
        from confluent_kafka import Producer

        self.topic = dlq_topic(topic)
        self.failed: list[str] = []
        self.sent = 0
        self._producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                   "enable.idempotence": True, "linger.ms": 20})
        if self.topic not in self._producer.list_topics(timeout=timeout_s).topics:
            raise UserFacingError(f"dead-letter topic {self.topic} does not exist; create it "
                                  f"(feedbeam topics create) or drop --dlq-to-kafka")

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.failed.append(str(err))

    def send(self, dead: DeadLetter) -> None:
        while True:
            try:
                self._producer.produce(dead.dlq_topic, value=dead.value, key=dead.key,
                                       headers=dead.headers(), on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self.sent += 1
        self._producer.poll(0)

    def close(self, timeout_s: float = 60.0) -> int:
        """Flush; returns how many dead letters reached Kafka."""
        left = self._producer.flush(timeout_s)
        return self.sent - left - len(self.failed)


# ---------------------------------------------------------------- reading


def replay(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]], out: Path, *,
           topic_prefix: str | None = None, batch: int = DEFAULT_BATCH, codec=None,
           dlq_sink: KafkaDeadLetterSink | None = None, progress: bool = True,
           consumer_config: dict | None = None) -> ReplayResult:
    """Read exactly ``ranges`` of ``topic`` and write them under ``out`` (module docstring).

    ``out`` must be empty or absent (``check_out_dir``). Returns the counts;
    the caller decides what a non-reconciling result means.
    """
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from tqdm import tqdm

    from stores.files.parquet import write_json
    from schemas.codec import WireCodec

    if batch < 1:
        raise UserFacingError("--batch must be >= 1")
    record_type, prefix = event_type_for_topic(topic, topic_prefix)
    codec = codec if codec is not None else WireCodec()
    out = Path(out)
    result = ReplayResult(topic, dict(sorted(ranges.items())))
    write_json(result.manifest(record_type, complete=False), out / MANIFEST)
    columns = _Columns(out, record_type, result, dlq_sink)
    accept = dict_decoder(codec, topic, prefix)
    states = {p: _Partition(p, start, stop) for p, (start, stop) in result.ranges.items()
              if stop > start}
    active = set(states)
    consumer = Consumer({"bootstrap.servers": bootstrap, **CONSUMER_CONFIG,
                         **(consumer_config or {})})
    bar = tqdm(total=result.records_in_range, unit="rec", unit_scale=True, dynamic_ncols=True,
               mininterval=0.5, desc=f"replay {topic}", disable=None if progress else True)

    def finish(state: _Partition) -> None:
        state.end_chunk(columns)
        state.done = True
        active.discard(state.partition)
        # Stop fetching what lies beyond the range.
        consumer.pause([TopicPartition(topic, state.partition)])

    try:
        # All partitions at once: a partition's first fetch has a latency
        # that reading them one by one would pay again for each.
        if states:
            consumer.assign([TopicPartition(topic, p, s.start) for p, s in states.items()])
        last_progress = time.monotonic()
        while active:
            messages = consumer.consume(num_messages=_CONSUME_BATCH, timeout=0.1)
            if not messages:
                if time.monotonic() - last_progress > _STALL_TIMEOUT_S:
                    behind = ", ".join(f"{p}: {states[p].read} of "
                                       f"{states[p].stop - states[p].start}"
                                       for p in sorted(active))
                    raise UserFacingError(f"{topic}: no records for {_STALL_TIMEOUT_S:g}s "
                                          f"before the end of the range (read {behind})")
                continue
            last_progress = time.monotonic()
            n = 0
            # Messages come in runs of one partition: its state and list
            # appends are looked up once per run (and again after a chunk ends).
            current = None
            for msg in messages:
                p = msg.partition()
                if p != current:
                    state = states.get(p)
                    if state is None or state.done:
                        current = None
                        continue
                    current, stop, chunk_end = p, state.stop, state.chunk_end
                    add_row, add_offset = state.rows.append, state.offsets.append
                    add_timestamp = state.timestamps.append
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        # The end offset is >= stop: offsets left are gaps.
                        finish(state)
                        current = None
                        continue
                    raise UserFacingError(f"reading {topic}[{p}]: {err}")
                offset = msg.offset()
                if offset >= stop:
                    finish(state)
                    current = None
                    continue
                if offset < state.start:  # never expected after the seek; not in range
                    continue
                if offset >= chunk_end:
                    state.next_chunk(columns, offset, batch)
                    chunk_end = state.chunk_end
                    add_row, add_offset = state.rows.append, state.offsets.append
                    add_timestamp = state.timestamps.append
                value = msg.value()
                decoded = accept(value)
                if decoded is not None:
                    add_row(decoded[1])
                    add_offset(offset)
                    add_timestamp(msg.timestamp()[1])
                else:
                    # Rejected: the shared decode step says why, as a dead letter.
                    state.dead.append(decode_record_dict(codec, KafkaRecord(
                        topic, p, offset, msg.key(), value, msg.timestamp()[1]), prefix))
                state.read += 1
                n += 1
                if offset == stop - 1:
                    finish(state)
                    current = None
            for state in states.values():
                state.stage(columns)
            bar.update(n)
        for state in states.values():
            result.records_read += state.read
            result.read_per_partition[state.partition] = state.read
        if dlq_sink is not None:
            result.dead_letters_to_kafka = dlq_sink.close()
    finally:
        bar.close()
        consumer.close()
    write_json(result.manifest(record_type, complete=True), out / MANIFEST)
    return result


def resolve_ranges(bootstrap: str, topic: str, spec: RangeSpec) -> dict[int, tuple[int, int]]:
    """Resolve ``spec`` against the topic; Kafka-side problems become ``UserFacingError``."""
    config = {"bootstrap.servers": bootstrap, **CONSUMER_CONFIG}
    try:
        if spec.kind == "time":
            return kafka_offsets.resolve_time_range(config, topic, spec.start, spec.stop)
        if spec.kind == "offset":
            return kafka_offsets.resolve_offset_range(config, topic, spec.start, spec.stop)
        return kafka_offsets.resolve_partition_offsets(config, topic, spec.partitions)
    except kafka_offsets.UnknownTopicError as exc:
        raise UserFacingError(f"{exc} on {bootstrap} (`feedbeam topics list` shows the "
                              f"event topics)") from None
    except kafka_offsets.OffsetRangeError as exc:
        raise UserFacingError(str(exc)) from None


# ---------------------------------------------------------------- pipeline re-runs

#: Pipelines ``--pipeline`` re-runs: name -> (module with ``build(pipeline,
#: options, ranges=...)``, the event topics it reads, less any prefix).
PIPELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fanout": ("pipelines.fanout", ("post-events", "follow-events")),
    "features": ("pipelines.features", ("engagement-events", "post-events")),
}
#: Options ``replay`` sets itself; given after ``--`` they would contradict the range.
_RESERVED_BEAM_ARGS = ("--replay_ranges", "--streaming", "--topic_prefix")


@dataclasses.dataclass
class PipelineReplayResult:
    """Counts of a pipeline re-run, from the pipeline's Beam counters."""

    topic: str
    ranges: dict[int, tuple[int, int]]
    counters: dict[str, int] | None  # "namespace:name" -> value; None: runner gave none

    def get(self, name: str) -> int | None:
        return None if self.counters is None else self.counters.get(name, 0)

    @property
    def records_in_range(self) -> int:
        return kafka_offsets.total_records(self.ranges)

    @property
    def reconciles(self) -> bool | None:
        """records read = decoded + dead letters <= records in range; None without counters."""
        if self.counters is None:
            return None
        read, decoded, dead = (self.get("feedbeam.kafka:records_read"),
                               self.get("feedbeam.decode:decoded"),
                               self.get("feedbeam.decode:dead_letter"))
        return read == decoded + dead and read <= self.records_in_range

    def reconciliation(self) -> str:
        if self.counters is None:
            return (f"records in range {self.records_in_range}; the runner reported no "
                    f"counters, so the events decoded and dead letters are unknown")
        read, decoded, dead = (self.get("feedbeam.kafka:records_read"),
                               self.get("feedbeam.decode:decoded"),
                               self.get("feedbeam.decode:dead_letter"))
        line = f"records in range {self.records_in_range} = events decoded {decoded} " \
               f"+ dead letters {dead}"
        gaps = self.records_in_range - read
        if gaps:
            line += f" + offsets without a record {gaps}"
        return line + ("" if self.reconciles else f"  MISMATCH: {read} records were read")


def pipeline_argv(pipeline: str, topic: str, prefix: str, ranges: dict[int, tuple[int, int]],
                  bootstrap: str, settings: StackSettings, beam_args: list[str]) -> list[str]:
    """The pipeline's argv: local-stack defaults, then ``beam_args``, then the range.

    Defaults: the local Kafka, Redis and Cassandra, and Prism (LOOPBACK) unless
    ``beam_args`` name a ``--runner``; later arguments win, so ``beam_args``
    override any default.
    """
    import json

    if pipeline not in PIPELINES:
        raise UserFacingError(f"--pipeline {pipeline!r}: choose one of {', '.join(PIPELINES)}")
    reads = PIPELINES[pipeline][1]
    if base_topic(topic, prefix) not in reads:
        raise UserFacingError(
            f"the {pipeline} pipeline reads {' and '.join(prefix + t for t in reads)}, not "
            f"{topic}; replay one of those (one topic's range per run)")
    for arg in beam_args:
        if arg.split("=", 1)[0] in _RESERVED_BEAM_ARGS:
            raise UserFacingError(f"{arg.split('=', 1)[0]} is set by replay from TOPIC and "
                                  f"the range; do not pass it to the pipeline")
    argv = [f"--kafka_bootstrap={bootstrap}", f"--redis_url={settings.redis_url}",
            f"--cassandra_host={settings.host}", f"--cassandra_port={settings.cassandra_port}"]
    if not any(a == "--runner" or a.startswith("--runner=") for a in beam_args):
        from infra.stack import prism_binary

        argv += ["--runner=PrismRunner", f"--prism_location={prism_binary(settings)}",
                 "--environment_type=LOOPBACK"]
    ranges_json = json.dumps({topic: {str(p): [s, e] for p, (s, e) in sorted(ranges.items())}},
                             separators=(",", ":"))
    return argv + list(beam_args) + [f"--topic_prefix={prefix}",
                                      f"--replay_ranges={ranges_json}"]


def run_pipeline(pipeline: str, topic: str, ranges: dict[int, tuple[int, int]],
                 argv: list[str]) -> PipelineReplayResult:
    """Run ``pipeline`` in batch over ``ranges`` of ``topic`` and wait for it to end.

    ``argv`` are the pipeline's options (``pipeline_argv``). Raises
    ``UserFacingError`` if the job does not end DONE.
    """
    import importlib

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.runner import PipelineState

    module = importlib.import_module(PIPELINES[pipeline][0])
    options = PipelineOptions(argv)
    options.view_as(StandardOptions).streaming = False
    p = beam.Pipeline(options=options)
    module.build(p, options, ranges={topic: ranges})
    result = p.run()
    state = result.wait_until_finish()
    if state != PipelineState.DONE:
        raise UserFacingError(f"the {pipeline} re-run ended {state}, not DONE")
    return PipelineReplayResult(topic, dict(sorted(ranges.items())), _counters(result))


def _counters(result) -> dict[str, int] | None:
    """``namespace:name`` -> value summed over steps (committed, else attempted)."""
    try:
        found = result.metrics().query()["counters"]
    except Exception as exc:  # a runner without a metrics service: say so, do not fail
        log.warning("no counters from the runner: %s", exc)
        return None
    out: collections.Counter = collections.Counter()
    for r in found:
        value = r.committed if r.committed is not None else r.attempted
        out[f"{r.key.metric.namespace}:{r.key.metric.name}"] += int(value or 0)
    return dict(out)


def run_pipeline_replay(args: argparse.Namespace, settings: StackSettings, pipeline: str,
                        beam_args: list[str]) -> int:
    spec = range_from_args(args)
    record_type, prefix = event_type_for_topic(args.topic, args.topic_prefix)
    bootstrap = args.bootstrap or settings.kafka_bootstrap
    if args.overwrite or args.dlq_to_kafka or args.schema_registry:
        raise UserFacingError("--overwrite, --dlq-to-kafka and --schema-registry are for "
                              "Parquet replays; with --pipeline, pipeline options follow its "
                              "name")
    ranges = resolve_ranges(bootstrap, args.topic, spec)
    argv = pipeline_argv(pipeline, args.topic, prefix, ranges, bootstrap, settings, beam_args)
    total = kafka_offsets.total_records(ranges)
    print(f"replay {args.topic} ({record_type.__name__}) from {bootstrap} through the "
          f"{pipeline} pipeline ({_runner_of(argv)}, batch)")
    print("  --partition-offsets " + ",".join(f"{p}:{s}-{e}" for p, (s, e) in ranges.items())
          + f"   ({total} offsets)")
    if total == 0:
        print("nothing to replay: the range is empty")
        return 0
    started = time.perf_counter()
    result = run_pipeline(pipeline, args.topic, ranges, argv)
    elapsed = time.perf_counter() - started
    print(f"{pipeline} re-run of {total} offsets in {elapsed:.1f}s")
    for name, value in sorted((result.counters or {}).items()):
        # The pipeline's own counters; the read and decode ones are in the line below.
        if name.startswith("feedbeam.") and not name.startswith(("feedbeam.kafka:",
                                                                  "feedbeam.decode:")):
            print(f"  {name:<40} {value:>10}")
    print(result.reconciliation())
    return 0 if result.reconciles is not False else 1


def _runner_of(argv: list[str]) -> str:
    runner = "PrismRunner"
    for a in argv:
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
    return runner


def run_replay(args: argparse.Namespace, settings: StackSettings) -> int:
    from schemas.codec import WireCodec

    if args.pipeline is not None:
        if not args.pipeline or args.pipeline[0] not in PIPELINES:
            raise UserFacingError(f"--pipeline needs a pipeline name first: one of "
                                  f"{', '.join(sorted(PIPELINES))}")
        name, beam_args = args.pipeline[0], args.pipeline[1:]
        if beam_args[:1] == ["--"]:
            beam_args = beam_args[1:]
        return run_pipeline_replay(args, settings, name, beam_args)
    spec = range_from_args(args)
    if args.batch < 1:
        raise UserFacingError("--batch must be >= 1")
    record_type, prefix = event_type_for_topic(args.topic, args.topic_prefix)
    bootstrap = args.bootstrap or settings.kafka_bootstrap
    out = Path(args.out)
    ranges = resolve_ranges(bootstrap, args.topic, spec)
    check_out_dir(out, args.overwrite)
    dlq_sink = KafkaDeadLetterSink(bootstrap, args.topic) if args.dlq_to_kafka else None
    codec = WireCodec(registry_url=args.schema_registry) if args.schema_registry else None

    print(f"replay {args.topic} ({record_type.__name__}) from {bootstrap} to {out}")
    print("  --partition-offsets " + ",".join(f"{p}:{s}-{e}" for p, (s, e) in ranges.items())
          + f"   ({kafka_offsets.total_records(ranges)} offsets)")
    started = time.perf_counter()
    result = replay(bootstrap, args.topic, ranges, out, topic_prefix=prefix, batch=args.batch,
                    codec=codec, dlq_sink=dlq_sink)
    elapsed = time.perf_counter() - started
    for directory, rows in sorted(result.rows_per_dir.items()):
        print(f"  {directory}  {rows:>10} rows")
    if result.dead_letters:
        print(f"  {DEAD_LETTER_DIR}  {result.dead_letters:>10} dead letters"
              + (f" ({result.dead_letters_to_kafka} also sent to {dlq_sink.topic})"
                 if dlq_sink is not None else ""))
    print(f"{result.records_read} records in {elapsed:.1f}s "
          f"({result.records_read / max(elapsed, 1e-9):,.0f} rec/s), {result.files} files")
    print(result.reconciliation())
    ok = result.reconciles
    if dlq_sink is not None and result.dead_letters_to_kafka != result.dead_letters:
        print(f"feedbeam: error: only {result.dead_letters_to_kafka} of {result.dead_letters} "
              f"dead letters reached {dlq_sink.topic}: {'; '.join(dlq_sink.failed[:3])}",
              file=sys.stderr)
        ok = False
    return 0 if ok else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a topic's time or offset range into Parquet or a pipeline",
        usage="%(prog)s TOPIC RANGE (--out DIR | --pipeline fanout [BEAM_ARGS ...])",
        description="Read a time or offset range of an event topic and write it as a Parquet "
        "dataset partitioned by event date and hour (date=YYYY-MM-DD/hour=HH, UTC). Records "
        "that do not decode go to DIR/_dead_letters/. The same range always gives the same "
        "files. Exits non-zero if rows + dead letters do not add up to the records read.",
        epilog="A time range [--from, --to) selects, per partition, the offsets from the first "
        "record with timestamp >= --from to the first with timestamp >= --to (Kafka's time "
        "index; timestamps here are event times, which are not ordered in a partition, so a "
        "few records in the range may lie outside the times). The resolved offsets are "
        "printed: pass them as --partition-offsets to repeat the replay exactly. "
        "With --pipeline, the range is re-run through a Beam pipeline in batch instead "
        "(see --pipeline).")
    p.add_argument("topic", metavar="TOPIC", help="event topic, e.g. post-events or "
                   "test1.post-events")
    g = p.add_argument_group("range (one kind)")
    g.add_argument("--from", dest="from_time", default=None, metavar="TIME",
                   help="start time, inclusive: ISO 8601 (naive = UTC) or epoch ms "
                   "(default with --to: the beginning)")
    g.add_argument("--to", dest="to_time", default=None, metavar="TIME",
                   help="end time, exclusive (default with --from: the current end)")
    g.add_argument("--from-offset", type=int, default=None, metavar="N",
                   help="first offset in every partition (clamped to what the partition has)")
    g.add_argument("--to-offset", type=int, default=None, metavar="M",
                   help="end offset, exclusive, in every partition (clamped to its end)")
    g.add_argument("--partition-offsets", default=None, metavar="SPEC",
                   help="explicit ranges, e.g. '0:10-200,1:0-' (end exclusive; an empty side "
                   "is open); only these partitions are read; out-of-range offsets are errors")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (empty or new) of a Parquet replay")
    target.add_argument("--pipeline", nargs=argparse.REMAINDER, default=None,
                   metavar="NAME [BEAM_ARGS]",
                   help="last on the line: instead of Parquet, re-run pipeline NAME ("
                   + ", ".join(sorted(PIPELINES)) + ") over the range in batch, committing no "
                   "offsets; everything after NAME is its Beam and pipeline options (--runner "
                   "(default Prism), --redis_key_prefix, --cassandra_keyspace, --push_threshold, "
                   "...). fanout reads post-events and follow-events: TOPIC must be one of them "
                   "and only its range is read, so the other topic's effects (the follow graph, "
                   "for post-events) must already be in the stores")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier replay in DIR (only a directory with _replay.json)")
    p.add_argument("--topic-prefix", default=None,
                   help="prefix of TOPIC before the event topic name (default: derived from "
                   "TOPIC, so test1.post-events has prefix test1.)")
    p.add_argument("--bootstrap", default=None,
                   help="Kafka bootstrap servers (default: the local stack's)")
    p.add_argument("--schema-registry", default=None, metavar="URL",
                   help="decode with schema ids from this Schema Registry (default: static ids)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N",
                   help="records per chunk: memory bound and file granularity; chunks are "
                   "aligned to offsets (offset // N), so file names do not depend on where the "
                   "range starts (default: %(default)s)")
    p.add_argument("--dlq-to-kafka", action="store_true",
                   help="also produce dead letters to TOPIC.dlq (with the pipeline's headers). "
                   "Off by default: the pipelines dead-letter these records already, and a "
                   "replay must not put duplicates on the DLQ")
    p.set_defaults(handler=run_replay)


__all__ = ["register", "run_replay", "replay", "run_pipeline", "pipeline_argv",
           "PipelineReplayResult", "PIPELINES", "resolve_ranges", "range_from_args",
           "RangeSpec", "ReplayResult", "event_type_for_topic", "check_out_dir", "parse_time",
           "KafkaDeadLetterSink", "CONSUMER_CONFIG", "DEFAULT_BATCH"]
