"""The key layout against the real Redis: what a writer stores a reader finds."""
from __future__ import annotations

import pytest

from schemas.keys import KeyLayout

pytestmark = pytest.mark.integration


def test_feed_zset_written_and_read_through_the_layout(redis_client, key_prefix):
    writer, reader = KeyLayout(key_prefix), KeyLayout(key_prefix)
    t0 = 1_700_000_000_000
    with redis_client.pipeline(transaction=False) as pipe:
        pipe.zadd(writer.home_feed(7), {"101": t0, "102": t0 + 10, "103": t0 + 5})
        pipe.zadd(writer.home_feed(7), {"101": t0})  # re-delivery: no duplicate
        pipe.hset(writer.post(102), mapping={"author_id": 3, "created_at": t0 + 10})
        pipe.execute()
    newest = redis_client.zrevrange(reader.home_feed(7), 0, -1, withscores=True)
    assert newest == [(b"102", t0 + 10), (b"103", t0 + 5), (b"101", t0)]
    assert redis_client.hget(reader.post(102), "author_id") == b"3"
    assert redis_client.zcard(reader.home_feed(8)) == 0


def test_ranked_feed_swap_in_one_transaction(redis_client, key_prefix):
    keys = KeyLayout(key_prefix)
    redis_client.set(keys.ranked_feed(5), b"first")
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.rename(keys.ranked_feed(5), keys.ranked_feed_previous(5))
        pipe.set(keys.ranked_feed(5), b"second")
        pipe.execute()
    assert redis_client.get(keys.ranked_feed(5)) == b"second"
    assert redis_client.get(keys.ranked_feed_previous(5)) == b"first"


def test_prefixes_isolate(redis_client, key_prefix):
    a, b = KeyLayout(key_prefix + "a"), KeyLayout(key_prefix + "b")
    redis_client.zadd(a.home_feed(1), {"1": 1})
    redis_client.set(a.dedup("fanout", "ev-1"), 1, nx=True, ex=60)
    assert redis_client.zcard(b.home_feed(1)) == 0
    assert redis_client.set(b.dedup("fanout", "ev-1"), 1, nx=True, ex=60)
    found = {k.decode() for k in redis_client.scan_iter(match=a.pattern(), count=1000)}
    assert found == {a.home_feed(1), a.dedup("fanout", "ev-1")}
