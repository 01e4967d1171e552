"""``feedbeam replay TOPIC RANGE --out DIR``: a topic's range to a Parquet dataset.

    feedbeam replay engagement-events --from 2024-05-01T10:00Z --to 2024-05-01T12:00Z --out /tmp/eng
    feedbeam replay test1.post-events --partition-offsets "0:10-200,2:0-" --out /tmp/posts

Reads exactly the resolved offset ranges (no consumer group, nothing
committed), decodes and validates each record as the pipelines do
(``schemas.validation``), and writes
``date=YYYY-MM-DD/hour=HH/part-<partition>-<chunk>.parquet`` by event hour,
``_dead_letters/`` for records that do not decode or break a rule, and
``_replay.json`` with the ranges and counts. ``replay()`` is the same from Python. ``docs/operations.md``
describes the layout, determinism and memory bound.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from infra.errors import UserFacingError
from infra.settings import StackSettings
from jobs.replay_range import (
    CONSUMER_CONFIG, event_type_for_topic, range_from_args, ranges_line, resolve_ranges,
)
from stores.kafka import offsets as kafka_offsets
from schemas.records import DeadLetter, KafkaRecord, decode_record_dict, dict_decoder
from schemas.events import dlq_topic
from schemas.validation import (VALIDATE_STEP, EventLimits, check_record, column_checked,
                                suspect_rows)

DEFAULT_BATCH = 50_000
MANIFEST = "_replay.json"
DEAD_LETTER_DIR = "_dead_letters"
_CONSUME_BATCH = 5_000
_STALL_TIMEOUT_S = 60.0


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
    invalid: int = 0  # of the dead letters, those that decoded but broke a validation rule
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
            "invalid": self.invalid, "rows_per_dir": dict(sorted(self.rows_per_dir.items())),
        }


class _Columns:
    """Turns decoded Avro dicts into Arrow tables and writes a chunk's files."""

    def __init__(self, out: Path, record_type: type, result: ReplayResult, dlq_sink=None,
                 checks: tuple[str, EventLimits, int] | None = None):
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
        self.record_type = record_type
        self._writer = None  # the thread chunks are written on, once there is one
        self._writing = None  # the chunk it is writing (a future)
        #: ``(topic, limits, now_ms)`` when the rows' checks wait for their table
        #: (``drop_invalid``): the types whose rules are all column rules.
        self.checks = checks

    def drop_invalid(self, table, state: "_Partition"):
        """``table`` (``state``'s staged rows) less the rows that break a rule, each
        added to ``state.dead`` as the per-record check would have: the columns say
        which rows may (``suspect_rows``), ``check_record`` decides and says why."""
        import pyarrow.compute as pc

        topic, limits, now_ms = self.checks

        def column(name: str):
            values = table.column(name)
            return (pc.utf8_length(values) if name == "event_id" else values).to_numpy(
                zero_copy_only=False)

        suspect = suspect_rows(self.record_type, column, state.timestamps, now_ms, limits)
        if not suspect.any():
            return table
        keep = ~suspect
        for i in self._np.flatnonzero(suspect).tolist():
            message = state.messages[i]
            letter = invalid_letter(self.record_type, state.rows[i], KafkaRecord(
                topic, state.partition, state.offsets[i], message.key(), message.value(),
                state.timestamps[i]), now_ms, limits)
            if letter is None:
                keep[i] = True
            else:
                state.dead.append(letter)
        return table if keep.all() else table.filter(self._pa.array(keep))

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
        """Write the chunk (``_write_chunk``) on the writer thread while the reading goes
        on: Parquet's encoding runs without the GIL, beside the Avro reads that hold it
        (a twentieth of a replay's time). One chunk at a time: this waits for the one
        before, and raises its error."""
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(1, thread_name_prefix="replay-writer")
        self.flush()
        self._writing = self._writer.submit(self._write_chunk, name, tables, dead)

    def flush(self) -> None:
        """Wait for the chunk being written; raises its error."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def close(self) -> None:
        """Stop the writer thread (after the chunk it is writing)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _write_chunk(self, name: str, tables: list, dead: list[DeadLetter]) -> None:
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
            # In offset order: rows checked by their columns join at the end of a batch.
            dead = sorted(dead, key=lambda d: d.offset)
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
            self.result.invalid += sum(d.step == VALIDATE_STEP for d in dead)
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
                 "rows", "offsets", "timestamps", "messages", "tables", "dead")

    def __init__(self, partition: int, start: int, stop: int):
        self.partition, self.start, self.stop = partition, start, stop
        self.read = 0
        self.done = False
        self.chunk_start = self.chunk_end = -1
        self.rows, self.offsets, self.timestamps = [], [], []
        self.messages = []  # the rows' records: a row the column checks reject needs its bytes
        self.tables: list = []
        self.dead: list[DeadLetter] = []

    def stage(self, columns: _Columns) -> None:
        if self.rows:
            table = columns.table(self.partition, self.rows, self.offsets, self.timestamps)
            if columns.checks is not None:
                table = columns.drop_invalid(table, self)
            self.tables.append(table)
            self.rows, self.offsets, self.timestamps = [], [], []
            self.messages = []

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


def invalid_letter(record_type: type, record: dict, kafka: KafkaRecord, now_ms: int,
                   limits: EventLimits) -> DeadLetter | None:
    """The dead letter (step ``validate``) of a decoded record that breaks ``limits`` at
    the wall clock ``now_ms``, as the pipelines' decode step makes it; None if it is
    valid. ``record`` is ``decode_record_dict``'s Avro dict of ``record_type``."""
    problem = check_record(record_type, record, kafka.timestamp_ms, now_ms, limits)
    if problem is None:
        return None
    return DeadLetter.of(kafka, VALIDATE_STEP, problem.reason, problem.message, now_ms)


def replay(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]], out: Path, *,
           topic_prefix: str | None = None, batch: int = DEFAULT_BATCH, codec=None,
           dlq_sink: KafkaDeadLetterSink | None = None, progress: bool = True,
           consumer_config: dict | None = None,
           limits: EventLimits | None = EventLimits()) -> ReplayResult:
    """Read exactly ``ranges`` of ``topic`` and write them under ``out`` (``docs/operations.md``).

    ``out`` must be empty or absent (``check_out_dir``). A record that decodes
    but breaks ``limits`` (``schemas.validation``, at the wall clock when the
    replay starts; None: no checks) is a dead letter, as in the pipelines.
    Returns the counts; the caller decides what a non-reconciling result means.
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
    now_ms = int(time.time() * 1000)
    # Types whose rules are all column rules are checked a batch at a time, once their
    # rows are a table (a tenth of a replay's time when checked record by record).
    by_columns = limits is not None and column_checked(record_type)
    columns = _Columns(out, record_type, result, dlq_sink,
                       (topic, limits, now_ms) if by_columns else None)
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
                    add_message = state.messages.append
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
                    add_message = state.messages.append
                value = msg.value()
                timestamp = msg.timestamp()[1]
                decoded = accept(value)
                if decoded is not None and (by_columns or limits is None or check_record(
                        decoded[0], decoded[1], timestamp, now_ms, limits) is None):
                    add_row(decoded[1])
                    add_offset(offset)
                    add_timestamp(timestamp)
                    add_message(msg)
                elif decoded is not None:
                    # Broke a rule: the same check again, for the dead letter.
                    state.dead.append(invalid_letter(*decoded, KafkaRecord(
                        topic, p, offset, msg.key(), value, timestamp), now_ms, limits))
                else:
                    # Rejected: the shared decode step says why, as a dead letter.
                    state.dead.append(decode_record_dict(codec, KafkaRecord(
                        topic, p, offset, msg.key(), value, timestamp), prefix))
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
        columns.flush()  # the last chunk written (its dead letters sent) before the counts
        if dlq_sink is not None:
            result.dead_letters_to_kafka = dlq_sink.close()
    finally:
        bar.close()
        consumer.close()
        columns.close()
    write_json(result.manifest(record_type, complete=True), out / MANIFEST)
    return result


def event_limits(args: argparse.Namespace) -> EventLimits:
    """The validation limits of ``--max-event-ahead-s`` and ``--max-event-age-s`` (the
    pipelines' defaults: 1 h ahead, no age limit)."""
    ahead = 3600.0 if args.max_event_ahead_s is None else args.max_event_ahead_s
    age = args.max_event_age_s
    if ahead < 0 or (age is not None and age < 0):
        raise UserFacingError("--max-event-ahead-s and --max-event-age-s must be >= 0")
    return EventLimits(max_ahead_ms=int(ahead * 1000),
                       max_age_ms=None if age is None else int(age * 1000))


def run_parquet_replay(args: argparse.Namespace, settings: StackSettings) -> int:
    """``feedbeam replay ... --out DIR``: 0 when every record read is a row or a dead letter."""
    from schemas.codec import WireCodec

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
    limits = event_limits(args)

    print(f"replay {args.topic} ({record_type.__name__}) from {bootstrap} to {out}")
    print(ranges_line(ranges))
    started = time.perf_counter()
    result = replay(bootstrap, args.topic, ranges, out, topic_prefix=prefix, batch=args.batch,
                    codec=codec, dlq_sink=dlq_sink, limits=limits)
    elapsed = time.perf_counter() - started
    for directory, rows in sorted(result.rows_per_dir.items()):
        print(f"  {directory}  {rows:>10} rows")
    if result.dead_letters:
        print(f"  {DEAD_LETTER_DIR}  {result.dead_letters:>10} dead letters "
              f"({result.invalid} invalid, {result.dead_letters - result.invalid} undecodable)"
              + (f", {result.dead_letters_to_kafka} also sent to {dlq_sink.topic}"
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


__all__ = ["replay", "run_parquet_replay", "ReplayResult", "KafkaDeadLetterSink",
           "invalid_letter", "event_limits",
           "check_out_dir", "DEFAULT_BATCH", "MANIFEST", "DEAD_LETTER_DIR"]
