"""Story events and expiries applied to both story stores, a batch at a time: Redis decides,
Cassandra follows.

    writer = open_story_writer(StoreConfig(), StoryPolicy())
    outcomes = writer.apply(events)                 # one StoryOutcome per StoryEvent
    round_ = writer.expire_due(shards, pending, fire_ms)   # an expiry timer's firing

The stories pipeline adapts ``StoryWriter`` (``pipelines.stories``); the
benchmark drives it directly. Design: ``docs/pipelines/stories.md``.
"""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

from domain.stories import StoryPolicy, due_buckets, expiry_bucket, settle_pending, story_expiry
from schemas.events import StoryEvent, StoryEventKind
from schemas.stories import ExpiryRound, StoryDurableWrites, StoryExpired, StoryOutcome
from stores.cassandra.stories import CassandraStoryStore, DurableRemoval, IndexedStory
from stores.config import StoreConfig
from stores.redis.stories import PUBLISHED, Removal, RedisStoryStore

#: Due stories of one index partition an expiry round removes at most (a longer
#: backlog takes more rounds).
MAX_DUE = 5000


def _now_ms() -> int:
    return int(time.time() * 1000)


class StoryWriter:
    """Applies story events and expiries to a ``RedisStoryStore`` and a
    ``CassandraStoryStore``.

    Redis decides what is accepted (tombstones, expiry, unknown stories) and
    Cassandra follows, so the two hold the same stories. ``clock`` gives the
    wall-clock ms that "already expired" is judged against. Every call works
    on a whole batch with a constant number of round trips, makes one attempt
    and is idempotent: a caller retries a failed one whole.
    """

    def __init__(self, redis: RedisStoryStore, cassandra: CassandraStoryStore,
                 clock: Callable[[], int] = _now_ms):
        self.redis = redis
        self.cassandra = cassandra
        self._clock = clock

    def close(self) -> None:
        self.redis.close()
        self.cassandra.close()

    def now_ms(self) -> int:
        """The writer's wall clock (ms), which expiry is judged against."""
        return self._clock()

    # -- events -------------------------------------------------------------------

    def apply(self, events: Sequence[StoryEvent],
              redis_whole: Callable[[Callable[[], list]], list] | None = None
              ) -> list[StoryOutcome]:
        """Apply events in order to both stores: ``apply_to_redis``, then
        ``write_durable`` of what it decided. One outcome per event, in order."""
        outcomes, writes = self.apply_to_redis(events, redis_whole)
        self.write_durable(writes)
        return outcomes

    def apply_to_redis(self, events: Sequence[StoryEvent],
                       redis_whole: Callable[[Callable[[], list]], list] | None = None
                       ) -> tuple[list[StoryOutcome], StoryDurableWrites]:
        """Apply events in order to Redis, whatever their kinds mixed: one outcome per
        event, in order, and the Cassandra writes that follow from them (for
        ``write_durable``, now or later, from a durable log). Round trips: with
        deletes, one Redis read of the deleted stories' expiries (and one
        Cassandra read of those Redis holds nothing of); up to three Redis
        pipelines (``RedisStoryStore.apply``).

        ``redis_whole(work)`` runs the Redis writes (``work``, idempotent) and returns
        their results once they were made on a Redis that kept its data throughout
        (``stores.restore.RedisHealer.write_whole``); the Cassandra writes follow
        from those results."""
        if not events:
            return [], StoryDurableWrites()
        now = self._clock()
        deleted = [e.story_id for e in events if e.kind is StoryEventKind.DELETED]
        # Cassandra is read only for deleted stories Redis holds no hash of and the
        # batch does not publish (lost, or never applied here): their expiry, and
        # the viewers it keeps.
        held = self.redis.held_expiries(deleted) if deleted else {}
        published = {e.story_id for e in events if e.kind is StoryEventKind.PUBLISHED}
        missing = [sid for sid in deleted if sid not in held and sid not in published]
        durable = self.cassandra.removal_context(missing) if missing else {}
        fallback = {sid: meta.expires_at for sid, (meta, _) in durable.items() if meta}

        def to_redis() -> list:
            return self.redis.apply(events, now, fallback)

        results = to_redis() if redis_whole is None else redis_whole(to_redis)
        publishes, views, removals, out = [], [], [], []
        for e, r in zip(events, results):
            if e.kind is StoryEventKind.PUBLISHED:
                if r == PUBLISHED:
                    publishes.append(e)
                out.append(StoryOutcome(e.event_id, r, e.story_id, e.author_id, story_expiry(e),
                                        e.event_time))
            elif e.kind is StoryEventKind.VIEWED:
                if r.counted:
                    views.append((e, r.author_id, r.expires_at))
                out.append(StoryOutcome(e.event_id, r.status if r.counted else f"view_{r.status}",
                                        e.story_id, e.author_id, r.expires_at, e.event_time))
            else:
                removals.append(_durable(e.story_id, r, durable, deleted=True))
                out.append(StoryOutcome(e.event_id, "deleted", e.story_id, r.author_id,
                                        r.expires_at, e.event_time))
        return out, StoryDurableWrites(tuple(publishes), tuple(views), tuple(removals))

    def write_durable(self, writes: StoryDurableWrites) -> None:
        """Write to Cassandra what ``apply_to_redis`` decided: one concurrent
        execution, plus one for deleted stories' views (last: if we crash before,
        a retry still finds the viewers in Cassandra's rows), after one read of
        the viewers Cassandra keeps of the deleted stories. Idempotent and
        order-free: every row carries a write timestamp that a removal's beats."""
        if writes.size:
            self.cassandra.write_decided([writes], self._clock())

    # -- expiry -------------------------------------------------------------------

    def expire_due(self, shards: Sequence[int], pending: Mapping[int, int],
                   fire_ms: int, max_due: int = MAX_DUE) -> ExpiryRound:
        """One firing of the expiry timer of the index ``shards``, at ``fire_ms``
        (event time): removes every story of those shards expiring at or before
        ``max(fire_ms, now)`` (at most ``max_due`` a partition; the rest is left
        pending, due at once),
        reading the durable expiry index in the ``pending`` buckets (bucket ->
        earliest pending expiry, ``domain.stories.add_pending``). Returns what it
        removed and what is left pending. Round trips: two Cassandra reads, the
        three Redis steps of a removal and two Cassandra writes, then one read
        for what is left in the last bucket it read."""
        now = self._clock()
        bound = max(fire_ms, now)
        buckets = due_buckets(pending, bound)
        due, more_at = self.cassandra.due(shards, buckets, bound, max_due)
        expired, after_delete = self._expire(due, now)
        if more_at is not None:
            drained, found = more_at - 1, {expiry_bucket(more_at): more_at}
        elif expiry_bucket(bound) in pending:
            drained = bound
            found = self.cassandra.earliest(shards, [expiry_bucket(bound)], bound)
        else:
            drained, found = bound, {}
        return ExpiryRound(tuple(expired), after_delete, settle_pending(pending, drained, found))

    def expire(self, story_id: int, author_id: int, expires_at: int) -> StoryExpired | None:
        """Remove one expired story from both stores (idempotent). None when the story
        turns out to have been deleted."""
        expired, _ = self._expire([IndexedStory(story_id, author_id, expires_at)], self._clock())
        return expired[0] if expired else None

    def _expire(self, stories: Sequence[IndexedStory], now: int) -> tuple[list[StoryExpired], int]:
        """Remove ``stories`` (expired) from Redis, then Cassandra; the
        ``StoryExpired`` of each that a delete had not removed first, and how many
        it had."""
        if not stories:
            return [], 0
        durable = self.cassandra.removal_context([s.story_id for s in stories], stories=False)
        removals = self.redis.remove_many(
            [(s.story_id, s.author_id, s.expires_at) for s in stories], False, now)
        self.cassandra.write(removals=[_durable(s.story_id, r, durable, deleted=False)
                                       for s, r in zip(stories, removals)], now_ms=now)
        removed_at = self._clock()
        expired = [StoryExpired(s.story_id, r.author_id, r.expires_at, removed_at)
                   for s, r in zip(stories, removals) if r.removed_as != "deleted"]
        return expired, len(stories) - len(expired)

    def pending(self, shards: Sequence[int]) -> dict[int, int]:
        """What the durable expiry index holds for ``shards`` now (bucket -> earliest
        expiry): the start-up re-arm of their timer."""
        return self.cassandra.pending(shards, self._clock())


def _durable(story_id: int, removal: Removal, durable: Mapping, deleted: bool) -> DurableRemoval:
    """The durable removal of a story Redis removed: Redis' author and expiry, and the
    viewers either store knows."""
    stored = durable.get(story_id, (None, ()))[1]
    return DurableRemoval(story_id, removal.author_id, removal.expires_at,
                          tuple(sorted(set(removal.viewers) | set(stored))), deleted)


def open_story_writer(stores: StoreConfig, policy: StoryPolicy = StoryPolicy()) -> StoryWriter:
    """A ``StoryWriter`` on new clients of the stores ``stores`` names; ``close()`` closes them."""
    redis_store = RedisStoryStore.from_url(stores.redis_url, stores.redis_key_prefix, policy)
    try:
        cassandra_store = CassandraStoryStore.connect(
            stores.cassandra_host, stores.cassandra_port, stores.cassandra_keyspace, policy,
            **stores.cassandra_options)
    except Exception:
        redis_store.close()
        raise
    return StoryWriter(redis_store, cassandra_store)
