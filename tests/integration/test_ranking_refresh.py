"""Ranking outside Beam against the real Redis and Cassandra: ``FeedRanker`` (candidates,
batched scoring, diversity, recency fallback, a model hot swap, a batch's feeds equal to
one-by-one refreshes), ``TriggerWriter`` (a celebrity's post refreshes a bounded audience;
a post going viral re-ranks the feeds that hold it, once per level, rate-limited per
user) and ``ClaimRefresher`` (what the queue hands out gets ranked and released).

The feeds, timelines and graph are written by the fan-out's own ``FeedFanout``
(push below the threshold, timeline above it), the features by the features
pipeline's ``OnlineFeatureStore``; the ranked feeds are read back through
``RankedFeedStore``, Redis and Cassandra both.
"""
from __future__ import annotations

import dataclasses

import time

import numpy as np
import pytest

from stores.config import StoreConfig
from stores.fanout import FeedFanout, FeedStores
from domain.fanout import FanoutPolicy
from stores.redis.candidates import AudienceReader
from stores.redis.features import OnlineFeatureStore
from stores.files.models import ModelRegistry
from stores.ranked import RankedFeedStore
from stores.ranker import ClaimRefresher, QueueConfig, RankingConfig, TriggerWriter
from domain.ranking import Debounce, RankingPolicy, ViralPolicy
from stores.cassandra.session import migrate
from schemas.events import EngagementEvent, EngagementKind, MediaType, PostEvent, PostEventKind
from schemas.features import FeatureValue
from schemas.ranking import RECENCY_VERSION, VIRAL, Candidate, RefreshRequest, decode_pending
from tests.integration.fanout_events import follow
from tests.integration.ranking_models import promote_toy_model
from domain.features import LIKE
from domain.social_features import SOCIAL_FEATURES
from stores.redis.social import SocialFacts

pytestmark = pytest.mark.integration

VIEWER, CELEB, FAN_A, FAN_B = 1, 99, 2, 3


def post(pid, author, t, media=MediaType.PHOTO):
    return PostEvent(f"c{pid}", t, PostEventKind.CREATED, pid, author, t, media)


@pytest.fixture
def world(stack, cassandra_session, keyspace, key_prefix, tmp_path):
    """Viewer 1 follows authors 10, 11, 12 (pushed) and celebrity 99 (pulled: 3
    followers, threshold 3). Author 10 posted 6 times, 11 and 12 once, the
    celebrity twice; the newest posts are author 10's."""
    migrate(cassandra_session, keyspace)
    stores = StoreConfig(stack.redis_url, key_prefix, stack.cassandra_host, stack.cassandra_port,
                         keyspace)
    opened = FeedStores.open(stores)
    fanout = FeedFanout(opened.redis, opened.cassandra, FanoutPolicy(
        push_threshold=3, celebrity_top_n=0))
    now = int(time.time() * 1000)
    t = now - 3_600_000
    fanout.apply([follow(VIEWER, a, t) for a in (10, 11, 12, CELEB)]
                 + [follow(u, CELEB, t) for u in (FAN_A, FAN_B)])
    posts = ([post(110, 11, t + 1000, MediaType.REEL), post(120, 12, t + 2000),
              post(990, CELEB, t + 3000), post(991, CELEB, t + 4000, MediaType.VIDEO)]
             + [post(100 + i, 10, t + 10_000 + i) for i in range(6)])
    fanout.apply(posts)
    features = OnlineFeatureStore(opened.redis.client, opened.redis.keys)
    features.write([FeatureValue("viewer_author", f"{VIEWER}:11", "affinity", 0.9, now - 60_000),
                    FeatureValue("viewer_author", f"{VIEWER}:12", "affinity", 0.7, now - 60_000)])
    config = RankingConfig(stores, model_dir=str(tmp_path / "models"), model_poll_s=0)
    policy = RankingPolicy(push_threshold=3, top_k=6, max_per_author=2)
    ranker = config.open(policy)
    reader = RankedFeedStore(opened.redis.client, opened.redis.keys, opened.cassandra)
    yield ranker, reader, ModelRegistry(config.model_dir), now
    ranker.close()
    opened.close()


@pytest.fixture
def stores_of(stack, cassandra_session, keyspace, key_prefix):
    migrate(cassandra_session, keyspace)
    opened = FeedStores.open(StoreConfig(stack.redis_url, key_prefix, stack.cassandra_host,
                                         stack.cassandra_port, keyspace))
    yield opened
    opened.close()


def ids(feed):
    return [e.post_id for e in feed.entries]


def authors(feed):
    return [e.author_id for e in feed.entries]


def test_recency_ranking_without_a_model_with_diversity(world):
    ranker, reader, _, now = world
    (outcome,) = ranker.refresh([RefreshRequest(VIEWER, now - 10)])
    assert outcome.model_version == RECENCY_VERSION and outcome.candidates == 10
    feed = reader.read(VIEWER)
    assert feed.model_version == RECENCY_VERSION
    # Newest first, but author 10's six newest posts are interleaved with the
    # others, at most 2 in the top 6, never two in a row while others remain.
    assert ids(feed) == [105, 991, 104, 990, 120, 110, 103, 102, 101, 100]
    assert authors(feed)[:6].count(10) == 2
    assert reader.read_durable(VIEWER) == feed
    # Celebrity posts were pulled from the timeline (not in the pushed feed).
    assert not {990, 991} & {p for p, _ in ranker.candidates.feeds.feed(VIEWER, 100)}


def test_model_scores_candidates_and_a_new_version_is_picked_up(world):
    ranker, reader, registry, now = world
    first = promote_toy_model(registry, "viewer_author_affinity", +1, at_ms=now - 5000)
    ranker.refresh([RefreshRequest(VIEWER, now)])
    feed = reader.read(VIEWER)
    assert feed.model_version == first
    assert set(ids(feed)[:2]) == {110, 120}  # the authors the viewer has an affinity to
    assert all(0.0 <= e.score <= 1.0 for e in feed.entries)

    # Hot swap: a new version in the directory is used by the next refresh.
    second = promote_toy_model(registry, "media_REEL", -1, at_ms=now - 1000)
    assert second != first
    time.sleep(0.002)  # a later generation time than the first ranking
    ranker.refresh([RefreshRequest(VIEWER, now)])
    feed = reader.read(VIEWER)
    assert feed.model_version == second
    assert min(feed.entries, key=lambda e: e.score).post_id == 110  # the only REEL
    assert ranker.models.swaps == 2


def test_a_social_model_scores_with_the_online_social_features(world):
    ranker, reader, registry, now = world
    # Followee 12 liked post 103 (author 10); nobody the viewer follows engaged with the rest.
    facts = SocialFacts(ranker.features.client, ranker.features.keys)
    engaged = facts.apply(np.array([LIKE, LIKE]), np.array([now - 60_000, now - 50_000]),
                          np.array([12, 77]), np.array([103, 104]), np.array([10, 10]))
    assert engaged == 2
    version = promote_toy_model(registry, "followee_engagers_recent", +1, at_ms=now - 5000,
                                community={10: 0, 11: 1, 12: 1})
    ranker.refresh([RefreshRequest(VIEWER, now)])
    feed = reader.read(VIEWER)
    assert feed.model_version == version
    assert ids(feed)[0] == 103
    rows = ranker.social_rows(ranker.candidates.columns([RefreshRequest(VIEWER, now)], now,
                                                        ranker.policy), now, {10: 0})
    assert sorted(rows[:, SOCIAL_FEATURES.index("followee_engagers_recent")].tolist())[-2:] \
        == [0.0, 1.0]


def test_new_posts_from_triggers_and_deletions(world):
    ranker, reader, _, now = world
    fresh = Candidate(555, 12, now - 1, "PHOTO")  # not written by the fan-out yet
    ranker.refresh([RefreshRequest(VIEWER, now, new_posts=(fresh,), deleted=frozenset({105}))])
    feed = reader.read(VIEWER)
    assert ids(feed)[0] == 555 and 105 not in ids(feed)


def test_a_user_without_candidates_gets_an_empty_ranking(world):
    ranker, reader, _, now = world
    (outcome,) = ranker.refresh([RefreshRequest(4242, now)])
    assert outcome.entries == 0
    feed = reader.read(4242)
    assert feed is not None and feed.entries == ()


def test_a_batch_ranks_each_user_as_a_refresh_of_that_user_alone(world):
    ranker, reader, registry, now = world
    promote_toy_model(registry, "viewer_author_affinity", +1, at_ms=now - 5000)
    users = [VIEWER, FAN_A, FAN_B, 4242]
    together = ranker.rank([RefreshRequest(u, now) for u in users], now)
    alone = [ranker.rank([RefreshRequest(u, now)], now).feeds[0] for u in users]
    assert together.feeds == alone
    assert [len(f.entries) for f in together.feeds] == [10, 2, 2, 0]   # fans: the celebrity


def test_a_celebrity_post_refreshes_a_bounded_audience(stores_of):
    """An author above the push threshold with 40 followers: a post queues refreshes for
    at most ``post_refresh_cap`` of them, the most engaged (still following, active)
    first, topped up in follow order; inactive followers are skipped."""
    redis = stores_of.redis
    now = int(time.time() * 1000)
    fanout = FeedFanout(redis, stores_of.cassandra, FanoutPolicy(push_threshold=5,
                                                                  celebrity_top_n=0))
    fans = list(range(100, 140))
    fanout.apply([follow(u, CELEB, now - 60_000 + i) for i, u in enumerate(fans)])
    redis.set_follower_engagement(CELEB, {139: 9.0, 138: 8.0, 137: 7.0, 5: 6.0})  # 5 left
    redis.set_last_read(138, now - 40 * 86_400_000)                               # inactive
    policy = RankingPolicy(push_threshold=5, post_refresh_cap=4)
    queue = QueueConfig(shards=2, debounce=Debounce(0, 1000, 1)).open(redis.client, redis.keys)
    writer = TriggerWriter(AudienceReader(redis), OnlineFeatureStore(redis.client, redis.keys),
                           queue, policy)
    result = writer.apply([post(777, CELEB, now)])
    assert result.reasons == {"post_created": 4}
    assert set(queue.pending()) == {139, 137, 100, 101}
    # Below the threshold every active follower is refreshed (here: cap 40).
    small = TriggerWriter(AudienceReader(redis), OnlineFeatureStore(redis.client, redis.keys),
                          queue, RankingPolicy(push_threshold=1000, post_refresh_cap=40))
    assert small.apply([post(778, CELEB, now)]).reasons == {"post_created": 39}


def test_a_post_going_viral_moves_up_in_the_feeds_that_hold_it(world):
    """Its engagement count jumps (features pipeline): the next engagement with it
    re-ranks its audience once for that level; the feed then puts it on top (a model
    that prefers engaged posts); a user is re-ranked for virality at most once per
    interval."""
    ranker, reader, registry, now = world
    redis = ranker.candidates.feeds
    features = OnlineFeatureStore(redis.client, redis.keys)
    promote_toy_model(registry, "post_like_1h", +1, at_ms=now - 5000)
    queue = QueueConfig(shards=1, debounce=Debounce(0, 1, 1)).open(redis.client, redis.keys)
    writer = TriggerWriter(AudienceReader(redis), features, queue, ranker.policy,
                           ViralPolicy(min_engagements=2, factor=2.0, user_interval_ms=60_000))
    claims = ClaimRefresher(ranker, queue, follow_wait=None)

    def refresh_queued():
        claim = queue.claim(0, int(time.time() * 1000) + 10, limit=10).refreshes
        claims.apply([claim])
        return claim

    # Every candidate starts with no likes (a missing value would take the toy
    # model's default branch, which may be the high one).
    features.write([FeatureValue("post", str(p), "like_1h", 0.0, now - 5000)
                    for p in (100, 101, 102, 103, 104, 105, 110, 120, 990, 991)])
    ranker.refresh([RefreshRequest(VIEWER, now)])
    assert ids(reader.read(VIEWER))[0] != 100   # author 10's oldest post: not on top
    like = EngagementEvent("l1", now, EngagementKind.LIKE, FAN_A, 10, 100, MediaType.PHOTO)
    # Engaged with, but not viral yet: only the liker is queued.
    writer.apply([like])
    assert [decode_pending(u, p)[1][0].reason for u, p in
            zip(*refresh_queued()[2:4])] == ["engaged"]
    features.write([FeatureValue("post", "100", "like_1h", 0.9, now - 1000)])
    writer.apply([like])
    refresh_queued()
    # 0.9 likes: below the minimum. Then 3 (level 1), then 3 again (same level).
    features.write([FeatureValue("post", "100", "like_1h", 3.0, now - 500)])
    result = writer.apply([dataclasses.replace(like, event_id="l2")])
    assert result.viral_posts == 1
    claim = refresh_queued()
    viral = {u for u, p in zip(claim.users, claim.payloads)
             if any(t.reason == VIRAL for t in decode_pending(u, p)[1])}
    assert viral == {VIEWER}   # author 10's only follower
    assert ids(reader.read(VIEWER))[0] == 100
    assert writer.apply([dataclasses.replace(like, event_id="l3")]).viral_posts == 0
    # Level 2 (8 likes): a new level, but the viewer was re-ranked for virality a
    # moment ago: rate-limited.
    features.write([FeatureValue("post", "100", "like_1h", 8.0, now - 100)])
    result = writer.apply([dataclasses.replace(like, event_id="l4")])
    assert result.viral_posts == 1 and VIRAL not in result.reasons


def test_a_post_ranked_before_the_fan_out_stored_it_stays_until_the_fan_out_has(world):
    """The ranking reads a new post before the fan-out writes it: its trigger carries
    it into the audience's refresh. A like refreshed before the fan-out caught up keeps
    it (remembered for the viewer's next rankings), where it used to drop it until the
    viewer's next change; once the fan-out has stored it, it is not remembered again.
    A post older than carry_unstored_ms is ranked but not remembered."""
    ranker, reader, _, now = world
    redis = ranker.candidates.feeds
    queue = QueueConfig(shards=1, debounce=Debounce(0, 1, 1)).open(redis.client, redis.keys)
    writer = TriggerWriter(AudienceReader(redis), OnlineFeatureStore(redis.client, redis.keys),
                           queue, ranker.policy, ViralPolicy())
    claims = ClaimRefresher(ranker, queue, follow_wait=None)
    carried = redis.keys.carried_posts(VIEWER)

    def refresh_queued():
        claim = queue.claim(0, int(time.time() * 1000) + 10, limit=10).refreshes
        assert claims.apply([claim]).outcomes

    fresh = post(556, 12, int(time.time() * 1000))  # author 12: the viewer follows
    writer.apply([fresh])
    refresh_queued()
    assert 556 in ids(reader.read(VIEWER))
    assert redis.client.hkeys(carried) == [b"556"] and ranker.carried == 1
    assert 0 < redis.client.pttl(carried) <= ranker.policy.carry_unstored_ms
    writer.apply([EngagementEvent("l1", int(time.time() * 1000), EngagementKind.LIKE, VIEWER,
                                  11, 110, MediaType.REEL)])
    refresh_queued()
    assert 556 in ids(reader.read(VIEWER)) and ranker.carried == 2
    FeedFanout(redis, None, FanoutPolicy(push_threshold=3, celebrity_top_n=0)).apply([fresh])
    ranker.refresh([RefreshRequest(VIEWER, int(time.time() * 1000))])
    assert 556 in ids(reader.read(VIEWER)) and ranker.carried == 2
    # Too old to remember: ranked from its trigger, then gone at the next ranking.
    writer.apply([post(557, 12, int(time.time() * 1000) - 61_000)])
    refresh_queued()
    assert 557 in ids(reader.read(VIEWER)) and ranker.carried == 2
    ranker.refresh([RefreshRequest(VIEWER, int(time.time() * 1000))])
    assert 557 not in ids(reader.read(VIEWER))
    # Created and deleted before the fan-out stores either: the deletion's refresh
    # forgets it, so a later ranking (a like) does not bring it back.
    doomed = post(558, 12, int(time.time() * 1000))
    writer.apply([doomed])
    refresh_queued()
    assert 558 in ids(reader.read(VIEWER)) and redis.client.hexists(carried, "558")
    writer.apply([dataclasses.replace(doomed, event_id="d558", kind=PostEventKind.DELETED)])
    refresh_queued()
    assert 558 not in ids(reader.read(VIEWER)) and not redis.client.hexists(carried, "558")
    ranker.refresh([RefreshRequest(VIEWER, int(time.time() * 1000))])
    assert 558 not in ids(reader.read(VIEWER))


def test_pending_refreshes_redis_lost_are_queued_again_from_the_recent_input(
        stack, stores_of, keyspace, key_prefix, kafka_topic):
    """Redis loses its data (the pending-refresh queue with it) while the trigger step
    runs: the next batch notices, Redis is restored from Cassandra, and the triggers of
    the recent input (read again from Kafka) are queued again."""
    from types import SimpleNamespace

    from confluent_kafka import Producer

    from jobs.clean import unlink_keys
    from pipelines.ranking import LossReplay, TriggerConfig
    from schemas.codec import WireCodec
    from stores.restore import RestoreSettings

    redis = stores_of.redis
    now = int(time.time() * 1000)
    FeedFanout(redis, stores_of.cassandra, FanoutPolicy(push_threshold=50, celebrity_top_n=0)
               ).apply([follow(u, 10, now - 60_000) for u in (2, 3)])
    prefix = f"{key_prefix}."
    topic = kafka_topic(partitions=1, name=prefix + PostEvent.TOPIC)
    created = post(500, 10, now)
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    producer.produce(topic, WireCodec().encode(created, topic), created.key, timestamp=now)
    assert producer.flush(30) == 0
    queue = QueueConfig(shards=2, debounce=Debounce(600_000, 1000, 1))  # none gets due here
    stores = StoreConfig(stack.redis_url, key_prefix, stack.cassandra_host, stack.cassandra_port,
                         keyspace)
    replay = LossReplay({"bootstrap.servers": stack.kafka_bootstrap}, (topic,), prefix,
                        window_ms=600_000)
    applier = TriggerConfig(stores, RankingPolicy(push_threshold=50), ViralPolicy(), queue,
                            RestoreSettings(), replay).open()
    pending = queue.open(redis.client, redis.keys)
    try:
        applier.apply([SimpleNamespace(events=[created])])
        assert set(pending.pending()) == {2, 3}
        unlink_keys(redis.client, f"{key_prefix}:*")  # Redis lost the prefix's data
        assert pending.pending() == {}
        applier.apply([SimpleNamespace(events=[post(501, 11, now + 1)])])  # no followers
        assert set(pending.pending()) == {2, 3}
    finally:
        applier.close()
