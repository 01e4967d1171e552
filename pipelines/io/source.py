"""The front of every pipeline: Kafka topics in, typed events out, bad bytes to the DLQ.

    events = pipeline | 'ReadPostEvents' >> ReadEvents(config, ['post-events'])

composes ``ReadFromKafka`` (``pipelines.io.kafka``), ``DecodeEvents`` and
``WriteDeadLetters`` (``pipelines.io.deadletter``). All three are plain
ParDos, so a runner fuses them into the read's stage: a bundle's dead letters
are flushed before the bundle ends, and the offsets the source commits on
bundle finalization never pass a record that is neither decoded nor in its
``<topic>.dlq``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import apache_beam as beam

from pipelines.io.deadletter import DecodeEvents, WriteDeadLetters
from pipelines.io.kafka import KafkaSourceConfig, ReadFromKafka


class ReadEvents(beam.PTransform):
    """Read ``topics`` (or bounded ``ranges``) and decode them to typed events.

    Args:
      config: the Kafka source's settings.
      topics / ranges: as for ``ReadFromKafka`` (unbounded topics, or bounded
        offset ranges for replays).
      topic_prefix: prefix of the topic names; the rest names the event type.
      producer_config: librdkafka settings for the dead-letter producer
        (default: the consumer's bootstrap servers and security settings).

    Returns a ``PCollection`` of events (``schemas.events``) timestamped by
    the source's timestamp policy. Undecodable records go to ``<topic>.dlq``.
    """

    def __init__(self, config: KafkaSourceConfig, topics: Sequence[str] = (),
                 ranges: Mapping[str, Mapping[int, tuple[int, int]]] | None = None,
                 topic_prefix: str = "", producer_config: Mapping[str, str] | None = None):
        super().__init__()
        self._config = config
        self._topics = tuple(topics)
        self._ranges = ranges
        self._prefix = topic_prefix
        self._producer_config = dict(producer_config or _producer_config_of(config))

    def expand(self, pbegin):
        records = pbegin | "Read" >> ReadFromKafka(self._config, self._topics, self._ranges)
        decoded = records | "Decode" >> DecodeEvents(topic_prefix=self._prefix)
        _ = decoded.dead_letters | "WriteDeadLetters" >> WriteDeadLetters(self._producer_config)
        return decoded.events


# Consumer-only librdkafka settings a producer would reject.
_CONSUMER_ONLY = ("group.id", "group.instance.id", "auto.offset.reset", "enable.auto.commit",
                  "enable.auto.offset.store", "enable.partition.eof", "isolation.level",
                  "session.timeout.ms", "max.poll.interval.ms", "fetch.min.bytes",
                  "fetch.wait.max.ms", "partition.assignment.strategy")


def producer_config_of(config: KafkaSourceConfig) -> dict:
    """The consumer's connection and security settings, reused for the DLQ producer."""
    return {k: v for k, v in config.consumer_config.items() if k not in _CONSUMER_ONLY}


_producer_config_of = producer_config_of
