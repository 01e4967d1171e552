"""The serving API end to end: real HTTP, real Redis and Cassandra, data written by the
fan-out transform (``FanOutToFollowerFeeds`` on FnApiRunner), the ranked store and the
story store. Auth, merge of pushed and pulled posts, hydration, pagination stable
while new posts arrive, pages past the Redis cap, cold and inactive rebuilds, ranked
pages across a re-ranking, the story tray and who may mark a story seen, work per
request bounded for an account following thousands, the HTTP servers' limits on
headers, bodies and slow clients, and a schemathesis run with no 5xx.

Run: ``python -m pytest tests/integration/test_serving_api.py``
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import pytest

from stores.cassandra.session import migrate
from stores.config import StoreConfig
from stores.fanout import FeedFanout
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
    command_calls,
    follow_raw,
    free_port,
    private_redis,
    raw_exchange,
    running_app,
    served,
    serving_config,
    story_raw,
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


def test_durable_last_reads_go_together_and_none_is_lost_at_shutdown(stack, stores, key_prefix,
                                                                    keyspace):
    """Users' first reads of the hour reach Cassandra in batches (more users than
    one batch holds, here in one flush window); reads still waiting for their
    flush when the worker stops are written by its shutdown."""
    from stores.cassandra.aio import LAST_READ_BATCH

    _, _, cassandra = stores
    users = list(range(1, 2 * LAST_READ_BATCH + 32))
    config = serving_config(stack, key_prefix, keyspace, push_threshold=3,
                            last_read_flush_s=2.0)
    with running_app(config) as (client, _):
        for user in users[:-5]:
            assert client.get(f"/v1/users/{user}/feed", user=user)[0] == 200
        wait_until(lambda: all((t or 0) >= NOW for t in cassandra.last_reads(users[:-5])),
                   10, "the durable last reads")
    late = serving_config(stack, key_prefix, keyspace, push_threshold=3,
                          last_read_flush_s=3600.0)
    with running_app(late) as (client, _):
        for user in users[-5:]:
            assert client.get(f"/v1/users/{user}/feed", user=user)[0] == 200
        assert cassandra.last_reads(users[-5:]) == [None] * 5  # an hour from their flush
    assert all((t or 0) >= NOW for t in cassandra.last_reads(users[-5:]))


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


def test_ranked_pages_reuse_cached_posts_until_the_deletion_log_names_them(
        stack, stores, key_prefix, keyspace, redis_client):
    """While a worker follows the log of deleted posts, a ranked page reuses the
    posts it cached past ``post_cache_s`` (no HMGET), and a post the fan-out deletes
    leaves the page within a few polls though it stays in the ranked list; a worker
    that does not follow the log reads each post again every ``post_cache_s``."""
    config, redis, cassandra = stores
    graph_and_posts(config)
    ranked = RankedFeedStore(redis.client, redis.keys, cassandra)
    ranked.write(1, [RankedEntry(21, 200, 0.9), RankedEntry(11, 100, 0.8)], "xgb-1", NOW)
    following = serving_config(stack, key_prefix, keyspace, push_threshold=3, post_cache_s=0.2,
                               deletion_poll_s=0.05)
    with running_app(following) as (api, _):
        assert ids(api.get("/v1/users/1/feed", user=1)[1]) == [21, 11]
        time.sleep(0.5)
        redis_client.config_resetstat()
        status, body = api.get("/v1/users/1/feed", user=1)
        assert status == 200 and body["kind"] == "ranked" and ids(body) == [21, 11]
        calls = command_calls(redis_client)
        assert "hmget" not in calls and calls.get("xrange", 0) <= 2, calls
        run_events(config, POLICY, [delete(21, 200, T0 + 12, NOW + 1)])
        assert redis.deleted([21]) == [True]
        wait_until(lambda: ids(api.get("/v1/users/1/feed", user=1)[1]) == [11], 10,
                   "the deleted post to leave the ranked page")
    with running_app(dataclasses.replace(following, deletion_poll_s=0.0)) as (api, _):
        assert ids(api.get("/v1/users/1/feed", user=1)[1]) == [11]
        time.sleep(0.5)
        redis_client.config_resetstat()
        assert ids(api.get("/v1/users/1/feed", user=1)[1]) == [11]
        calls = command_calls(redis_client)
        assert calls["hmget"] == 2 and "xrange" not in calls, calls  # posts 21 and 11 again


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
    wait_until(lambda: cassandra_stories.seen(1, now) == {502}, 10, "the durable seen row")
    assert api.call("POST", "/v1/users/1/stories/999/seen", user=1)[0] == 404


def test_only_a_visible_story_can_be_marked_seen(stack, redis_client, key_prefix):
    """Seen needs the story active and its author followed (or the caller's own);
    anything else is the same 404 as an unknown id, so ids reveal nothing."""
    keys = KeyLayout(key_prefix)
    now = int(time.time() * 1000)
    follow_raw(redis_client, keys, 1, [100], now - 60_000)
    for sid, author in ((601, 100), (602, 101), (603, 1)):
        story_raw(redis_client, keys, sid, author, now - 1000, now + 3_600_000)
    story_raw(redis_client, keys, 604, 100, now - 7_200_000, now - 1000)  # expired
    config = serving_config(stack, key_prefix, "t_nokeyspace", cassandra_port=free_port())
    with running_app(config) as (api, _):
        unknown = api.call("POST", "/v1/users/1/stories/999/seen", user=1)
        assert unknown[0] == 404
        for sid in (602, 604):  # an unfollowed author's live story; an expired one
            status, body = api.call("POST", f"/v1/users/1/stories/{sid}/seen", user=1)
            assert status == 404 and body["error"]["message"] == f"story {sid} not found"
        assert redis_client.zrange(keys.seen_stories(1), 0, -1) == []
        for sid in (601, 603):  # a followed author's story; one's own
            status, body = api.call("POST", f"/v1/users/1/stories/{sid}/seen", user=1)
            assert status == 200 and body == {"seen": True, "source": "redis"}
    assert redis_client.zrange(keys.seen_stories(1), 0, -1) == [b"601", b"603"]
    assert redis_client.pttl(keys.seen_stories(1)) > 3_600_000  # expiry + grace


def test_the_tray_pages_through_followees(stack, redis_client, key_prefix):
    keys = KeyLayout(key_prefix)
    now = int(time.time() * 1000)
    follow_raw(redis_client, keys, 1, [100, 101, 102], now - 60_000)  # 102 most recent
    for sid, author in ((701, 100), (702, 101), (703, 102)):
        story_raw(redis_client, keys, sid, author, now - 1000 + sid, now + 3_600_000)
    config = serving_config(stack, key_prefix, "t_nokeyspace", cassandra_port=free_port(),
                            tray_followees=2)
    with running_app(config) as (api, _):
        status, page1 = api.get("/v1/users/1/stories/tray", user=1)
        assert status == 200 and [e["author_id"] for e in page1["entries"]] == [102, 101]
        status, page2 = api.get(f"/v1/users/1/stories/tray?cursor={page1['next_cursor']}", user=1)
        assert [e["author_id"] for e in page2["entries"]] == [100]
        assert page2["next_cursor"] is None
        status, body = api.get(f"/v1/users/1/feed?cursor={page1['next_cursor']}", user=1)
        assert status == 400 and "tray" in body["error"]["message"]


#: An account following thousands (``many_followees``): user 1 follows accounts
#: 1000..5999 in that order; every 100th is a celebrity (users 2 and 3 follow it
#: too: 3 followers, the push threshold) with one post, ``c * 10``; account 1001
#: posts 5 (pushed); every 25th account has a live story.
MANY = list(range(1000, 6000))
MANY_CELEBRITIES = MANY[::100]
MANY_STORIES = [a for a in MANY if a % 25 == 0]


def many_followees(config: StoreConfig, cassandra_session) -> None:
    """``MANY``'s graph and posts written by the fan-out's store code (``FeedFanout``,
    so each user's followed-celebrities set and its durable table are what the
    pipeline keeps), its stories by the story stores; Redis and Cassandra."""
    policy = FanoutPolicy(push_threshold=3, celebrity_top_n=0, feed_cap=100, timeline_cap=100)
    events = ([follow(u, c, T0 - u) for c in MANY_CELEBRITIES for u in (2, 3)]
              + [follow(1, a, T0 + i) for i, a in enumerate(MANY)]
              + [create(c * 10, c, T0 + 10_000 + i) for i, c in enumerate(MANY_CELEBRITIES)]
              + [create(5, 1001, T0 + 9_000)])
    fanout = FeedFanout.open(config, policy)
    try:
        fanout.redis.set_last_read(1, NOW)  # active: no rebuild on read
        fanout.apply(events)
        assert fanout.redis.followed_celebrities([1]) == {1: MANY_CELEBRITIES}
        now = int(time.time() * 1000)
        stories = [StoryEvent(f"s{a}", now, StoryEventKind.PUBLISHED, 900_000 + a, a,
                              created_at=now - a, expires_at=now + 3_600_000) for a in MANY_STORIES]
        RedisStoryStore(fanout.redis.client, fanout.redis.keys).publish(stories, now)
        CassandraStoryStore(cassandra_session, config.cassandra_keyspace).publish(stories, now)
    finally:
        fanout.close()


def test_work_per_request_is_bounded_whatever_the_account(stack, cassandra_session, keyspace):
    """User 1 follows 5,000 accounts, 50 of them celebrities: a feed page finds the
    timelines to pull in one read of the fan-out's followed-celebrities set (no
    follower counts, no scan of the follow list) and pulls the
    ``max_pulled_timelines`` most recently followed; a tray page reads
    ``tray_followees`` story indexes (commands counted by a private Redis)."""
    migrate(cassandra_session, keyspace)
    with private_redis() as (url, _):
        import redis

        client = redis.Redis.from_url(url)
        many_followees(StoreConfig(url, "fb", stack.host, stack.cassandra_port, keyspace),
                       cassandra_session)
        config = serving_config(stack, "fb", keyspace, redis_url=url, max_pulled_timelines=20,
                                tray_followees=50)
        with running_app(config) as (api, _):
            client.config_resetstat()
            status, body = api.get("/v1/users/1/feed/chronological?limit=100", user=1)
            assert status == 200 and body["source"] == "redis", body
            first = command_calls(client)
            # The set (ZRANGE), the home feed, its size (the one ZCARD) and 20 timelines.
            assert first["zrange"] == 1 and first["zcard"] == 1, first
            assert first["zrevrangebyscore"] == 1 + 20, first
            assert "zrevrange" not in first, first  # the follow list is not read
            # The 20 pulled are the most recently followed celebrities.
            assert {i["author_id"] for i in body["items"]} == set(MANY_CELEBRITIES[-20:]) | {1001}
            client.config_resetstat()
            assert api.get("/v1/users/1/feed/chronological", user=1)[0] == 200
            cached = command_calls(client)  # the set is cached
            assert "zrange" not in cached and cached["zcard"] == 1, cached
            client.config_resetstat()
            status, tray = api.get("/v1/users/1/stories/tray?limit=100", user=1)
            assert status == 200 and tray["source"] == "redis" and tray["next_cursor"]
            calls = command_calls(client)
            # The followee page, 50 story indexes, the seen set, the live stories' hashes.
            assert calls["zrevrange"] == 1 + 50 and calls["zrangebyscore"] == 1, calls
            assert {e["author_id"] for e in tray["entries"]} == set(MANY_STORIES) & set(MANY[-50:])
            assert calls["hgetall"] == len(tray["entries"]), calls
        client.close()


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
def test_the_http_server_bounds_headers_bodies_and_slow_clients(stack, server):
    args = ["--header-read-timeout-s", "1", "--cassandra-timeout-ms", "100"]
    with served(server, args, env={"FEEDBEAM_CASSANDRA_PORT": str(free_port())}) as port:
        huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
        assert raw_exchange(port, huge).startswith(b"HTTP/1.1 431")
        body = b"POST /v1/users/1/stories/5/seen HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        reply = raw_exchange(port, body + b"Connection: close\r\n\r\n" + b"x" * 5000)
        assert reply.startswith(b"HTTP/1.1 413") and b"larger than 1024 bytes" in reply
        # Half a request, then nothing: the server hangs up (it would wait for ever).
        reply = raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert b"200" not in reply.split(b"\r\n", 1)[0]
        # A connection that never sends anything is closed too.
        idle = raw_exchange(port, b"")
        assert idle == b"" or idle.startswith(b"HTTP/1.1 408"), idle
        ok = raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200")


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
    assert (status, ready) == (200, {"status": "ready", "redis": "ready", "cassandra": "ready"})
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
