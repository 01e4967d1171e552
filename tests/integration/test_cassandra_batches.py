"""Unlogged batches bounded by bytes on the real Cassandra: the 61 KB post of issue 25,
written in one block with ordinary rows, no longer makes a batch the server refuses."""
from __future__ import annotations

import pytest

from schemas.events import FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind
from stores.cassandra.feeds import CassandraFeedStore
from stores.cassandra.session import migrate
from stores.config import DEFAULT_CASSANDRA_BATCH_ROWS, StoreConfig
from stores.fanout import FeedStores

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def test_a_huge_post_among_ordinary_writes_is_stored(stack, keyspace, cassandra_session):
    migrate(cassandra_session, keyspace)
    store = CassandraFeedStore(cassandra_session, keyspace, batch_rows=50)
    huge = PostEvent("p-big", T0, PostEventKind.CREATED, 900001, 2, T0, MediaType.PHOTO, 1,
                     tuple(("h%03d" % i) * 25 for i in range(600)))
    posts = [PostEvent(f"p{i}", T0 + i, PostEventKind.CREATED, 100 + i, 2, T0 + i)
             for i in range(20)]
    with store.deferred():
        for post in posts[:10] + [huge] + posts[10:]:
            store.put_post(post)
        store.apply_edges([FollowEvent(f"f{i}", T0, FollowKind.FOLLOW, i, 2)
                           for i in range(1, 30)])
    stored = store.posts([huge.post_id, posts[0].post_id, posts[-1].post_id])
    assert stored[0]["hashtags"] == huge.hashtags
    assert stored[1] is not None and stored[2] is not None
    assert sorted(store.followers(2)) == list(range(1, 30))


@pytest.mark.parametrize("rows", [DEFAULT_CASSANDRA_BATCH_ROWS, 7])
def test_a_store_opened_from_the_config_writes_in_its_batches(stack, keyspace, cassandra_session,
                                                              rows):
    """The rows per batch a job is given (``--cassandra_batch_rows``, default or not)
    reach its store, and the server takes batches of that many graph rows whole."""
    migrate(cassandra_session, keyspace)
    store = FeedStores.open_cassandra(StoreConfig(
        stack.redis_url, "fb", stack.cassandra_host, stack.cassandra_port, keyspace,
        cassandra_batch_rows=rows))
    try:
        assert store.batch_rows == rows
        store.apply_edges([FollowEvent(f"f{i}", T0 + i, FollowKind.FOLLOW, i, 3)
                           for i in range(1, 1001)])
        assert store.followers(3) == list(range(1, 1001))
        assert all(store.following(i) == [3] for i in (1, 500, 1000))
    finally:
        store.close()
