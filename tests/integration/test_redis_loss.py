"""Redis loses its data under running jobs and heals from Cassandra by itself.

The fan-out and stories jobs run on a private Prism state directory (``feedbeam
submit``) with their own topics, groups, Redis prefix and keyspace; the serving
API runs beside them with its generation check on. Follows, posts, a post
delete, stories, a view and a story delete are applied; then every key of the
prefix is deleted at once (what a Redis restart without persistence leaves).
Until the next batch restores Redis the API answers from Cassandra, the same
feed and tray as before. Then the deleted post's CREATED and the deleted
story's PUBLISHED are replayed with new follows, posts and a story: after the
jobs caught up, graph, feeds, timelines and tombstones equal the fan-out's
oracle (``domain.fanout.expected_state``), the trays hold the live stories
only, the API serves Redis again, and Cassandra's follower counts, sampled the
whole time, never went down.

Run: ``.venv/bin/python -m pytest tests/integration/test_redis_loss.py``
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from domain.fanout import FanoutPolicy, expected_state
from domain.stories import StoryPolicy
from schemas.cassandra import FOLLOWER_COUNTS
from schemas.events import FollowEvent, MediaType, PostEvent, StoryEvent, StoryEventKind
from schemas.keys import KeyLayout
from stores.cassandra.feeds import CassandraFeedStore
from stores.cassandra.session import migrate
from stores.redis.feeds import RedisFeedStore
from stores.redis.generation import RedisGeneration
from stores.redis.stories import RedisStoryStore
from tests.integration.cli_jobs import submitted
from tests.integration.fanout_events import create, delete, follow
from tests.integration.serving_harness import running_app, serving_config
from tests.integration.test_fanout import PARTITIONS, Topics, durable_feeds, group_done

pytestmark = pytest.mark.integration

FIRST_S = 150   # a job's first batch on a busy machine
NEXT_S = 60
HOUR = 3_600_000
USERS = range(1, 6)
AUTHORS = (10, 11)


def now_ms() -> int:
    return int(time.time() * 1000)


def story(kind: StoryEventKind, sid: int, author: int, t: int, viewer: int | None = None):
    if kind is StoryEventKind.PUBLISHED:
        return StoryEvent(f"pub-{sid}", t, kind, sid, author, created_at=t, expires_at=t + HOUR,
                          media_type=MediaType.PHOTO)
    return StoryEvent(f"{kind.value}-{sid}-{viewer}", t, kind, sid, author, viewer_id=viewer)


class CountWatch:
    """Samples Cassandra's follower counts of ``AUTHORS`` every 0.1 s in a thread."""

    def __init__(self, session, keyspace: str):
        self._stmt = session.prepare(f"SELECT user_id, followers FROM {keyspace}."
                                     f"{FOLLOWER_COUNTS} WHERE user_id IN ?")
        self._session = session
        self.samples: list[dict[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self._session.execute(self._stmt, (list(AUTHORS),))
            self.samples.append({r.user_id: r.followers for r in rows})
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def went_down(self) -> list[tuple[int, int, int]]:
        """``(user, before, after)`` of every sample lower than an earlier one."""
        high: dict[int, int] = {}
        out = []
        for sample in self.samples:
            for user, n in sample.items():
                if n < high.get(user, 0):
                    out.append((user, high[user], n))
                high[user] = max(high.get(user, 0), n)
        return out


def test_jobs_and_api_heal_a_redis_that_lost_its_data(stack, kafka_topic, cassandra_session,
                                                      keyspace, key_prefix, redis_client,
                                                      tmp_path):
    migrate(cassandra_session, keyspace)
    topics = Topics(stack, kafka_topic, (PostEvent.TOPIC, FollowEvent.TOPIC, StoryEvent.TOPIC))
    fanout_topics = [topics.prefix + t for t in (PostEvent.TOPIC, FollowEvent.TOPIC)]
    story_topic = [topics.prefix + StoryEvent.TOPIC]
    keys = KeyLayout(key_prefix)
    feeds = RedisFeedStore(redis_client, keys)
    stories = RedisStoryStore(redis_client, keys, StoryPolicy())
    cassandra = CassandraFeedStore(cassandra_session, keyspace)
    policy = FanoutPolicy()
    # Whichever job restores Redis waits for the durable steps of these jobs' groups.
    common = [f"--topic_prefix={topics.prefix}", "--fallback_start=earliest",
              f"--redis_key_prefix={key_prefix}", f"--cassandra_keyspace={keyspace}",
              "--fanout_consumer_group=loss-fanout", "--stories_consumer_group=loss-stories"]

    def caught_up() -> bool:
        return (group_done(stack.kafka_bootstrap, fanout_topics, PARTITIONS, "loss-fanout")
                and group_done(stack.kafka_bootstrap, story_topic, PARTITIONS, "loss-stories"))

    def tray(viewer: int) -> list[tuple[int, list[int]]]:
        entries = stories.tray(viewer, list(AUTHORS), now_ms(), limit=10)
        return [(e.author_id, [s.story_id for s in e.stories]) for e in entries]

    with submitted(stack, tmp_path / "fanout", "prism", "fanout", *common,
                   "--consumer_group=loss-fanout") as fan, \
            submitted(stack, tmp_path / "stories", "prism", "stories", *common,
                      "--consumer_group=loss-stories", "--idle_skew_s=1") as _, \
            running_app(serving_config(stack, key_prefix, keyspace,
                                       generation_check_s=0.2)) as (api, _):
        t = now_ms()
        deleted_post = create(101, 10, t + 11)
        topics.send([follow(1, 10, t), follow(2, 10, t + 1), follow(3, 10, t + 2),
                     follow(1, 11, t + 3), follow(2, 11, t + 4),
                     create(100, 10, t + 10), deleted_post, create(110, 11, t + 12)])
        topics.send([delete(101, 10, t + 11, t + 20)])
        deleted_story = story(StoryEventKind.PUBLISHED, 501, 11, t + 30)
        topics.send([story(StoryEventKind.PUBLISHED, 500, 10, t + 30), deleted_story,
                     story(StoryEventKind.VIEWED, 500, 10, t + 31, viewer=1)])
        topics.send([story(StoryEventKind.DELETED, 501, 11, t + 40)])
        fan.wait_until(caught_up, FIRST_S, "both jobs to apply the first events")
        assert RedisGeneration(redis_client, keys).read() is not None  # marked on first batch

        def answers():
            feed = api.get("/v1/users/1/feed/chronological", user=1)[1]
            tray_body = api.get("/v1/users/1/stories/tray", user=1)[1]
            return ([i["post_id"] for i in feed["items"]], feed["source"],
                    [(e["author_id"], [s["story_id"] for s in e["stories"]])
                     for e in tray_body["entries"]])

        before = answers()
        assert before[:2] == ([110, 100], "redis") and (10, [500]) in before[2], before

        with CountWatch(cassandra_session, keyspace) as counts:
            # The loss: every key of the prefix at once, as a restart without persistence.
            lost = list(redis_client.scan_iter(match=keys.pattern(), count=1000))
            redis_client.delete(*lost)
            # No batch yet, no restore: the API answers from Cassandra, the same.
            fan.wait_until(lambda: answers()[1] == "cassandra", 10, "the API's fallback")
            during = answers()
            assert during[0] == before[0] and during[2] == before[2], (before, during)

            def restores_started() -> int:
                return Path(fan.log).read_text(errors="replace").count(
                    "Redis restore: waiting up to")

            # The first batch restored the empty prefix, which had no marker yet.
            earlier = restores_started()
            t = now_ms()
            topics.send([deleted_post, follow(4, 10, t), create(102, 10, t + 5)])
            # The fan-out's batch comes first, so the fan-out runs the restore (and
            # waits for its durable log); the stories' batch then finds it done or
            # under way. Sent together, either job's batch could start it, and the
            # stories job cannot wait for the fan-out's durable log (it does not know
            # the test's consumer group for it): it would wait 60 s.
            fan.wait_until(lambda: restores_started() > earlier, NEXT_S,
                           "the fan-out to start the restore")
            topics.send([deleted_story, story(StoryEventKind.PUBLISHED, 502, 11, t + 10)])
            fan.wait_until(caught_up, NEXT_S, "both jobs to apply the events after the loss")
            fan.wait_until(lambda: answers()[1] == "redis", 10, "the API back on Redis")

        expected = expected_state([e for e in topics.events if not isinstance(e, StoryEvent)],
                                  policy)
        assert {u: [(p, c) for p, c in feeds.feed(u, 10_000)] for u in USERS} == \
            {u: expected.feeds.get(u, []) for u in USERS}
        assert durable_feeds(cassandra) == {u: ps for u, ps in expected.durable_feeds.items()
                                            if ps}
        for author in AUTHORS:
            assert feeds.followers(author) == expected.followers[author]
            assert feeds.timeline(author, 10_000) == expected.timelines.get(author, [])
            assert cassandra.follower_count(author) == len(expected.followers[author])
        # The replayed CREATED met the restored tombstone: nowhere to be seen.
        assert feeds.deleted([101]) == [True] and cassandra.deleted([101]) == [True]
        assert not any(101 in dict(feeds.feed(u, 10_000)) for u in USERS)
        # The replayed PUBLISHED met the restored story tombstone.
        assert redis_client.hget(keys.story(501), "removed") == b"deleted"
        assert sorted(tray(1)) == [(10, [500]), (11, [502])]
        assert stories.viewers(500) == [1]
        after = answers()
        assert after[0] == [102, 110, 100] and sorted(after[2]) == [(10, [500]), (11, [502])]
        assert counts.samples and not counts.went_down(), counts.went_down()
        # The fan-out's restore read Cassandra only after its durable step had applied
        # the durable log (or said that it gave up waiting).
        fan_log = Path(fan.log).read_text(errors="replace")
        assert "Redis restore: waiting up to" in fan_log
        assert "records behind" not in fan_log, fan_log[-2000:]
