"""Kafka sink for Beam: ``WriteToKafka`` writes ``KafkaMessage``s with confluent-kafka.

::

    messages | 'WriteDLQ' >> WriteToKafka({"bootstrap.servers": "127.0.0.1:9092"})

Delivery is checked per bundle (``Deliveries``, which other steps that write
Kafka use too): ``process()`` hands each message to the producer,
``finish_bundle()`` flushes and waits for every delivery report. Messages that
failed with a transient error (timeout, broker down, leader moving) are
produced again with exponential backoff, up to ``max_retries`` times; a
message too large for the broker is sent once more in the form ``resize``
gives it (dead letters: truncated); anything still undelivered, or any other
permanent error (unknown topic, not authorized), makes ``finish_bundle()``
raise a ``RuntimeError`` naming the topics, counts and first errors. The
bundle then fails loudly and the runner retries it, so writes are
at-least-once: a retried bundle can write a message twice (the idempotent
producer only removes duplicates of its own internal retries, not of a re-run
bundle).

The transform outputs nothing: its result is an empty ``PCollection`` that
only exists so the step can be named and chained; what was written shows in
the Beam counters ``written``, ``retried``, ``resized`` and ``failed``
(namespace ``feedbeam.kafka_write`` unless told otherwise).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

log = logging.getLogger(__name__)

#: Producer settings used unless ``producer_config`` overrides them.
#: ``message.timeout.ms`` bounds how long a message may sit undelivered, so a
#: dead broker surfaces as a failed bundle instead of a hung one, and
#: ``topic.metadata.propagation.max.ms`` (below it) turns a missing topic into
#: "unknown topic" rather than a generic timeout.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "message.timeout.ms": 30_000,
    "topic.metadata.propagation.max.ms": 10_000,
}

_ERRORS_SHOWN = 3


@dataclasses.dataclass(frozen=True, slots=True)
class KafkaMessage:
    """One message to write: ``headers`` are ``(name, bytes)`` pairs, in order.

    ``timestamp_ms`` is the Kafka CreateTime; None lets the producer stamp it.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None


def _transient_codes() -> frozenset[int]:
    from confluent_kafka import KafkaError

    names = (
        "_MSG_TIMED_OUT", "_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN", "_QUEUE_FULL",
        "_NODE_NOT_FOUND", "_RESOLVE", "_WAIT_COORD", "_TIMED_OUT_QUEUE",
        "REQUEST_TIMED_OUT", "NETWORK_EXCEPTION", "LEADER_NOT_AVAILABLE",
        "NOT_LEADER_FOR_PARTITION", "NOT_ENOUGH_REPLICAS", "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
        "KAFKA_STORAGE_ERROR", "BROKER_NOT_AVAILABLE", "FENCED_LEADER_EPOCH",
        "UNKNOWN_LEADER_EPOCH", "OUT_OF_ORDER_SEQUENCE_NUMBER", "THROTTLING_QUOTA_EXCEEDED",
    )
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


def is_transient(error) -> bool:
    """Whether a failed delivery (a ``KafkaError``) is worth producing again.

    confluent-kafka does not carry librdkafka's retriable flag on delivery
    reports, so the decision is by error code. An unknown topic counts as
    permanent: topic auto-creation is off, so waiting does not create it.
    """
    if error.fatal():
        return False
    return error.retriable() or error.code() in _transient_codes()


#: ``resize(message) -> smaller message or None``: what to send instead of a
#: message the broker refused as too large (None: fail as any permanent error).
Resize = Callable[[KafkaMessage], Optional[KafkaMessage]]


class Deliveries:
    """A producer whose deliveries are checked, for any step that writes Kafka.

    ``produce()`` queues a message; ``settle()`` waits for every delivery
    report, produces transient failures again with exponential backoff (up to
    ``max_retries`` times) and a message the broker refused as too large once
    more as ``resize`` makes it, then raises ``RuntimeError`` naming the
    topics, counts and first errors of whatever is still undelivered. Not
    picklable: built where it is used (a DoFn's ``setup``).
    """

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int = 5,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 metrics_namespace: str = "feedbeam.kafka_write",
                 per_topic_counter: str | None = None, resize: Resize | None = None):
        self.config = {**PRODUCER_DEFAULTS, **dict(producer_config)}
        self._max_retries = max_retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._namespace = metrics_namespace
        self._per_topic_counter = per_topic_counter
        self._resize = resize
        self._written = Metrics.counter(metrics_namespace, "written")
        self._retried = Metrics.counter(metrics_namespace, "retried")
        self._resized = Metrics.counter(metrics_namespace, "resized")
        self._failed_counter = Metrics.counter(metrics_namespace, "failed")
        self._topic_counters: dict[str, Any] = {}
        self._failed: list[tuple[KafkaMessage, Any]] = []
        self.producer = self._new_producer()

    def _new_producer(self):
        from confluent_kafka import Producer

        return Producer(self.config)

    @property
    def max_message_bytes(self) -> int:
        """The producer's own limit on a message (librdkafka ``message.max.bytes``)."""
        return int(self.config.get("message.max.bytes", 1_000_000))

    def reset(self) -> None:
        """Forget failures of an abandoned bundle (a retried bundle starts clean)."""
        self._failed = []

    def produce(self, message: KafkaMessage) -> None:
        """Queue ``message``; its delivery is checked by the next ``settle()``."""
        self._produce(message)
        self.producer.poll(0)  # serve delivery reports as they come

    def settle(self) -> None:
        """Wait for every queued message; retry, resize or raise (see the class doc)."""
        self._flush()
        attempt = 0
        resized = False
        while self._failed:
            if self._resize is not None and not resized:
                resized = True
                if self._resize_too_large():
                    continue
            permanent = [(m, e) for m, e in self._failed if not is_transient(e)]
            if permanent or attempt >= self._max_retries:
                break
            attempt += 1
            retry, self._failed = self._failed, []
            delay = min(self._max_backoff_s, self._backoff_s * 2 ** (attempt - 1))
            log.warning("WriteToKafka: %d message(s) failed transiently (first: %s); "
                        "retry %d/%d in %.2fs", len(retry), retry[0][1], attempt,
                        self._max_retries, delay)
            time.sleep(delay)
            self._retried.inc(len(retry))
            for message, _ in retry:
                self._produce(message)
            self._flush()
        if self._failed:
            failed, self._failed = self._failed, []
            self._failed_counter.inc(len(failed))
            if any(e.fatal() for _, e in failed):
                # A fatal producer error poisons the instance; the retried
                # bundle gets a fresh producer.
                self.producer = self._new_producer()
            raise RuntimeError(_failure_message(failed, attempt))

    def close(self) -> None:
        if self.producer is not None:
            remaining = self.producer.flush(self._flush_timeout_s())
            if remaining:
                log.error("WriteToKafka: %d message(s) undelivered at teardown", remaining)
            self.producer = None

    # -- helpers

    def _resize_too_large(self) -> bool:
        """Produce again each message refused as too large, resized where ``resize``
        can make it smaller and as it was otherwise (the broker refuses a whole record
        batch, so small messages batched with a large one fail too); whether any."""
        from confluent_kafka import KafkaError

        too_large = [m for m, e in self._failed if e.code() == KafkaError.MSG_SIZE_TOO_LARGE]
        if not too_large:
            return False
        resized = [self._resize(m) for m in too_large]
        if all(r is None for r in resized):
            return False
        self._failed = [(m, e) for m, e in self._failed
                        if e.code() != KafkaError.MSG_SIZE_TOO_LARGE]
        shrunk = [r for r in resized if r is not None]
        log.warning("WriteToKafka: %d message(s) refused as too large; sending %d of them "
                    "resized (first: topic %r) and the rest again as they were",
                    len(too_large), len(shrunk), shrunk[0].topic)
        self._resized.inc(len(shrunk))
        for message, smaller in zip(too_large, resized):
            self._produce(message if smaller is None else smaller)
        self._flush()
        return True

    def _produce(self, message: KafkaMessage) -> None:
        from confluent_kafka import KafkaException

        def on_delivery(err, _msg, message=message):
            if err is None:
                self._count_written(message.topic)
            else:
                self._failed.append((message, err))

        kwargs = {"key": message.key, "value": message.value,
                  "headers": list(message.headers) or None, "on_delivery": on_delivery}
        if message.timestamp_ms is not None:
            kwargs["timestamp"] = message.timestamp_ms
        while True:
            try:
                self.producer.produce(message.topic, **kwargs)
                return
            except BufferError:
                # The local queue is full: serve delivery reports to make room.
                self.producer.poll(0.1)
            except KafkaException as exc:
                # Refused before queueing (e.g. topic known not to exist, too large).
                self._failed.append((message, exc.args[0]))
                return

    def _count_written(self, topic: str) -> None:
        self._written.inc()
        if self._per_topic_counter:
            counter = self._topic_counters.get(topic)
            if counter is None:
                counter = self._topic_counters[topic] = Metrics.counter(
                    self._namespace, f"{self._per_topic_counter}.{topic}")
            counter.inc()

    def _flush_timeout_s(self) -> float:
        # Every queued message is delivered or failed within message.timeout.ms.
        return int(self.config["message.timeout.ms"]) / 1000 + 5.0

    def _flush(self) -> None:
        if self.producer is None:
            return  # closed while the runner cancelled the job: nothing was produced since
        remaining = self.producer.flush(self._flush_timeout_s())
        if remaining:
            raise RuntimeError(
                f"WriteToKafka: {remaining} message(s) neither delivered nor failed "
                f"within {self._flush_timeout_s():.0f}s")


class _KafkaWriteFn(beam.DoFn):
    """Sink DoFn: keeps only config when pickled; one ``Deliveries`` per DoFn instance."""

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int,
                 backoff_s: float, max_backoff_s: float, metrics_namespace: str,
                 per_topic_counter: str | None, resize: Resize | None = None):
        self._config = {**PRODUCER_DEFAULTS, **dict(producer_config)}
        self._args = (max_retries, backoff_s, max_backoff_s, metrics_namespace,
                      per_topic_counter, resize)
        self._deliveries: Deliveries | None = None

    def __getstate__(self):
        # Only configuration travels to workers; clients are built in setup().
        state = self.__dict__.copy()
        state["_deliveries"] = None
        return state

    def setup(self):
        self._deliveries = Deliveries(self._config, *self._args)

    def start_bundle(self):
        self._deliveries.reset()

    def process(self, message: KafkaMessage):
        self._deliveries.produce(message)

    def finish_bundle(self):
        if self._deliveries is not None:  # None: torn down while the job was cancelled
            self._deliveries.settle()

    def teardown(self):
        if self._deliveries is not None:
            # None after a cancelled job's teardown: nothing was produced since.
            self._deliveries.close()
            self._deliveries = None


def _failure_message(failed: list[tuple[KafkaMessage, Any]], retries: int) -> str:
    by_topic: dict[str, list] = {}
    for message, error in failed:
        by_topic.setdefault(message.topic, []).append(error)
    parts = []
    for topic, errors in sorted(by_topic.items()):
        shown = "; ".join(str(e) for e in errors[:_ERRORS_SHOWN])
        parts.append(f"topic {topic!r}: {len(errors)} message(s), first errors: {shown}")
    return (f"WriteToKafka: {len(failed)} message(s) not delivered after {retries} "
            f"retr{'y' if retries == 1 else 'ies'}: " + " | ".join(parts))


class WriteToKafka(beam.PTransform):
    """Write a ``PCollection[KafkaMessage]`` to Kafka; returns an empty PCollection.

    ``producer_config`` is a confluent-kafka config (at least
    ``bootstrap.servers``) laid over ``PRODUCER_DEFAULTS``. Transient delivery
    failures are retried ``max_retries`` times, the n-th after
    ``backoff_s * 2**(n-1)`` seconds (at most ``max_backoff_s``); then, or on
    a permanent error, the bundle fails. ``per_topic_counter``, when given,
    also counts delivered messages per destination topic under
    ``<per_topic_counter>.<topic>``. ``resize``, when given, turns a message
    the broker refused as too large into one to send instead (once).
    """

    def __init__(self, producer_config: Mapping[str, Any], max_retries: int = 5, *,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 metrics_namespace: str = "feedbeam.kafka_write",
                 per_topic_counter: str | None = None, resize: Resize | None = None,
                 label: str | None = None):
        super().__init__(label)
        if "bootstrap.servers" not in producer_config:
            raise ValueError("producer_config needs 'bootstrap.servers'")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self._fn = _KafkaWriteFn(producer_config, max_retries, backoff_s, max_backoff_s,
                                 metrics_namespace, per_topic_counter, resize)

    def expand(self, messages):
        # The DoFn yields nothing; the (empty) result only lets callers chain.
        return messages | "Produce" >> beam.ParDo(self._fn).with_input_types(KafkaMessage)
