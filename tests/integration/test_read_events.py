"""Kafka -> typed events with dead letters, end to end on Prism and the real broker."""
from __future__ import annotations

import random
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import Producer

from infra.install import prism_binary
from pipelines.io.deadletter import read_dead_letters
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.source import ReadEvents
from schemas.codec import WireCodec, header
from schemas.events import FollowEvent, FollowKind, PostEvent, PostEventKind
from tests.integration.test_kafka_source import _cancel, _wait_for

pytestmark = pytest.mark.integration


class _EventIdsToRedis(beam.DoFn):
    def __init__(self, redis_url: str, key: str):
        self._url, self._key = redis_url, key

    def setup(self):
        import redis

        self._client = redis.Redis.from_url(self._url)

    def process(self, event):
        self._client.sadd(self._key, event.event_id)

    def teardown(self):
        self._client.close()


def _malformed(codec: WireCodec, good: bytes) -> list[tuple[str, bytes]]:
    """One record of every malformed kind the codec knows, plus random bytes."""
    wrong_type = codec.encode(FollowEvent("x", 1, FollowKind.FOLLOW, 1, 2))
    rng = random.Random(7)
    cases = [
        ("too_short", b""),
        ("too_short", b"\x00\x00"),
        ("wrong_magic", b"\x07" + good[1:]),
        ("unknown_schema_id", header(999) + good[5:]),
        ("truncated", good[:-3]),
        ("bad_body", good + b"\x00\x01"),
        ("schema_topic_mismatch", wrong_type),
    ]
    cases += [("random", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 60))))
              for _ in range(13)]
    return cases


def _run_until_applied(stack, pipeline, redis_client, ids_key: str, good: int, dlq: str,
                       bad: int) -> list:
    """Run ``pipeline`` until ``good`` ids are in Redis and ``bad`` dead letters in
    ``dlq``, then cancel it; returns the dead letters."""
    result = pipeline.run()
    try:
        _wait_for(lambda: redis_client.scard(ids_key) >= good, 120, "every good event", result)
        return _wait_for(
            lambda: (found := read_dead_letters(stack.kafka_bootstrap, dlq, 10))
            and len(found) >= bad and found, 60, "every dead letter", result)
    finally:
        _cancel(result)


def _prism_options(stack, *extra: str) -> PipelineOptions:
    return PipelineOptions([
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming", f"--kafka_bootstrap={stack.kafka_bootstrap}",
        f"--consumer_group=g-{uuid.uuid4().hex[:8]}", "--fallback_start=earliest", *extra])


def test_good_records_arrive_and_every_bad_one_lands_in_the_dlq(
        stack, kafka_topic, redis_client, key_prefix):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    topic = kafka_topic(partitions=3, name=prefix + "post-events")
    dlq = kafka_topic(partitions=1, name=prefix + "post-events.dlq")
    codec = WireCodec()
    posts = [PostEvent(f"e{i}", 1_700_000_000_000 + i, PostEventKind.CREATED, i, i % 7,
                       1_700_000_000_000 + i) for i in range(300)]
    bad = _malformed(codec, codec.encode(posts[0]))
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for i, post in enumerate(posts):
        producer.produce(topic, codec.encode(post), post.key)
        if i % 15 == 0 and i // 15 < len(bad):
            producer.produce(topic, bad[i // 15][1], b"bad")
    assert producer.flush(30) == 0

    options = _prism_options(stack)
    config = options.view_as(KafkaReadOptions).source_config(default_group="unused")
    ids_key = f"{key_prefix}:ids"
    pipeline = beam.Pipeline(options=options)
    (pipeline
     | "ReadEvents" >> ReadEvents(config, [topic], topic_prefix=prefix)
     | "Ids" >> beam.ParDo(_EventIdsToRedis(stack.redis_url, ids_key)))
    letters = _run_until_applied(stack, pipeline, redis_client, ids_key, len(posts), dlq,
                                 len(bad))

    assert {m.decode() for m in redis_client.smembers(ids_key)} == {p.event_id for p in posts}
    assert sorted(d.value for d in letters) == sorted(value for _, value in bad)
    for letter in letters:
        assert letter.topic == topic and letter.step == "decode" and letter.key == b"bad"
    named = {value: reason for reason, value in bad if reason != "random"}
    for letter in letters:
        if letter.value in named:
            assert letter.reason == named[letter.value]


def test_event_time_policy_survives_event_times_in_other_units(
        stack, kafka_topic, redis_client, key_prefix):
    """With element times taken from the events, a follow in ns, µs or seconds must not
    break the job (a batch of the ns record alone would be stamped past what Beam's
    timestamps hold) nor move the watermark: each is dead-lettered, and the good
    events after them pass a one-minute window."""
    import time

    from apache_beam.transforms import window

    prefix = f"t{uuid.uuid4().hex[:8]}."
    topic = kafka_topic(partitions=1, name=prefix + "follow-events")
    dlq = kafka_topic(partitions=1, name=prefix + "follow-events.dlq")
    codec = WireCodec()
    now = int(time.time() * 1000)
    good = [FollowEvent(f"f{i}", now - 120_000 + i, FollowKind.FOLLOW, i, 7) for i in range(20)]
    odd = {"ns": now * 1_000_000, "us": now * 1000, "s": now // 1000}
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})

    def produce(events, key=b"odd"):
        for event in events:
            producer.produce(topic, codec.encode(event), key)
        assert producer.flush(30) == 0

    # The ns record comes first and alone: its batch holds nothing else.
    produce([FollowEvent("ns", odd["ns"], FollowKind.FOLLOW, 1, 2)])
    options = _prism_options(stack, "--timestamp_policy=event")
    config = options.view_as(KafkaReadOptions).source_config(default_group="unused")
    ids_key = f"{key_prefix}:ids"
    pipeline = beam.Pipeline(options=options)
    (pipeline
     | "ReadEvents" >> ReadEvents(config, [topic], topic_prefix=prefix)
     | "Minute" >> beam.WindowInto(window.FixedWindows(60))
     | "Ids" >> beam.ParDo(_EventIdsToRedis(stack.redis_url, ids_key)))
    result = pipeline.run()
    try:
        _wait_for(lambda: read_dead_letters(stack.kafka_bootstrap, dlq, 10), 120,
                  "the ns record's dead letter", result)
        produce([FollowEvent(name, t, FollowKind.FOLLOW, 1, 2) for name, t in odd.items()
                 if name != "ns"])
        produce(good, key=b"good")
        _wait_for(lambda: redis_client.scard(ids_key) >= len(good), 120, "every good event",
                  result)
        letters = _wait_for(
            lambda: (found := read_dead_letters(stack.kafka_bootstrap, dlq, 10))
            and len(found) >= len(odd) and found, 60, "every dead letter", result)
    finally:
        _cancel(result)
    assert {m.decode() for m in redis_client.smembers(ids_key)} == {e.event_id for e in good}
    assert sorted((codec.decode(d.value).event_id, d.step, d.reason) for d in letters) == [
        ("ns", "validate", "event_time_in_future"), ("s", "validate", "event_time_before_floor"),
        ("us", "validate", "event_time_in_future")]
