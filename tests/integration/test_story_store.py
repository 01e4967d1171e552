"""The story stores against the real Redis and Cassandra: publish, views, delete,
expiry removal, tray order, read-time expiry filtering, mark_seen, the expiry
index sweep, and idempotent redelivery. Both backends run the same read tests.

Run: ``.venv/bin/python -m pytest tests/integration/test_story_store.py``
"""
from __future__ import annotations

import time

import pytest

from stores.redis.feeds import RedisFeedStore
from stores.cassandra.stories import CassandraStoryStore
from stores.redis.stories import RedisStoryStore
from domain.stories import StoryPolicy
from stores.cassandra.session import migrate
from schemas.events import MediaType, StoryEvent, StoryEventKind
from schemas.keys import KeyLayout
from stores.stories import StoryWriter

pytestmark = pytest.mark.integration

MIN = 60_000
POLICY = StoryPolicy(grace_ms=10 * MIN)


def now_ms() -> int:
    return int(time.time() * 1000)


def published(story: int, author: int, created: int, life_ms: int = 30 * MIN) -> StoryEvent:
    return StoryEvent(f"pub-{story}", created, StoryEventKind.PUBLISHED, story, author,
                      created_at=created, expires_at=created + life_ms,
                      media_type=MediaType.PHOTO)


def viewed(story: int, author: int, viewer: int, at: int) -> StoryEvent:
    return StoryEvent(f"view-{story}-{viewer}-{at}", at, StoryEventKind.VIEWED, story, author,
                      viewer_id=viewer)


def deleted(story: int, author: int, at: int) -> StoryEvent:
    return StoryEvent(f"del-{story}", at, StoryEventKind.DELETED, story, author)


class Both:
    """Writes through ``StoryWriter`` (as the pipeline does: Redis decides what is
    accepted, Cassandra follows) at a given wall-clock time, so each store's
    reads can be checked."""

    def __init__(self, redis_store: RedisStoryStore, cassandra_store: CassandraStoryStore):
        self.redis, self.cassandra = redis_store, cassandra_store
        self.now = 0
        self.writer = StoryWriter(redis_store, cassandra_store, clock=lambda: self.now)

    def apply(self, events, now) -> list[str]:
        self.now = now
        return [o.action for o in self.writer.apply(events)]

    publish = view = apply

    def delete(self, story, author, now):
        self.now = now
        (outcome,) = self.writer.apply([deleted(story, author, now)])
        return outcome

    def expire(self, story, author, expires, now):
        self.now = now
        return self.writer.expire(story, author, expires)


@pytest.fixture
def stores(redis_client, key_prefix, cassandra_session, keyspace) -> Both:
    migrate(cassandra_session, keyspace)
    return Both(RedisStoryStore(redis_client, KeyLayout(key_prefix), POLICY),
                CassandraStoryStore(cassandra_session, keyspace, POLICY))


@pytest.fixture(params=["redis", "cassandra"])
def reader(request, stores):
    """Each backend's read side in turn."""
    return getattr(stores, request.param)


def redis_dump(stores: Both) -> dict:
    return RedisFeedStore(stores.redis.client, stores.redis.keys).dump()


def test_tray_orders_unseen_first_then_most_recent(stores, reader):
    t = now_ms()
    stores.publish([published(11, 1, t - 5 * MIN), published(12, 1, t - 4 * MIN),
                    published(21, 2, t - 3 * MIN), published(31, 3, t - 2 * MIN),
                    published(41, 4, t - 1 * MIN)], t)
    # Viewer 9 saw everything of author 3 and one of author 1's two stories.
    assert stores.view([viewed(31, 3, 9, t), viewed(11, 1, 9, t)], t) == ["viewed", "viewed"]
    tray = reader.tray(9, [1, 2, 3, 5], t, limit=10)   # 4 not followed, 5 has nothing
    assert [e.author_id for e in tray] == [2, 1, 3]
    assert [(e.unseen, e.latest_created_at) for e in tray] == [
        (1, t - 3 * MIN), (1, t - 4 * MIN), (0, t - 2 * MIN)]
    assert [(s.story_id, s.seen) for s in tray[1].stories] == [(11, True), (12, False)]
    assert [e.author_id for e in reader.tray(9, [1, 2, 3], t, limit=2)] == [2, 1]
    assert reader.tray(9, [1, 2, 3], t, limit=0) == []


def test_expired_stories_are_filtered_at_read_without_removal(stores, reader):
    t = now_ms()
    stores.publish([published(11, 1, t - 5 * MIN, life_ms=10 * MIN),
                    published(12, 1, t - 1 * MIN, life_ms=10 * MIN)], t)
    later = t + 6 * MIN   # 11 expired (at t + 5 min), 12 not; no removal has run
    assert [s.story_id for s in reader.active_stories(1, later)] == [12]
    assert [s.story_id for s in reader.tray(9, [1], later, 10)[0].stories] == [12]
    assert reader.tray(9, [1], t + 9 * MIN, 10) == []   # both expired
    # Exactly at expires_at the story is gone.
    assert reader.tray(9, [1], t + 5 * MIN, 10)[0].stories[0].story_id == 12


def test_publish_and_views_are_idempotent(stores, reader):
    t = now_ms()
    pub = published(11, 1, t - MIN)
    views = [viewed(11, 1, 7, t), viewed(11, 1, 8, t), viewed(11, 1, 7, t + 1)]
    assert stores.publish([pub], t) == ["published"]
    assert stores.view(views, t) == ["viewed"] * 3
    before = (redis_dump(stores), stores.cassandra.dump())
    stores.publish([pub], t + 5)
    stores.view(views, t + 5)
    assert (redis_dump(stores), stores.cassandra.dump()) == before
    assert reader.viewers(11) == [7, 8]
    assert reader.story(11).views == 2
    assert reader.seen(7, t) == {11} and reader.seen(8, t) == {11}


def test_views_never_create_state(stores):
    t = now_ms()
    stores.publish([published(11, 1, t - 20 * MIN, life_ms=30 * MIN)], t)
    before = (redis_dump(stores), stores.cassandra.dump())
    statuses = stores.view([
        viewed(99, 1, 7, t),                  # unknown story
        viewed(11, 1, 7, t + 10 * MIN),       # at expires_at (event time): too late
    ], t)
    assert statuses == ["view_unknown", "view_late"]
    # Applied after the story expired (a backlog drained late): refused too.
    assert stores.view([viewed(11, 1, 8, t)], t + 11 * MIN) == ["view_expired"]
    assert (redis_dump(stores), stores.cassandra.dump()) == before


def test_publish_refusals(stores):
    t = now_ms()
    assert stores.publish([published(11, 1, t - 40 * MIN, life_ms=30 * MIN),
                           published(12, 1, t, life_ms=8 * 24 * 60 * MIN)], t) == [
        "expired", "beyond_horizon"]
    assert redis_dump(stores) == {}
    assert all(rows == [] for rows in stores.cassandra.dump().values())


def test_delete_removes_everything_and_blocks_a_replayed_publish(stores, reader):
    t = now_ms()
    pub = published(11, 1, t - MIN)
    stores.publish([pub, published(12, 1, t)], t)
    stores.view([viewed(11, 1, 7, t), viewed(11, 1, 8, t), viewed(12, 1, 7, t)], t)
    outcome = stores.delete(11, 1, t)
    assert (outcome.action, outcome.author_id, outcome.expires_at) == ("deleted", 1, pub.expires_at)
    assert [s.story_id for s in reader.active_stories(1, t)] == [12]
    assert reader.story(11) is None and reader.viewers(11) == []
    assert reader.seen(7, t) == {12} and reader.seen(8, t) == set()
    # Redelivered publish and view: refused, nothing comes back.
    assert stores.publish([pub], t + 1) == ["tombstoned"]
    assert stores.view([viewed(11, 1, 9, t + 1)], t + 1) == ["view_deleted"]
    assert reader.story(11) is None and reader.viewers(11) == []
    # The tombstone expires with the story (+ grace).
    ttl_ms = stores.redis.client.pttl(stores.redis.keys.story(11))
    assert 0 < ttl_ms <= pub.expires_at + POLICY.grace_ms - t
    # Deleting again (a redelivery, even with Cassandra's rows gone) is a no-op.
    snapshot = (redis_dump(stores), stores.cassandra.dump())
    assert stores.delete(11, 1, t + 2).expires_at == pub.expires_at
    assert (redis_dump(stores), stores.cassandra.dump()) == snapshot


def test_expiry_removal_leaves_only_a_tombstone(stores):
    t = now_ms()
    pub = published(11, 1, t - MIN)
    stores.publish([pub], t)
    stores.view([viewed(11, 1, 7, t)], t)
    expired = stores.expire(11, 1, pub.expires_at, t + 5)
    assert (expired.story_id, expired.author_id, expired.removed_at) == (11, 1, t + 5)
    story_key = stores.redis.keys.story(11)
    assert redis_dump(stores) == {story_key: {
        "author_id": "1", "expires_at": str(pub.expires_at), "removed": "expired"}}
    assert 0 < stores.redis.client.pttl(story_key) <= pub.expires_at + POLICY.grace_ms - t
    assert all(rows == [] for rows in stores.cassandra.dump().values())
    # Replays after the removal (the watermark ran ahead of the wall clock)
    # bring nothing back: Redis refuses, Cassandra's writes are shadowed.
    assert stores.publish([pub], t + 6) == ["tombstoned"]
    assert stores.view([viewed(11, 1, 8, t)], t + 6) == ["view_expired"]
    stores.cassandra.publish([pub], t)
    stores.cassandra.record_views([(viewed(11, 1, 7, t), 1, pub.expires_at)], t)
    assert all(rows == [] for rows in stores.cassandra.dump().values())
    # An expiry after a delete keeps the delete's tombstone.
    stores.publish([published(12, 1, t)], t)
    stores.delete(12, 1, t + 1)
    # (a timer re-armed after the delete: nothing to announce)
    assert stores.expire(12, 1, t + 30 * MIN, t + 2) is None
    assert redis_dump(stores)[stores.redis.keys.story(12)]["removed"] == "deleted"


def test_keys_and_rows_expire_with_the_story(stores):
    t = now_ms()
    pub = published(11, 1, t - MIN)
    stores.publish([pub], t)
    stores.view([viewed(11, 1, 7, t)], t)
    limit_ms = pub.expires_at + POLICY.grace_ms - t
    keys = stores.redis.keys
    for key in (keys.story(11), keys.story_viewers(11), keys.author_stories(1),
                keys.seen_stories(7)):
        assert 0 < stores.redis.client.pttl(key) <= limit_ms, key
    ks = stores.cassandra.keyspace
    session = stores.cassandra._db.session
    ttl = session.execute(f"SELECT TTL(created_at) AS t FROM {ks}.stories_by_author "
                          "WHERE author_id = 1 AND story_id = 11").one().t
    assert 0 < ttl <= limit_ms / 1000 + 1


def test_mark_seen(stores, reader):
    t = now_ms()
    stores.publish([published(11, 1, t - MIN, life_ms=10 * MIN)], t)
    assert reader.mark_seen(7, 11, t) is True
    assert reader.seen(7, t) == {11}
    assert reader.tray(7, [1], t, 10)[0].unseen == 0
    assert reader.mark_seen(7, 99, t) is False                 # unknown
    assert reader.mark_seen(8, 11, t + 9 * MIN) is False       # expired at read time
    assert reader.seen(8, t) == set()


def test_sweep_lists_indexed_stories_by_expiry(stores):
    t = now_ms()
    stores.publish([published(12, 2, t, life_ms=50 * MIN), published(11, 1, t, life_ms=20 * MIN),
                    published(13, 1, t, life_ms=3 * 24 * 60 * MIN)], t)
    swept = stores.cassandra.sweep(t)
    assert [(s.story_id, s.author_id, s.expires_at) for s in swept] == [
        (11, 1, t + 20 * MIN), (12, 2, t + 50 * MIN), (13, 1, t + 3 * 24 * 60 * MIN)]
    stores.delete(12, 2, t)
    assert [s.story_id for s in stores.cassandra.sweep(t)] == [11, 13]


def test_deletes_are_recorded_so_a_lost_tombstone_can_be_restored(stores):
    t = now_ms()
    pub, other = published(11, 1, t - MIN), published(12, 1, t)
    stores.publish([pub, other], t)
    stores.delete(11, 1, t)
    stores.expire(12, 1, other.expires_at, t + 1)  # an expiry is not recorded
    assert list(stores.cassandra.scan_deletions()) == [(11, 1, pub.expires_at)]
    key = stores.redis.keys.story(11)
    tombstone, expire_at = redis_dump(stores)[key], stores.redis.client.pexpiretime(key)
    # Redis loses the tombstone; a replayed publish would now be taken...
    stores.redis.client.delete(key)
    # ... unless the tombstone is restored from Cassandra first (feedbeam rebuild).
    restored = stores.redis.restore_deletions(list(stores.cassandra.scan_deletions()), t + 2)
    assert restored == 1 and redis_dump(stores)[key] == tombstone
    assert stores.redis.client.pexpiretime(key) == expire_at
    assert stores.publish([pub], t + 3) == ["tombstoned"]
    # Past expiry + grace there is nothing left to restore.
    assert stores.redis.restore_deletions([(11, 1, pub.expires_at)],
                                          pub.expires_at + POLICY.grace_ms) == 0


# -- batches ----------------------------------------------------------------------


class _Counted:
    """Counts the round trips a store makes: Redis pipelines executed and Cassandra
    concurrent executions (the real clients underneath)."""

    def __init__(self, stores: Both, monkeypatch):
        self.redis = self.cassandra = 0
        client, db = stores.redis.client, stores.cassandra._db
        make_pipeline, execute = client.pipeline, db._execute

        def pipeline(*args, **kwargs):
            pipe = make_pipeline(*args, **kwargs)
            run = pipe.execute

            def counted_execute(*a, **k):
                self.redis += 1
                return run(*a, **k)

            pipe.execute = counted_execute
            return pipe

        def counted(work):
            self.cassandra += 1
            return execute(work)

        monkeypatch.setattr(client, "pipeline", pipeline)
        monkeypatch.setattr(db, "_execute", counted)

    def take(self) -> tuple[int, int]:
        out, self.redis, self.cassandra = (self.redis, self.cassandra), 0, 0
        return out


def mixed_batch(base: int, n: int, t: int) -> list[StoryEvent]:
    """``n`` stories of ``base``.., each published, viewed twice (once again by the
    same viewer), every third deleted, and a view and a publish after the delete."""
    events = []
    for i in range(n):
        story = base + i
        events += [published(story, 1 + i % 5, t - MIN), viewed(story, 1 + i % 5, 7, t),
                   viewed(story, 1 + i % 5, 8 + i, t), viewed(story, 1 + i % 5, 7, t + 1)]
        if i % 3 == 0:
            events += [deleted(story, 1 + i % 5, t + 2), viewed(story, 1 + i % 5, 9, t + 3),
                       published(story, 1 + i % 5, t - MIN)]
    return events


def test_a_batch_of_any_size_mixing_kinds_costs_the_same_round_trips(stores, monkeypatch):
    from domain.stories import expected_stories

    t = now_ms()
    counted = _Counted(stores, monkeypatch)
    small, large = mixed_batch(1000, 3, t), mixed_batch(2000, 200, t)
    outcomes = stores.apply(small, t)
    assert outcomes[:7] == ["published", "viewed", "viewed", "viewed", "deleted",
                            "view_deleted", "tombstoned"]
    # Deletes: Redis reads their expiries first; Cassandra reads the viewers it keeps
    # (and, of a story Redis holds nothing of, its row: none here), writes, then
    # deletes the views partitions.
    assert counted.take() == (4, 3)
    stores.apply(large, t)
    assert counted.take() == (4, 3)
    no_deletes = [e for e in mixed_batch(5000, 150, t) if e.kind is not StoryEventKind.DELETED]
    stores.apply(no_deletes, t)
    assert counted.take() == (2, 1)
    # Applied in event order, as the oracle applies them, in both stores.
    expected = expected_stories(small + large + no_deletes, t, POLICY)
    for story, meta in expected.live.items():
        assert stores.redis.story(story) == stores.cassandra.story(story) == meta
        assert stores.redis.viewers(story) == stores.cassandra.viewers(story) == sorted(
            expected.viewers.get(story, ()))
    for story in expected.removed:
        assert stores.redis.story(story) is None and stores.cassandra.story(story) is None
        assert stores.redis.viewers(story) == stores.cassandra.viewers(story) == []
    for viewer in (7, 8, 9, 150):
        assert stores.redis.seen(viewer, t) == stores.cassandra.seen(viewer, t) == \
            expected.seen.get(viewer, set())


def test_a_delete_retried_after_its_first_step_still_cleans_the_viewers(stores):
    t = now_ms()
    pub = published(11, 1, t - MIN)
    stores.apply([pub, viewed(11, 1, 7, t), viewed(11, 1, 8, t)], t)
    # A crash after the delete's first Redis step: the hash is marked, nothing else done.
    redis_store = stores.redis
    redis_store._story_step(keys=[redis_store.keys.story(11), redis_store.keys.story_viewers(11)],
                            args=[t, POLICY.grace_ms, "d", 1, pub.expires_at, "", ""])
    assert redis_store.story(11) is None                    # not served meanwhile
    assert redis_store.seen(7, t) == {11}                    # satellites still there
    assert stores.delete(11, 1, t).action == "deleted"       # the retry
    assert redis_store.seen(7, t) == redis_store.seen(8, t) == set()
    assert redis_dump(stores) == {redis_store.keys.story(11): {
        "author_id": "1", "expires_at": str(pub.expires_at), "removed": "deleted"}}
    assert all(rows == [] for name, rows in stores.cassandra.dump().items())


def test_expiry_rounds_remove_what_is_due_and_say_what_is_left(stores):
    from domain.stories import HOUR_MS, add_pending, expiry_bucket, index_shards_of

    t = (now_ms() // HOUR_MS + 2) * HOUR_MS   # ahead of the wall clock: event time decides
    b = expiry_bucket(t)
    key0, key1 = index_shards_of(0, 8), index_shards_of(1, 8)   # [0, 8] and [1, 9]
    # story -> expires_at: 16, 32, 48 are index shard 0, 24 shard 8, 17 and 33 shard 1.
    expiries = {16: t + 10, 32: t + 20, 24: t + 30, 48: t + HOUR_MS + 40, 17: t + 15,
                33: t + 16}
    stores.apply([StoryEvent(f"p{s}", t - MIN, StoryEventKind.PUBLISHED, s, 3,
                             created_at=t - MIN, expires_at=e) for s, e in expiries.items()],
                 t - MIN)
    stores.apply([viewed(16, 3, 7, t - 5), deleted(32, 3, t - 5)], t - MIN)
    pending: dict[int, int] = {}
    for s in (16, 32, 24, 48):
        add_pending(pending, expiries[s])
    assert pending == {b: t + 10, b + 1: t + HOUR_MS + 40}

    # Fired at t + 25: 16 is due; 32 was deleted (out of the index), 24 comes later.
    done = stores.writer.expire_due(key0, pending, t + 25)
    assert [(e.story_id, e.author_id, e.expires_at) for e in done.expired] == [(16, 3, t + 10)]
    assert done.pending == {b: t + 30, b + 1: t + HOUR_MS + 40}
    assert stores.redis.story(16) is None and stores.cassandra.story(16) is None
    assert stores.redis.seen(7, t) == stores.cassandra.seen(7, t) == set()
    assert stores.redis.story(17) is not None and stores.redis.story(24) is not None
    # The next firing takes the rest of the hour; the bucket goes.
    done = stores.writer.expire_due(key0, done.pending, t + 30)
    assert [e.story_id for e in done.expired] == [24]
    assert done.pending == {b + 1: t + HOUR_MS + 40}
    assert stores.redis.story(48) is not None and stores.redis.story(17) is not None

    # A round allowed fewer stories than are due leaves the rest pending, due at once.
    done = stores.writer.expire_due(key1, {b: t + 15}, t + 20, max_due=1)
    assert [e.story_id for e in done.expired] == [17]
    assert done.pending == {b: t + 15}
    done = stores.writer.expire_due(key1, done.pending, t + 20, max_due=1)
    assert [e.story_id for e in done.expired] == [33]
    done = stores.writer.expire_due(key1, done.pending, t + 20, max_due=1)
    assert (done.expired, done.pending) == ((), {})
    assert stores.redis.story(33) is None and stores.cassandra.story(33) is None
    # A story a delete removed after its index row was read is not announced.
    assert stores.writer.expire(32, 3, t + 20) is None


def test_the_start_up_sweep_finds_each_bucket_with_stories(stores):
    from domain.stories import HOUR_MS, expiry_bucket, index_shards_of

    t = now_ms()
    h = (t // HOUR_MS + 1) * HOUR_MS   # the next full hour
    b = expiry_bucket(h)
    expiries = {16: h + 5 * MIN, 32: h + 3 * MIN, 48: h + 3 * HOUR_MS, 17: h + MIN}
    stores.apply([StoryEvent(f"p{s}", t, StoryEventKind.PUBLISHED, s, 1, created_at=t,
                             expires_at=e) for s, e in expiries.items()], t)
    assert stores.writer.pending(index_shards_of(0, 4)) == {b: h + 3 * MIN,
                                                            b + 3: h + 3 * HOUR_MS}
    assert stores.writer.pending(index_shards_of(1, 4)) == {b: h + MIN}
    assert stores.writer.pending(index_shards_of(2, 4)) == {}
