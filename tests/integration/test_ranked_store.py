"""RankedFeedStore against the real Redis and Cassandra: rank order kept exactly,
newer-wins replacement in both stores, the previous version kept for paging,
and the async reader seeing what the sync writer wrote.

Run: ``python -m pytest tests/integration/test_ranked_store.py``
"""
from __future__ import annotations

import asyncio

import pytest

from stores.cassandra.feeds import CassandraFeedStore
from stores.ranked import AsyncRankedReader, RankedFeedStore
from stores.cassandra.session import migrate
from schemas.keys import KeyLayout
from schemas.ranked import RankedEntry, RankedFeed

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
E = RankedEntry


@pytest.fixture
def store(redis_client, key_prefix, cassandra_session, keyspace):
    migrate(cassandra_session, keyspace)
    return RankedFeedStore(redis_client, KeyLayout(key_prefix),
                           CassandraFeedStore(cassandra_session, keyspace))


def test_rank_order_survives_scores_out_of_order(store):
    # Diversity re-ranking put 12 (score 0.5) above 13 (score 0.9).
    entries = [E(11, 1, 0.7), E(12, 2, 0.5), E(13, 1, 0.9), E(14, 3, 0.1)]
    assert store.write(7, entries, "xgb-1", T0) is True
    expected = RankedFeed(7, tuple(entries), "xgb-1", T0)
    assert store.read(7) == expected
    assert store.read_durable(7) == expected
    page = store.read_page(7, start=1, count=2)
    assert page.entries == (E(12, 2, 0.5), E(13, 1, 0.9))
    assert (page.start, page.total, page.model_version, page.generated_at_ms) == (1, 4, "xgb-1", T0)
    assert store.read_page(7, start=3, count=5).entries == (E(14, 3, 0.1),)
    assert store.read_page(7, start=4, count=5).entries == ()


def test_older_ranking_never_replaces_newer_in_either_store(store):
    newer = [E(21, 1, 2.0), E(22, 2, 1.0)]
    assert store.write(7, newer, "xgb-2", T0 + 10) is True
    assert store.write(7, [E(31, 1, 9.0)], "xgb-1", T0 + 5) is False      # late, older
    assert store.write(7, newer, "xgb-2", T0 + 10) is False                # replayed: no-op
    want = RankedFeed(7, tuple(newer), "xgb-2", T0 + 10)
    assert store.read(7) == want and store.read_durable(7) == want


def test_replacement_keeps_previous_version_for_readers_paging_through_it(store):
    first = [E(p, p % 3, 1.0 / p) for p in range(1, 11)]
    store.write(7, first, "m1", T0)
    store.write(7, [E(100, 5, 1.0)], "m2", T0 + 1)
    old = store.read_page(7, start=5, count=3, generated_at_ms=T0)
    assert old.requested_version and old.entries == tuple(first[5:8])
    assert 0 < store.redis.ttl(store.keys.ranked_feed_previous(7)) <= store.keep_previous_s
    # Two replacements later the first version is gone: the current one is served, flagged.
    store.write(7, [E(200, 5, 1.0)], "m3", T0 + 2)
    gone = store.read_page(7, start=0, count=3, generated_at_ms=T0)
    assert not gone.requested_version and gone.entries == (E(200, 5, 1.0),)
    assert gone.model_version == "m3"


def test_empty_ranking_and_unknown_user(store):
    assert store.read(8) is None and store.read_durable(8) is None
    store.write(8, [E(1, 1, 1.0)], "m1", T0)
    store.write(8, [], "m1", T0 + 1)
    assert store.read(8) == RankedFeed(8, (), "m1", T0 + 1)
    assert store.read_durable(8) == RankedFeed(8, (), "m1", T0 + 1)


def test_bad_input_is_refused_before_writing(store):
    with pytest.raises(ValueError, match="twice"):
        store.write(9, [E(1, 1, 1.0), E(1, 1, 0.5)], "m1", T0)
    with pytest.raises(ValueError, match="non-finite"):
        store.write(9, [E(1, 1, float("nan"))], "m1", T0)
    assert store.read(9) is None and store.read_durable(9) is None


def test_large_ranking_and_async_reader(store, stack, key_prefix):
    import redis.asyncio as aioredis

    entries = [E(p, p % 17, float(p)) for p in range(2500)]
    store.write(7, entries, "m1", T0)
    assert store.read(7).entries == tuple(entries)

    async def read():
        client = aioredis.Redis.from_url(stack.redis_url)
        try:
            return await AsyncRankedReader(client, KeyLayout(key_prefix)).read_page(7, 1200, 5)
        finally:
            await client.aclose()

    page = asyncio.run(read())
    assert page.entries == tuple(entries[1200:1205]) and page.total == 2500


def test_connect_opens_and_closes_its_own_clients(stack, cassandra_session, keyspace, key_prefix):
    migrate(cassandra_session, keyspace)
    store = RankedFeedStore.connect(stack.redis_url, key_prefix, stack.host,
                                    stack.cassandra_port, keyspace)
    try:
        store.write(3, [E(1, 2, 0.5)], "m1", T0)
        assert store.read(3) == store.read_durable(3) == RankedFeed(3, (E(1, 2, 0.5),), "m1", T0)
    finally:
        store.close()
    assert store.cassandra._cluster is None


def test_a_feed_of_the_layout_before_reads_as_none_and_is_replaced(store):
    # Before one string per feed: a ZSET of ranks and a meta HASH (docs/operations.md).
    k = store.keys
    store.redis.zadd(k.ranked_feed(6), {"9": 2.0, "8": 1.0})
    store.redis.hset(k.ranked_meta(6), mapping={"model_version": "m0", "generated_at": T0 + 50})
    assert store.read(6) is None
    assert store.write(6, [E(1, 1, 1.0)], "m1", T0) is True
    assert store.read(6) == RankedFeed(6, (E(1, 1, 1.0),), "m1", T0)
    assert not store.redis.exists(k.ranked_meta(6))
