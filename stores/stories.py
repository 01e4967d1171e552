"""Story events and expiries applied to both story stores: Redis decides, Cassandra follows.

    writer = open_story_writer(StoreConfig(), StoryPolicy())
    outcomes = writer.apply(events)          # one StoryOutcome per StoryEvent
    expired = writer.expire(story_id, author_id, expires_at)

The stories pipeline adapts ``StoryWriter`` (``pipelines.stories``); the
benchmark drives it directly. Design: ``docs/pipelines/stories.md``.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

from domain.stories import StoryPolicy, story_expiry
from schemas.events import STORY_TTL_MS, StoryEvent, StoryEventKind
from schemas.stories import StoryExpired, StoryOutcome
from stores.cassandra.stories import CassandraStoryStore
from stores.config import StoreConfig
from stores.redis.stories import RedisStoryStore


def _now_ms() -> int:
    return int(time.time() * 1000)


class StoryWriter:
    """Applies story events and expiries to a ``RedisStoryStore`` and a
    ``CassandraStoryStore``.

    Redis decides what is accepted (tombstones, expiry, unknown stories) and
    Cassandra follows, so the two hold the same stories. ``clock`` gives the
    wall-clock ms that "already expired" is judged against. Every call makes
    one attempt and is idempotent: a caller retries a failed one whole.
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

    def apply(self, events: Sequence[StoryEvent]) -> list[StoryOutcome]:
        """Apply events in order: consecutive publishes or views as one batch each,
        deletes one by one. One outcome per event, in order."""
        now = self._clock()
        out: list[StoryOutcome] = []
        for kind, run in _runs(events):
            if kind is StoryEventKind.PUBLISHED:
                out += self._publish(run, now)
            elif kind is StoryEventKind.VIEWED:
                out += self._view(run, now)
            else:
                out += [self._delete(e) for e in run]
        return out

    def _publish(self, events: Sequence[StoryEvent], now: int) -> list[StoryOutcome]:
        statuses = self.redis.publish(events, now)
        self.cassandra.publish([e for e, s in zip(events, statuses) if s == "published"], now)
        return [StoryOutcome(e.event_id, s, e.story_id, e.author_id, story_expiry(e),
                             e.event_time) for e, s in zip(events, statuses)]

    def _view(self, events: Sequence[StoryEvent], now: int) -> list[StoryOutcome]:
        results = self.redis.record_views(events, now)
        self.cassandra.record_views([(e, r.author_id, r.expires_at)
                                     for e, r in zip(events, results) if r.counted], now)
        return [StoryOutcome(e.event_id, r.status if r.counted else f"view_{r.status}",
                             e.story_id, e.author_id, r.expires_at, e.event_time)
                for e, r in zip(events, results)]

    def _delete(self, event: StoryEvent) -> StoryOutcome:
        durable = self.cassandra.story(event.story_id)
        fallback = durable.expires_at if durable else event.event_time + STORY_TTL_MS
        # Redis first: if we crash before Cassandra's removal, the retry still
        # finds the viewers in Cassandra's rows (removed last).
        removal = self.redis.remove(event.story_id, event.author_id, fallback, deleted=True)
        self.cassandra.remove(event.story_id, removal.author_id, removal.expires_at,
                              removal.viewers, deleted=True, now_ms=self._clock())
        return StoryOutcome(event.event_id, "deleted", event.story_id, removal.author_id,
                            removal.expires_at, event.event_time)

    def expire(self, story_id: int, author_id: int, expires_at: int) -> StoryExpired | None:
        """Remove an expired story from both stores (idempotent). None when the story
        turns out to have been deleted (its timer was re-armed after the delete)."""
        removal = self.redis.remove(story_id, author_id, expires_at, deleted=False)
        self.cassandra.remove(story_id, removal.author_id, removal.expires_at, removal.viewers)
        if removal.removed_as == "deleted":
            return None
        return StoryExpired(story_id, removal.author_id, removal.expires_at, self._clock())


def open_story_writer(stores: StoreConfig, policy: StoryPolicy = StoryPolicy()) -> StoryWriter:
    """A ``StoryWriter`` on new clients of the stores ``stores`` names; ``close()`` closes them."""
    redis_store = RedisStoryStore.from_url(stores.redis_url, stores.redis_key_prefix, policy)
    try:
        cassandra_store = CassandraStoryStore.connect(
            stores.cassandra_host, stores.cassandra_port, stores.cassandra_keyspace, policy)
    except Exception:
        redis_store.close()
        raise
    return StoryWriter(redis_store, cassandra_store)


def _runs(events: Iterable[StoryEvent]) -> list[tuple[StoryEventKind, list[StoryEvent]]]:
    """Consecutive events of one kind, grouped, in order."""
    runs: list[tuple[StoryEventKind, list[StoryEvent]]] = []
    for e in events:
        if runs and runs[-1][0] is e.kind:
            runs[-1][1].append(e)
        else:
            runs.append((e.kind, [e]))
    return runs
