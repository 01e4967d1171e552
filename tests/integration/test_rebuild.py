"""``feedbeam rebuild``: Redis emptied after the pipelines wrote it, refilled from Cassandra.

The fan-out transform applies a small scenario (pushes, a celebrity, an
unfollow, a delete, an inactive reader) to the real Redis and Cassandra; the
test snapshots every Redis key, deletes them all (the "loss"), runs the CLI
and compares. Edge-version entries of edges that no longer exist cannot come
back (Cassandra deletes an unfollowed edge), so those are compared for the
live edges only.

The second scenario adds what the features, stories and ranking pipelines
write (through their store classes, into both stores): the serving API's
ranked feeds and story trays and a feature hydrate must answer the same after
the loss and the rebuild; an expired story and expired feature values stay
out, and a ranked feed the running pipeline wrote after the loss is kept.

Run: ``python -m pytest tests/integration/test_rebuild.py``
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from domain.fanout import DAY_MS, FanoutPolicy
from domain.features import follower_scores
from stores.cassandra.features import CassandraFeatureStore
from stores.redis.features import OnlineFeatureStore
from stores.ranked import RankedFeedStore
from stores.cassandra.stories import CassandraStoryStore
from stores.redis.stories import RedisStoryStore
from schemas.events import MediaType, StoryEvent, StoryEventKind
from schemas.features import (
    AFFINITY,
    AUTHOR,
    DEFAULT_HALF_LIFE_MS,
    POST,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    FeatureValue,
)
from schemas.ranked import RankedEntry
from tests.integration.fanout_events import U, create, delete, follow
from tests.integration.serving_harness import running_app, serving_config
from tests.integration.test_fanout import REPO
from tests.integration.test_fanout_pipeline import run_events, stores  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def lose_redis(redis_client, key_prefix: str) -> None:
    """The loss: every key of this test's prefix (and only those) deleted."""
    keys = list(redis_client.scan_iter(match=f"{key_prefix}:*", count=1000))
    assert keys
    redis_client.delete(*keys)


def run_rebuild(key_prefix: str, keyspace: str, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "rebuild", "--key-prefix", key_prefix,
         "--keyspace", keyspace, "--no-progress", *extra],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def _views(dump: dict) -> dict:
    """The dump without edge-version hashes (compared separately)."""
    return {k: v for k, v in dump.items() if ":edges_" not in k}


def test_rebuild_restores_what_the_pipeline_wrote(stack, stores, redis_client, key_prefix,
                                                  keyspace):
    config, redis, cassandra = stores
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=1, feed_cap=3, timeline_cap=10)
    redis.set_last_read(4, T0 - 40 * DAY_MS)
    cassandra.set_last_read(4, T0 - 40 * DAY_MS)
    events = ([follow(u, 100, T0 + u) for u in (1, 2, 4)] + [follow(1, 200, T0), follow(5, 200, T0)]
              + [follow(u, 300, T0 + u) for u in (1, 2, 3, 5)]            # 300: a celebrity
              + [create(p, 100 if p % 2 else 200, T0 + 100 + p) for p in range(1, 8)]
              + [create(50, 300, T0 + 150), follow(5, 200, T0 + 300, U),
                 delete(3, 100, T0 + 103, T0 + 400)])
    run_events(config, policy, events)
    before = redis.dump()
    assert any(":feed:" in k for k in before) and any(":post:" in k for k in before)

    lose_redis(redis_client, key_prefix)
    done = run_rebuild(key_prefix, keyspace, "--feed-cap", "3", "--timeline-cap", "10")
    assert "rebuilt graph" in done.stdout

    after = redis.dump()
    assert _views(after) == _views(before)
    for author in (100, 200, 300):
        edges_before = before[redis.keys.follower_edges(author)]
        edges_after = after[redis.keys.follower_edges(author)]
        live = {str(u) for u in redis.followers(author)}
        assert {f: v for f, v in edges_before.items() if f in live} == edges_after


def test_rebuild_rejects_unknown_views(stack):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "rebuild", "--views",
                           "ranked,nope,stories"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown view(s) nope" in done.stderr
    assert "features, stories, ranked" in done.stderr


HOUR = 3_600_000
MINUTE = 60_000
#: What the serving API is asked, per user: ranked feeds and story trays.
REQUESTS = [("/v1/users/1/feed", 1), ("/v1/users/2/feed", 2), ("/v1/users/1/stories/tray", 1),
            ("/v1/users/2/stories/tray", 2), ("/v1/users/3/stories/tray", 3)]


def _answers(stack, key_prefix: str, keyspace: str) -> dict:
    """Every ``REQUESTS`` answer of a freshly started API (no per-process caches)."""
    config = serving_config(stack, key_prefix, keyspace, push_threshold=10)
    with running_app(config) as (client, _):
        return {path: client.get(path, user) for path, user in REQUESTS}


def after_tombstone(redis_client, key: str) -> str | None:
    """How a story was removed, by its Redis tombstone (None: no tombstone)."""
    how = redis_client.hget(key, "removed")
    return None if how is None else how.decode()


def _expiries(redis_client, keys: list[str]) -> dict[str, int]:
    return {k: redis_client.execute_command("PEXPIRETIME", k) for k in keys}


def _materialize_features(online, durable, redis, now: int) -> None:
    """What the features pipeline's sinks write: online and durable values, and the
    top followers from the viewer-author affinities. Post 13's value and viewer
    1's affinity to author 101 are older than their online TTLs (2 and 30 days)."""
    values = [FeatureValue(POST, "11", "like_1h", 3.0, now - 10 * MINUTE),
              FeatureValue(POST, "11", "view_24h", 20.0, now - 10 * MINUTE, version=2),
              FeatureValue(POST, "12", "like_1h", 1.0, now - 5 * MINUTE),
              FeatureValue(POST, "13", "like_1h", 7.0, now - 3 * DAY_MS),
              FeatureValue(AUTHOR, "100", "engagement_rate_7d", 0.25, now - HOUR),
              FeatureValue(VIEWER_AUTHOR, "1:100", AFFINITY, 2.0, now - 20 * MINUTE),
              FeatureValue(VIEWER_AUTHOR, "1:101", AFFINITY, 0.5, now - 40 * DAY_MS),
              FeatureValue(VIEWER_AUTHOR, "2:100", AFFINITY, 1.0, now - HOUR),
              FeatureValue(VIEWER_MEDIA, "1:PHOTO", AFFINITY, 1.5, now - 30 * MINUTE)]
    online.write(values)
    durable.write(values)
    redis.apply_follower_engagement(follower_scores(values, DEFAULT_HALF_LIFE_MS), keep=10_000)


def _materialize_stories(hot, durable, now: int) -> StoryEvent:
    """What the stories pipeline writes: 501 (author 100) and 502 (101) active; 503
    (100) published two hours ago and expired a minute ago, its removal not run
    (the expiry step is behind), with a view by user 2; 504 (100) published and
    deleted (a tombstone in Redis). User 1 and 3 viewed 502, user 2 marked 501
    seen through the API's read-your-own-view."""
    def published(sid, author, created, expires):
        return StoryEvent(f"p{sid}", created, StoryEventKind.PUBLISHED, sid, author,
                          created_at=created, expires_at=expires, media_type=MediaType.REEL)

    def viewed(sid, author, viewer, at):
        return StoryEvent(f"v{sid}-{viewer}", at, StoryEventKind.VIEWED, sid, author,
                          viewer_id=viewer)

    then = now - 2 * HOUR
    for at, events in ((then, [published(503, 100, then, now - MINUTE)]),
                       (now, [published(501, 100, now - 5000, now + HOUR),
                              published(502, 101, now - 1000, now + HOUR)])):
        assert hot.publish(events, at) == ["published"] * len(events)
        durable.publish(events, at)
    for at, views in ((then + 1000, [viewed(503, 100, 2, then + 1000)]),
                      (now, [viewed(502, 101, 1, now - 500), viewed(502, 101, 3, now - 400)])):
        results = hot.record_views(views, at)
        assert all(r.counted for r in results)
        durable.record_views([(v, r.author_id, r.expires_at) for v, r in zip(views, results)], at)
    assert hot.mark_seen(2, 501, now) and durable.mark_seen(2, 501, now)
    deleted = published(504, 100, now - 9000, now + HOUR)
    assert hot.publish([deleted], now) == ["published"]
    durable.publish([deleted], now)
    removal = hot.remove(504, 100, now + HOUR, deleted=True)
    durable.remove(504, 100, removal.expires_at, removal.viewers, deleted=True, now_ms=now)
    return deleted


def test_rebuild_restores_features_stories_and_ranked_feeds(
        stack, stores, redis_client, key_prefix, keyspace, cassandra_session):
    config, redis, cassandra = stores
    now = int(time.time() * 1000)
    t0 = now - HOUR
    policy = FanoutPolicy(push_threshold=10, feed_cap=100, timeline_cap=100)
    run_events(config, policy, [follow(1, 100, t0), follow(1, 101, t0 + 1), follow(2, 100, t0 + 2),
                                follow(3, 101, t0 + 3), create(11, 100, t0 + 10),
                                create(12, 101, t0 + 20), create(13, 100, t0 + 300)])
    online = OnlineFeatureStore(redis.client, redis.keys)
    _materialize_features(online, CassandraFeatureStore(cassandra_session, keyspace), redis, now)
    hot = RedisStoryStore(redis.client, redis.keys)
    deleted_story = _materialize_stories(hot, CassandraStoryStore(cassandra_session, keyspace),
                                         now)
    ranked = RankedFeedStore(redis.client, redis.keys, cassandra)
    # Generated before post 13: the API puts 13 first as a "fresh" post.
    ranked.write(1, [RankedEntry(12, 101, 0.9), RankedEntry(11, 100, 0.7)], "xgb-7", t0 + 200)
    ranked.write(2, [RankedEntry(11, 100, 0.5)], "xgb-7", t0 + 200)

    answers = _answers(stack, key_prefix, keyspace)
    assert all(status == 200 for status, _ in answers.values()), answers
    assert answers["/v1/users/1/feed"][1]["kind"] == "ranked"
    assert [i["post_id"] for i in answers["/v1/users/1/feed"][1]["items"]] == [13, 12, 11]
    assert [e["author_id"] for e in answers["/v1/users/1/stories/tray"][1]["entries"]] == [100, 101]
    assert [s["story_id"] for s in answers["/v1/users/2/stories/tray"][1]["entries"][0]["stories"]
            ] == [501]
    hydrate = online.hydrate(1, [11, 12, 13], [100, 101, 100], now)
    assert hydrate.posts[2] == {} and hydrate.author_affinity[1] == 0.0    # expired values
    k = redis.keys
    story_keys = [k.story(501), k.story(502), k.story(504), k.story_viewers(502),
                  k.author_stories(100),
                  k.author_stories(101), k.seen_stories(1), k.seen_stories(2), k.seen_stories(3)]
    expiries = _expiries(redis_client, story_keys)
    before = redis.dump()
    assert before[k.post_features(13)] and before[k.story(503)]
    affinities = online.raw(VIEWER_AUTHOR, "1:0")
    assert set(affinities) == {"100", "101"}

    lose_redis(redis_client, key_prefix)
    # The ranking pipeline keeps running: user 2's newer ranking lands before the rebuild.
    newer = RankedFeedStore(redis.client, redis.keys)
    assert newer.write(2, [RankedEntry(13, 100, 0.99), RankedEntry(11, 100, 0.4)], "xgb-8", now)
    done = run_rebuild(key_prefix, keyspace, "--feed-cap", "100", "--timeline-cap", "100")
    assert all(f"{view} " in done.stdout for view in ("features", "stories", "ranked"))

    after_answers = _answers(stack, key_prefix, keyspace)
    user2_feed = after_answers.pop("/v1/users/2/feed")
    assert after_answers == {p: a for p, a in answers.items() if p != "/v1/users/2/feed"}
    assert user2_feed[1]["model_version"] == "xgb-8"
    assert [i["post_id"] for i in user2_feed[1]["items"]] == [13, 11]
    assert online.hydrate(1, [11, 12, 13], [100, 101, 100], now) == hydrate
    assert _expiries(redis_client, story_keys) == expiries
    assert hot.viewers(502) == [1, 3] and hot.story(502).views == 2
    # The deleted story's tombstone is back: a replay of its publish stays refused.
    assert after_tombstone(redis_client, k.story(504)) == "deleted"
    assert hot.publish([deleted_story], now) == ["tombstoned"]

    after = redis.dump()
    # Gone: the expired story (with its viewer set and seen entry) and the feature
    # values past their online TTL; changed: user 2's ranking (newer), the reads.
    gone = {k.story(503), k.story_viewers(503), k.post_features(13)}
    assert not gone & after.keys()
    assert [m for m, _ in after[k.seen_stories(2)]] == ["501"]
    assert online.raw(VIEWER_AUTHOR, "1:0") == {"100": affinities["100"]}
    changed = gone | {k.seen_stories(2), k.author_affinity(1), k.ranked_feed(2)}
    kept = {key for key in before if key not in changed and ":last_read:" not in key}
    assert {key: after.get(key) for key in kept} == {key: before[key] for key in kept}
    assert k.top_followers(100) in kept and k.top_followers(101) in kept
