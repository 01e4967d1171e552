"""Durable logs: the Cassandra copy kept off a job's Redis path.

A job's Redis step applies a batch to Redis, then writes the Cassandra writes
that batch decided to a Kafka topic of its own (``LogWriter``: every record
delivered before the batch counts as done, so before its offsets are
committed). A durable step reads that topic under a consumer group of its
own (``durable_source``) and applies it to Cassandra (``ApplyDurableLog``),
committing only after its own writes. Redis never waits on Cassandra, and a
crash of either step loses nothing: each resumes from its own offsets. The
writes must be idempotent and order-free (both stores' writes carry their
own timestamps), since a log record may be applied twice or after a later
one. The fan-out and the stories jobs use it (docs/pipelines/fanout.md,
docs/pipelines/stories.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import pickle
import threading
import time
from typing import Any, Callable, Sequence

import apache_beam as beam
from apache_beam import coders
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.common import DURABLE_GROUP_SUFFIX
from pipelines.io.deadletter import WriteDeadLetters
from pipelines.io.kafka import KafkaSourceConfig, ReadFromKafka
from pipelines.io.kafka_write import Deliveries, KafkaMessage
from pipelines.io.sink import ApplierConfig, ApplyInBatches
from pipelines.io.source import producer_config_of
from schemas.durable_log import MalformedLogRecord
from schemas.records import DeadLetter, RecordBatch
from stores.kafka.lag import LogCatchUp

#: The step named in a dead letter of a log record that does not decode.
DECODE_STEP = "decode_durable_log"
#: ``--parts``: which steps a job with a durable log runs.
PARTS = ("all", "redis", "durable")


class BusySteps:
    """The applies of a job's Redis step running in this worker process, for its
    durable step in the same process to give way to (``wait_idle``).

    On a machine the two steps share (``--parts=all``: one worker process), a
    durable batch written to Cassandra while the Redis step applies a batch takes
    CPU from it (the Cassandra server's, the driver's and the GIL), and the Redis
    step's batch is what makes a post readable. Waiting for the Redis step's apply
    to end, a bounded time per durable batch, moves the durable step into the gaps
    between the Redis step's applies (it may trail; its own offsets commit after
    its own writes). Measured: docs/benchmarks.md ("the durable step giving way in
    process"). In a process of its own (``--parts=durable``) nothing is ever busy.
    """

    def __init__(self):
        self._busy = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def busy(self):
        """Around one apply of the step given way to (applies may overlap)."""
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                if not self._busy:
                    self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> float:
        """Wait until no apply runs, at most ``timeout_s``; the seconds waited."""
        if timeout_s <= 0:
            return 0.0
        start = time.monotonic()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout_s)
        return time.monotonic() - start


def row_chunks(writes: Sequence[Any], rows_of: Callable[[Any], int], max_rows: int,
               max_writes: int) -> list[Sequence[Any]]:
    """``writes`` cut into consecutive chunks of at most ``max_writes`` writes and,
    where a write allows, ``max_rows`` rows (a write of more rows than that is a
    chunk of its own)."""
    if max_rows < 1 or max_writes < 1:
        raise ValueError("max_rows and max_writes must be >= 1")
    out: list[Sequence[Any]] = []
    start = rows = 0
    for i, write in enumerate(writes):
        n = rows_of(write)
        if i > start and (rows + n > max_rows or i - start >= max_writes):
            out.append(writes[start:i])
            start, rows = i, 0
        rows += n
    if start < len(writes):
        out.append(writes[start:])
    return out


class DurableLogOptions(PipelineOptions):
    """The flags of a job with a durable log (the fan-out, the stories)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--durable_copy", choices=("log", "inline"), default="log",
                            help="log: the Cassandra writes each batch's Redis writes decide go "
                                 "to the job's durable log topic (<prefix>fanout-durable, "
                                 "<prefix>stories-durable), applied by a step of its own under "
                                 f"the consumer group <group>{DURABLE_GROUP_SUFFIX}, so Redis "
                                 "never waits on Cassandra; inline: in each batch before its "
                                 "offsets are committed (always so in a --replay_ranges re-run)")
        parser.add_argument("--parts", choices=PARTS, default="all",
                            help="with --durable_copy=log: run both steps (all), only the Redis "
                                 "step, or only the durable step (to give each a job of its "
                                 "own; the stories' expiry timers run with the durable step)")
        parser.add_argument("--durable_max_batch", type=int, default=10,
                            help="record batches (polls) of the durable log applied to "
                                 "Cassandra at once")


@dataclasses.dataclass(frozen=True)
class DurableLog:
    """Where a Redis step writes its durable log: the topic and the producer's
    librdkafka settings; the durable step's consumer group, and how long a restore
    of Redis waits for that group to apply the log (``restore_wait_s``, 0: no wait)."""

    topic: str
    producer_config: dict
    group: str | None = None
    restore_wait_s: float = 60.0

    def catch_up(self) -> LogCatchUp | None:
        """The wait a restore runs before reading Cassandra (None: none)."""
        if self.group is None or self.restore_wait_s <= 0:
            return None
        return LogCatchUp(self.producer_config["bootstrap.servers"], self.group, (self.topic,),
                          self.restore_wait_s)


class LogWriter:
    """The Redis step's side of a ``DurableLog``: ``write(values)`` produces the
    record values and returns once every one is delivered (or raises, and the
    batch fails). Not picklable: built in an applier's ``open()``."""

    def __init__(self, log: DurableLog, metrics_namespace: str):
        self._topic = log.topic
        self._deliveries = Deliveries(log.producer_config, metrics_namespace=metrics_namespace)

    def write(self, values: Sequence[bytes]) -> None:
        self._deliveries.reset()
        for value in values:
            self._deliveries.produce(KafkaMessage(self._topic, None, value))
        self._deliveries.settle()

    def close(self) -> None:
        self._deliveries.close()


def durable_source(config: KafkaSourceConfig, default_group: str) -> KafkaSourceConfig:
    """The durable step's source: the job's Kafka settings under its own group
    (the job's plus ``DURABLE_GROUP_SUFFIX``), always from that group's offsets
    (earliest without any), never rewound or skipped."""
    group = config.consumer_config.get("group.id", default_group) + DURABLE_GROUP_SUFFIX
    # A log record holds up to a few thousand writes: smaller polls and bundles
    # than the event topics' keep a backlog's batches in bounds.
    return dataclasses.replace(
        config, consumer_config={**config.consumer_config, "group.id": group},
        start_from="committed", fallback_start="earliest", rewind_ms=0,
        batch_records=min(config.batch_records, 100),
        max_records_per_bundle=min(config.max_records_per_bundle, 1_000))


_WRITES, _DEAD = "writes", "dead_letters"


class DecodedRecords(list):
    """The decoded values of one record batch of a durable log, in offset order."""


class DecodedRecordsCoder(coders.Coder):
    """Pickles ``DecodedRecords``, but estimates their size without pickling them:
    Beam samples the sizes of a step's outputs, and pickling thousands of decoded
    writes for it took about a tenth of the fan-out's durable step (py-spy)."""

    #: A record's size as the estimate counts it: up to a few thousand ids.
    RECORD_BYTES = 16 * 1024

    def encode(self, value: DecodedRecords) -> bytes:
        return pickle.dumps(list(value), pickle.HIGHEST_PROTOCOL)

    def decode(self, data: bytes) -> DecodedRecords:
        return DecodedRecords(pickle.loads(data))

    def estimate_size(self, value: DecodedRecords) -> int:
        return self.RECORD_BYTES * len(value)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return DecodedRecords


beam.coders.registry.register_coder(DecodedRecords, DecodedRecordsCoder)


class _DecodeLogFn(beam.DoFn):
    """A record batch of a durable log -> its decoded values (``decode`` of each, one
    ``DecodedRecords``); a record that does not decode -> a dead letter (its original bytes
    and the reason)."""

    def __init__(self, decode: Callable[[bytes | None], Any]):
        self._decode = decode

    def process(self, batch: RecordBatch):
        decoded = DecodedRecords()
        for i, value in enumerate(batch.values):
            try:
                decoded.append(self._decode(value))
            except MalformedLogRecord as exc:
                yield beam.pvalue.TaggedOutput(_DEAD, DeadLetter.of(
                    batch.record(i), DECODE_STEP, exc.reason, str(exc)))
        if decoded:
            yield decoded


class ApplyDurableLog(beam.PTransform):
    """Read a durable log with its own consumer group and apply it.

    Args:
      source: the Kafka source's settings (its ``group.id`` is the durable
        step's own: its offsets are committed after the applier's writes).
      topics: the durable log topic(s).
      applier: an ``ApplierConfig`` whose applier takes lists of decoded record
        values (one list per record batch).
      namespace: the applier's metrics namespace.
      decode: a record value -> what the applier gets of it; raises
        ``MalformedLogRecord`` for a value that is not a log record.
      max_batch: record batches applied at once.
      producer_config: librdkafka settings for the dead-letter producer.
      output_type: the applier's outputs' type, when it has outputs.

    Applied to the pipeline root; returns the applier's outputs. A record that
    does not decode goes to ``<topic>.dlq``.
    """

    def __init__(self, source: KafkaSourceConfig, topics: Sequence[str],
                 applier: ApplierConfig, namespace: str,
                 decode: Callable[[bytes | None], Any], max_batch: int = 10,
                 producer_config: dict | None = None, output_type=None):
        super().__init__()
        self._source = source
        self._topics = tuple(topics)
        self._applier = applier
        self._namespace = namespace
        self._decode = decode
        self._max_batch = max_batch
        self._producer_config = dict(producer_config or producer_config_of(source))
        self._output_type = output_type

    def expand(self, pbegin):
        decoded = (pbegin
                   | "Read" >> ReadFromKafka(self._source, self._topics)
                   | "Decode" >> beam.ParDo(_DecodeLogFn(self._decode))
                   .with_output_types(DecodedRecords, **{_DEAD: DeadLetter})
                   .with_outputs(_DEAD, main=_WRITES))
        _ = decoded[_DEAD] | "WriteDeadLetters" >> WriteDeadLetters(self._producer_config)
        return decoded[_WRITES] | "ApplyToCassandra" >> ApplyInBatches(
            self._applier, self._namespace, self._max_batch, output_type=self._output_type)


def own_restore_wait(configured: LogCatchUp | None, topic: str, own: DurableLog | None
                     ) -> LogCatchUp | None:
    """The wait a restore run by a job with a durable log of its own runs: the
    ``configured`` waits (``StoreOptions``: one per job's durable log, under the
    default groups) with the one for its own log ``topic`` replaced by ``own``'s
    wait (its own group; none when ``own`` is None: it writes Cassandra inline)."""
    waits = [w for w in ([] if configured is None else configured.each())
             if topic not in w.topics]
    mine = None if own is None else own.catch_up()
    waits = ([] if mine is None else [mine]) + waits
    if not waits:
        return None
    return dataclasses.replace(waits[0], also=tuple(waits[1:]))


__all__ = ["DECODE_STEP", "PARTS", "DurableLogOptions", "DurableLog", "LogWriter", "durable_source", "ApplyDurableLog",
           "own_restore_wait"]
