"""``feedbeam replay`` against the real Kafka: ranges, reconciliation, determinism, errors."""
from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from schemas.records import DeadLetter
from schemas.codec import WireCodec, header
from schemas.events import (
    EngagementEvent, EngagementKind, MediaType, PostEvent, PostEventKind,
)

pytestmark = pytest.mark.integration

T0 = 1_714_557_600_000  # 2024-05-01T10:00:00Z
HOUR = 3_600_000
N_EVENTS = 3000
SPAN = 5 * HOUR
PARTITIONS = 3


def _post(i: int) -> PostEvent:
    """Event ``i``; every 37th is 90 minutes late, so timestamps are not ordered by offset."""
    event_time = T0 + i * SPAN // N_EVENTS
    if i % 37 == 0 and event_time - T0 >= 90 * 60_000:
        event_time -= 90 * 60_000
    return PostEvent(f"p{i:05d}", event_time, PostEventKind.CREATED,
                     post_id=10_000 + i, author_id=i % 50, created_at=T0 + i,
                     media_type=list(MediaType)[i % 4], caption_length=i % 100,
                     hashtags=tuple(f"h{j}" for j in range(i % 3)))


def _malformed(codec: WireCodec, i: int, ts: int) -> tuple[bytes | None, str]:
    good = codec.encode(_post(i))
    kinds = [
        (b"\x01" + good[1:], "wrong_magic"),
        (good[:-3], "truncated"),
        (bytes((i * 37 + k) % 256 for k in range(23)) + b"\x07", "wrong_magic"),
        (header(999) + b"\x02ab", "unknown_schema_id"),
        (codec.encode(EngagementEvent(f"x{i}", ts, EngagementKind.LIKE, viewer_id=1,
                                      author_id=2, post_id=3, media_type=MediaType.PHOTO)),
         "schema_topic_mismatch"),
        (None, "null_value"),
    ]
    return kinds[(i // 100) % len(kinds)]


@pytest.fixture(scope="module")
def produced(stack, tmp_path_factory):
    """A post-events topic with N_EVENTS events over 5 hours and a malformed record every 100.

    Yields ``(topic, records)``; ``records`` are dicts with partition, offset,
    timestamp, value, and the event or the expected dead-letter reason.
    """
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"t.{uuid.uuid4().hex[:10]}.post-events"
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, PARTITIONS, 1)])[topic].result(timeout=60)
    codec = WireCodec()
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "enable.idempotence": True,
                         "linger.ms": 5})
    records: list[dict] = []

    def delivered(info):
        def callback(err, msg):
            assert err is None, err
            records.append({**info, "partition": msg.partition(), "offset": msg.offset()})
        return callback

    for i in range(N_EVENTS):
        event = _post(i)
        p = i % PARTITIONS
        producer.produce(topic, codec.encode(event, topic), event.key, partition=p,
                         timestamp=event.event_time,
                         on_delivery=delivered({"event": event, "timestamp": event.event_time}))
        if i % 100 == 50:
            value, reason = _malformed(codec, i, event.event_time)
            producer.produce(topic, value, b"bad", partition=p, timestamp=event.event_time,
                             on_delivery=delivered({"reason": reason, "value": value,
                                                    "timestamp": event.event_time}))
    assert producer.flush(60) == 0
    assert len(records) == N_EVENTS + N_EVENTS // 100
    yield topic, records
    admin.delete_topics([topic])[topic].result(timeout=60)


def _replay(stack, topic: str, out: Path, *args: str) -> int:
    return main(["replay", topic, "--out", str(out), "--bootstrap", stack.kafka_bootstrap,
                 "--batch", "400", *args])


def _rows(out: Path) -> list[dict]:
    return ds.dataset(out, partitioning="hive", format="parquet").to_table().to_pylist()


def _dead(out: Path) -> list[dict]:
    files = sorted((out / "_dead_letters").glob("*.parquet"))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_time_range_reconciles_with_the_topic(stack, produced, tmp_path, capsys):
    topic, records = produced
    start, stop = T0 + HOUR + 123_456, T0 + 4 * HOUR
    # Kafka's time index: per partition, the offsets from the first record with
    # timestamp >= start to the first with timestamp >= stop, late records included.
    in_range = []
    for p in range(PARTITIONS):
        part = sorted((r for r in records if r["partition"] == p), key=lambda r: r["offset"])
        first = next(i for i, r in enumerate(part) if r["timestamp"] >= start)
        end = next((i for i, r in enumerate(part) if r["timestamp"] >= stop), len(part))
        in_range += part[first:end]
    assert any(r["timestamp"] < start for r in in_range)  # a late one is inside
    expected_events = sorted((r["event"] for r in in_range if "event" in r),
                             key=lambda e: e.event_id)
    expected_dead = sorted((r["partition"], r["offset"], r["reason"])
                           for r in in_range if "reason" in r)
    assert expected_dead and len(expected_events) > 1000

    out = tmp_path / "by-time"
    assert _replay(stack, topic, out, "--from", str(start), "--to", "2024-05-01T14:00:00Z") == 0
    printed = capsys.readouterr().out
    assert (f"records in range {len(in_range)} = rows written {len(expected_events)} + "
            f"dead letters {len(expected_dead)}") in printed
    assert "date=2024-05-01/hour=11" in printed and "date=2024-05-01/hour=14" not in printed

    rows = _rows(out)
    got = sorted((PostEvent.from_avro(r) for r in rows), key=lambda e: e.event_id)
    assert got == expected_events
    coords = {(r["partition"], r["offset"]): r for r in in_range}
    for row in rows:  # source columns and the hive columns are right
        source = coords[(row["_partition"], row["_offset"])]
        assert source["event"].event_id == row["event_id"]
        assert row["_kafka_timestamp"] == row["event_time"]
        assert int(row["_event_ts"].timestamp() * 1000) == row["event_time"]
        assert (row["event_time"] - T0) // HOUR + 10 == row["hour"]
    dead = _dead(out)
    assert sorted((d["partition"], d["offset"], d["reason"]) for d in dead) == expected_dead
    for d in dead:  # original bytes are kept
        assert d["value"] == coords[(d["partition"], d["offset"])]["value"]
        assert d["key"] == b"bad" and d["topic"] == topic and d["error"]


def test_two_replays_write_identical_files(stack, produced, tmp_path):
    topic, _ = produced
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert _replay(stack, topic, out, "--from", str(T0 + HOUR), "--to", str(T0 + 3 * HOUR)) == 0
    files_a, files_b = _files(a), _files(b)
    assert len(files_a) > 5 and files_a == files_b
    # Within a file, rows are in offset order of one partition.
    for name in files_a:
        if name.endswith(".parquet") and not name.startswith("_"):
            table = pq.read_table(a / name)
            offsets = table.column("_offset").to_pylist()
            assert offsets == sorted(offsets)
            assert len(set(table.column("_partition").to_pylist())) == 1


def test_offset_ranges(stack, produced, tmp_path, capsys):
    topic, records = produced
    out = tmp_path / "offsets"
    assert _replay(stack, topic, out, "--from-offset", "100", "--to-offset", "350") == 0
    expected = [r for r in records if 100 <= r["offset"] < 350]
    rows, dead = _rows(out), _dead(out)
    assert len(rows) + len(dead) == len(expected) == 3 * 250
    assert {(r["_partition"], r["_offset"]) for r in rows} | \
        {(d["partition"], d["offset"]) for d in dead} == \
        {(r["partition"], r["offset"]) for r in expected}
    assert "records in range 750 = " in capsys.readouterr().out

    out = tmp_path / "partition"
    assert _replay(stack, topic, out, "--partition-offsets", "1:5-50,2:990-") == 0
    ends = {p: max(r["offset"] for r in records if r["partition"] == p) + 1 for p in (1, 2)}
    rows, dead = _rows(out), _dead(out)
    got = sorted([(r["_partition"], r["_offset"]) for r in rows]
                 + [(d["partition"], d["offset"]) for d in dead])
    assert got == [(1, o) for o in range(5, 50)] + [(2, o) for o in range(990, ends[2])]


def test_empty_range(stack, produced, tmp_path, capsys):
    topic, _ = produced
    out = tmp_path / "empty"
    assert _replay(stack, topic, out, "--from", "2030-01-01T00:00:00Z") == 0
    assert "records in range 0 = rows written 0 + dead letters 0" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["_replay.json"]


def test_errors(stack, produced, tmp_path, capsys):
    topic, _ = produced
    missing = f"t.{uuid.uuid4().hex[:10]}.post-events"
    assert _replay(stack, missing, tmp_path / "x", "--from-offset", "0") == 2
    assert f"topic '{missing}' does not exist" in capsys.readouterr().err
    assert _replay(stack, topic, tmp_path / "x", "--partition-offsets", "7:0-5") == 2
    assert "not 7" in capsys.readouterr().err
    assert _replay(stack, topic, tmp_path / "x", "--partition-offsets", "0:0-100000") == 2
    assert "past the end offset" in capsys.readouterr().err

    out = tmp_path / "twice"
    assert _replay(stack, topic, out, "--to-offset", "10") == 0
    assert _replay(stack, topic, out, "--to-offset", "20") == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert _replay(stack, topic, out, "--to-offset", "20", "--overwrite") == 0
    assert len(_rows(out)) + len(_dead(out)) == 60


def test_dead_letters_to_kafka_only_when_asked(stack, kafka_topic, tmp_path):
    from confluent_kafka import Consumer, Producer, TopicPartition

    topic = kafka_topic(partitions=1, name=f"t.{uuid.uuid4().hex[:10]}.post-events")
    dlq = kafka_topic(partitions=1, name=topic + ".dlq")
    codec = WireCodec()
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    producer.produce(topic, codec.encode(_post(1), topic), b"k1", timestamp=T0)
    producer.produce(topic, b"\x05garbage", b"k2", timestamp=T0 + 1)
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": dlq})
    try:
        assert _replay(stack, topic, tmp_path / "a", "--from-offset", "0") == 0
        assert consumer.get_watermark_offsets(TopicPartition(dlq, 0), timeout=10) == (0, 0)

        assert _replay(stack, topic, tmp_path / "b", "--from-offset", "0", "--dlq-to-kafka") == 0
        consumer.assign([TopicPartition(dlq, 0, 0)])
        msg = consumer.poll(30)
        assert msg is not None and msg.error() is None
        dead = DeadLetter.from_kafka(msg.key(), msg.value(), msg.headers())
        assert (dead.topic, dead.partition, dead.offset, dead.reason, dead.value, dead.key) == \
            (topic, 0, 1, "wrong_magic", b"\x05garbage", b"k2")
    finally:
        consumer.close()


# ---------------------------------------------------------------- --pipeline fanout


def _cli_replay(stack, topic: str, *args: str) -> str:
    """``feedbeam replay`` as a user runs it (its own process: the job runs in it); stdout."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "replay", topic, "--bootstrap", stack.kafka_bootstrap,
         *args], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
        timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done.stdout


def test_pipeline_fanout_replays_a_range_into_the_stores(
        stack, kafka_topic, cassandra_session, keyspace, key_prefix):
    """Graph, then posts, each replayed by range through the fan-out pipeline on Prism.

    The post range ends before the last post, so that post must not be pushed;
    a malformed record in the range is counted as a dead letter and reaches the DLQ.
    """
    from confluent_kafka import Producer

    from domain.fanout import FanoutPolicy, expected_state
    from stores.redis.feeds import RedisFeedStore
    from stores.cassandra.session import migrate
    from tests.integration.fanout_events import create, follow

    prefix = f"t{uuid.uuid4().hex[:8]}."
    posts_topic = kafka_topic(2, name=prefix + "post-events")
    follows_topic = kafka_topic(2, name=prefix + "follow-events")
    dlq = kafka_topic(1, name=posts_topic + ".dlq")
    migrate(cassandra_session, keyspace)
    policy = FanoutPolicy(push_threshold=4, celebrity_top_n=1)
    t = T0
    celeb, authors = 100, (101, 102, 103)
    graph = [follow(u, celeb, t + u) for u in range(1, 7)]  # 6 followers: pulled, top 1 pushed
    graph += [follow(u, a, t + 10 + u) for a in authors for u in range(1, 7) if (u + a) % 2]
    posts = [create(1000 + i, (celeb, *authors)[i % 4], t + 1000 + i) for i in range(12)]
    codec = WireCodec()
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for e in graph:
        producer.produce(follows_topic, codec.encode(e, follows_topic), e.key,
                         timestamp=e.event_time)
    # Posts in partition 0 only, so an offset range selects a known prefix of them.
    for e in posts[:-1]:
        producer.produce(posts_topic, codec.encode(e, posts_topic), e.key, partition=0,
                         timestamp=e.event_time)
    producer.produce(posts_topic, b"\x05garbage", b"bad", partition=0, timestamp=t + 2000)
    producer.produce(posts_topic, codec.encode(posts[-1], posts_topic), posts[-1].key,
                     partition=0, timestamp=posts[-1].event_time)
    assert producer.flush(30) == 0

    store_args = [f"--redis_key_prefix={key_prefix}", f"--cassandra_keyspace={keyspace}",
                  f"--push_threshold={policy.push_threshold}",
                  f"--celebrity_top_n={policy.celebrity_top_n}"]
    out = _cli_replay(stack, follows_topic, "--from-offset", "0", "--pipeline", "fanout",
                      *store_args)
    assert f"records in range {len(graph)} = events decoded {len(graph)} + dead letters 0" in out

    # Offsets 0..12 of partition 0: 11 posts and the malformed record, not the last post.
    out = _cli_replay(stack, posts_topic, "--partition-offsets", "0:0-12", "--pipeline",
                      "fanout", *store_args)
    assert "records in range 12 = events decoded 11 + dead letters 1" in out
    assert "feedbeam.fanout:events_push" in out

    expected = expected_state(graph + posts[:-1], policy)
    redis = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    try:
        feeds = {u: redis.feed(u, 100) for u in range(1, 7)}
        assert feeds == {u: expected.feeds.get(u, []) for u in range(1, 7)}
        assert any(feeds.values())
        assert all(p != posts[-1].post_id for f in feeds.values() for p, _ in f)
        assert redis.timeline(celeb, 100) == expected.timelines[celeb]
    finally:
        redis.close()
    # Nothing was committed for the live job's group.
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap, "group.id": "feedbeam-fanout"})
    try:
        committed = consumer.committed([TopicPartition(posts_topic, 0)], timeout=10)
        assert committed[0].offset < 0
        assert consumer.get_watermark_offsets(TopicPartition(dlq, 0), timeout=10)[1] == 1
    finally:
        consumer.close()


def test_pipeline_replay_refuses_a_topic_the_pipeline_does_not_read(stack, kafka_topic, capsys):
    topic = kafka_topic(1, name=f"t{uuid.uuid4().hex[:8]}.engagement-events")
    assert main(["replay", topic, "--from-offset", "0", "--bootstrap", stack.kafka_bootstrap,
                 "--pipeline", "fanout"]) == 2
    err = capsys.readouterr().err
    assert "fanout pipeline reads" in err and "post-events and" in err
