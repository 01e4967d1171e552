"""Events through the real Kafka: produced with the codec, consumed and decoded equal."""
from __future__ import annotations

import pytest

from jobs.topics import create_topics, describe_topics, feed_topics
from schemas.codec import MalformedRecordError, WireCodec
from schemas.events import (
    EngagementEvent, EngagementKind, FollowEvent, FollowKind, MediaType, PostEvent,
    PostEventKind, StoryEvent, StoryEventKind,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def _events(n: int):
    for i in range(n):
        yield PostEvent(f"p{i}", T0 + i, PostEventKind.CREATED, post_id=i, author_id=i % 7,
                        created_at=T0 + i, media_type=MediaType.VIDEO, hashtags=("a", str(i)))
        yield EngagementEvent(f"e{i}", T0 + i, EngagementKind.VIEW, viewer_id=i, author_id=3,
                              post_id=i, media_type=MediaType.PHOTO, dwell_ms=i * 10)
        yield StoryEvent(f"s{i}", T0 + i, StoryEventKind.VIEWED, story_id=i, author_id=2,
                         viewer_id=i)
        yield FollowEvent(f"f{i}", T0 + i, FollowKind.FOLLOW, follower_id=i, followee_id=1)


def _consume_all(bootstrap: str, topic: str, count: int, timeout_s: float = 60.0) -> list:
    import time

    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": topic + ".test",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < count and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    return messages


def test_produce_encoded_consume_decoded(stack, kafka_topic):
    from confluent_kafka import Producer

    topic = kafka_topic(partitions=3)
    codec = WireCodec()
    sent = list(_events(50))
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True})
    for event in sent:
        producer.produce(topic, key=event.key, value=codec.encode(event, topic))
    producer.produce(topic, key=b"x", value=b"not avro")
    assert producer.flush(30) == 0

    messages = _consume_all(stack.kafka_bootstrap, topic, len(sent) + 1)
    reader = WireCodec()  # a separate consumer process has its own codec
    decoded, malformed = [], []
    for msg in messages:
        try:
            decoded.append(reader.decode(msg.value()))
        except MalformedRecordError as exc:
            malformed.append((msg.value(), exc.reason))
    assert malformed == [(b"not avro", "wrong_magic")]
    assert sorted(decoded, key=lambda e: e.event_id) == sorted(sent, key=lambda e: e.event_id)
    # Per key, order is kept (one key -> one partition).
    by_key: dict[bytes, list] = {}
    for event in decoded:
        by_key.setdefault(event.key + type(event).__name__.encode(), []).append(event.event_time)
    assert all(times == sorted(times) for times in by_key.values())


def test_create_topics_is_idempotent(stack, kafka_topic):
    # kafka_topic owns cleanup; pre-create one name so the function meets an existing topic.
    first = kafka_topic(partitions=2)
    prefix = first + "."
    names = feed_topics(prefix)
    # The dead-letter topics beyond the event topics' twins are made too.
    assert {prefix + "feedbeam.features.dlq", prefix + "fanout-durable.dlq"} <= set(names)
    for name in names:
        kafka_topic(partitions=2, name=name)  # registers for cleanup
    assert create_topics(stack.kafka_bootstrap, names, partitions=2) == {n: "exists" for n in names}
    rows = {name: (parts, end) for name, parts, end in describe_topics(stack.kafka_bootstrap, prefix, names)}
    assert rows == {n: (2, 0) for n in names}


def test_create_topics_creates(stack, kafka_topic):
    import uuid

    from confluent_kafka.admin import AdminClient

    name = f"t.{uuid.uuid4().hex[:12]}.create"
    try:
        assert create_topics(stack.kafka_bootstrap, [name], partitions=1) == {name: "created"}
        assert create_topics(stack.kafka_bootstrap, [name], partitions=1) == {name: "exists"}
    finally:
        admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
        for future in admin.delete_topics([name], operation_timeout=30).values():
            future.result(timeout=60)
