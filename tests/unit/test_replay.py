"""``feedbeam replay`` pieces without Kafka: Arrow schemas, options, hive paths, offsets."""
from __future__ import annotations

import argparse

import pyarrow as pa
import pytest

from infra.errors import UserFacingError
from jobs.replay import register
from jobs.replay_parquet import check_out_dir
from jobs.replay_range import RangeSpec, event_type_for_topic, parse_time, range_from_args
from stores.kafka.offsets import OffsetRangeError, clamp_range, parse_partition_offsets
from stores.files.parquet import avro_to_arrow, event_schema, hive_dir, hour_of
from schemas.codec import WireCodec, reader_schema
from schemas.events import (
    EVENT_TYPES, EngagementEvent, EngagementKind, FollowEvent, FollowKind, MediaType, PostEvent,
    PostEventKind, StoryEvent, StoryEventKind,
)

SOURCE = [("_event_ts", pa.timestamp("ms", tz="UTC"), False), ("_partition", pa.int32(), False),
          ("_offset", pa.int64(), False), ("_kafka_timestamp", pa.int64(), False)]

EXPECTED = {
    PostEvent: [
        ("event_id", pa.string(), False), ("event_time", pa.int64(), False),
        ("kind", pa.string(), False), ("post_id", pa.int64(), False),
        ("author_id", pa.int64(), False), ("created_at", pa.int64(), False),
        ("media_type", pa.string(), False), ("caption_length", pa.int32(), False),
        ("hashtags", pa.list_(pa.field("item", pa.string(), nullable=False)), False),
    ],
    EngagementEvent: [
        ("event_id", pa.string(), False), ("event_time", pa.int64(), False),
        ("kind", pa.string(), False), ("viewer_id", pa.int64(), False),
        ("author_id", pa.int64(), False), ("post_id", pa.int64(), True),
        ("media_type", pa.string(), True), ("dwell_ms", pa.int32(), True),
    ],
    StoryEvent: [
        ("event_id", pa.string(), False), ("event_time", pa.int64(), False),
        ("kind", pa.string(), False), ("story_id", pa.int64(), False),
        ("author_id", pa.int64(), False), ("viewer_id", pa.int64(), True),
        ("created_at", pa.int64(), True), ("expires_at", pa.int64(), True),
        ("media_type", pa.string(), True),
    ],
    FollowEvent: [
        ("event_id", pa.string(), False), ("event_time", pa.int64(), False),
        ("kind", pa.string(), False), ("follower_id", pa.int64(), False),
        ("followee_id", pa.int64(), False),
    ],
}


@pytest.mark.parametrize("record_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_event_schema_maps_every_avro_field(record_type):
    schema = event_schema(reader_schema(record_type))
    got = [(f.name, f.type, f.nullable) for f in schema]
    assert got == EXPECTED[record_type] + SOURCE


@pytest.mark.parametrize("record_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_enum_fields_keep_their_symbols(record_type):
    schema = event_schema(reader_schema(record_type))
    avro_kind = next(f for f in reader_schema(record_type)["fields"] if f["name"] == "kind")
    symbols = schema.field("kind").metadata[b"avro.enum.symbols"].decode().split(",")
    assert symbols == avro_kind["type"]["symbols"]
    assert schema.field("event_time").metadata[b"doc"]


@pytest.mark.parametrize("record_type", EVENT_TYPES, ids=lambda t: t.__name__)
def test_reader_enum_symbols_are_python_enum_members(record_type):
    """What makes decode_record_dict accept exactly what decode_record accepts."""
    import enum

    import schemas.events as events

    enums = {name: obj for name, obj in vars(events).items()
             if isinstance(obj, type) and issubclass(obj, enum.Enum)}

    def walk(avro_type):
        if isinstance(avro_type, list):
            for branch in avro_type:
                yield from walk(branch)
        elif isinstance(avro_type, dict):
            if avro_type.get("type") == "enum":
                yield avro_type
            for key in ("items", "values"):
                if key in avro_type:
                    yield from walk(avro_type[key])

    found = 0
    for field in reader_schema(record_type)["fields"]:
        for avro_enum in walk(field["type"]):
            python_enum = enums[avro_enum["name"]]
            assert set(avro_enum["symbols"]) <= {m.value for m in python_enum}
            found += 1
    assert found >= 1


@pytest.mark.parametrize("event", [
    PostEvent("p1", 1_714_557_600_000, PostEventKind.CREATED, post_id=1, author_id=2,
              created_at=1_714_557_600_000, media_type=MediaType.REEL, caption_length=5,
              hashtags=("a", "b")),
    EngagementEvent("e1", 1_714_557_600_001, EngagementKind.PROFILE_VIEW, viewer_id=1,
                    author_id=2),
    StoryEvent("s1", 1_714_557_600_002, StoryEventKind.PUBLISHED, story_id=3, author_id=4,
               created_at=5, media_type=MediaType.PHOTO),
    FollowEvent("f1", 1_714_557_600_003, FollowKind.FOLLOW, follower_id=1, followee_id=2),
], ids=lambda e: type(e).__name__)
def test_decoded_dict_fits_the_arrow_schema_and_round_trips(event):
    codec = WireCodec()
    record_type, row = codec.decode_dict(codec.encode(event))
    schema = event_schema(reader_schema(record_type))
    avro_fields = [f for f in schema if not f.name.startswith("_")]
    table = pa.Table.from_struct_array(pa.array([row], type=pa.struct(avro_fields)))
    back = table.to_pylist()[0]
    assert record_type.from_avro(back) == record_type.from_avro(row)


def test_avro_to_arrow_other_types():
    assert avro_to_arrow({"type": "long", "logicalType": "timestamp-millis"})[0] == \
        pa.timestamp("ms", tz="UTC")
    assert avro_to_arrow({"type": "map", "values": "double"})[0] == \
        pa.map_(pa.string(), pa.field("value", pa.float64(), nullable=False))
    assert avro_to_arrow(["null", "boolean"])[:2] == (pa.bool_(), True)
    assert avro_to_arrow({"type": "fixed", "name": "F", "size": 4})[0] == pa.binary(4)
    named: dict = {}
    avro_to_arrow({"type": "enum", "name": "x.Color", "symbols": ["RED"]}, named)
    assert avro_to_arrow("x.Color", named)[0] == pa.string()
    with pytest.raises(ValueError, match="no Arrow equivalent"):
        avro_to_arrow(["null", "long", "string"])
    with pytest.raises(ValueError, match="unknown Avro type"):
        avro_to_arrow("Nope")


@pytest.mark.parametrize("ms, expected", [
    (1_714_557_600_000, "date=2024-05-01/hour=10"),           # 2024-05-01T10:00:00Z
    (1_714_557_600_000 - 1, "date=2024-05-01/hour=09"),       # one ms earlier
    (1_714_521_600_000 + 23 * 3_600_000 + 3_599_999, "date=2024-05-01/hour=23"),
    (1_714_608_000_000, "date=2024-05-02/hour=00"),
    (0, "date=1970-01-01/hour=00"),
    (-1, "date=1969-12-31/hour=23"),
])
def test_hive_dir_of_an_event_time(ms, expected):
    assert hive_dir(hour_of(ms)) == expected


# ---------------------------------------------------------------- options


def _parse(*argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["replay", *argv])


def test_time_range_options():
    args = _parse("post-events", "--from", "2024-05-01T10:00:00Z", "--to", "2024-05-01T12:00",
                  "--out", "/tmp/x")
    assert range_from_args(args) == RangeSpec("time", 1_714_557_600_000, 1_714_564_800_000)
    assert range_from_args(_parse("post-events", "--to", "5", "--out", "d")) == \
        RangeSpec("time", None, 5)
    assert parse_time("2024-05-01T12:00:00+02:00", "--from") == 1_714_557_600_000


def test_offset_range_options():
    assert range_from_args(_parse("post-events", "--from-offset", "10", "--to-offset", "20",
                                  "--out", "d")) == RangeSpec("offset", 10, 20)
    spec = range_from_args(_parse("post-events", "--partition-offsets", "0:10-200, 2:5-",
                                  "--out", "d"))
    assert spec == RangeSpec("partitions", partitions={0: (10, 200), 2: (5, None)})


@pytest.mark.parametrize("argv, message", [
    ([], "give a range"),
    (["--from", "2024-05-01", "--from-offset", "3"], "one kind of range"),
    (["--to-offset", "3", "--partition-offsets", "0:1-2"], "one kind of range"),
    (["--from", "yesterday"], "bad --from"),
    (["--from", "2024-05-02", "--to", "2024-05-01"], "is not before"),
    (["--from-offset", "9", "--to-offset", "3"], "is after"),
    (["--from-offset", "-1"], ">= 0"),
    (["--partition-offsets", "0:1-2,0:3-4"], "given twice"),
    (["--partition-offsets", "a:1-2"], "PARTITION:FROM-TO"),
    (["--partition-offsets", "0:9-2"], "is after"),
])
def test_bad_ranges_are_user_errors(argv, message):
    with pytest.raises(UserFacingError, match=message):
        range_from_args(_parse("post-events", *argv, "--out", "d"))


def test_out_is_required():
    with pytest.raises(SystemExit):
        _parse("post-events", "--from-offset", "0")


def test_event_type_from_topic_name():
    assert event_type_for_topic("post-events") == (PostEvent, "")
    assert event_type_for_topic("t.abc.story-events") == (StoryEvent, "t.abc.")
    assert event_type_for_topic("x-follow-events", "x-") == (FollowEvent, "x-")
    with pytest.raises(UserFacingError, match="cannot tell the event type"):
        event_type_for_topic("post-events.dlq")
    with pytest.raises(UserFacingError, match="not an event topic"):
        event_type_for_topic("t.post-events", "u.")


def test_parse_partition_offsets():
    assert parse_partition_offsets("0:10-200,1:0-,2:-50") == \
        {0: (10, 200), 1: (0, None), 2: (None, 50)}
    with pytest.raises(OffsetRangeError, match="no partition ranges"):
        parse_partition_offsets(" , ")


def test_clamp_range():
    assert clamp_range(0, None, None, 5, 100, strict=False) == (5, 100)
    assert clamp_range(0, 0, 1000, 5, 100, strict=False) == (5, 100)
    assert clamp_range(0, 200, 300, 5, 100, strict=False) == (100, 100)
    assert clamp_range(0, 10, None, 5, 100, strict=True) == (10, 100)
    with pytest.raises(OffsetRangeError, match="deleted by retention"):
        clamp_range(0, 0, 50, 5, 100, strict=True)
    with pytest.raises(OffsetRangeError, match="past the end offset 100"):
        clamp_range(3, 10, 101, 5, 100, strict=True)
    with pytest.raises(OffsetRangeError, match="is after"):
        clamp_range(0, 50, 10, 5, 100, strict=False)


def test_out_dir_must_be_empty_or_an_earlier_replay(tmp_path):
    check_out_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("keep")
    with pytest.raises(UserFacingError, match="not empty"):
        check_out_dir(tmp_path / "stuff", overwrite=False)
    with pytest.raises(UserFacingError, match="not a replay output"):
        check_out_dir(tmp_path / "stuff", overwrite=True)
    assert (tmp_path / "stuff" / "notes.txt").exists()
    replayed = tmp_path / "replayed"
    (replayed / "date=2024-05-01" / "hour=10").mkdir(parents=True)
    (replayed / "_replay.json").write_text("{}")
    check_out_dir(replayed, overwrite=True)
    assert list(replayed.iterdir()) == []


# -- validation in a Parquet replay -----------------------------------------------------


class _Message:
    def __init__(self, partition, offset, value, timestamp_ms, key=b"k"):
        self._p, self._o, self._v, self._t, self._k = partition, offset, value, timestamp_ms, key

    def partition(self):
        return self._p

    def offset(self):
        return self._o

    def value(self):
        return self._v

    def key(self):
        return self._k

    def timestamp(self):
        return (1, self._t)

    def error(self):
        return None


class _Consumer:
    """A consumer that hands out ``MESSAGES`` once (in one ``consume``)."""

    MESSAGES: list = []

    def __init__(self, config):
        self._left = list(self.MESSAGES)

    def assign(self, partitions):
        pass

    def pause(self, partitions):
        pass

    def consume(self, num_messages, timeout):
        out, self._left = self._left, []
        return out

    def close(self):
        pass


def test_a_parquet_replay_dead_letters_what_the_pipelines_would_not_accept(
        tmp_path, monkeypatch):
    import json
    import time

    import confluent_kafka
    import pyarrow.parquet as pq

    from jobs.replay_parquet import DEAD_LETTER_DIR, MANIFEST, replay
    from schemas.validation import EVENT_TIME_IN_FUTURE, NEGATIVE_ID

    now = int(time.time() * 1000)
    codec = WireCodec()

    def follow(i, event_time, follower=3):
        return codec.encode(FollowEvent(f"f{i}", event_time, FollowKind.FOLLOW,
                                        follower_id=follower, followee_id=7))

    _Consumer.MESSAGES = [
        _Message(0, 0, follow(0, now - 1000), now),
        _Message(0, 1, follow(1, now * 1000), now),              # microseconds
        _Message(0, 2, follow(2, now - 1000, follower=-5), now),  # a negative id
        _Message(0, 3, b"not avro", now),                        # does not decode
        _Message(0, 4, follow(4, now - 500), now),
    ]
    monkeypatch.setattr(confluent_kafka, "Consumer", _Consumer)
    result = replay("k:9092", "follow-events", {0: (0, 5)}, tmp_path / "out", progress=False)
    assert (result.records_read, result.rows_written, result.dead_letters, result.invalid) == (
        5, 2, 3, 2)
    assert result.reconciles
    dead = pq.read_table(tmp_path / "out" / DEAD_LETTER_DIR).to_pydict()
    assert list(zip(dead["offset"], dead["step"], dead["reason"])) == [
        (1, "validate", EVENT_TIME_IN_FUTURE), (2, "validate", NEGATIVE_ID),
        (3, "decode", "wrong_magic")]
    assert dead["value"][1] == follow(2, now - 1000, follower=-5)  # the original bytes
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["invalid"] == 2

    # Without limits only what does not decode is a dead letter (the microsecond time is
    # left out: as a row its event hour is past what a date can hold, and the replay fails).
    del _Consumer.MESSAGES[1]
    off = replay("k:9092", "follow-events", {0: (0, 5)}, tmp_path / "off", progress=False,
                 limits=None)
    assert (off.rows_written, off.dead_letters, off.invalid) == (3, 1, 0)


def test_replay_validation_options():
    from jobs.replay_parquet import event_limits

    args = _parse("follow-events", "--from-offset", "0", "--out", "/tmp/x")
    assert event_limits(args).max_ahead_ms == 3_600_000
    assert event_limits(args).max_age_ms is None
    args = _parse("follow-events", "--from-offset", "0", "--out", "/tmp/x",
                  "--max-event-ahead-s", "60", "--max-event-age-s", "86400")
    assert (event_limits(args).max_ahead_ms, event_limits(args).max_age_ms) == (
        60_000, 86_400_000)
    with pytest.raises(UserFacingError):
        event_limits(_parse("follow-events", "--from-offset", "0", "--out", "/tmp/x",
                            "--max-event-ahead-s", "-1"))


def test_a_pipeline_replay_reports_the_invalid_records_among_its_dead_letters():
    from jobs.replay_pipeline import PipelineReplayResult

    result = PipelineReplayResult("post-events", {0: (0, 10)}, {
        "feedbeam.kafka:records_read": 10, "feedbeam.decode:decoded": 7,
        "feedbeam.decode:dead_letter": 3, "feedbeam.decode:invalid": 2,
        "feedbeam.decode:dead_letter_wrong_magic": 1,
        "feedbeam.decode:dead_letter_event_time_in_future": 2})
    assert result.reconciles and result.invalid == 2
    assert result.reconciliation() == (
        "records in range 10 = events decoded 7 + dead letters 3 (2 invalid; "
        "event_time_in_future 2, wrong_magic 1)")
