"""Which Kafka client errors the source rides out and which end the read."""
from __future__ import annotations


def test_broker_outages_are_recoverable_source_errors_but_unknown_topics_are_not():
    from confluent_kafka import KafkaError

    from pipelines.io.kafka import recoverable

    assert recoverable(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert recoverable(KafkaError(KafkaError._TRANSPORT))
    assert not recoverable(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    assert not recoverable(KafkaError(KafkaError._TRANSPORT, fatal=True))
