"""DecodeEvents on TestPipeline: good records become typed events, every bad one a DeadLetter."""
from __future__ import annotations

import pickle
import random

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as _TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines.io.deadletter import (
    DECODE_NAMESPACE, DecodeEvents, _DecodeFn, to_kafka_message,
)
from schemas.records import DECODE_STEP, DeadLetter, KafkaRecord
from schemas.codec import WireCodec, header
from schemas.events import (
    EngagementEvent, EngagementKind, FollowEvent, FollowKind, MediaType, PostEvent,
    PostEventKind, StoryEvent, StoryEventKind,
)

T0 = 1_700_000_000_000
PREFIX = "t1."

EVENTS = [
    PostEvent("p1", T0, PostEventKind.CREATED, post_id=10, author_id=7, created_at=T0,
              media_type=MediaType.REEL, caption_length=42, hashtags=("sun", "sea")),
    PostEvent("p2", T0 + 5, PostEventKind.DELETED, post_id=10, author_id=7, created_at=T0),
    EngagementEvent("e1", T0 + 1, EngagementKind.VIEW, viewer_id=3, author_id=7, post_id=10,
                    media_type=MediaType.VIDEO, dwell_ms=1500),
    EngagementEvent("e2", T0 + 2, EngagementKind.PROFILE_VIEW, viewer_id=3, author_id=7),
    StoryEvent("s1", T0 + 3, StoryEventKind.PUBLISHED, story_id=99, author_id=7, created_at=T0,
               expires_at=T0 + 3600_000, media_type=MediaType.PHOTO),
    StoryEvent("s2", T0 + 4, StoryEventKind.VIEWED, story_id=99, author_id=7, viewer_id=3),
    FollowEvent("f1", T0 + 6, FollowKind.FOLLOW, follower_id=3, followee_id=7),
    FollowEvent("f2", T0 + 7, FollowKind.UNFOLLOW, follower_id=3, followee_id=2**62),
]

_codec = WireCodec()
_POST = _codec.encode(EVENTS[0])
_ENGAGEMENT = _codec.encode(EVENTS[2])

#: (name, topic without prefix, value, expected reason)
MALFORMED = [
    ("empty", "post-events", b"", "too_short"),
    ("too_short", "post-events", b"\x00\x00\x00", "too_short"),
    ("wrong_magic", "post-events", b"\x01" + _POST[1:], "wrong_magic"),
    ("unknown_schema_id", "post-events", header(99) + _POST[5:], "unknown_schema_id"),
    ("truncated", "engagement-events", _ENGAGEMENT[:-3], "truncated"),
    ("trailing_garbage", "post-events", _POST + b"\x00\x01", "bad_body"),
    ("schema_topic_mismatch", "engagement-events", _POST, "schema_topic_mismatch"),
    ("null_value", "story-events", None, "null_value"),
]
KNOWN_REASONS = {"too_short", "wrong_magic", "unknown_schema_id", "truncated", "bad_body",
                 "schema_topic_mismatch", "null_value"}


def _random_values(n: int, seed: int = 20240607) -> list[bytes]:
    """Random bytes, half of them behind a valid header so the body parser is exercised."""
    rng = random.Random(seed)
    values = []
    for i in range(n):
        body = rng.randbytes(rng.randrange(0, 40))
        values.append(header(rng.randrange(1, 5)) + body if i % 2 else body)
    return values


def _records() -> tuple[list[KafkaRecord], list[KafkaRecord], list[tuple[KafkaRecord, str]]]:
    good = [
        KafkaRecord(PREFIX + type(e).TOPIC, partition=i % 3, offset=100 + i,
                    key=e.key, value=_codec.encode(e), timestamp_ms=e.event_time)
        for i, e in enumerate(EVENTS)
    ]
    bad = [
        (KafkaRecord(PREFIX + topic, partition=1, offset=500 + i, key=name.encode(),
                     value=value, timestamp_ms=T0 + 1000 + i), reason)
        for i, (name, topic, value, reason) in enumerate(MALFORMED)
    ]
    rand = [
        KafkaRecord(PREFIX + "follow-events", partition=2, offset=900 + i, key=None,
                    value=value, timestamp_ms=T0 + 2000 + i)
        for i, value in enumerate(_random_values(40))
    ]
    return good, rand, bad


def _coords(item) -> tuple:
    return (item.topic, item.partition, item.offset)


class _WithTimestamp(beam.DoFn):
    def process(self, element, ts=beam.DoFn.TimestampParam):
        yield element, ts.micros // 1000


def test_decode_events_splits_good_and_bad_records_and_keeps_timestamps():
    good, rand, bad = _records()
    inputs = good + [r for r, _ in bad] + rand
    by_coords = {_coords(r): r for r in inputs}
    expected_reason = {_coords(r): reason for r, reason in bad}
    bad_coords = set(expected_reason) | {_coords(r) for r in rand}

    def check_dead_letters(actual):
        assert sorted(_coords(dl) for dl, _ in actual) == sorted(bad_coords)
        for dl, ts in actual:
            record = by_coords[_coords(dl)]
            # The original bytes and coordinates, at the record's timestamp.
            assert (dl.key, dl.value, dl.timestamp_ms) == (record.key, record.value,
                                                           record.timestamp_ms)
            assert ts == record.timestamp_ms
            assert dl.step == DECODE_STEP and dl.error and dl.failed_at_ms > 0
            assert dl.reason == expected_reason.get(_coords(dl), dl.reason), dl
            assert dl.reason in KNOWN_REASONS, dl

    p = _TestPipeline()
    records = (p | "Create" >> beam.Create(inputs)
               | "Stamp" >> beam.Map(lambda r: TimestampedValue(r, r.timestamp_ms / 1000)))
    decoded = records | "DecodeEvents" >> DecodeEvents(WireCodec, topic_prefix=PREFIX)
    events = decoded.events | "EventTs" >> beam.ParDo(_WithTimestamp())
    dead = decoded.dead_letters | "DeadTs" >> beam.ParDo(_WithTimestamp())

    assert_that(events, equal_to([(e, e.event_time) for e in EVENTS]), label="GoodEvents")
    assert_that(dead, check_dead_letters, label="DeadLetters")
    # Nothing vanishes: events + dead letters = inputs.
    total = ((decoded.events, decoded.dead_letters) | "Both" >> beam.Flatten()
             | "Count" >> beam.combiners.Count.Globally())
    assert_that(total, equal_to([len(inputs)]), label="Reconcile")

    result = p.run()
    result.wait_until_finish()

    counters = {r.key.metric.name: r.committed
                for r in result.metrics().query(
                    MetricsFilter().with_namespace(DECODE_NAMESPACE))["counters"]}
    assert counters["decoded"] == len(good)
    assert counters["dead_letter"] == len(bad) + len(rand)
    for reason in KNOWN_REASONS:
        assert counters[f"dead_letter_{reason}"] >= sum(1 for _, r in bad if r == reason)
    assert sum(v for k, v in counters.items() if k.startswith("dead_letter_")) \
        == counters["dead_letter"]


def test_random_bytes_are_dead_letters_with_seeded_generator():
    # Kept apart from the big pipeline so a failure names the culprit bytes.
    _, rand, _ = _records()
    with _TestPipeline() as p:
        decoded = p | beam.Create(rand) | DecodeEvents()
        assert_that(decoded.events, equal_to([]), label="NoEvents")
        assert_that(
            decoded.dead_letters | beam.Map(lambda dl: (_coords(dl), dl.value)),
            equal_to([(_coords(r), r.value) for r in rand]), label="AllDeadLettered")


def test_decode_events_accepts_a_codec_instance_and_no_prefix():
    event = EVENTS[2]
    record = KafkaRecord(event.TOPIC, 0, 1, event.key, _codec.encode(event), event.event_time)
    with _TestPipeline() as p:
        decoded = p | beam.Create([record]) | DecodeEvents(WireCodec())
        assert_that(decoded.events, equal_to([event]))


def test_decode_fn_pickles_without_its_codec():
    fn = _DecodeFn(WireCodec(), "")
    fn.setup()
    assert fn._codec is not None
    clone = pickle.loads(pickle.dumps(fn))
    assert clone._codec is None
    clone.setup()
    event = EVENTS[0]
    record = KafkaRecord(event.TOPIC, 0, 1, event.key, _codec.encode(event), T0)
    assert list(clone.process(record)) == [event]


@pytest.mark.parametrize("key", [b"k", None])
@pytest.mark.parametrize("value", [b"\x01\xffbytes", b"", None])
def test_dead_letter_headers_round_trip(key, value):
    record = KafkaRecord("post-events", 2, 12345, key, value, T0)
    dl = DeadLetter.of(record, DECODE_STEP, "wrong_magic", "magic byte 1, expected 0 — ünïcode",
                       failed_at_ms=T0 + 99)
    assert DeadLetter.from_kafka(key, value, dl.headers()) == dl
    message = to_kafka_message(dl)
    assert (message.topic, message.key, message.value, message.timestamp_ms) == (
        "post-events.dlq", key, value, T0 + 99)
    assert DeadLetter.from_kafka(message.key, message.value, list(message.headers)) == dl


def test_dead_letter_from_kafka_rejects_foreign_records():
    with pytest.raises(ValueError, match="not a feedbeam dead letter"):
        DeadLetter.from_kafka(b"k", b"v", [("other", b"x")])
