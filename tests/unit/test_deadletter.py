"""DecodeBatches on TestPipeline: good records become typed event batches, every bad one a DeadLetter;
batches opened keep each event's own time."""
from __future__ import annotations

import dataclasses
import pickle
import random

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as _TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from pipelines.io import deadletter
from pipelines.io.deadletter import (
    DECODE_NAMESPACE, DecodeBatches, _DecodeBatchFn, to_kafka_message,
)
from pipelines.io.kafka_write import KafkaMessage
from schemas import validation
from pipelines.io.kafka import RecordBatchCoder
from pipelines.io.source import OpenBatches
from schemas.records import DECODE_STEP, DeadLetter, KafkaRecord, RecordBatch, decode_batch
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


def _batches(records: list[KafkaRecord], size: int = 3) -> list[RecordBatch]:
    """Records grouped per partition into batches of ``size``, in offset order."""
    by_partition: dict[tuple, list[KafkaRecord]] = {}
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        by_partition.setdefault((r.topic, r.partition), []).append(r)
    out = []
    for (topic, partition), rs in sorted(by_partition.items()):
        for i in range(0, len(rs), size):
            chunk = rs[i:i + size]
            batch = RecordBatch(topic, partition, [r.offset for r in chunk],
                                [r.key for r in chunk], [r.value for r in chunk],
                                [r.timestamp_ms for r in chunk])
            out.append(batch)
    return out


class _CreateBatches(beam.PTransform):
    """``_batches(records)`` stamped with their oldest record's time, as the source does."""

    def __init__(self, records: list[KafkaRecord]):
        super().__init__()
        self._batches = _batches(records)

    def expand(self, pbegin):
        return (pbegin | "Create" >> beam.Create(self._batches)
                | "Stamp" >> beam.Map(lambda b: TimestampedValue(b, min(b.timestamps_ms) / 1000))
                .with_output_types(RecordBatch))


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

    def check_dead_letters_at_batch_time(actual):
        # A dead letter keeps its record's bytes and time; as an element it carries
        # its batch's time, which is never after its own.
        check_dead_letters([(dl, dl.timestamp_ms) for dl, _ in actual])
        assert all(ts <= dl.timestamp_ms for dl, ts in actual)

    p = _TestPipeline()
    batches = p | "Create" >> _CreateBatches(inputs)
    decoded = batches | "DecodeBatches" >> DecodeBatches(WireCodec, topic_prefix=PREFIX)
    events = (decoded.events | "Open" >> OpenBatches()
              | "EventTs" >> beam.ParDo(_WithTimestamp()))
    dead = decoded.dead_letters | "DeadTs" >> beam.ParDo(_WithTimestamp())

    assert_that(events, equal_to([(e, e.event_time) for e in EVENTS]), label="GoodEvents")
    assert_that(dead, check_dead_letters_at_batch_time, label="DeadLetters")
    # Nothing vanishes: events + dead letters = inputs.
    sizes = ((decoded.events | "EventCounts" >> beam.Map(len)),
             (decoded.dead_letters | "DeadCounts" >> beam.Map(lambda _: 1)))
    total = sizes | "Both" >> beam.Flatten() | "Sum" >> beam.CombineGlobally(sum)
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
        decoded = p | _CreateBatches(rand) | DecodeBatches()
        assert_that(decoded.events, equal_to([]), label="NoEvents")
        assert_that(
            decoded.dead_letters | beam.Map(lambda dl: (_coords(dl), dl.value)),
            equal_to([(_coords(r), r.value) for r in rand]), label="AllDeadLettered")


def test_decode_batches_accepts_a_codec_instance_and_no_prefix():
    event = EVENTS[2]
    record = KafkaRecord(event.TOPIC, 0, 1, event.key, _codec.encode(event), event.event_time)
    with _TestPipeline() as p:
        decoded = p | _CreateBatches([record]) | DecodeBatches(WireCodec())
        assert_that(decoded.events | OpenBatches(), equal_to([event]))


def test_decode_fn_pickles_without_its_codec():
    fn = _DecodeBatchFn(WireCodec(), "")
    fn.setup()
    assert fn._codec is not None
    clone = pickle.loads(pickle.dumps(fn))
    assert clone._codec is None
    clone.setup()
    event = EVENTS[0]
    record = KafkaRecord(event.TOPIC, 0, 1, event.key, _codec.encode(event), T0)
    (batch,) = list(clone.process(_batches([record])[0]))
    assert list(batch.events) == [event]


def test_decode_batch_keeps_order_coordinates_and_bytes_of_the_good_records():
    good = [_codec.encode(e) for e in EVENTS[:2]]
    values = [good[0], b"junk", None, good[1]]
    batch = RecordBatch("post-events", 4, [10, 11, 12, 13], [b"a", b"b", None, b"d"], values,
                        [T0 + 3, T0 + 1, T0 + 2, T0])
    events, dead = decode_batch(_codec, batch)
    assert list(events.events) == EVENTS[:2]
    assert (list(events.offsets), list(events.timestamps_ms), list(events.keys)) == (
        [10, 13], [T0 + 3, T0], [b"a", b"d"])
    assert events.record(1) == KafkaRecord("post-events", 4, 13, b"d", good[1], T0)
    assert [(d.offset, d.reason, d.value, d.timestamp_ms) for d in dead] == [
        (11, "too_short", b"junk", T0 + 1), (12, "null_value", None, T0 + 2)]


@pytest.mark.parametrize("keys, values", [
    ([b"k", None, b""], [b"\x00v", b"", None]),
    ([], []),
])
def test_record_batches_survive_their_coder(keys, values):
    batch = RecordBatch("t.post-events", 7, list(range(5, 5 + len(keys))), keys, values,
                        [T0 + i for i in range(len(keys))])
    coder = RecordBatchCoder()
    decoded = coder.decode(coder.encode(batch))
    assert decoded == RecordBatch(batch.topic, batch.partition, list(batch.offsets),
                                  [None if k is None else k for k in keys], values,
                                  list(batch.timestamps_ms))
    assert coder.is_deterministic()


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


def test_records_out_of_order_across_batches_keep_their_own_windows_and_none_is_late():
    """Two batches of one partition, out of order inside and across them, with the
    watermark moving between them as the source moves it (newest time seen less
    the allowed out-of-orderness, 30 s here): every event lands in the window of
    its own time, none is dropped as late."""
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms import window

    def engagement(i, seconds):
        return EngagementEvent(f"e{i}", T0 + seconds * 1000, EngagementKind.LIKE, viewer_id=i,
                               author_id=7, post_id=10, media_type=MediaType.PHOTO)

    def batch(offset, events):
        return RecordBatch("engagement-events", 0, [offset + i for i in range(len(events))],
                           [None] * len(events), [_codec.encode(e) for e in events],
                           [e.event_time for e in events])

    first = [engagement(1, 50), engagement(2, 10)]    # stamped 10 s, watermark then 50-30 = 20 s
    second = [engagement(3, 30), engagement(4, 70)]   # stamped 30 s: behind the newest, not late
    stream = (TestStream()
              .add_elements([TimestampedValue(batch(0, first), (T0 + 10_000) / 1000)])
              .advance_watermark_to((T0 + 20_000) / 1000)
              .add_elements([TimestampedValue(batch(2, second), (T0 + 30_000) / 1000)])
              .advance_watermark_to_infinity())
    options = _TestPipeline().get_pipeline_options()
    options.view_as(StandardOptions).streaming = True
    with _TestPipeline(options=options) as p:
        events = (p | stream
                  | DecodeBatches().with_input_types(RecordBatch)
                  ).events | OpenBatches()
        windowed = (events
                    | beam.WindowInto(window.FixedWindows(60), allowed_lateness=0)
                    | beam.Map(lambda e: ("all", e.event_id))
                    | beam.GroupByKey()
                    | beam.ParDo(_WindowStart()))
        minute = (T0 // 60_000) * 60
        expected = {}
        for e in first + second:
            start = (e.event_time // 60_000) * 60
            expected.setdefault(start, set()).add(e.event_id)
        assert minute in expected
        assert_that(windowed, equal_to(sorted((s, tuple(sorted(ids))) for s, ids in
                                              expected.items())))


class _WindowStart(beam.DoFn):
    def process(self, element, w=beam.DoFn.WindowParam):
        _, ids = element
        yield int(w.start.micros // 1_000_000), tuple(sorted(ids))


# --------------------------------------------------------------------------- validation


NOW = 1_796_000_000_000


def _invalid_events() -> list[tuple[object, str]]:
    """Decodable events that break a rule, with the reason each must carry."""
    base = EVENTS[6]  # a FOLLOW
    return [
        (dataclasses.replace(base, event_id="us", event_time=NOW * 1000),
         validation.EVENT_TIME_IN_FUTURE),
        (dataclasses.replace(base, event_id="ns", event_time=NOW * 1_000_000),
         validation.EVENT_TIME_IN_FUTURE),
        (dataclasses.replace(base, event_id="s", event_time=NOW // 1000),
         validation.EVENT_TIME_BEFORE_FLOOR),
        (dataclasses.replace(base, event_id="neg", follower_id=-4), validation.NEGATIVE_ID),
        (dataclasses.replace(EVENTS[0], event_id="tags",
                             hashtags=tuple(("h%03d" % i) * 25 for i in range(600))),
         validation.TOO_MANY_HASHTAGS),
        (dataclasses.replace(EVENTS[4], event_id="story",
                             expires_at=EVENTS[4].created_at + 40 * 24 * 3_600_000),
         validation.STORY_LIFE_TOO_LONG),
    ]


def test_decode_batch_dead_letters_invalid_events_and_keeps_the_rest_in_order():
    invalid = _invalid_events()
    mixed = [EVENTS[6], invalid[0][0], EVENTS[7], invalid[3][0], invalid[1][0]]
    values = [_codec.encode(e) for e in mixed]
    batch = RecordBatch("follow-events", 1, [20, 21, 22, 23, 24], [b"k"] * 5, values,
                        [T0] * 5)
    events, dead = decode_batch(_codec, batch, limits=validation.EventLimits(), now_ms=NOW)
    assert list(events.events) == [EVENTS[6], EVENTS[7]]
    assert list(events.offsets) == [20, 22] and list(events.values) == [values[0], values[2]]
    assert [(d.offset, d.step, d.reason, d.value) for d in dead] == [
        (21, validation.VALIDATE_STEP, validation.EVENT_TIME_IN_FUTURE, values[1]),
        (23, validation.VALIDATE_STEP, validation.NEGATIVE_ID, values[3]),
        (24, validation.VALIDATE_STEP, validation.EVENT_TIME_IN_FUTURE, values[4])]
    # Without limits nothing is checked (the decode-only path).
    events, dead = decode_batch(_codec, batch)
    assert len(events) == 5 and not dead


def test_validation_compares_against_the_kafka_timestamp_not_the_element_time():
    # Element times by event time (as --timestamp_policy=event gives them), the
    # Kafka timestamps two hours before: the events claim to lie ahead of the
    # moment their records were written.
    event = dataclasses.replace(EVENTS[6], event_time=T0 + 2 * 3_600_000)
    batch = RecordBatch("follow-events", 0, [5], [None], [_codec.encode(event)],
                        [event.event_time], kafka_timestamps_ms=[T0])
    events, dead = decode_batch(_codec, batch, limits=validation.EventLimits(), now_ms=NOW)
    assert not events.events
    assert [(d.reason, d.timestamp_ms) for d in dead] == [(validation.EVENT_TIME_IN_FUTURE, T0)]


def test_decode_batches_sends_invalid_events_to_the_dead_letters_with_their_reason():
    invalid = _invalid_events()
    records = [KafkaRecord(PREFIX + type(e).TOPIC, partition=0, offset=700 + i, key=b"bad",
                           value=_codec.encode(e), timestamp_ms=T0)
               for i, (e, _) in enumerate(invalid)]
    good, _, _ = _records()
    expected = {(r.topic, r.offset): reason for r, (_, reason) in zip(records, invalid)}
    with _TestPipeline() as p:
        decoded = (p | _CreateBatches(good + records)
                   | DecodeBatches(topic_prefix=PREFIX))
        assert_that(decoded.events | OpenBatches(), equal_to(EVENTS), label="GoodEvents")
        assert_that(decoded.dead_letters
                    | beam.Map(lambda d: ((d.topic, d.offset), d.step, d.reason)),
                    equal_to([(c, validation.VALIDATE_STEP, r) for c, r in expected.items()]),
                    label="Invalid")


def test_decode_batches_without_limits_checks_nothing():
    event, _ = _invalid_events()[3]
    record = KafkaRecord(event.TOPIC, 0, 1, event.key, _codec.encode(event), T0)
    with _TestPipeline() as p:
        decoded = p | _CreateBatches([record]) | DecodeBatches(limits=None)
        assert_that(decoded.events | OpenBatches(), equal_to([event]))


def test_record_batches_keep_their_kafka_timestamps_through_the_coder():
    batch = RecordBatch("t.post-events", 1, [3, 4], [b"k", None], [b"a", b"b"],
                        [T0 + 1, T0 + 2], kafka_timestamps_ms=[T0 - 7, -1])
    coder = RecordBatchCoder()
    decoded = coder.decode(coder.encode(batch))
    assert list(decoded.kafka_timestamps_ms) == [T0 - 7, -1]
    assert decoded.record(0).timestamp_ms == T0 - 7 and decoded.timestamps_ms == [T0 + 1, T0 + 2]


# --------------------------------------------------------------------------- large dead letters


def _letter(value: bytes | None, key: bytes | None = b"key") -> DeadLetter:
    return DeadLetter.of(KafkaRecord("post-events", 1, 42, key, value, T0), DECODE_STEP,
                         "bad_body", "boom", failed_at_ms=T0 + 1)


def test_a_dead_letter_too_large_for_a_message_is_truncated_with_size_and_digest():
    import hashlib

    value = bytes(range(256)) * 8_000  # 2 MB
    message = to_kafka_message(_letter(value), max_message_bytes=100_000)
    size = len(message.key) + len(message.value) + sum(len(n) + len(v) for n, v in message.headers)
    assert size <= 100_000 and len(message.value) > 90_000
    assert value.startswith(message.value)
    back = DeadLetter.from_kafka(message.key, message.value, list(message.headers))
    assert back.is_truncated and back.value_size == len(value)
    assert back.value_sha256 == hashlib.sha256(value).hexdigest()
    assert (back.topic, back.offset, back.reason) == ("post-events", 42, "bad_body")
    # A letter that fits is untouched, and carries no truncation headers.
    small = to_kafka_message(_letter(b"v" * 1000), max_message_bytes=100_000)
    assert small.value == b"v" * 1000 and not any(n.startswith("feedbeam.value")
                                                   for n, _ in small.headers)
    assert DeadLetter.from_kafka(small.key, small.value, list(small.headers)) == _letter(
        b"v" * 1000)


def test_a_dead_letter_the_broker_refuses_is_shrunk_keeping_the_original_digest():
    value = b"x" * 50_000
    fitted = to_kafka_message(_letter(value), max_message_bytes=40_000)
    shrunk = deadletter.shrink_dead_letter_message(fitted)
    assert len(shrunk.value) == deadletter.SHRUNK_VALUE_BYTES
    back = DeadLetter.from_kafka(shrunk.key, shrunk.value, list(shrunk.headers))
    assert back.value_size == len(value)  # the original's, not the fitted one's
    # Nothing left to cut, or not a dead letter: no resize (the error stands).
    assert deadletter.shrink_dead_letter_message(shrunk) is None
    assert deadletter.shrink_dead_letter_message(
        KafkaMessage("x.dlq", None, b"y" * 5000, (("other", b"1"),))) is None


def test_a_missing_dlq_topic_fails_with_what_to_do():
    hint = deadletter.missing_topic_hint(
        "WriteToKafka: 1 message(s) not delivered after 0 retries: topic 'x.dlq': 1 message(s), "
        "first errors: KafkaError{code=UNKNOWN_TOPIC_OR_PART,val=3,str=\"Broker: Unknown topic "
        "or partition\"}")
    assert "feedbeam topics create" in hint and "x.dlq" in hint
    assert deadletter.missing_topic_hint("other trouble") == "other trouble"


def _engagement_batch(n: int) -> RecordBatch:
    events = [EngagementEvent(f"e-{i:016x}", T0 + i, EngagementKind.VIEW, viewer_id=i,
                              author_id=i % 97, post_id=i * 31, media_type=MediaType.VIDEO,
                              dwell_ms=1500 + i % 700) for i in range(n)]
    return RecordBatch(PREFIX + "engagement-events", 0, list(range(n)), [e.key for e in events],
                       [_codec.encode(e) for e in events], [e.event_time for e in events])


def test_size_estimates_track_the_encoded_sizes_without_encoding():
    """Beam samples element sizes for its byte counters; the coders estimate them from a
    few values instead of encoding a whole batch, and stay close to the real size."""
    batch = _engagement_batch(1000)
    events, dead = decode_batch(_codec, batch, PREFIX)
    assert not dead
    record_size = len(RecordBatchCoder().encode(batch))
    assert 0.8 * record_size < RecordBatchCoder().estimate_size(batch) < 1.2 * record_size
    coder = deadletter.EventBatchCoder()
    event_size = len(coder.encode(events))
    assert 0.5 * event_size < coder.estimate_size(events) < 2 * event_size
    assert coder.decode(coder.encode(events)) == events
    assert beam.coders.registry.get_coder(type(events)).__class__ is deadletter.EventBatchCoder
    empty = RecordBatch(PREFIX + "engagement-events", 0, [], [], [], [])
    assert RecordBatchCoder().estimate_size(empty) > 0
