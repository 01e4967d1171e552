"""CassandraFeatureStore on the real Cassandra: newer-wins by write stamp, reads, refill of Redis."""
from __future__ import annotations

import pytest

from stores.cassandra.features import CassandraFeatureStore, refill_online
from stores.redis.features import OnlineFeatureStore
from stores.cassandra.session import migrate
from schemas.features import AFFINITY, AUTHOR, POST, VIEWER_AUTHOR, VIEWER_MEDIA, FeatureValue

pytestmark = pytest.mark.integration

NOW = 1_700_000_000_000


@pytest.fixture
def store(cassandra_session, keyspace):
    migrate(cassandra_session, keyspace)
    return CassandraFeatureStore(cassandra_session, keyspace)


def test_newer_stamp_wins_and_reads_back(store):
    old = FeatureValue(POST, "1", "like_1h", 5.0, NOW - 60_000)
    new = FeatureValue(POST, "1", "like_1h", 2.0, NOW)
    late_pane = FeatureValue(POST, "1", "like_1h", 3.0, NOW, version=1)
    store.write([new, late_pane])
    store.write([old, new])  # a replay of older values
    store.write([FeatureValue(AUTHOR, "45", "posts_7d", 4.0, NOW),
                 FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 1.5, NOW, 2),
                 FeatureValue(VIEWER_AUTHOR, "7:46", AFFINITY, 0.5, NOW - 1),
                 FeatureValue(VIEWER_MEDIA, "7:REEL", AFFINITY, 0.25, NOW)])
    assert store.read(POST, [1, 2]) == [[late_pane], []]
    assert store.read(AUTHOR, [45]) == [[FeatureValue(AUTHOR, "45", "posts_7d", 4.0, NOW)]]
    assert store.read(VIEWER_AUTHOR, [7]) == [[
        FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 1.5, NOW, 2),
        FeatureValue(VIEWER_AUTHOR, "7:46", AFFINITY, 0.5, NOW - 1)]]
    assert store.read(VIEWER_MEDIA, [7]) == [[FeatureValue(VIEWER_MEDIA, "7:REEL", AFFINITY,
                                                           0.25, NOW)]]
    with pytest.raises(ValueError, match="affinity"):
        store.write([FeatureValue(VIEWER_MEDIA, "7:REEL", "like_1h", 1.0, NOW)])


def test_refill_restores_redis_without_rolling_back_newer_values(store, stack, key_prefix):
    values = [FeatureValue(POST, str(p), "view_24h", float(p), NOW) for p in range(1, 6)]
    values += [FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 1.0, NOW),
               FeatureValue(AUTHOR, "45", "engagement_rate_7d", 0.5, NOW)]
    store.write(values)
    online = OnlineFeatureStore.from_url(stack.redis_url, key_prefix=key_prefix)
    try:
        # Redis already has a newer value for post 5 (the live pipeline moved on).
        online.write([FeatureValue(POST, "5", "view_24h", 50.0, NOW + 1)])
        counts = refill_online(store, online, batch_size=2)
        assert counts["read.post"] == 5 and counts["written.post"] == 4
        assert counts["read.viewer_media"] == 0
        got = online.hydrate(7, [1, 3, 5], [45], NOW + 10)
        assert got.posts == [{"view_24h": 1.0}, {"view_24h": 3.0}, {"view_24h": 50.0}]
        assert got.authors == [{"engagement_rate_7d": 0.5}]
        assert got.author_affinity == [pytest.approx(1.0)]
    finally:
        online.close()
