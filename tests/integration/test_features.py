"""The features pipeline end to end: Kafka -> Prism -> Redis + Cassandra + Parquet, against an
oracle computed straight from the produced events.

The test owns its topics (``<prefix>engagement-events``, ``<prefix>post-events`` and their
``.dlq``), a Redis key prefix, a keyspace and a log directory. Events lie three days in the past,
in event-time order, with duplicates and unlikes; then one "clock" record per partition at the
current time moves every partition's watermark past them, so every window drains. A like from
the past after that is too late and must land in the DLQ.
"""
from __future__ import annotations

import random
import time
import uuid

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import Producer

from infra.install import prism_binary
from pipelines import features
from stores.cassandra.features import CassandraFeatureStore
from pipelines.io.deadletter import read_dead_letters
from stores.files.feature_log import point_in_time_join, read_feature_log
from stores.kafka import offsets as kafka_offsets
from stores.redis import affinities, slots
from stores.redis.features import OnlineFeatureStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.session import migrate
from schemas.codec import WireCodec
from schemas.events import (EngagementEvent, EngagementKind, MediaType, PostEvent,
                            PostEventKind, dlq_topic)
from schemas.features import (AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES, VIEWER_AUTHOR,
                              VIEWER_MEDIA, WINDOW_MS, FeatureTTLs)
from schemas.keys import KeyLayout
from tests.integration.features_oracle import Oracle
from tests.integration.test_kafka_source import _cancel, _wait_for

pytestmark = pytest.mark.integration

K = EngagementKind
PARTITIONS = 2
M = 60_000
H = 60 * M
SLIDE = 5 * M
HALF_LIFE = 2 * 24 * H
POSTS = range(1, 13)
VIEWERS = range(100, 124)
CLOCK = 990  # ids of the clock records, left out of the comparisons
LATENESS = 6 * H


def author_of(post: int) -> int:
    return post % 4 + 1


def workload(base: int, seed: int = 7) -> list:
    """Post creations, then ~500 engagements over two hours (sorted), with repeats and unlikes."""
    rng = random.Random(seed)
    media = list(MediaType)
    events: list = [PostEvent(f"p{p}", base - 30 * M + p * M, PostEventKind.CREATED, p,
                              author_of(p), base - 30 * M + p * M, media[p % 4]) for p in POSTS]
    kinds = [K.VIEW] * 10 + [K.LIKE] * 4 + [K.COMMENT] * 2 + [K.SHARE, K.SAVE, K.PROFILE_VIEW]
    for i in range(500):
        post, viewer, kind = rng.choice(POSTS), rng.choice(VIEWERS), rng.choice(kinds)
        t = base + rng.randrange(2 * H)
        if kind is K.PROFILE_VIEW:
            e = EngagementEvent(f"e{i}", t, kind, viewer, author_of(post))
        else:
            e = EngagementEvent(f"e{i}", t, kind, viewer, author_of(post), post,
                                media[post % 4], rng.randrange(20_000) if kind is K.VIEW else None)
        events.append(e)
        if kind is K.LIKE and rng.random() < 0.3:
            events.append(EngagementEvent(f"u{i}", t + rng.randrange(M, 40 * M), K.UNLIKE,
                                          viewer, e.author_id, post, e.media_type))
        if rng.random() < 0.05:
            events.append(e)  # a duplicate: same event_id
    return sorted(events, key=lambda e: e.event_time)


class Topics:
    def __init__(self, stack, kafka_topic):
        self.prefix = f"t{uuid.uuid4().hex[:8]}."
        self.bootstrap = stack.kafka_bootstrap
        for t in (EngagementEvent.TOPIC, PostEvent.TOPIC):
            kafka_topic(PARTITIONS, name=self.prefix + t)
            kafka_topic(1, name=self.prefix + dlq_topic(t))
        self.codec = WireCodec()
        self.producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})

    def send(self, events, partition: int | None = None) -> None:
        for e in events:
            topic = self.prefix + e.TOPIC
            extra = {} if partition is None else {"partition": partition}
            self.producer.produce(topic, self.codec.encode(e, topic), e.key,
                                  timestamp=e.event_time, **extra)
        assert self.producer.flush(30) == 0

    def clock(self, now: int) -> None:
        """One record per partition at ``now``: every partition's watermark moves there."""
        for p in range(PARTITIONS):
            self.send([EngagementEvent(f"clock-e{p}", now, K.VIEW, CLOCK, CLOCK, CLOCK + p)], p)
            self.send([PostEvent(f"clock-p{p}", now, PostEventKind.CREATED, CLOCK + p, CLOCK,
                                 now)], p)


def job_args(stack, topics: Topics, key_prefix: str, keyspace: str, log_dir: str,
             state_dir: str | None = None) -> list[str]:
    state = [f"--feature_state_dir={state_dir}"] if state_dir else []
    return [*state,
        "--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
        "--environment_type=LOOPBACK", "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--consumer_group=g-{uuid.uuid4().hex[:8]}",
        f"--topic_prefix={topics.prefix}", "--fallback_start=earliest",
        f"--redis_url={stack.redis_url}", f"--redis_key_prefix={key_prefix}",
        f"--cassandra_host={stack.cassandra_host}", f"--cassandra_port={stack.cassandra_port}",
        f"--cassandra_keyspace={keyspace}", f"--feature_log_dir={log_dir}", "--log_flush_s=1",
        "--sinks=redis,cassandra,log,top_followers,social",
        f"--half_life_days={HALF_LIFE / (24 * H)}", "--post_ttl_h=200", "--author_ttl_h=200",
        # The job reads a backlog of two topics; a partition read later holds no
        # watermark on Prism until its read starts, so the other topic can run hours
        # ahead: a lateness wider than the backlog keeps every produced event on time.
        f"--allowed_lateness_s={LATENESS / 1000}", f"--dedup_horizon_s={LATENESS / 1000}",
    ]


def _values(dump: dict) -> dict:
    """A Redis dump flattened to ``{(key, field, part): number or text}``: feature fields as
    value and write stamp, zset members with their scores."""
    out = {}
    for key, value in dump.items():
        if f"{CLOCK}" in key or f"{CLOCK + 1}" in key:
            continue  # the clock records' entities: not part of the workload
        if ":feat:" in key:
            for field, (number, stamp) in _stored_fields(key, value).items():
                out[(key, field, "value")] = number
                out[(key, field, "stamp")] = stamp
        elif isinstance(value, list):
            out.update({(key, member, "score"): score for member, score in value})
        elif isinstance(value, dict):
            out.update({(key, field, ""): v for field, v in value.items()})
        else:
            out[(key, "", "")] = value
    return out


def _stored_fields(key: str, value) -> dict[str, tuple[float, int]]:
    """A feature key of a dump as ``{field: (number, write stamp)}``: a hash's
    ``value@stamp`` fields, a post's or author's slots, or an affinity string's
    records (``str`` where the dump could decode them)."""
    if isinstance(value, dict):
        return {field: (float(number), int(stamp))
                for field, (number, _, stamp) in ((f, v.partition("@")) for f, v in value.items())}
    if isinstance(value, str):
        value = value.encode()
    for kind, names in ((":feat:post.", POST_FEATURES), (":feat:author.", AUTHOR_FEATURES),
                        (":feat:aff_media.", MEDIA_TYPES)):
        if kind in key:
            return slots.fields(names, value)
    authors, values, stamps = affinities.unpack(value)
    return {str(a): (v, s) for a, v, s in zip(authors.tolist(), values.tolist(), stamps.tolist())}


def _log_complete(log_dir, last_change: dict[int, int]) -> bool:
    if not any(log_dir.rglob("*.parquet")):
        return False
    table = read_feature_log(log_dir, "post")
    newest: dict[str, int] = {}
    for entity, at in zip(table.column("entity_id").to_pylist(),
                          table.column("valid_at_ms").to_pylist()):
        newest[entity] = max(newest.get(entity, 0), at)
    return all(newest.get(str(p), 0) >= at for p, at in last_change.items())


def _durable_pairs(durable: CassandraFeatureStore) -> dict:
    return {(v.entity_id, v.valid_at_ms): (v.value, v.version)
            for rows in durable.read(VIEWER_AUTHOR, list(VIEWERS)) for v in rows}


def _missing_pairs(oracle: Oracle, online: OnlineFeatureStore) -> list[tuple]:
    """``(viewer, author, stored version, oracle's version)`` of the affinities behind."""
    missing = []
    for viewer in VIEWERS:
        stored = online.raw(VIEWER_AUTHOR, f"{viewer}:0")
        for author in range(1, 5):
            want = oracle.affinity(viewer, author=author)
            have = stored.get(str(author), (None, 0))[1]
            if want is not None and have < want[1]:
                missing.append((viewer, author, have, want[1]))
    return missing


def _pairs_complete(oracle: Oracle, online: OnlineFeatureStore) -> bool:
    return not _missing_pairs(oracle, online)


def _drained(online: OnlineFeatureStore, last_post_change: dict[int, int]) -> bool:
    for post, at in last_post_change.items():
        stored = online.raw("post", str(post))
        if max((valid_at for _, valid_at in stored.values()), default=0) < at:
            return False
    return True


def test_pipeline_matches_the_oracle_in_every_store(stack, kafka_topic, cassandra_session,
                                                     keyspace, key_prefix, tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    now = int(time.time() * 1000) // H * H - H
    base = now - 3 * 24 * H
    events = workload(base)
    oracle = Oracle.of(events, HALF_LIFE)
    log_dir = tmp_path / "log"
    ttls = FeatureTTLs(post_ms=200 * H, author_ms=200 * H)
    online = OnlineFeatureStore.from_url(stack.redis_url, key_prefix=key_prefix, ttls=ttls,
                                         half_life_ms=HALF_LIFE)
    durable = CassandraFeatureStore(cassandra_session, keyspace)
    options = PipelineOptions(job_args(stack, topics, key_prefix, keyspace, str(log_dir),
                                       str(tmp_path / "state")))
    # Everything is on the topics before the job starts: an empty partition is idle, and
    # an idle partition's watermark runs with the wall clock, which would make three-day
    # old events produced afterwards too late.
    topics.send(events)
    topics.clock(now)
    pipeline = beam.Pipeline(options=options)
    features.build(pipeline, options)
    result = pipeline.run()
    try:
        # Each post's last change: its last counted bucket leaving the 24 h window (a
        # cancelled like leaving it changes nothing).
        counted = [e for e in oracle.engagements if e.post_id is not None
                   and e.kind != K.UNLIKE and e.event_id not in oracle.cancels]
        last = {p: max(e.event_time for e in counted if e.post_id == p)
                for p in {e.post_id for e in counted}}
        last_change = {p: t - t % SLIDE + WINDOW_MS["24h"] + SLIDE for p, t in last.items()}
        _wait_for(lambda: _drained(online, last_change), 240, "every post window to drain",
                  result)
        _wait_for(lambda: _pairs_complete(oracle, online), 60, "every affinity pair", result,
                  state=lambda: (_missing_pairs(oracle, online)[:8], read_dead_letters(
                      stack.kafka_bootstrap, topics.prefix + dlq_topic(EngagementEvent.TOPIC))))
        ranges_before_too_late = {
            topics.prefix + t: {p: (0, high) for p, (_, high) in kafka_offsets.watermarks(
                {"bootstrap.servers": stack.kafka_bootstrap}, topics.prefix + t).items()}
            for t in (EngagementEvent.TOPIC, PostEvent.TOPIC)}
        # A like from the past, after the watermark moved on: too late.
        topics.send([EngagementEvent("too-late", base + H, K.LIKE, 100, author_of(1), 1,
                                     MediaType.PHOTO)])
        posts_dlq = read_dead_letters(stack.kafka_bootstrap,
                                      topics.prefix + dlq_topic(PostEvent.TOPIC))
        assert posts_dlq == []
        letters = _wait_for(lambda: read_dead_letters(
            stack.kafka_bootstrap, topics.prefix + dlq_topic(EngagementEvent.TOPIC)), 90,
            "the too-late dead letter", result)
        _wait_for(lambda: _log_complete(log_dir, last_change), 60, "the feature log", result)
    finally:
        _cancel(result)
    # The original record, at its offset.
    assert [(d.reason, d.step) for d in letters] == [("too_late", "features")], letters
    assert letters[0].offset >= 0 and WireCodec().decode(letters[0].value).event_id == "too-late"

    # A bounded re-run of both topics up to the too-late like (the same events): every
    # value stays, no write stamp moves back.
    feed = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    before = _values(feed.dump())
    durable_before = _durable_pairs(durable)
    replay = beam.Pipeline(options=PipelineOptions(
        [a for a in job_args(stack, topics, key_prefix, keyspace, str(tmp_path / "replay"))
         if a != "--streaming"]))
    features.build(replay, replay.options, ranges=ranges_before_too_late)
    assert replay.run().wait_until_finish() == "DONE"
    after = _values(feed.dump())
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key[2] == "stamp":
            # Only changed names are emitted at a window end, so which end a value was
            # last written at depends on the order events met timers; never earlier.
            assert after[key] >= value, key
        elif isinstance(value, float):
            assert after[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert after[key] == value, key
    durable_after = _durable_pairs(durable)
    assert durable_after.keys() == durable_before.keys()
    for key, (value, version) in durable_before.items():
        assert durable_after[key] == (pytest.approx(value, rel=1e-9), version), key
    assert any((tmp_path / "replay").rglob("*.parquet"))  # it did emit
    feed.close()

    _check_log(oracle, log_dir, base)
    _check_social_firsts(events + [EngagementEvent("too-late", base + H, K.LIKE, 100,
                                                   author_of(1), 1, MediaType.PHOTO)],
                         feed_client(stack), key_prefix)
    _check_affinities(oracle, online, durable, stack, key_prefix, now)
    _check_authors(oracle, online, durable)
    _check_posts_drained(online, durable, last)
    online.close()


def feed_client(stack):
    from stores.redis.client import new_client

    return new_client(stack.redis_url)


def _check_social_firsts(events, client, key_prefix: str) -> None:
    """The social facts (``stores.redis.social``) hold each viewer's earliest view and
    earliest engagement of each post: every event the job read counts, a replay (the
    bounded re-run) and a late event included, repeats once."""
    engaging = {K.LIKE, K.COMMENT, K.SHARE, K.SAVE}
    expected: dict[tuple[int, bool], dict[int, int]] = {}
    for e in events:
        if not isinstance(e, EngagementEvent) or e.post_id is None:
            continue
        if e.kind in engaging or e.kind is K.VIEW:
            firsts = expected.setdefault((e.post_id, e.kind in engaging), {})
            firsts[e.viewer_id] = min(firsts.get(e.viewer_id, e.event_time), e.event_time)
    keys = KeyLayout(key_prefix)
    try:
        for (post, engaged), firsts in expected.items():
            key = (keys.post_engagers if engaged else keys.post_viewers)(post)
            stored = client.zrange(key, 0, -1, withscores=True)
            assert {int(v): int(t) for v, t in stored} == firsts, (post, engaged)
        assert len(expected) > 10
    finally:
        client.close()


def _same_values(durable_rows: dict, redis_rows: dict) -> None:
    """Cassandra and Redis hold the same (value, valid_at) per field; values may differ in
    the last bits when two emissions of one stamp summed floats in another order."""
    assert durable_rows.keys() == redis_rows.keys()
    for field, (value, valid_at) in redis_rows.items():
        assert durable_rows[field] == (pytest.approx(value, rel=1e-12), valid_at), field


def _check_log(oracle: Oracle, log_dir, base: int) -> None:
    """Point-in-time values from the log equal the oracle's windows at many times."""
    rng = random.Random(3)
    rows = [(p, base + rng.randrange(-H, 28 * H)) for p in POSTS for _ in range(25)]
    requests = pa.table({"entity_id": [str(p) for p, _ in rows], "ts_ms": [t for _, t in rows]})
    names = ["like_1h", "comment_1h", "view_1h", "engagement_rate_1h", "like_24h", "share_24h",
             "save_24h", "view_24h", "engagement_rate_24h"]
    joined = point_in_time_join(log_dir, requests, "post", names).to_pydict()
    created = {p.post_id: p.event_time for p in oracle.posts}
    mismatches = []
    nonzero = 0
    for i, (post, ts) in enumerate(rows):
        end = ts - ts % SLIDE
        first = created[post] - created[post] % SLIDE + SLIDE
        for name in names:
            kind, _, window = name.rpartition("_")
            got = joined[name][i]
            if end < first:
                expected = None
            else:
                counts = oracle.post(post, end, WINDOW_MS[window])
                expected = counts["rate" if kind == "engagement_rate" else kind]
                nonzero += expected != 0
            if got != expected and not (got is not None and expected is not None
                                        and abs(got - expected) < 1e-9):
                mismatches.append((post, ts, name, got, expected))
    assert not mismatches, mismatches[:10]
    assert nonzero > 300  # the sample times hit the engagement, not just empty windows


def _check_affinities(oracle: Oracle, online, durable, stack, key_prefix, now) -> None:
    from stores.redis.client import new_client

    stored_pairs = 0
    for viewer in VIEWERS:
        raw = online.raw(VIEWER_AUTHOR, f"{viewer}:0")
        expected = {str(a): oracle.affinity(viewer, author=a) for a in range(1, 5)}
        expected = {a: v for a, v in expected.items() if v is not None}
        assert set(raw) == set(expected), viewer
        for author, (value, valid_at) in raw.items():
            assert valid_at == expected[author][1], (viewer, author)
            assert value == pytest.approx(expected[author][0], rel=1e-9, abs=1e-12)
            stored_pairs += 1
        media = online.raw(VIEWER_MEDIA, f"{viewer}:PHOTO")
        for name, (value, valid_at) in media.items():
            want = oracle.affinity(viewer, media=name)
            assert (valid_at, value) == (want[1], pytest.approx(want[0], rel=1e-9, abs=1e-12))
        durable_rows = {v.entity_id.split(":")[1]: (v.value, v.valid_at_ms)
                        for v in durable.read(VIEWER_AUTHOR, [viewer])[0]}
        _same_values(durable_rows, raw)
        # Read through the shared reader: decayed to now.
        got = online.author_affinity(viewer, [1, 2, 3, 4], now)
        for a, value in zip(range(1, 5), got):
            want = oracle.affinity(viewer, author=a)
            decayed = 0.0 if want is None else want[0] * 2 ** (-(now - want[1]) / HALF_LIFE)
            assert value == pytest.approx(decayed, rel=1e-9, abs=1e-12)
    assert stored_pairs > 20
    # top_followers: viewers ranked like their affinity decayed to any common time.
    client = new_client(stack.redis_url)
    try:
        for author in range(1, 5):
            ranked = [int(m) for m in client.zrevrange(KeyLayout(key_prefix).top_followers(author),
                                                       0, -1)]
            scores = {v: oracle.affinity(v, author=author) for v in VIEWERS}
            positive = {v: s[0] * 2 ** (-(now - s[1]) / HALF_LIFE)
                        for v, s in scores.items() if s is not None and s[0] > 1e-12}
            assert sorted(ranked) == sorted(positive)
            values = [positive[v] for v in ranked]
            assert values == sorted(values, reverse=True)
    finally:
        client.close()


def _check_authors(oracle: Oracle, online, durable) -> None:
    for author in range(1, 5):
        stored = online.raw("author", str(author))
        rate_at = stored["engagement_rate_7d"][1]
        want = oracle.author(author, rate_at, WINDOW_MS["7d"])
        assert stored["engagement_rate_7d"][0] == pytest.approx(want["engagement_rate_7d"])
        posts_value, posts_at = stored["posts_7d"]
        assert posts_value == oracle.author(author, posts_at, WINDOW_MS["7d"])["posts_7d"]
        durable_rows = {v.name: (v.value, v.valid_at_ms)
                        for v in durable.read("author", [author])[0]}
        _same_values(durable_rows, stored)


def _check_posts_drained(online, durable, last) -> None:
    for post in last:
        stored = online.raw("post", str(post))
        assert {v for v, _ in stored.values()} == {0.0}, (post, stored)
        assert {v.name: (v.value, v.valid_at_ms)
                for v in durable.read("post", [post])[0]} == stored


def _snapshot_meta(state_dir):
    from stores.files.feature_state import SnapshotStore

    return SnapshotStore(state_dir).read_meta()


def test_a_killed_job_resumes_from_its_snapshot(stack, kafka_topic, cassandra_session,
                                                keyspace, key_prefix, tmp_path):
    """SIGKILL to the job (launcher, LOOPBACK workers and Prism) after a snapshot, while
    it reads newer records; a restart restores the snapshot, re-reads only from its
    offsets, and every store ends equal to the oracle: nothing lost, nothing twice."""
    import os
    import signal
    import subprocess
    import sys

    from pipelines.features import snapshot_restart
    from stores.kafka.lag import committed_offsets

    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic)
    now = int(time.time() * 1000) // H * H - H
    base = now - 3 * 24 * H
    events = workload(base)
    oracle = Oracle.of(events, HALF_LIFE)
    ttls = FeatureTTLs(post_ms=200 * H, author_ms=200 * H)
    online = OnlineFeatureStore.from_url(stack.redis_url, key_prefix=key_prefix, ttls=ttls,
                                         half_life_ms=HALF_LIFE)
    durable = CassandraFeatureStore(cassandra_session, keyspace)
    state_dir = tmp_path / "state"
    group = f"g-{uuid.uuid4().hex[:8]}"
    args = [a for a in job_args(stack, topics, key_prefix, keyspace, str(tmp_path / "log"),
                                str(state_dir)) if not a.startswith("--consumer_group")]
    args += [f"--consumer_group={group}", "--snapshot_interval_s=5"]
    log_path = tmp_path / "job.log"

    def start():
        with open(log_path, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "pipelines.features", *args],
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    # The first hour of events (every partition gets some, so none is idle and runs
    # ahead with the wall clock), then the rest once a snapshot holds the first part.
    cut = base + H
    first = [e for e in events if e.event_time < cut]
    rest = [e for e in events if e.event_time >= cut]
    topics.send(first)
    topic_names = [topics.prefix + t for t in (EngagementEvent.TOPIC, PostEvent.TOPIC)]
    ends = {tp: high for t in topic_names for tp, high in (
        ((t, p), h) for p, (_, h) in kafka_offsets.watermarks(
            {"bootstrap.servers": stack.kafka_bootstrap}, t).items())}
    job = start()
    try:
        _wait_for(lambda: (snapshot_restart(state_dir) or {}) and all(
            snapshot_restart(state_dir).get(tp, 0) >= end for tp, end in ends.items()
            if end > 0), 240, "a snapshot holding the first hour")
        topics.send(rest)
        topics.clock(now)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    at_kill = _snapshot_meta(state_dir)
    total = sum(h for t in topic_names for _, (_, h) in kafka_offsets.watermarks(
        {"bootstrap.servers": stack.kafka_bootstrap}, t).items())
    restart = snapshot_restart(state_dir)
    assert sum(restart.values()) < total  # the rest is not in the snapshot: it is re-read

    job = start()
    try:
        counted = [e for e in oracle.engagements if e.post_id is not None
                   and e.kind != K.UNLIKE and e.event_id not in oracle.cancels]
        last = {p: max(e.event_time for e in counted if e.post_id == p)
                for p in {e.post_id for e in counted}}
        last_change = {p: t - t % SLIDE + WINDOW_MS["24h"] + SLIDE for p, t in last.items()}
        _wait_for(lambda: job.poll() is None and _drained(online, last_change), 300,
                  "every post window to drain after the restart")
        _wait_for(lambda: _pairs_complete(oracle, online), 60, "every affinity pair",
                  state=lambda: _missing_pairs(oracle, online)[:8])
        _wait_for(lambda: sum(v or 0 for v in committed_offsets(
            stack.kafka_bootstrap, group, topic_names).values()) >= total, 60, "lag 0")
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
    restored = log_path.read_text(errors="replace")
    assert "restored snapshot" in restored and "from the snapshot" in restored, restored[-2000:]
    assert at_kill["sizes"]["posts"] > 0
    assert read_dead_letters(stack.kafka_bootstrap,
                             topics.prefix + dlq_topic(EngagementEvent.TOPIC)) == []
    _check_affinities(oracle, online, durable, stack, key_prefix, now)
    _check_authors(oracle, online, durable)
    _check_posts_drained(online, durable, last)
    online.close()
