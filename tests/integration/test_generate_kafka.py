"""``feedbeam generate`` against the real Kafka: what the generator yields is what
the topics hold, per key in order, decodable with the codec; failures are loud."""
from __future__ import annotations

import argparse
import collections
import time
import uuid

import pytest

from jobs import generate
from infra.errors import UserFacingError
from jobs.generate import KafkaEventSink, config_from_args, pump
from jobs.workload import Workload
from schemas.codec import WireCodec
from schemas.events import TOPIC_TYPES, TOPICS

pytestmark = pytest.mark.integration

START = 1_714_564_800_000  # 2024-05-01T12:00:00Z


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.register(parser.add_subparsers())
    return parser.parse_args(["generate", *argv])


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}."


def _consume(bootstrap: str, topics: list[str], count: int, timeout_s: float = 60.0) -> list:
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"gen-test-{uuid.uuid4().hex}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    consumer.subscribe(topics)
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < count and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                assert msg.error() is None, msg.error()
                messages.append(msg)
        # Anything beyond ``count`` would be a duplicate: give it a moment to show.
        for msg in consumer.consume(num_messages=10_000, timeout=2.0):
            messages.append(msg)
    finally:
        consumer.close()
    return messages


def test_generated_workload_round_trips_through_kafka(stack, kafka_topic, capsys):
    prefix = _prefix()
    for topic in TOPICS:
        kafka_topic(partitions=3, name=prefix + topic)
    args = _args("--seed", "11", "--users", "400", "--avg-following", "25",
                 "--push-threshold", "150", "--posts-per-day", "6", "--stories-per-day", "3",
                 "--churn-per-day", "2", "--duration", "1h", "--start", str(START),
                 "--bootstrap", stack.kafka_bootstrap, "--topic-prefix", prefix)

    assert generate.run_generate(args, stack) == 0

    expected = list(Workload(config_from_args(args)).events())
    expected_counts = collections.Counter(topic for topic, _, _ in expected)
    assert set(expected_counts) == set(TOPICS)
    printed = capsys.readouterr().out
    assert f"{len(expected)} delivered" in printed

    messages = _consume(stack.kafka_bootstrap, [prefix + t for t in TOPICS], len(expected))
    codec = WireCodec()
    got = collections.defaultdict(list)  # (topic, key) -> events in partition order
    for msg in messages:
        topic = msg.topic().removeprefix(prefix)
        event = codec.decode(msg.value(), TOPIC_TYPES[topic])
        assert msg.key() == event.key
        assert msg.timestamp()[1] == event.event_time  # replays by time select event time
        got[(topic, msg.key())].append((msg.partition(), msg.offset(), event))
    assert collections.Counter({t: sum(len(v) for (tt, _), v in got.items() if tt == t)
                                for t in TOPICS}) == expected_counts

    want = collections.defaultdict(list)
    for topic, key, event in expected:
        want[(topic, key)].append(event)
    assert set(got) == set(want)
    for k, rows in got.items():
        assert len({p for p, _, _ in rows}) == 1  # one key, one partition
        assert [e for _, _, e in sorted(rows, key=lambda r: r[1])] == want[k], k


def test_missing_topics_are_a_clear_error(stack):
    with pytest.raises(UserFacingError, match="topics missing.*feedbeam topics create"):
        KafkaEventSink(stack.kafka_bootstrap, topic_prefix=_prefix())


def test_unreachable_kafka_is_a_clear_error():
    with pytest.raises(UserFacingError, match="does not answer"):
        KafkaEventSink("127.0.0.1:1", check_topics_timeout_s=2.0)


def test_delivery_failures_are_counted_and_raised(stack):
    """Topics that reject every batch (max.message.bytes tiny): close() must fail loudly."""
    from confluent_kafka.admin import AdminClient, NewTopic

    prefix = _prefix()
    names = [prefix + t for t in TOPICS]
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=1, replication_factor=1,
                  config={"max.message.bytes": "16"}) for n in names],
        operation_timeout=30)
    try:
        for future in futures.values():
            future.result(timeout=60)
        config = config_from_args(_args("--users", "100", "--avg-following", "10",
                                        "--celebrities", "0", "--start", str(START)))
        sink = KafkaEventSink(stack.kafka_bootstrap, prefix,
                              config={"message.timeout.ms": 10_000})
        counts = pump(Workload(config).events(), [sink], limit=200)
        with pytest.raises(UserFacingError, match="of 200 events were not delivered") as info:
            sink.close(timeout_s=30)
        assert sum(counts.values()) == 200
        assert sum(sink.failed.values()) == 200 and sink.delivered == 0
        assert prefix + "follow-events" in str(info.value)
    finally:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            future.result(timeout=60)
