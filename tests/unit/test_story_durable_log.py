"""The stories' durable log records: what the Redis step decided, as Kafka values."""
from __future__ import annotations

import pytest

from schemas.events import MediaType, StoryEvent, StoryEventKind
from schemas.durable_log import MalformedLogRecord
from schemas.stories import (
    DurableRemoval,
    StoryDurableWrites,
    decode_story_writes,
    encode_story_writes,
)

P, V = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED


def _writes() -> StoryDurableWrites:
    return StoryDurableWrites(
        (StoryEvent("e1", 10, P, 1, 2, created_at=9, expires_at=500, media_type=MediaType.REEL),
         StoryEvent("e2", 11, P, 3, 2)),
        ((StoryEvent("e3", 12, V, 1, 2, viewer_id=7), 2, 500),),
        (DurableRemoval(4, 5, 600, (8, 9), deleted=True), DurableRemoval(6, 5, 700)))


def _cassandra_view(w: StoryDurableWrites):
    """Every field ``CassandraStoryStore.write`` reads (the event ids are not kept)."""
    return ([(e.story_id, e.author_id, e.event_time, e.created_at, e.expires_at, e.media_type)
             for e in w.publishes],
            [(e.story_id, e.viewer_id, e.event_time, a, x) for e, a, x in w.views],
            list(w.removals))


def test_writes_round_trip_through_one_record():
    [value] = encode_story_writes(_writes())
    assert _cassandra_view(decode_story_writes(value)) == _cassandra_view(_writes())
    assert encode_story_writes(StoryDurableWrites()) == []


def test_large_batches_split_across_records_counting_a_removal_s_viewers():
    many = StoryDurableWrites(removals=tuple(DurableRemoval(i, 1, 100, tuple(range(40)))
                                             for i in range(10)))
    values = encode_story_writes(many, max_ids=100)
    decoded = [decode_story_writes(v) for v in values]
    assert [len(d.removals) for d in decoded] == [2, 2, 2, 2, 2]   # 41 ids each
    assert [r for d in decoded for r in d.removals] == list(many.removals)
    with pytest.raises(ValueError):
        encode_story_writes(many, max_ids=0)


@pytest.mark.parametrize("value, reason", [
    (b"", "empty"),
    (b"\x00binary", "not_json"),
    (b'{"v": 2, "w": []}', "bad_format"),
    (b'{"v": 1, "w": [["x", 1]]}', "bad_write"),
    (b'{"v": 1, "w": [["p", 1, 2]]}', "bad_write"),
    (b'{"v": 1, "w": [["p", 1, "2", 3, null, null, null]]}', "bad_write"),
    (b'{"v": 1, "w": [["p", 1, 2, 3, null, null, "GIF"]]}', "bad_write"),
    (b'{"v": 1, "w": [["r", 1, 2, 3, [4, "5"], false]]}', "bad_write"),
    (b'{"v": 1, "w": [["r", 1, 2, 3, [4], 1]]}', "bad_write"),
    (b'{"v": 1, "w": [7]}', "bad_write"),
])
def test_a_value_that_is_not_a_record_is_refused_with_its_reason(value, reason):
    with pytest.raises(MalformedLogRecord) as info:
        decode_story_writes(value)
    assert info.value.reason == reason
