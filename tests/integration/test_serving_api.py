"""The serving API end to end: real HTTP, real Redis and Cassandra, data written by the
fan-out transform (``FanOutToFollowerFeeds`` on FnApiRunner), the ranked store and the
story store. Auth, merge of pushed and pulled posts, hydration, pagination stable
while new posts arrive, pages past the Redis cap, cold and inactive rebuilds, ranked
pages across a re-ranking, the story tray, and a schemathesis run with no 5xx.

Run: ``python -m pytest tests/integration/test_serving_api.py``
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from stores.config import StoreConfig
from domain.fanout import DAY_MS, FanoutPolicy
from stores.ranked import RankedFeedStore
from stores.cassandra.stories import CassandraStoryStore
from stores.redis.stories import RedisStoryStore
from schemas.events import StoryEvent, StoryEventKind
from schemas.keys import KeyLayout
from schemas.ranked import RankedEntry
from serving.auth import issue_token
from tests.integration.fanout_events import create, delete, follow
from tests.integration.serving_harness import (
    JWT_KEY,
    running_app,
    serving_config,
    wait_until,
)
# ``stores``: (StoreConfig, RedisFeedStore, CassandraFeedStore) on a fresh prefix and keyspace.
from tests.integration.test_fanout_pipeline import run_events, stores  # noqa: F401

pytestmark = pytest.mark.integration

NOW = int(time.time() * 1000)
T0 = NOW - 3_600_000  # recent: inside the feed's Cassandra buckets and TTL
POLICY = FanoutPolicy(push_threshold=3, celebrity_top_n=1, feed_cap=100, timeline_cap=100)


@pytest.fixture
def api(stack, stores, key_prefix, keyspace):
    with running_app(serving_config(stack, key_prefix, keyspace, push_threshold=3)) as (client, _):
        yield client


def ids(body: dict) -> list[int]:
    return [item["post_id"] for item in body["items"]]


def graph_and_posts(config: StoreConfig) -> None:
    """User 1 and 2 follow author 100 (pushed) and celebrity 200 (3 followers: pulled,
    but its top-1 follower, user 2, still gets pushes); post 12 is deleted."""
    run_events(config, POLICY, [
        follow(2, 200, T0), follow(1, 200, T0 + 1), follow(3, 200, T0 + 2),
        follow(1, 100, T0 + 3), follow(2, 100, T0 + 4),
        create(11, 100, T0 + 10), create(12, 100, T0 + 11), create(21, 200, T0 + 12),
        create(22, 200, T0 + 13), delete(12, 100, T0 + 11, T0 + 14)])


def test_auth(api, stores):
    graph_and_posts(stores[0])
    path = "/v1/users/1/feed"
    status, body = api.get(path)
    assert status == 401 and "missing bearer token" in body["error"]["message"]
    assert api.get(path, token=issue_token("another-key-0123456789-0123456789", 1))[0] == 401
    assert api.get(path, token=issue_token(JWT_KEY, 1, now_s=time.time() - 7200))[0] == 401
    assert api.get(path, token="not.a.jwt")[0] == 401
    status, body = api.get(path, user=2)
    assert status == 403 and body["error"]["status"] == 403
    assert api.get("/v1/users/1/stories/tray", user=2)[0] == 403
    assert api.get(path, user=1)[0] == 200


def test_feed_merges_pushed_and_pulled_posts_hydrated(api, stores):
    config, redis, cassandra = stores
    graph_and_posts(config)
    # User 1 gets 11 pushed and pulls 21, 22 from the celebrity's timeline; user 2
    # has 21, 22 pushed *and* pulls them: each appears once.
    for user in (1, 2):
        status, body = api.get(f"/v1/users/{user}/feed/chronological", user=user)
        assert status == 200, body
        assert ids(body) == [22, 21, 11]
        assert body["kind"] == "chronological" and body["next_cursor"] is None
    first = body["items"][0]
    assert (first["author_id"], first["created_at"], first["media_type"]) == (200, T0 + 13, "PHOTO")
    # No ranking yet: /feed is the chronological feed.
    status, body = api.get("/v1/users/1/feed", user=1)
    assert body["kind"] == "chronological" and ids(body) == [22, 21, 11]
    # The read was recorded in both stores (the durable one off the request path).
    assert redis.last_reads([1])[0] >= NOW
    wait_until(lambda: (cassandra.last_reads([1])[0] or 0) >= NOW, 10, "durable last read")


def test_pagination_is_stable_while_new_posts_arrive(api, stores):
    config, _, _ = stores
    run_events(config, POLICY, [follow(1, 100, T0)] +
               [create(100 + i, 100, T0 + 10 + i) for i in range(12)] +
               [create(200 + i, 100, T0 + 50) for i in range(5)])  # five posts in one ms
    expected = [200 + i for i in reversed(range(5))] + [100 + i for i in reversed(range(12))]
    path = "/v1/users/1/feed/chronological"
    status, page1 = api.get(f"{path}?limit=4", user=1)
    assert ids(page1) == expected[:4]
    # New posts arrive (newer and at the page boundary's millisecond) while the user scrolls.
    run_events(config, POLICY, [create(300, 100, T0 + 60), create(199, 100, T0 + 50)])
    seen = ids(page1)
    cursor = page1["next_cursor"]
    while cursor:
        status, page = api.get(f"{path}?limit=4&cursor={cursor}", user=1)
        assert status == 200, page
        seen += ids(page)
        cursor = page["next_cursor"]
    # Exactly the feed as it was, in order; post 199 sorts below the boundary
    # (same ms, smaller id) so it shows up in its place, never twice.
    assert seen == expected[:5] + [199] + expected[5:]
    status, fresh = api.get(f"{path}?limit=3", user=1)
    assert ids(fresh)[0] == 300


def test_pages_past_the_redis_cap_come_from_cassandra(stack, stores, key_prefix, keyspace):
    config, redis, _ = stores
    policy = FanoutPolicy(push_threshold=10, feed_cap=3)
    run_events(config, policy, [follow(1, 100, T0)] +
               [create(100 + i, 100, T0 + 10 + i) for i in range(8)])
    assert len(redis.feed(1, 100)) == 3
    with running_app(serving_config(stack, key_prefix, keyspace, feed_cap=3)) as (client, _):
        pages = client.pages("/v1/users/1/feed/chronological", 1, limit=2)
    assert [p for page in pages for p in ids(page)] == [100 + i for i in reversed(range(8))]


def test_inactive_and_lost_feeds_are_rebuilt_on_read(api, stores, redis_client):
    config, redis, _ = stores
    redis.set_last_read(3, T0 - 40 * DAY_MS)  # inactive: fan-out skips them
    run_events(config, POLICY, [follow(3, 100, T0), follow(1, 100, T0 + 1),
                                create(11, 100, T0 + 10), create(12, 100, T0 + 11)])
    assert redis.feed(3, 10) == []
    status, body = api.get("/v1/users/3/feed/chronological", user=3)
    assert status == 200 and body["source"] == "rebuilt" and ids(body) == [12, 11]
    assert [p for p, _ in redis.feed(3, 10)] == [12, 11]       # cached for the next read
    assert redis.last_reads([3])[0] >= NOW
    status, body = api.get("/v1/users/3/feed/chronological", user=3)
    assert body["source"] == "redis" and ids(body) == [12, 11]

    # A feed lost from Redis (cache loss) comes back from Cassandra and the timelines.
    redis_client.delete(KeyLayout(config.redis_key_prefix).home_feed(1))
    status, body = api.get("/v1/users/1/feed", user=1)
    assert status == 200 and body["source"] == "rebuilt" and ids(body) == [12, 11]


def test_ranked_feed_pages_survive_a_reranking(api, stores):
    config, redis, cassandra = stores
    graph_and_posts(config)
    ranked = RankedFeedStore(redis.client, redis.keys, cassandra)
    ranked.write(1, [RankedEntry(21, 200, 0.9), RankedEntry(11, 100, 0.8),
                     RankedEntry(22, 200, 0.95)], "xgb-1", T0 + 20)
    run_events(config, POLICY, [create(13, 100, T0 + 30)])  # after the ranking: "fresh"
    status, page1 = api.get("/v1/users/1/feed?limit=2", user=1)
    assert status == 200 and page1["kind"] == "ranked" and page1["model_version"] == "xgb-1"
    assert ids(page1) == [13, 21]
    assert [i["score"] for i in page1["items"]] == [None, 0.9]
    # The ranking is refreshed while the user scrolls: page 2 continues the old one.
    ranked.write(1, [RankedEntry(13, 100, 1.0), RankedEntry(22, 200, 0.5)], "xgb-2", T0 + 40)
    status, page2 = api.get(f"/v1/users/1/feed?limit=2&cursor={page1['next_cursor']}", user=1)
    assert ids(page2) == [11, 22] and page2["model_version"] == "xgb-1"
    assert page2["next_cursor"] is None
    status, again = api.get("/v1/users/1/feed?limit=5", user=1)
    assert ids(again) == [13, 22] and again["model_version"] == "xgb-2"
    # A ranked cursor is not a chronological one.
    status, body = api.get(f"/v1/users/1/feed/chronological?cursor={page1['next_cursor']}", user=1)
    assert status == 400 and "ranked" in body["error"]["message"]


def test_story_tray_and_mark_seen(api, stores, redis_client, key_prefix, cassandra_session,
                                  keyspace):
    config, _, _ = stores
    run_events(config, POLICY, [follow(1, 100, T0), follow(1, 101, T0)])
    redis_stories = RedisStoryStore(redis_client, KeyLayout(key_prefix))
    cassandra_stories = CassandraStoryStore(cassandra_session, keyspace)
    now = int(time.time() * 1000)
    events = [StoryEvent(f"s{sid}", created, StoryEventKind.PUBLISHED, sid, author,
                         created_at=created, expires_at=created + 3_600_000)
              for sid, author, created in ((501, 100, now - 5000), (502, 101, now - 1000))]
    redis_stories.publish(events, now)
    cassandra_stories.publish(events, now)

    status, tray = api.get("/v1/users/1/stories/tray", user=1)
    assert status == 200 and [e["author_id"] for e in tray["entries"]] == [101, 100]
    status, body = api.call("POST", "/v1/users/1/stories/502/seen", user=1)
    assert status == 200 and body["seen"] is True
    status, tray = api.get("/v1/users/1/stories/tray", user=1)
    assert [e["author_id"] for e in tray["entries"]] == [100, 101]   # unseen first
    assert tray["entries"][1]["stories"][0]["seen"] is True
    assert cassandra_stories.seen(1, now) == {502}                    # durable copy too
    assert api.call("POST", "/v1/users/1/stories/999/seen", user=1)[0] == 404


def test_bad_input_gets_a_clear_4xx(api):
    cases = {
        "/v1/users/1/feed?limit=0": 400, "/v1/users/1/feed?limit=101": 400,
        "/v1/users/1/feed?limit=abc": 400, "/v1/users/1/feed?cursor=zzz": 400,
        "/v1/users/1/feed?cursor=": 400, "/v1/users/abc/feed": 400,
        "/v1/users/1/feeds": 404, "/nope": 404, "/v1/users/99999999999999999999/feed": 400,
    }
    for path, want in cases.items():
        status, body = api.get(path, user=1)
        assert status == want, (path, body)
        assert body["error"]["status"] == want and body["error"]["message"]
    status, body = api.call("POST", "/v1/users/1/feed", user=1)
    assert status == 405
    # Another user's cursor is refused even with a valid signature.
    status, other = api.get("/v1/users/2/feed?limit=1", user=2)
    if other["next_cursor"]:
        assert api.get(f"/v1/users/1/feed?cursor={other['next_cursor']}", user=1)[0] == 400


def test_health_metrics_and_openapi(api):
    assert api.get("/healthz") == (200, {"status": "ok"})
    status, ready = api.get("/readyz")
    assert status == 200 and ready["status"] == "ready"
    api.get("/v1/users/1/feed", user=1)
    status, text = api.get("/metrics")
    assert status == 200 and 'feedbeam_http_requests_total{route="feed",status="200"' in text
    status, spec = api.get("/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "/v1/users/{user_id}/feed" in spec["paths"]


def test_schemathesis_finds_no_server_error(api, stores, tmp_path):
    graph_and_posts(stores[0])
    token = issue_token(JWT_KEY, 1)
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{api.base_url}/openapi.json",
         "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {token}",
         "--max-examples", "40", "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache dir lands there
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Tested: 7" in result.stdout and " passed" in result.stdout, result.stdout[-2000:]
