"""``FeedRanker`` against the real Redis and Cassandra: candidates, scoring, diversity,
recency fallback and a model hot swap.

The feeds, timelines and graph are written by the fan-out's own ``FeedFanout``
(push below the threshold, timeline above it), the features by the features
pipeline's ``OnlineFeatureStore``; the ranked feeds are read back through
``RankedFeedStore``, Redis and Cassandra both.
"""
from __future__ import annotations

import time

import pytest

from stores.config import StoreConfig
from stores.fanout import FeedFanout, FeedStores
from domain.fanout import FanoutPolicy
from stores.redis.features import OnlineFeatureStore
from stores.files.models import ModelRegistry
from stores.ranked import RankedFeedStore
from stores.ranker import RankingConfig
from domain.ranking import RankingPolicy
from stores.cassandra.session import migrate
from schemas.events import MediaType, PostEvent, PostEventKind
from schemas.features import FeatureValue
from schemas.ranking import RECENCY_VERSION, Candidate, RefreshRequest
from tests.integration.fanout_events import follow
from tests.integration.ranking_models import promote_toy_model

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
    stores = StoreConfig(stack.redis_url, key_prefix, stack.host, stack.cassandra_port, keyspace)
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
