"""The front of every pipeline: Kafka topics in, typed event batches out, bad bytes to the DLQ.

    batches = pipeline | 'ReadPostEvents' >> ReadEventBatches(config, ['post-events'])
    events = pipeline | 'ReadPostEvents' >> ReadEvents(config, ['post-events'])

``ReadEventBatches`` composes ``ReadFromKafka`` (``pipelines.io.kafka``),
``DecodeBatches`` (decode and validate) and ``WriteDeadLetters``
(``pipelines.io.deadletter``): one element per partition poll all the way.
``ReadEvents`` then opens the batches into one element per event, each at its
own event time, for steps that work event by event. All are plain ParDos, fused into the read's stage, so the
offsets the source commits on bundle finalization never pass a record that is
neither applied nor in its ``<topic>.dlq``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import apache_beam as beam
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from pipelines.io.deadletter import DecodeBatches, WriteDeadLetters
from pipelines.io.kafka import KafkaSourceConfig, ReadFromKafka
from schemas.events import Event
from schemas.records import EventBatch


class ReadEventBatches(beam.PTransform):
    """Read ``topics`` (or bounded ``ranges``) and decode them to typed event batches.

    Args:
      config: the Kafka source's settings.
      topics / ranges: as for ``ReadFromKafka``: unbounded topics, or bounded
        offset ranges for replays; given ranges, the topics are not read.
      topic_prefix: prefix of the topic names; the rest names the event type.
      producer_config: librdkafka settings for the dead-letter producer
        (default: the consumer's bootstrap servers and security settings).

    Returns a ``PCollection[EventBatch]``, each stamped with its oldest
    record's time. Undecodable records, and events that break the config's
    ``event_limits`` (``schemas.validation``), go to ``<topic>.dlq``.
    """

    def __init__(self, config: KafkaSourceConfig, topics: Sequence[str] = (),
                 ranges: Mapping[str, Mapping[int, tuple[int, int]]] | None = None,
                 topic_prefix: str = "", producer_config: Mapping[str, str] | None = None):
        super().__init__()
        self._config = config
        self._topics = () if ranges else tuple(topics)
        self._ranges = ranges
        self._prefix = topic_prefix
        self._producer_config = dict(producer_config or producer_config_of(config))

    def expand(self, pbegin):
        batches = pbegin | "Read" >> ReadFromKafka(self._config, self._topics, self._ranges)
        decoded = batches | "Decode" >> DecodeBatches(topic_prefix=self._prefix,
                                                      limits=self._config.event_limits)
        _ = decoded.dead_letters | "WriteDeadLetters" >> WriteDeadLetters(self._producer_config)
        return decoded.events


class _OpenBatchFn(beam.DoFn):
    """One element per event of a batch, at the event's own time (never before the
    batch's: the batch carries its oldest record's time)."""

    def process(self, batch: EventBatch, window=beam.DoFn.WindowParam):
        windows = (window,)
        for event, ts in zip(batch.events, batch.timestamps_ms):
            yield WindowedValue(event, Timestamp(micros=ts * 1000), windows)


class OpenBatches(beam.PTransform):
    """``PCollection[EventBatch]`` -> ``PCollection[Event]``, each at its own time."""

    def expand(self, batches):
        return batches | "OpenBatches" >> beam.ParDo(_OpenBatchFn()).with_output_types(Event)


class ReadEvents(beam.PTransform):
    """``ReadEventBatches`` opened into one element per event (``OpenBatches``).

    Same arguments; returns a ``PCollection`` of events (``schemas.events``)
    timestamped by the source's timestamp policy.
    """

    def __init__(self, config: KafkaSourceConfig, topics: Sequence[str] = (),
                 ranges: Mapping[str, Mapping[int, tuple[int, int]]] | None = None,
                 topic_prefix: str = "", producer_config: Mapping[str, str] | None = None):
        super().__init__()
        self._batches = ReadEventBatches(config, topics, ranges, topic_prefix, producer_config)

    def expand(self, pbegin):
        return pbegin | "ReadBatches" >> self._batches | "Open" >> OpenBatches()


# Consumer-only librdkafka settings a producer would reject.
_CONSUMER_ONLY = ("group.id", "group.instance.id", "auto.offset.reset", "enable.auto.commit",
                  "enable.auto.offset.store", "enable.partition.eof", "isolation.level",
                  "session.timeout.ms", "max.poll.interval.ms", "fetch.min.bytes",
                  "fetch.wait.max.ms", "partition.assignment.strategy")


def producer_config_of(config: KafkaSourceConfig) -> dict:
    """The consumer's connection and security settings, reused for the DLQ producer."""
    return {k: v for k, v in config.consumer_config.items() if k not in _CONSUMER_ONLY}
