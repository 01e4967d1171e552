"""The stories pipeline end to end: Kafka -> Prism -> Redis + Cassandra, and the read side.

Each test owns ``<prefix>story-events`` (2 partitions), a Redis key prefix and
a migrated keyspace. Event times are "now" (stories are judged against the
wall clock). A test waits until the job's consumer group has committed the
end of the topic (offsets are committed only after a bundle's writes are
done), and polls the stores with a deadline for what the timers remove.

Run: ``.venv/bin/python -m pytest tests/integration/test_stories.py``
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid

import pytest

from infra.install import prism_binary
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.stories import CassandraStoryStore
from stores.redis.stories import RedisStoryStore
from domain.stories import ExpectedStories, StoryPolicy, expected_stories
from stores.cassandra.session import migrate
from schemas.events import FollowEvent, FollowKind, MediaType, StoryEvent, StoryEventKind
from schemas.keys import KeyLayout
from pipelines.common import STORIES_DURABLE_LOG_TOPIC
from pipelines.io.deadletter import read_dead_letters
from schemas.events import dlq_topic
from stores.kafka.lag import caught_up, committed_offsets, end_offsets
from tests.integration.test_fanout import Topics
from tests.integration.test_kafka_source import _kill, _wait_for

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTITIONS = 2  # as test_fanout.Topics.done expects
POLICY = StoryPolicy(grace_ms=10 * 60_000)
PUBLISHED, VIEWED, DELETED = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


class StoryTopic(Topics):
    """The test's ``story-events`` topic with a producer of typed events and the
    group-progress check of ``test_fanout.Topics``."""

    def __init__(self, stack, kafka_topic):
        super().__init__(stack, kafka_topic, (StoryEvent.TOPIC,))


class Env:
    def __init__(self, stack, topic: StoryTopic, redis_client, key_prefix, session, keyspace):
        self.stack, self.topic, self.key_prefix, self.keyspace = stack, topic, key_prefix, keyspace
        self.keys = KeyLayout(key_prefix)
        self.redis = RedisStoryStore(redis_client, self.keys, POLICY)
        self.cassandra = CassandraStoryStore(session, keyspace, POLICY)
        self.feeds = RedisFeedStore(redis_client, self.keys)
        self.group = f"g-{uuid.uuid4().hex[:8]}"
        self.log = open(os.path.join(stack.state_dir, "logs", f"test-stories-{key_prefix}.log"),
                        "ab")

    def start(self, *extra: str) -> subprocess.Popen:
        """The job in its own process group (so a test can SIGKILL it and its runner)."""
        args = [*extra,
            "--runner=PrismRunner", f"--prism_location={prism_binary(self.stack)}",
            "--environment_type=LOOPBACK", "--streaming",
            f"--kafka_bootstrap={self.stack.kafka_bootstrap}", f"--consumer_group={self.group}",
            f"--topic_prefix={self.topic.prefix}", "--fallback_start=earliest",
            "--idle_skew_s=1", f"--grace_s={POLICY.grace_ms / 1000}",
            f"--redis_url={self.stack.redis_url}", f"--redis_key_prefix={self.key_prefix}",
            f"--cassandra_host={self.stack.host}",
            f"--cassandra_port={self.stack.cassandra_port}",
            f"--cassandra_keyspace={self.keyspace}"]
        return subprocess.Popen([sys.executable, "-m", "pipelines.stories", *args], cwd=REPO,
                                stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def drained(self) -> bool:
        return self.topic.done(self.group)


@pytest.fixture
def env(stack, kafka_topic, redis_client, key_prefix, cassandra_session, keyspace):
    migrate(cassandra_session, keyspace)
    e = Env(stack, StoryTopic(stack, kafka_topic), redis_client, key_prefix,
            cassandra_session, keyspace)
    yield e
    e.log.close()


def now_ms() -> int:
    return int(time.time() * 1000)


def story(kind: StoryEventKind, story_id: int, author: int, at: int, viewer: int | None = None,
          expires: int | None = None, tag: str = "") -> StoryEvent:
    return StoryEvent(f"{kind.value}-{story_id}-{viewer}-{at}{tag}", at, kind, story_id, author,
                      viewer_id=viewer, created_at=at if kind is PUBLISHED else None,
                      expires_at=expires, media_type=MediaType.PHOTO if kind is PUBLISHED else None)


# -- store state in the oracle's shape ------------------------------------------------


def redis_state(env: Env) -> ExpectedStories:
    """Everything under the test's prefix, read back as ``ExpectedStories``:
    tombstones count as removed; any other leftover of a story counts as live."""
    dump = RedisFeedStore(env.redis.client, env.keys).dump()
    live, viewers, seen, removed = {}, {}, {}, set()
    for key, value in dump.items():
        kind, tag = key.split(":")[1], int(key.split("{")[1].rstrip("}").split(":")[1])
        if kind == "story" and "removed" in value:
            removed.add(tag)
        elif kind == "story":
            live[tag] = env.redis.story(tag)
        elif kind == "story_viewers":
            viewers[tag] = {int(v) for v in value}
        elif kind == "seen":
            seen[tag] = {int(m) for m, _ in value}
        elif kind == "stories":
            for member, _ in value:
                live.setdefault(int(member), None)
    return ExpectedStories(live, viewers, seen, removed)


def cassandra_state(env: Env) -> ExpectedStories:
    dump = env.cassandra.dump()
    by_author = {r["story_id"]: r for r in dump["stories_by_author"]}
    assert set(by_author) == {r["story_id"] for r in dump["stories_by_id"]} == \
        {r["story_id"] for r in dump["story_expiry_index"]}
    viewers: dict[int, set[int]] = {}
    for r in dump["story_views"]:
        viewers.setdefault(r["story_id"], set()).add(r["viewer_id"])
    seen: dict[int, set[int]] = {}
    for r in dump["stories_seen_by_viewer"]:
        seen.setdefault(r["viewer_id"], set()).add(r["story_id"])
    live = {s: env.cassandra.story(s) for s in by_author}
    return ExpectedStories(live, viewers, seen, set())


def assert_matches(actual: ExpectedStories, expected: ExpectedStories, tombstones: bool) -> None:
    assert actual.live == expected.live
    assert actual.viewers == expected.viewers
    assert actual.seen == expected.seen
    if tombstones:  # every removed story that was ever written leaves one
        assert actual.removed <= expected.removed


def redis_matches(env: Env, expected: ExpectedStories) -> bool:
    try:
        assert_matches(redis_state(env), expected, tombstones=True)
        return True
    except AssertionError:
        return False


def both_match(env: Env, expected: ExpectedStories) -> bool:
    """Redis, then Cassandra, hold ``expected``: the job removes a story from Redis
    first, so Redis matching alone leaves the last removal's Cassandra rows pending."""
    if not redis_matches(env, expected):
        return False
    try:
        assert_matches(cassandra_state(env), expected, tombstones=False)
        return True
    except AssertionError:
        return False


# -- tests ----------------------------------------------------------------------------


def test_tray_order_and_unseen_counts_from_both_stores(env):
    t = now_ms()
    viewer = 7
    env.feeds.apply_edges([FollowEvent(f"f{a}", t - 10_000, FollowKind.FOLLOW, viewer, a)
                           for a in (1, 2, 3, 4)])
    hour = 3600_000
    events = [
        story(PUBLISHED, 11, 1, t - 50_000, expires=t + hour),
        story(PUBLISHED, 12, 1, t - 40_000, expires=t + hour),
        story(PUBLISHED, 21, 2, t - 30_000, expires=t + hour),
        story(PUBLISHED, 31, 3, t - 20_000, expires=t + hour),
        story(PUBLISHED, 41, 4, t - 10_000, expires=t + hour),
        story(PUBLISHED, 51, 5, t - 5_000, expires=t + hour),    # author not followed
        story(VIEWED, 31, 3, t - 9_000, viewer=viewer),
        story(VIEWED, 11, 1, t - 8_000, viewer=viewer),
        story(VIEWED, 11, 1, t - 7_000, viewer=8),
        story(VIEWED, 41, 4, t - 6_000, viewer=viewer),
        story(DELETED, 41, 4, t - 5_000),                        # author 4 has nothing left
    ]
    env.topic.send(events)
    # A record of the durable log that is not one: dead-lettered, the rest applied.
    log = env.topic.prefix + STORIES_DURABLE_LOG_TOPIC
    env.topic.producer.produce(log, b"not a stories write", b"k")
    assert env.topic.producer.flush(30) == 0
    job = env.start()
    try:
        _wait_for(env.drained, 120, "the job to apply the topic")
    finally:
        _kill(job)
    (dead,) = read_dead_letters(env.stack.kafka_bootstrap, dlq_topic(log))
    assert (dead.value, dead.reason, dead.topic) == (b"not a stories write", "not_json", log)
    followees = env.feeds.following(viewer)
    assert followees == [1, 2, 3, 4]
    for reader in (env.redis, env.cassandra):
        tray = reader.tray(viewer, followees, now_ms(), limit=10)
        assert [(e.author_id, e.unseen, len(e.stories)) for e in tray] == [
            (2, 1, 1), (1, 1, 2), (3, 0, 1)], type(reader).__name__
        assert [(s.story_id, s.seen) for s in tray[1].stories] == [(11, True), (12, False)]
        assert reader.story(11).views == 2 and reader.viewers(11) == [7, 8]
        assert reader.story(41) is None


def test_expired_never_served_while_stopped_and_restart_converges(env, kafka_topic):
    rng = random.Random(6)
    t0 = now_ms()
    short, long_ = t0 + 45_000, t0 + 2 * 3600_000
    authors, viewers = range(1, 7), range(100, 110)
    first: list[StoryEvent] = []
    for a in authors:
        for k, expires in enumerate((short, long_, long_)):
            first.append(story(PUBLISHED, a * 100 + k, a, t0 + k, expires=expires))
    ids = [e.story_id for e in first]
    first += [story(VIEWED, s, s // 100, t0 + 10 + i, viewer=rng.choice(viewers))
              for i, s in enumerate(rng.choices(ids, k=60))]
    env.topic.send(first)
    job = env.start()
    try:
        _wait_for(env.drained, 120, "the first events to be applied")
    finally:
        _kill(job)   # kill -9: the armed timers die with the runner
    assert env.redis.story(100) is not None   # a short story, timer armed and lost

    # While the job is down: a backlog of new publishes (some expire before the
    # restart), views, deletes and a redelivered publish.
    t1 = now_ms()
    backlog = [story(PUBLISHED, a * 100 + k, a, t1 + k, expires=expires)
               for a in authors for k, expires in ((3, short), (4, long_))]
    backlog += [story(VIEWED, s, s // 100, t1 + 10 + i, viewer=rng.choice(viewers))
                for i, s in enumerate(rng.choices(ids + [e.story_id for e in backlog], k=60))]
    backlog += [story(DELETED, a * 100 + 1, a, t1 + 100) for a in (1, 2, 3)]
    backlog += [first[4]]   # redelivered publish of a live story
    env.topic.send(backlog)

    # Wait out the short stories with nothing running: readers must not serve them
    # although their state is still in both stores.
    _wait_for(lambda: now_ms() > short + 1000, 60, "the short stories to expire")
    now = now_ms()
    for reader in (env.redis, env.cassandra):
        served = {s.story_id for e in reader.tray(viewers[0], list(authors), now, 100)
                  for s in e.stories}
        assert served and all(s % 100 not in (0, 3) for s in served)
        assert all(reader.mark_seen(viewers[0], a * 100, now) is False for a in authors)
    assert env.redis.client.hgetall(env.keys.story(100))[b"expires_at"] == str(short).encode()
    assert env.cassandra.story(100).expires_at == short   # stored, not removed, not served

    # Late views of the expired stories arrive too.
    late = [story(VIEWED, a * 100, a, now, viewer=999) for a in authors]
    env.topic.send(late)

    expired_topic = kafka_topic(1, name=env.topic.prefix + "stories-expired")
    job = env.start("--expired_topic=stories-expired")
    try:
        _wait_for(env.drained, 120, "the restarted job to drain the backlog")
        expected = expected_stories(env.topic.events, now_ms(), POLICY)
        assert expected.removed >= {a * 100 for a in authors} | {101, 201, 301}
        _wait_for(lambda: both_match(env, expected), 90,
                  "the timers re-armed from the expiry index to remove the expired stories")
    finally:
        _kill(job)
    assert_matches(redis_state(env), expected, tombstones=True)
    assert_matches(cassandra_state(env), expected, tombstones=False)
    # The short stories of the backlog expired before the restart read them: never written.
    assert not env.redis.client.exists(env.keys.story(103))
    # Each removal by a timer (re-armed by the sweep) was announced on the topic.
    announced = {r["story_id"]: r for r in read_json(env.stack, expired_topic)}
    assert set(announced) >= {a * 100 for a in authors}
    assert all(r["removed_at"] >= r["expires_at"] == short for s, r in announced.items()
               if s % 100 == 0)


def test_a_story_expires_on_time_after_the_job_drained_an_old_backlog(env):
    # A backlog stamped a minute back on every partition; once it is applied, one
    # partition gets a story expiring 3 s later and the others stay quiet. Their idle
    # watermark followed the clock from their last record's age (a minute and more
    # behind it), which held the expiry back as long; it follows the clock itself.
    old = now_ms() - 60_000
    env.topic.send([story(PUBLISHED, a, a, old, expires=old + 3600_000) for a in range(1, 21)])
    job = env.start()
    try:
        _wait_for(env.drained, 120, "the job to apply the backlog")
        expires = now_ms() + 3000
        env.topic.send([story(PUBLISHED, 99, 1, expires - 3000, expires=expires)])
        _wait_for(lambda: env.redis.client.hget(env.keys.story(99), "removed") is not None, 120,
                  "the story to be removed")
        late_s = (now_ms() - expires) / 1000
        # Cassandra's delete follows Redis' in the same round, a moment later.
        _wait_for(lambda: env.cassandra.story(99) is None, 30, "the durable row to be removed")
    finally:
        _kill(job)
    assert late_s < 20, f"removed {late_s:.1f} s after it expired"


def test_trays_are_right_before_the_durable_copy_which_catches_up_in_a_job_of_its_own(env):
    # The Redis step alone (--parts=redis): trays right, offsets committed, nothing in
    # Cassandra yet. Then the durable step alone: Cassandra catches up from the log,
    # and the expiry timers (which run with it) remove the short story from both.
    t = now_ms()
    short = t + 6000
    env.topic.send([story(PUBLISHED, 61, 6, t - 3000, expires=t + 3600_000),
                    story(PUBLISHED, 62, 6, t - 2000, expires=short),
                    story(PUBLISHED, 63, 6, t - 1500, expires=t + 3600_000),
                    story(VIEWED, 61, 6, t - 1000, viewer=9),
                    story(VIEWED, 63, 6, t - 900, viewer=9),
                    story(DELETED, 63, 6, t - 800)])
    topic = env.topic.prefix + StoryEvent.TOPIC
    ends = end_offsets(env.stack.kafka_bootstrap, [topic])
    job = env.start("--parts=redis")
    try:
        _wait_for(lambda: caught_up(committed_offsets(env.stack.kafka_bootstrap, env.group,
                                                      [topic]), ends), 120,
                  "the Redis step to apply the topic")
        assert [s.story_id for s in env.redis.active_stories(6, now_ms())] == [61, 62]
        assert env.redis.viewers(61) == [9] and env.redis.story(63) is None
        assert env.cassandra.story(61) is None and env.cassandra.dump()["story_views"] == []
        assert not env.drained()     # the durable step's group has not read its log
    finally:
        _kill(job)
    job = env.start("--parts=durable")
    try:
        _wait_for(env.drained, 120, "the durable step to apply the log")
        assert env.cassandra.story(61).views == 1 and env.cassandra.viewers(61) == [9]
        assert env.cassandra.story(63) is None
        assert [d[0] for d in env.cassandra.scan_deletions()] == [63]
        _wait_for(lambda: env.redis.client.hget(env.keys.story(62), "removed") is not None
                  and env.cassandra.story(62) is None, 120, "the short story's expiry")
    finally:
        _kill(job)
    for reader in (env.redis, env.cassandra):
        assert [s.story_id for s in reader.active_stories(6, now_ms())] == [61]


def read_json(stack, topic: str) -> list[dict]:
    """Every record of ``topic`` (one partition) as JSON."""
    import json

    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": stack.kafka_bootstrap,
                         "group.id": f"read-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.partition.eof": True})
    consumer.subscribe([topic])
    out: list[dict] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            if msg.error() is not None:
                break   # end of the partition
            out.append(json.loads(msg.value()))
    finally:
        consumer.close()
    return out
