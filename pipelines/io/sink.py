"""The one batching store sink every pipeline writes through.

    outcomes = events | "ApplyToStores" >> ApplyInBatches(
        FanoutApplierConfig(stores, policy), namespace="feedbeam.fanout", max_batch=500)

``ApplyInBatches`` wraps ``BatchSinkFn``, which keeps only the applier's
configuration when pickled, opens the applier in ``setup()`` (its clients),
buffers elements in ``process()``, applies them every ``max_batch`` elements
and in ``finish_bundle()`` (so a bundle's writes are done before the source
commits its offsets), and closes it in ``teardown()``. A batch that fails
with a transient store error is applied again whole, as ``RetryPolicy`` says
(every applier writes idempotently); then the error fails the bundle.

An applier configuration is any picklable object whose ``open()`` returns an
object with ``apply(batch) -> list | None`` and ``close()``. ``apply`` returns
one output per input element, in order (``None`` where an element has no
output), or ``None`` when the sink has no output at all; outputs keep their
input's timestamp and window.

Counters in the given namespace: ``batches``, ``batch_retries``,
``batch_failures``, ``elements``.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.common import Counters
from stores.retry import RetryPolicy


class Applier(Protocol):
    def apply(self, batch: list) -> Sequence[Any] | None: ...

    def close(self) -> None: ...


class ApplierConfig(Protocol):
    def open(self) -> Applier: ...


class BatchSinkFn(beam.DoFn):
    """Buffers elements and applies them in batches with the applier ``config`` opens."""

    def __init__(self, config: ApplierConfig, namespace: str, max_batch: int = 500,
                 retry: RetryPolicy = RetryPolicy()):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._config = config
        self._namespace = namespace
        self._max_batch = max_batch
        self._retry = retry

    def setup(self):
        self._applier = self._config.open()
        self._counters = Counters(self._namespace)

    def start_bundle(self):
        self._pending: list[tuple[Any, Any, Any]] = []

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        self._pending.append((element, timestamp, window))
        if len(self._pending) >= self._max_batch:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def teardown(self):
        applier = getattr(self, "_applier", None)
        if applier is not None:
            self._applier = None
            applier.close()

    def _flush(self):
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        batch = [element for element, _, _ in pending]
        try:
            outputs = self._retry.call(
                lambda: self._applier.apply(batch), what=f"{self._namespace}: {len(batch)} elements",
                on_retry=lambda _: self._counters.inc("batch_retries"))
        except Exception:
            self._counters.inc("batch_failures")
            raise
        self._counters.inc("batches")
        self._counters.inc("elements", len(batch))
        if outputs is None:
            return
        for output, (_, timestamp, window) in zip(outputs, pending):
            if output is not None:
                yield WindowedValue(output, timestamp, [window])


class ApplyInBatches(beam.PTransform):
    """``PCollection[T]`` -> the applier's outputs (see the module doc)."""

    def __init__(self, config: ApplierConfig, namespace: str, max_batch: int = 500,
                 retry: RetryPolicy = RetryPolicy(), output_type=None):
        super().__init__()
        self._fn = BatchSinkFn(config, namespace, max_batch, retry)
        self._output_type = output_type

    def expand(self, elements):
        apply = beam.ParDo(self._fn)
        if self._output_type is not None:
            apply = apply.with_output_types(self._output_type)
        return elements | "ApplyInBatches" >> apply
