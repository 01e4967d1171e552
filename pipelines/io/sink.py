"""The one batching store sink every pipeline writes through, with its error barrier.

    outcomes = events | "ApplyToStores" >> ApplyInBatches(
        FanoutApplierConfig(stores, policy), namespace="feedbeam.fanout", max_batch=500,
        dead_letters="from_options")

``ApplyInBatches`` wraps ``BatchSinkFn``, which keeps only the applier's
configuration when pickled, opens the applier in ``setup()`` (its clients),
buffers elements in ``process()``, applies them every ``max_batch`` elements
and in ``finish_bundle()`` (so a bundle's writes are done before the source
commits its offsets), and closes it in ``teardown()``. A batch that fails
with a transient store error is applied again whole, as ``RetryPolicy`` says
(every applier writes idempotently); then the error fails the bundle.

With ``dead_letters`` (a ``DeadLetterTarget``, or ``"from_options"``) a batch
failing with any other error is split in halves until the elements at fault
are alone; those go to the DLQ (reason ``apply_failed``), the rest is applied.
Without it that error fails the bundle. Design: ``docs/pipelines/kafka-io.md``.

An applier configuration is any picklable object whose ``open()`` returns an
object with ``apply(batch) -> list | None`` and ``close()``. ``apply`` returns
one output per input element, in order (``None`` where an element has no
output), or ``None`` when the sink has no output at all; outputs keep their
input's timestamp and window (an ``EventBatch`` split by the barrier gives
one output per applied part).

Counters in the given namespace: ``batches``, ``batch_retries``,
``batch_failures``, ``elements``, ``isolations`` and ``dead_letters``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping, Protocol, Sequence

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.common import (Counters, StoreOptions, WORKER_GC_THRESHOLDS, collect_for_batches,
                              worker_gc_thresholds)
from pipelines.io.deadletter import CodecFactory, DeadLetterProducer, build_codec
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.source import producer_config_of
from schemas.codec import WireCodec
from schemas.events import EVENT_TYPES
from schemas.records import UNKNOWN, DeadLetter, EventBatch, KafkaRecord
from stores.retry import RetryPolicy, is_transient

log = logging.getLogger(__name__)

#: ``ApplyInBatches(..., dead_letters=FROM_OPTIONS)``: the target from the
#: pipeline's ``KafkaReadOptions`` (bootstrap servers, client settings, prefix).
FROM_OPTIONS = "from_options"
APPLY_FAILED = "apply_failed"


class Applier(Protocol):
    def apply(self, batch: list) -> Sequence[Any] | None: ...

    def close(self) -> None: ...


class ApplierConfig(Protocol):
    def open(self) -> Applier: ...


@dataclasses.dataclass(frozen=True)
class DeadLetterTarget:
    """Where ``ApplyInBatches`` sends the elements it cannot apply.

    ``producer_config``: librdkafka settings of the dead-letter producer.
    ``topic_prefix``: prefix of the topic names (an event's dead letter goes
    to ``<prefix><its topic>.dlq``; any other element's to
    ``<prefix><namespace>.dlq``). ``codec`` re-encodes a bare event (its
    original bytes are gone). ``max_consecutive``: after this many elements
    in a row failed with nothing applied in between, the error is taken to be
    the stores' (a missing table, say), not the records', and fails the
    bundle instead of sending the whole stream to the DLQ.
    """

    producer_config: Mapping[str, Any]
    topic_prefix: str = ""
    codec: CodecFactory = WireCodec
    max_consecutive: int = 100

    def __post_init__(self):
        if "bootstrap.servers" not in self.producer_config:
            raise ValueError("producer_config needs 'bootstrap.servers'")
        if self.max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")

    @classmethod
    def from_options(cls, options) -> "DeadLetterTarget":
        """The target of a pipeline: its ``KafkaReadOptions``' servers, client settings
        and topic prefix (the dead-letter topics are those of the records it reads)."""
        kafka = options.view_as(KafkaReadOptions)
        config = kafka.source_config(default_group="feedbeam-dead-letters")
        return cls(producer_config_of(config), kafka.topic_prefix)


class BatchSinkFn(beam.DoFn):
    """Buffers elements and applies them in batches with the applier ``config`` opens;
    with ``dead_letters``, isolates and dead-letters the elements a batch fails on."""

    def __init__(self, config: ApplierConfig, namespace: str, max_batch: int = 500,
                 retry: RetryPolicy = RetryPolicy(),
                 dead_letters: DeadLetterTarget | None = None,
                 flush_early: Callable[[list], bool] | None = None,
                 gc_thresholds: tuple[int, int, int] | None = WORKER_GC_THRESHOLDS):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._config = config
        self._gc_thresholds = gc_thresholds
        self._namespace = namespace
        self._max_batch = max_batch
        self._retry = retry
        self._target = dead_letters
        self._flush_early = flush_early

    def setup(self):
        collect_for_batches(self._gc_thresholds)
        self._applier = self._config.open()
        self._counters = Counters(self._namespace)
        self._consecutive = 0
        self._codec = None
        self._dlq = (None if self._target is None
                     else DeadLetterProducer(self._target.producer_config))

    def start_bundle(self):
        self._pending: list[tuple[Any, Any, Any]] = []
        if self._dlq is not None:
            self._dlq.reset()

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        self._pending.append((element, timestamp, window))
        if len(self._pending) >= self._max_batch or (
                self._flush_early is not None
                and self._flush_early([e for e, _, _ in self._pending])):
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()
        if self._dlq is not None:
            # The bundle's dead letters are in Kafka before it ends, so the
            # source's commit never passes a record that is neither applied
            # nor dead-lettered.
            self._dlq.settle()

    def teardown(self):
        applier = getattr(self, "_applier", None)
        if applier is not None:
            self._applier = None
            applier.close()
        dlq = getattr(self, "_dlq", None)
        if dlq is not None:
            self._dlq = None
            dlq.close()

    def _flush(self):
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        for output, timestamp, window in self._apply_isolating(pending):
            if output is not None:
                yield WindowedValue(output, timestamp, [window])

    def _apply(self, batch: list):
        """One batch through the applier, retried whole on transient errors."""
        try:
            outputs = self._retry.call(
                lambda: self._applier.apply(batch),
                what=f"{self._namespace}: {len(batch)} elements",
                on_retry=lambda _: self._counters.inc("batch_retries"))
        except Exception:
            self._counters.inc("batch_failures")
            raise
        self._counters.inc("batches")
        self._counters.inc("elements", len(batch))
        return outputs

    def _apply_isolating(self, items: list[tuple[Any, Any, Any]]) -> list[tuple[Any, Any, Any]]:
        """``(output, timestamp, window)`` of the applied ``items``; elements that fail
        on their own with a permanent error are dead-lettered (when there is a target)."""
        try:
            outputs = self._apply([element for element, _, _ in items])
        except Exception as exc:
            if self._target is None or is_transient(exc):
                raise
            return self._isolate(items, exc)
        self._consecutive = 0
        if outputs is None:
            return []
        return [(output, timestamp, window)
                for output, (_, timestamp, window) in zip(outputs, items)]

    def _isolate(self, items: list[tuple[Any, Any, Any]], exc: Exception) -> list:
        if len(items) > 1:
            self._counters.inc("isolations")
            middle = len(items) // 2
            return self._apply_isolating(items[:middle]) + self._apply_isolating(items[middle:])
        element, timestamp, window = items[0]
        if isinstance(element, EventBatch) and len(element) > 1:
            self._counters.inc("isolations")
            middle = len(element) // 2
            return self._apply_isolating([(element.part(0, middle), timestamp, window),
                                          (element.part(middle, len(element)), timestamp,
                                           window)])
        if isinstance(element, EventBatch) and not len(element):
            raise exc  # nothing to blame
        self._consecutive += 1
        if self._consecutive > self._target.max_consecutive:
            raise RuntimeError(
                f"{self._namespace}: {self._consecutive} elements in a row failed to apply and "
                f"nothing in between succeeded; taking it for a store problem, not bad records "
                f"(last error: {type(exc).__name__}: {exc})") from exc
        letter = self._dead_letter(element, timestamp.micros // 1000, exc)
        log.warning("%s: dead-lettering an element that fails to apply (%s[%d]@%d): %s: %s",
                    self._namespace, letter.topic, letter.partition, letter.offset,
                    type(exc).__name__, exc)
        self._dlq.send(letter)
        self._counters.inc("dead_letters")
        return []

    def _dead_letter(self, element, timestamp_ms: int, exc: Exception) -> DeadLetter:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(element, EventBatch):
            return DeadLetter.of(element.record(0), self._namespace, APPLY_FAILED, error)
        prefix = self._target.topic_prefix
        if isinstance(element, EVENT_TYPES):
            topic = prefix + element.TOPIC
            if self._codec is None:
                self._codec = build_codec(self._target.codec)
            try:
                key, value = element.key, self._codec.encode(element, topic)
            except Exception as encode_error:  # the element may be what cannot be encoded
                key, value = element.key, repr(element).encode("utf-8", "replace")
                error += f" (value is repr(), the event did not re-encode: {encode_error})"
        else:
            topic, key = prefix + self._namespace, None
            value = repr(element).encode("utf-8", "replace")
        record = KafkaRecord(topic, UNKNOWN, UNKNOWN, key, value, timestamp_ms)
        return DeadLetter.of(record, self._namespace, APPLY_FAILED, error)


@dataclasses.dataclass(frozen=True)
class PartialPolls:
    """``flush_early`` for a sink of event batches (one partition poll each): apply
    once ``after`` polls are buffered if the last one was not full (fewer than
    ``full`` records: the source has caught up, so latency matters), while a
    backlog's full polls fill the sink's whole ``max_batch``."""

    full: int
    after: int = 8

    def __call__(self, pending: list) -> bool:
        return len(pending) >= self.after and len(pending[-1]) < self.full


class ApplyInBatches(beam.PTransform):
    """``PCollection[T]`` -> the applier's outputs (see the module doc).

    ``dead_letters``: a ``DeadLetterTarget``, ``FROM_OPTIONS`` (built from the
    pipeline's options when the transform is applied), or None (a permanent
    error fails the bundle). ``flush_early(pending)``: whether to apply the
    elements buffered so far before ``max_batch`` (picklable; e.g.
    ``PartialPolls``). The sink's ``setup`` gives the worker process the
    garbage-collection thresholds of the pipeline's ``--worker_gc``
    (``pipelines.common.collect_for_batches``).
    """

    def __init__(self, config: ApplierConfig, namespace: str, max_batch: int = 500,
                 retry: RetryPolicy = RetryPolicy(), output_type=None,
                 dead_letters: DeadLetterTarget | str | None = None,
                 flush_early: Callable[[list], bool] | None = None):
        super().__init__()
        if isinstance(dead_letters, str) and dead_letters != FROM_OPTIONS:
            raise ValueError(f"dead_letters must be a DeadLetterTarget, {FROM_OPTIONS!r} "
                             f"or None, not {dead_letters!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._args = (config, namespace, max_batch, retry)
        self._output_type = output_type
        self._dead_letters = dead_letters
        self._flush_early = flush_early

    def expand(self, elements):
        target = self._dead_letters
        if target == FROM_OPTIONS:
            target = DeadLetterTarget.from_options(elements.pipeline.options)
        thresholds = worker_gc_thresholds(
            elements.pipeline.options.view_as(StoreOptions).worker_gc)
        apply = beam.ParDo(BatchSinkFn(*self._args, dead_letters=target,
                                       flush_early=self._flush_early,
                                       gc_thresholds=thresholds))
        if self._output_type is not None:
            apply = apply.with_output_types(self._output_type)
        return elements | "ApplyInBatches" >> apply
