"""Poison records mixed into a normal stream, through the real source, decode, validation and
store sink on Prism: each bad record lands in its ``.dlq`` with its reason, every good record is
applied, and the job keeps running.

The job is a small test pipeline (``ReadEventBatches`` + ``ApplyInBatches`` with an applier
writing to Redis), built the way the real pipelines are built; the store-side poison is a real
Redis error (``WRONGTYPE``) for one post.
"""
from __future__ import annotations

import hashlib
import random
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.install import prism_binary
from jobs.topics import wait_until_visible
from pipelines.io.deadletter import SHRUNK_VALUE_BYTES, read_dead_letters
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.sink import APPLY_FAILED, ApplyInBatches
from pipelines.io.source import ReadEventBatches
from schemas import validation as v
from schemas.codec import WireCodec
from schemas.events import (
    FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind, StoryEvent, StoryEventKind,
)
from tests.integration.test_kafka_source import _cancel, _wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "feedbeam.poison_test"
H = 3_600_000
DAY = 24 * H
POISON_POST = 666  # its Redis key holds a string: HSET on it fails (WRONGTYPE)
DLQ_LIMIT = 20_000  # max.message.bytes of follow-events.dlq: below one of its dead letters


class _RedisApplier:
    """Applies event batches to Redis: posts into hashes and follows into sets in one
    non-transactional pipeline, then, once those succeeded, every event id into a set
    (what the test reads as applied)."""

    def __init__(self, redis_url: str, prefix: str):
        import redis

        self._client = redis.Redis.from_url(redis_url)
        self._prefix = prefix

    def apply(self, batches: list) -> None:
        pipe = self._client.pipeline(transaction=False)
        ids = []
        for batch in batches:
            for event in batch.events:
                ids.append(event.event_id)
                if isinstance(event, PostEvent):
                    pipe.hset(f"{self._prefix}:post:{event.post_id}", "author", event.author_id)
                elif isinstance(event, FollowEvent):
                    pipe.sadd(f"{self._prefix}:follows:{event.follower_id}", event.followee_id)
        pipe.execute()
        if ids:
            self._client.sadd(f"{self._prefix}:ids", *ids)

    def close(self) -> None:
        self._client.close()


class _RedisApplierConfig:
    def __init__(self, redis_url: str, prefix: str):
        self.redis_url, self.prefix = redis_url, prefix

    def open(self) -> _RedisApplier:
        return _RedisApplier(self.redis_url, self.prefix)


def _stream(now: int) -> tuple[list, list[tuple[str, object, str, str]]]:
    """The good events, and the bad ones as ``(name, event or raw bytes, topic, reason)``."""
    good: list = []
    for i in range(40):
        t = now - 60_000 + i * 100
        good.append(FollowEvent(f"f{i}", t, FollowKind.FOLLOW, 100 + i % 5, 200 + i))
        good.append(PostEvent(f"p{i}", t, PostEventKind.CREATED, 1000 + i, 200 + i, t,
                              MediaType.PHOTO, 12, ("sun",)))
        if i % 4 == 0:
            good.append(StoryEvent(f"s{i}", t, StoryEventKind.PUBLISHED, 3000 + i, 200 + i,
                                   created_at=t, expires_at=t + DAY))
    good.append(FollowEvent("f-2-62", now, FollowKind.FOLLOW, 1, 2**62))  # large ids are fine
    # Replayed history: a 2023 event on a record written now is valid.
    good.append(PostEvent("p-2023", 1_700_000_000_000, PostEventKind.CREATED, 5000, 9,
                          1_700_000_000_000))

    rng = random.Random(25)
    bad = [
        ("huge post", PostEvent("p-huge", now, PostEventKind.CREATED, 900001, 2, now,
                                MediaType.PHOTO, 1, tuple(("h%03d" % i) * 25 for i in range(600))),
         "post-events", v.TOO_MANY_HASHTAGS),
        ("µs follow", FollowEvent("f-us", now * 1000, FollowKind.FOLLOW, 11, 12),
         "follow-events", v.EVENT_TIME_IN_FUTURE),
        ("ns follow", FollowEvent("f-ns", now * 1_000_000, FollowKind.FOLLOW, 13, 14),
         "follow-events", v.EVENT_TIME_IN_FUTURE),
        ("seconds post", PostEvent("p-sec", now // 1000, PostEventKind.CREATED, 900002, 2,
                                   now // 1000), "post-events", v.EVENT_TIME_BEFORE_FLOOR),
        ("story decades ahead", StoryEvent("s-far", now + 30 * 365 * DAY,
                                           StoryEventKind.PUBLISHED, 900003, 2,
                                           created_at=now + 30 * 365 * DAY),
         "story-events", v.EVENT_TIME_IN_FUTURE),
        ("story past max ttl", StoryEvent("s-ttl", now, StoryEventKind.PUBLISHED, 900004, 2,
                                          created_at=now, expires_at=now + 40 * 365 * DAY),
         "story-events", v.STORY_LIFE_TOO_LONG),
        ("story expiring before creation", StoryEvent(
            "s-neg", now, StoryEventKind.PUBLISHED, 900005, 2, created_at=now,
            expires_at=now - H), "story-events", v.STORY_EXPIRES_BEFORE_CREATION),
        ("negative id", FollowEvent("f-neg", now, FollowKind.FOLLOW, -5, 12),
         "follow-events", v.NEGATIVE_ID),
        # Valid, but the store refuses it: the sink's barrier dead-letters it.
        ("store poison", PostEvent("p-poison", now, PostEventKind.CREATED, POISON_POST, 2, now),
         "post-events", APPLY_FAILED),
        # Undecodable and over the producer's 1 MB message limit once it has headers.
        ("1 MB garbage", b"\x09" + rng.randbytes(1_040_000), "post-events", "wrong_magic"),
        # Undecodable, over its .dlq topic's max.message.bytes.
        ("100 KB garbage", b"\x07" + rng.randbytes(100_000), "follow-events", "wrong_magic"),
    ]
    return good, bad


@pytest.fixture
def topics(stack):
    """The four event topics and their .dlq twins under a fresh prefix; follow-events.dlq
    with a small ``max.message.bytes``, follow-events taking timestamps far ahead (Kafka 4
    refuses those more than an hour ahead by default). Deleted afterwards."""
    prefix = f"t{uuid.uuid4().hex[:8]}."
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    names = [prefix + t for t in ("post-events", "follow-events", "story-events",
                                  "engagement-events")]
    new = [NewTopic(n, 2, 1, config=(
        {"message.timestamp.after.max.ms": str(30 * DAY)} if n.endswith("follow-events") else {}))
        for n in names]
    new += [NewTopic(n + ".dlq", 1, 1, config=(
        {"max.message.bytes": str(DLQ_LIMIT)} if n.endswith("follow-events") else {}))
        for n in names]
    for future in admin.create_topics(new, operation_timeout=30).values():
        future.result(timeout=60)
    wait_until_visible(admin, [t.topic for t in new], timeout_s=60)
    yield prefix
    for future in admin.delete_topics([t.topic for t in new], operation_timeout=30).values():
        future.result(timeout=60)


def test_poison_records_are_dead_lettered_with_their_reason_and_the_job_goes_on(
        stack, topics, redis_client, key_prefix):
    prefix = topics
    now = int(time.time() * 1000)
    good, bad = _stream(now)
    redis_client.set(f"{key_prefix}:post:{POISON_POST}", "not a hash")
    codec = WireCodec()
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap,
                         "message.max.bytes": 2_000_000, "linger.ms": 5})
    delivered: dict[str, tuple[int, int]] = {}

    def send(name, topic, value, key=b"k", timestamp=None):
        def on_delivery(err, msg):
            assert err is None, (name, err)
            delivered[name] = (msg.partition(), msg.offset())

        producer.produce(prefix + topic, value, key, on_delivery=on_delivery,
                         **({} if timestamp is None else {"timestamp": timestamp}))

    bad_values = {}
    for i, event in enumerate(good):
        send(event.event_id, event.TOPIC, codec.encode(event), event.key)
        if i % 9 == 0 and i // 9 < len(bad):
            name, item, topic, _ = bad[i // 9]
            bad_values[name] = item if isinstance(item, bytes) else codec.encode(item)
            send(name, topic, bad_values[name])
    for name, item, topic, _ in bad:
        if name not in bad_values:
            bad_values[name] = item if isinstance(item, bytes) else codec.encode(item)
            send(name, topic, bad_values[name])
    # A valid event on a record stamped ten days ahead (a producer's clock).
    future_record = FollowEvent("f-future-record", now, FollowKind.FOLLOW, 15, 16)
    bad_values["future record"] = codec.encode(future_record)
    send("future record", "follow-events", bad_values["future record"],
         timestamp=now + 10 * DAY)
    bad.append(("future record", future_record, "follow-events", v.RECORD_TIME_IN_FUTURE))
    assert producer.flush(60) == 0

    options = PipelineOptions([
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--topic_prefix={prefix}",
        f"--consumer_group=g-{uuid.uuid4().hex[:8]}", "--fallback_start=earliest"])
    config = options.view_as(KafkaReadOptions).source_config(default_group="unused")
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline
         | "Read" >> ReadEventBatches(
             config, [prefix + t for t in ("post-events", "follow-events", "story-events")],
             topic_prefix=prefix)
         | "Apply" >> ApplyInBatches(_RedisApplierConfig(stack.redis_url, key_prefix),
                                     NAMESPACE, max_batch=50, dead_letters="from_options"))
    result = pipeline.run()
    ids_key = f"{key_prefix}:ids"

    def dead_letters():
        return {name: read_dead_letters(stack.kafka_bootstrap, f"{prefix}{name}.dlq", 10)
                for name in ("post-events", "follow-events", "story-events")}

    def all_dead_lettered():
        found = dead_letters()
        return found if sum(map(len, found.values())) >= len(bad) else None

    try:
        _wait_for(lambda: redis_client.scard(ids_key) >= len(good), 300, "every good event",
                  result, state=lambda: redis_client.scard(ids_key))
        letters = _wait_for(all_dead_lettered, 120, "every dead letter", result,
                            state=lambda: {k: len(x) for k, x in dead_letters().items()})
        # The job went past every poison record: one more good record still arrives.
        last = FollowEvent("f-last", int(time.time() * 1000), FollowKind.FOLLOW, 7, 8)
        send("last", last.TOPIC, codec.encode(last), last.key)
        assert producer.flush(30) == 0
        _wait_for(lambda: redis_client.sismember(ids_key, "f-last"), 120,
                  "a record produced after the poison", result)
        from apache_beam.runners.runner import PipelineState

        assert not PipelineState.is_terminal(result.state), result.state
    finally:
        _cancel(result)

    applied = {m.decode() for m in redis_client.smembers(ids_key)}
    assert applied == {e.event_id for e in good} | {"f-last"}
    assert redis_client.smembers(f"{key_prefix}:follows:1") == {str(2**62).encode()}

    by_coords = {(d.topic, d.partition, d.offset): d for ds in letters.values() for d in ds}
    assert len(by_coords) == len(bad)  # each once (no bundle was retried here)
    for name, _, topic, reason in bad:
        partition, offset = delivered[name]
        letter = by_coords[(prefix + topic, partition, offset)]
        assert letter.reason == reason, (name, letter.reason, letter.error)
        value = bad_values[name]
        if letter.is_truncated:
            assert name in ("1 MB garbage", "100 KB garbage"), name
            assert letter.value_size == len(value)
            assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
            assert value.startswith(letter.value)
        else:
            assert letter.value == value, name
    steps = {name: by_coords[(prefix + topic, *delivered[name])].step
             for name, _, topic, _ in bad}
    assert steps["store poison"] == NAMESPACE
    assert steps["1 MB garbage"] == steps["100 KB garbage"] == "decode"
    assert {s for n, s in steps.items() if n not in ("store poison", "1 MB garbage",
                                                     "100 KB garbage")} == {v.VALIDATE_STEP}
    # The 1 MB letter was fitted to the producer's limit; the 100 KB one shrunk after the
    # broker refused it for its topic's smaller limit.
    huge = by_coords[(prefix + "post-events", *delivered["1 MB garbage"])]
    assert 900_000 < len(huge.value) < 1_000_000
    shrunk = by_coords[(prefix + "follow-events", *delivered["100 KB garbage"])]
    assert len(shrunk.value) == SHRUNK_VALUE_BYTES
    assert "WRONGTYPE" in by_coords[(prefix + "post-events", *delivered["store poison"])].error
