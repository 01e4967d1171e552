"""Pure parts of the feed stores: edge versions, encodings, chunking, retry rules."""
from __future__ import annotations

import itertools
import re
from datetime import datetime

import pytest

from stores.cassandra import feeds as cstore
from stores.redis import client as redis_client
from stores.retry import RetryPolicy, is_transient
from stores.redis import feeds as rstore
from schemas.cassandra import FEED_BUCKET_MS
from schemas.events import FollowEvent, FollowKind, MediaType, PostEvent, PostEventKind
from schemas.keys import KeyLayout

T0 = 1_700_000_000_000


def _edge(kind: FollowKind, t: int) -> FollowEvent:
    return FollowEvent("e", t, kind, 10, 1)


def _final_state(events: list[FollowEvent]) -> bool:
    """Whether the edge exists after applying ``events`` in order, newer-version-wins."""
    best = None
    for e in events:
        if best is None or rstore.edge_version(e) > rstore.edge_version(best):
            best = e
    return best is not None and best.kind is FollowKind.FOLLOW


def test_edge_version_orders_by_time_then_unfollow_wins_ties():
    f1, u2, f3 = _edge(FollowKind.FOLLOW, T0 + 1), _edge(FollowKind.UNFOLLOW, T0 + 2), \
        _edge(FollowKind.FOLLOW, T0 + 3)
    assert rstore.edge_version(f1) < rstore.edge_version(u2) < rstore.edge_version(f3)
    tie_f, tie_u = _edge(FollowKind.FOLLOW, T0), _edge(FollowKind.UNFOLLOW, T0)
    assert rstore.edge_version(tie_u) > rstore.edge_version(tie_f)
    # Exact in a Lua double for any realistic event time.
    assert rstore.edge_version(_edge(FollowKind.UNFOLLOW, 4_102_444_800_000)) < 2 ** 53


@pytest.mark.parametrize("events, following", [
    ([(FollowKind.UNFOLLOW, 2), (FollowKind.FOLLOW, 1)], False),
    ([(FollowKind.UNFOLLOW, 2), (FollowKind.FOLLOW, 1), (FollowKind.FOLLOW, 3)], True),
    ([(FollowKind.FOLLOW, 5), (FollowKind.UNFOLLOW, 5)], False),
])
def test_any_arrival_order_gives_the_same_edge(events, following):
    edges = [_edge(k, T0 + t) for k, t in events]
    for order in itertools.permutations(edges):
        assert _final_state(list(order)) is following


def test_chunks_and_trim_stop():
    assert [list(c) for c in redis_client.chunks([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]
    assert list(redis_client.chunks([], 3)) == []
    with pytest.raises(ValueError):
        list(redis_client.chunks([1], 0))
    assert rstore.trim_stop(1000) == -1001
    with pytest.raises(ValueError):
        rstore.trim_stop(0)


def test_pushes_group_by_feed_only_where_feeds_share_posts():
    """Per user (ascending) the indices of its posts, ascending, 4 bytes big-endian
    each, as ``_PUSH_BY_FEED`` reads them; nothing where the users get fewer posts
    each than asked on average."""
    def indices(*values: int) -> bytes:
        return b"".join(v.to_bytes(4, "big") for v in values)

    lists = [[30, 10], [10], [], [20, 30, 10]]
    assert rstore._posts_by_feed(lists, 2.0) == (
        [10, 20, 30], [indices(0, 1, 3), indices(3), indices(0, 3)])
    assert rstore._posts_by_feed(lists, 2.0 + 1e-9) is None     # 6 entries for 3 users
    assert rstore._posts_by_feed([[7], [8]], 1.0) == ([7, 8], [indices(0), indices(1)])
    assert rstore._posts_by_feed([[], []], 0.0) is None
    assert rstore._posts_by_feed(lists, float("inf")) is None
    many = [[5]] * 70_000 + [[6]]                   # indices past two bytes
    assert rstore._posts_by_feed(many, 1.0) == ([5, 6], [indices(*range(70_000)),
                                                          indices(70_000)])
    big = [list(range(u, 2_000, 3)) for u in range(12)]
    feeds, packed = rstore._posts_by_feed(big, 1.0)
    assert feeds == list(range(2_000))
    for user, posts in zip(feeds, packed):
        assert posts == indices(*[i for i in range(12) if i % 3 == user % 3 and user >= i])


def test_post_hash_round_trip():
    event = PostEvent("p1", T0 + 5, PostEventKind.CREATED, 100, 3, T0, MediaType.REEL, 42,
                      ("a", "b,c"))
    fields = rstore.post_fields(event)
    assert all(isinstance(v, str) for v in fields.values())
    as_redis_returns = {k.encode(): v.encode() for k, v in fields.items()}
    meta = rstore.parse_post(100, as_redis_returns)
    assert meta == rstore.post_meta_from_event(event)
    assert meta["hashtags"] == ("a", "b,c") and meta["deleted"] is False
    assert rstore.parse_post(100, {}) is None
    tomb = rstore.parse_post(100, {b"author_id": b"3", b"created_at": str(T0).encode(),
                                   b"deleted": b"1", b"deleted_at": b"9"})
    assert tomb["deleted"] is True and tomb["hashtags"] == () and tomb["media_type"] is None


def test_new_keys_share_the_users_tag():
    k = KeyLayout("fb")
    tags = {re.search(r"\{([^}]*)\}", f(7)).group(1)
            for f in (k.followers, k.follower_edges, k.top_followers, k.following,
                      k.following_edges, k.home_feed, k.unfollowed)}
    assert tags == {"u:7"}
    assert len({k.follower_edges(7), k.following_edges(7), k.top_followers(7)}) == 3


def test_transient_errors_are_retried_others_are_not():
    import redis
    from cassandra import InvalidRequest, OperationTimedOut, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable

    assert is_transient(OperationTimedOut())
    assert is_transient(WriteTimeout("slow", write_type=0))
    assert is_transient(Unavailable("down"))
    assert is_transient(NoHostAvailable("none", {}))
    assert is_transient(redis.ConnectionError("reset"))
    assert not is_transient(InvalidRequest("bad cql"))
    assert not is_transient(redis.ResponseError("WRONGTYPE"))
    assert not is_transient(ValueError())
    assert RetryPolicy(attempts=7, first_delay_s=0.05, max_delay_s=1.0).delays() == [
        0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert RetryPolicy(attempts=1).delays() == []


def test_the_policy_retries_transient_errors_only_and_gives_up_after_its_attempts(monkeypatch):
    import time

    from cassandra import InvalidRequest, OperationTimedOut

    monkeypatch.setattr(time, "sleep", lambda s: None)
    policy = RetryPolicy(attempts=3, first_delay_s=0.0, max_delay_s=0.0)
    calls, retried = [], []

    def flaky(errors):
        def call():
            calls.append(1)
            if errors:
                raise errors.pop(0)
            return "done"
        return call

    assert policy.call(flaky([OperationTimedOut()] * 2), on_retry=retried.append) == "done"
    assert len(calls) == 3 and len(retried) == 2
    calls.clear()
    with pytest.raises(OperationTimedOut):
        policy.call(flaky([OperationTimedOut()] * 3))
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(InvalidRequest):
        policy.call(flaky([InvalidRequest("bad")]))
    assert len(calls) == 1


def test_timestamps_and_buckets():
    assert cstore.to_ms(datetime(2023, 11, 14, 22, 13, 20, 123000)) == T0 + 123
    assert cstore.to_ms(datetime(1970, 1, 1)) == 0 and cstore.to_ms(None) is None
    b = T0 // FEED_BUCKET_MS
    assert cstore.plan_buckets(T0, 3) == [b, b - 1, b - 2]


def test_dump_rows_sort_with_missing_values():
    rows = [{"a": 2, "b": None}, {"a": 1, "b": (1,)}, {"a": 2, "b": (0,)}]
    assert sorted(rows, key=cstore._sort_key) == [
        {"a": 1, "b": (1,)}, {"a": 2, "b": None}, {"a": 2, "b": (0,)}]
    assert cstore._plain([datetime(1970, 1, 1, 0, 0, 1)]) == (1000,)


class _FlakyCassandra:
    """Stands in for ``execute_concurrent``: fails chosen statements a number of times."""

    def __init__(self, failures: dict[str, list[BaseException]]):
        self.failures = failures
        self.calls: list[list[str]] = []

    def __call__(self, session, work, concurrency, raise_on_first_error):
        self.calls.append([stmt for stmt, _ in work])
        out = []
        for stmt, params in work:
            errors = self.failures.get(stmt)
            out.append((False, errors.pop(0)) if errors else (True, (stmt, params)))
        return out


def _store_with(monkeypatch, fake) -> cstore.CassandraFeedStore:
    import cassandra.concurrent

    monkeypatch.setattr(cassandra.concurrent, "execute_concurrent", fake)
    monkeypatch.setattr(cstore.time, "sleep", lambda s: None)
    return cstore.CassandraFeedStore(
        object(), "ks", retry=RetryPolicy(attempts=3, first_delay_s=0.0, max_delay_s=0.0))


def test_only_transiently_failed_statements_are_re_executed(monkeypatch):
    from cassandra import OperationTimedOut

    fake = _FlakyCassandra({"b": [OperationTimedOut()]})
    store = _store_with(monkeypatch, fake)
    assert store._execute([("a", (1,)), ("b", (2,)), ("c", (3,))]) == [
        ("a", (1,)), ("b", (2,)), ("c", (3,))]
    assert fake.calls == [["a", "b", "c"], ["b"]]
    assert (store.stats.written, store.stats.retried, store.stats.failed) == (3, 1, 0)


def test_permanent_errors_and_exhausted_retries_raise(monkeypatch):
    from cassandra import InvalidRequest, OperationTimedOut

    store = _store_with(monkeypatch, _FlakyCassandra({"a": [InvalidRequest("bad")]}))
    with pytest.raises(InvalidRequest):
        store._execute([("a", ())])
    assert store.stats.failed == 1 and store.stats.retried == 0

    fake = _FlakyCassandra({"a": [OperationTimedOut() for _ in range(5)]})
    store = _store_with(monkeypatch, fake)
    with pytest.raises(OperationTimedOut):
        store._execute([("a", ())])
    assert len(fake.calls) == 3  # the policy's 3 attempts
    assert (store.stats.retried, store.stats.failed) == (2, 1)


def test_writes_are_packed_into_unlogged_batches():
    from cassandra.query import BatchStatement, BatchType

    work = [("INSERT %s", (i,)) for i in range(5)]
    packed = cstore.pack_batches(work, batch_rows=2)
    assert [type(stmt) for stmt, _ in packed] == [BatchStatement, BatchStatement, str]
    assert packed[2] == ("INSERT %s", (4,))
    assert all(b.batch_type == BatchType.UNLOGGED and b.is_idempotent and p is None
               for b, p in packed[:2])
    assert [len(b._statements_and_parameters) for b, _ in packed[:2]] == [2, 2]
    assert cstore.pack_batches(work, batch_rows=1) == work


def test_deferred_writes_run_once_at_the_end_and_are_dropped_on_error(monkeypatch):
    fake = _FlakyCassandra({})
    store = _store_with(monkeypatch, fake)
    store.batch_rows = 1
    with store.deferred():
        store._write([("a", (1,))])
        with store.deferred():  # nested: joins the outer block
            store._write([("b", (2,))])
        assert fake.calls == []
    assert fake.calls == [["a", "b"]]

    with pytest.raises(RuntimeError):
        with store.deferred():
            store._write([("c", (3,))])
            raise RuntimeError("batch failed")
    store._write([("d", (4,))])  # not deferred any more: runs at once
    assert fake.calls == [["a", "b"], ["d"]]
