"""features, stories and ranking end to end on Prism and on Flink, unmodified, through the CLI.

Each test submits its pipeline detached (``feedbeam submit NAME --runner R
--detach``) against the real Kafka, Redis and Cassandra, with its own topics
(a unique prefix), consumer group, Redis key prefix and keyspace; produces a
few events; polls both stores with a deadline until the materialized view
shows and ``feedbeam status`` shows the group at lag 0 (every offset
committed; on Flink the jobs checkpoint, which is when it commits); then
cancels the job (``cli_jobs.submitted`` checks that its process,
and on Flink the job on the job server, are gone). Fan-out has the same test
in ``test_submit``. Flink jobs run one after the other (one test at a time).

What each one shows on the runner, beyond "it runs":

* features: post counts (a duplicate counted once) and an affinity, each
  emitted when an event-time timer passes the end of its slide;
* stories: a published story in the tray with its view, then removed at its
  ``expires_at`` by an event-time timer (the Redis tombstone says "expired":
  the read-side expiry filter never writes one), so the source's watermark
  advances on that runner; a story expiring later stays;
* ranking: a ranked feed scored by a promoted (tiny) XGBoost model after the
  debounce timers fire.

Run: ``.venv/bin/python -m pytest tests/integration/test_pipelines_on_runners.py``
(``-k flink`` for the Flink ones; the Flink job server must be up).
"""
from __future__ import annotations

import time
import uuid

import pytest

from stores.cassandra.features import CassandraFeatureStore
from stores.cassandra.feeds import CassandraFeedStore
from stores.redis.features import OnlineFeatureStore
from stores.files.models import ModelRegistry
from stores.ranked import RankedFeedStore
from stores.redis.feeds import RedisFeedStore
from stores.cassandra.stories import CassandraStoryStore
from stores.redis.stories import RedisStoryStore
from domain.stories import StoryPolicy
from stores.cassandra.session import migrate
from schemas.events import (EngagementEvent, EngagementKind, FollowEvent, MediaType, PostEvent,
                            PostEventKind, StoryEvent, StoryEventKind)
from schemas.features import VIEWER_AUTHOR
from schemas.keys import KeyLayout
from tests.integration.cli_jobs import submitted
from tests.integration.fanout_events import create, follow
from tests.integration.ranking_models import promote_toy_model
from tests.integration.test_fanout import Topics

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("runner", ["prism", "flink"])]

#: Deadline for a job's first result: a Flink job takes a while to start on a busy machine.
FIRST_S = 150
#: Deadline for each later result of a running job.
NEXT_S = 60


def now_ms() -> int:
    return int(time.time() * 1000)


def isolated(runner: str, topics: Topics, group: str, key_prefix: str,
             keyspace: str) -> list[str]:
    """The options that give a job the test's own topics, group, key prefix and keyspace;
    on Flink, checkpoints (offsets are committed when one completes)."""
    checkpoints = ["--checkpointing_interval=2000"] if runner == "flink" else []
    return [f"--topic_prefix={topics.prefix}", f"--consumer_group={group}",
            "--fallback_start=earliest", f"--redis_key_prefix={key_prefix}",
            f"--cassandra_keyspace={keyspace}", *checkpoints]


def new_group() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def test_features(runner, stack, kafka_topic, cassandra_session, keyspace, key_prefix,
                  tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic, (EngagementEvent.TOPIC, PostEvent.TOPIC))
    online = OnlineFeatureStore.from_url(stack.redis_url, key_prefix=key_prefix)
    durable = CassandraFeatureStore(cassandra_session, keyspace)
    post, author, viewers = 301, 30, (100, 101)
    group = new_group()

    def post_counts(stored: dict) -> tuple:
        return tuple(stored.get(name, (None,))[0] for name in ("like_1h", "view_1h"))

    def durable_post() -> dict:
        return {v.name: (v.value, v.valid_at_ms) for v in durable.read("post", [post])[0]}

    with submitted(stack, tmp_path, runner, "features",
                   *isolated(runner, topics, group, key_prefix, keyspace), "--slide_s=5",
                   "--author_slide_s=60", "--idle_skew_s=0.5",
                   "--sinks=redis,cassandra,top_followers") as job:
        t = now_ms()
        like = EngagementEvent("like-100", t + 2, EngagementKind.LIKE, viewers[0], author,
                               post, MediaType.PHOTO)
        topics.send([create(post, author, t), like, like,  # a duplicate event_id
                     EngagementEvent("like-101", t + 3, EngagementKind.LIKE, viewers[1],
                                     author, post, MediaType.PHOTO),
                     EngagementEvent("view-100", t + 1, EngagementKind.VIEW, viewers[0],
                                     author, post, MediaType.PHOTO, 5_000)])
        job.wait_until(lambda: post_counts(online.raw("post", str(post))) == (2.0, 1.0),
                       FIRST_S, "the post's counts in Redis")
        job.wait_until(lambda: durable_post() == online.raw("post", str(post)), NEXT_S,
                       "the post's counts in Cassandra")
        for viewer in viewers:
            job.wait_until(lambda: online.raw(VIEWER_AUTHOR, f"{viewer}:0").get(str(author)),
                           NEXT_S, f"viewer {viewer}'s affinity in Redis")
            job.wait_until(lambda: any(v.entity_id == f"{viewer}:{author}"
                                       for v in durable.read(VIEWER_AUTHOR, [viewer])[0]),
                           NEXT_S, f"viewer {viewer}'s affinity in Cassandra")
        job.wait_caught_up(group)
    # Viewer 100 liked and viewed, 101 only liked: a stronger affinity.
    affinity = {v: online.raw(VIEWER_AUTHOR, f"{v}:0")[str(author)][0] for v in viewers}
    assert affinity[100] > affinity[101] > 0
    online.close()


def test_stories(runner, stack, kafka_topic, cassandra_session, keyspace, key_prefix,
                 tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic, (StoryEvent.TOPIC,))
    policy = StoryPolicy(grace_ms=600_000)
    keys = KeyLayout(key_prefix)
    redis = RedisStoryStore.from_url(stack.redis_url, key_prefix, policy)
    cassandra = CassandraStoryStore(cassandra_session, keyspace, policy)
    author, viewer, lasting, brief = 5, 7, 501, 502
    group = new_group()

    def publish(story_id: int, t: int, expires: int) -> StoryEvent:
        return StoryEvent(f"pub-{story_id}", t, StoryEventKind.PUBLISHED, story_id, author,
                          created_at=t, expires_at=expires, media_type=MediaType.PHOTO)

    def tray(reader) -> list[tuple[int, bool]]:
        entries = reader.tray(viewer, [author], now_ms(), limit=10)
        return [(s.story_id, s.seen) for e in entries for s in e.stories]

    with submitted(stack, tmp_path, runner, "stories",
                   *isolated(runner, topics, group, key_prefix, keyspace), "--idle_skew_s=1",
                   f"--grace_s={policy.grace_ms / 1000}") as job:
        t = now_ms()
        topics.send([publish(lasting, t, t + 3600_000),
                     StoryEvent("view-501", t + 1, StoryEventKind.VIEWED, lasting, author,
                                viewer_id=viewer)])
        for reader in (redis, cassandra):
            job.wait_until(lambda: tray(reader) == [(lasting, True)], FIRST_S,
                           f"the viewed story in the tray ({type(reader).__name__})")
        # Produced once the job is known to be reading, to expire while it watches.
        t = now_ms()
        expires = t + 30_000
        topics.send([publish(brief, t, expires)])
        for reader in (redis, cassandra):
            job.wait_until(lambda: tray(reader) == [(lasting, True), (brief, False)], 25,
                           f"the brief story in the tray ({type(reader).__name__})")
        job.wait_until(lambda: redis.client.hget(keys.story(brief), "removed") == b"expired",
                       NEXT_S, "the expiry timer's removal")
        assert now_ms() >= expires  # the timer fired at expires_at, not before
        job.wait_until(lambda: brief not in {r["story_id"] for r in
                                             cassandra.dump()["stories_by_author"]},
                       NEXT_S, "the durable removal")
        assert redis.story(lasting) is not None and cassandra.story(lasting) is not None
        assert tray(redis) == tray(cassandra) == [(lasting, True)]
        job.wait_caught_up(group)
    redis.close()


def test_ranking(runner, stack, kafka_topic, cassandra_session, keyspace, key_prefix,
                 tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic,
                    (PostEvent.TOPIC, EngagementEvent.TOPIC, FollowEvent.TOPIC))
    viewer, author = 1, 10
    group = new_group()
    version = promote_toy_model(ModelRegistry(tmp_path / "models"), "viewer_author_affinity")
    feeds = RedisFeedStore.from_url(stack.redis_url, key_prefix=key_prefix)
    reader = RankedFeedStore(feeds.client, feeds.keys,
                             CassandraFeedStore(cassandra_session, keyspace))
    # The graph the fan-out keeps (not running here): the ranking job reads followers there.
    t = now_ms()
    feeds.apply_edges([follow(viewer, author, t)])

    def ranked():
        feed = reader.read(viewer)
        return None if feed is None else (feed.model_version, sorted(e.post_id for e in feed.entries))

    with submitted(stack, tmp_path, runner, "ranking",
                   *isolated(runner, topics, group, key_prefix, keyspace), f"--model_dir={tmp_path / 'models'}",
                   "--model_poll_s=0.5", "--settle_s=0.2", "--debounce_s=1", "--idle_skew_s=0.5",
                   "--push_threshold=3", "--celebrity_top_n=0", "--top_k=4") as job:
        topics.send([follow(viewer, author, t)])
        job.wait_until(lambda: ranked() == (version, []), FIRST_S,
                       "the follow's refresh (no posts yet)")
        t = now_ms()
        topics.send([create(100, author, t), create(101, author, t + 1),
                     PostEvent("c102", t + 2, PostEventKind.CREATED, 102, 11, t + 2,
                               MediaType.PHOTO)])  # not followed: not a candidate
        job.wait_until(lambda: ranked() == (version, [100, 101]), NEXT_S,
                       "the posts in the ranked feed")
        job.wait_until(lambda: reader.read_durable(viewer) == reader.read(viewer), NEXT_S,
                       "the durable copy")
        job.wait_caught_up(group)
    feeds.close()
