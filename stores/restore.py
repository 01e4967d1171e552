"""Refilling Redis from Cassandra: the views ``feedbeam rebuild`` restores, and the jobs'
check that restores them by itself when Redis lost its data.

    with open_restore(StoreConfig(), RestoreSettings()) as ctx:
        restore(ctx, VIEWS)                           # every view, in dependency order

    healer = RedisHealer(RedisGeneration(client, keys), CassandraRestore(config, settings))
    generation = healer.check()       # one GET; restores first (under a lock) if the marker is gone
    ranking = healer.run_whole(lambda: rank(users))   # run again if Redis was lost under it

Every view is rewritten through the store modules the pipelines and the API
use, with their idempotent rules (newer wins, tombstones kept), so a restore
can run beside the jobs, be interrupted and run again. What each view
restores and what it cannot: docs/operations.md, "rebuild: refill Redis from
Cassandra" and "Redis lost its data".
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import logging
import time
from typing import Callable, Iterable, Iterator, TypeVar

import redis as redis_errors

from domain.fanout import FanoutPolicy
from domain.stories import StoryPolicy
from schemas.features import DEFAULT_HALF_LIFE_MS, FeatureTTLs
from stores.cassandra.feeds import CassandraFeedStore, batched
from stores.config import StoreConfig
from stores.kafka.lag import LogCatchUp
from stores.redis.feeds import RedisFeedStore
from stores.redis.generation import RedisGeneration, new_token

log = logging.getLogger(__name__)

BATCH = 2000
T = TypeVar("T")


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass(frozen=True)
class RestoreSettings:
    """The pipelines' options a restore must agree with: caps of feeds and timelines
    (fan-out), online feature TTLs, decay and top followers kept (features), the
    story grace (stories). Picklable: a pipeline carries it to its workers."""

    feed_cap: int = FanoutPolicy().feed_cap
    timeline_cap: int = FanoutPolicy().timeline_cap
    feature_ttls: FeatureTTLs = FeatureTTLs()
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    top_followers_keep: int = 10_000
    story_policy: StoryPolicy = StoryPolicy()


@dataclasses.dataclass
class RestoreContext:
    """Open stores of one restore: ``redis`` (``RedisFeedStore``), ``cassandra``
    (``CassandraFeedStore``, whose session and keyspace the other durable stores
    share); ``clock`` gives "now" in ms, read per batch (expiries, TTLs)."""

    redis: RedisFeedStore
    cassandra: CassandraFeedStore
    settings: RestoreSettings = RestoreSettings()
    clock: Callable[[], int] = _now_ms

    @property
    def session(self):
        return self.cassandra.session

    @property
    def keyspace(self) -> str:
        return self.cassandra.keyspace


@contextlib.contextmanager
def open_restore(config: StoreConfig, settings: RestoreSettings) -> Iterator[RestoreContext]:
    """A ``RestoreContext`` on new clients of the stores ``config`` names, closed on exit."""
    redis = RedisFeedStore.from_url(config.redis_url, key_prefix=config.redis_key_prefix)
    try:
        cassandra = CassandraFeedStore.connect(config.cassandra_host, config.cassandra_port,
                                               config.cassandra_keyspace,
                                               **config.cassandra_options)
        try:
            yield RestoreContext(redis, cassandra, settings)
        finally:
            cassandra.close()
    finally:
        redis.close()


# -- the views ----------------------------------------------------------------------------


def restore_graph(ctx: RestoreContext, bar) -> int:
    """Follow edges (so the follower sets, hence the counts, are whole again), then each
    user's followed celebrities (and the celebrities' flags)."""
    n = 0
    for edges in batched(ctx.cassandra.scan_follow_edges(), BATCH):
        ctx.redis.apply_edges(edges)
        n += len(edges)
        bar.update(len(edges))
    for rows in batched(ctx.cassandra.scan_followed_celebrities(), BATCH):
        ctx.redis.restore_followed_celebrities(rows)
        n += len(rows)
        bar.update(len(rows))
    return n


def restore_posts(ctx: RestoreContext, bar) -> int:
    """Post metadata, and the tombstones of deleted posts (off their timelines): a
    replayed create of one stays refused."""
    from schemas.events import PostEventKind

    cap = ctx.settings.timeline_cap
    n = 0
    for posts in batched(ctx.cassandra.scan_posts(), BATCH):
        ctx.redis.put_posts([p for p in posts if p.kind is PostEventKind.CREATED])
        for p in posts:
            if p.kind is PostEventKind.DELETED:
                ctx.redis.tombstone_post(p)
                ctx.redis.remove_from_timeline(p.author_id, [(p.post_id, p.created_at)], cap)
        n += len(posts)
        bar.update(len(posts))
    return n


def newest_per_key(rows: Iterable[tuple[int, int, int]], cap: int, bar) -> dict[int, list]:
    """``{key: [(post_id, created_at), ...]}`` of ``(key, post_id, created_at)`` rows,
    the newest ``cap`` per key (in no particular order)."""
    heaps: dict[int, list] = collections.defaultdict(list)
    for key, post_id, created_at in rows:
        heap = heaps[key]
        item = (created_at, post_id)
        if len(heap) < cap:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
        bar.update(1)
    return {k: [(p, c) for c, p in h] for k, h in heaps.items()}


def restore_timelines(ctx: RestoreContext, bar) -> int:
    cap = ctx.settings.timeline_cap
    newest = newest_per_key(ctx.cassandra.scan_timelines(), cap, bar)
    entries = [(author, p, c) for author, kept in newest.items() for p, c in kept]
    for part in batched(entries, BATCH):
        ctx.redis.add_to_timelines(part, cap)
    return len(entries)


def restore_feeds(ctx: RestoreContext, bar) -> int:
    cap = ctx.settings.feed_cap
    newest = newest_per_key(ctx.cassandra.scan_home_feeds(), cap, bar)
    for user, kept in newest.items():
        ctx.redis.merge_into_feed(user, kept, cap)
    return sum(len(v) for v in newest.values())


def restore_activity(ctx: RestoreContext, bar) -> int:
    """Last feed reads: without them every follower looks inactive to the fan-out."""
    n = 0
    for user, at_ms in ctx.cassandra.scan_last_reads():
        ctx.redis.set_last_read(user, at_ms)
        n += 1
        bar.update(1)
    return n


def restore_features(ctx: RestoreContext, bar) -> int:
    """Online feature hashes (fresh values only) and the authors' top followers."""
    from domain.features import follower_scores
    from schemas.features import VIEWER_AUTHOR
    from stores.cassandra.features import CassandraFeatureStore, refill_online
    from stores.redis.features import OnlineFeatureStore

    s = ctx.settings
    online = OnlineFeatureStore(ctx.redis.client, ctx.redis.keys, s.feature_ttls, s.half_life_ms)

    def after_batch(entity_type: str, values: list) -> None:
        if entity_type == VIEWER_AUTHOR:
            # Every affinity, expired ones too: the ranking keeps them (no TTL).
            ctx.redis.apply_follower_engagement(follower_scores(values, s.half_life_ms),
                                                keep=s.top_followers_keep)
        bar.update(len(values))

    counts = refill_online(CassandraFeatureStore(ctx.session, ctx.keyspace), online,
                           batch_size=BATCH, now_ms=ctx.clock(), on_batch=after_batch)
    return sum(n for key, n in counts.items() if key.startswith("read."))


def restore_stories(ctx: RestoreContext, bar) -> int:
    """Deletions (tombstones) first, then active stories, their views, the seen sets."""
    from domain.stories import republished_event, reviewed_event
    from stores.cassandra.stories import CassandraStoryStore
    from stores.redis.stories import PUBLISHED, RedisStoryStore

    policy = ctx.settings.story_policy
    durable = CassandraStoryStore(ctx.session, ctx.keyspace, policy)
    hot = RedisStoryStore(ctx.redis.client, ctx.redis.keys, policy)
    restored: dict[int, int] = {}   # story id -> author, of the stories written back
    n = 0
    for rows in batched(durable.scan_deletions(), BATCH):
        hot.restore_deletions(rows, ctx.clock())
        n += len(rows)
        bar.update(len(rows))
    for rows in batched(durable.scan_stories(), BATCH):
        now = ctx.clock()
        live = [s for s in rows if s.active(now)]
        statuses = hot.publish([republished_event(s, policy) for s in live], now)
        restored.update((s.story_id, s.author_id) for s, status in zip(live, statuses)
                        if status == PUBLISHED)
        n += len(rows)
        bar.update(len(rows))
    for rows in batched(durable.scan_views(), BATCH):
        hot.record_views([reviewed_event(sid, restored[sid], viewer, at)
                          for sid, viewer, at in rows if sid in restored], ctx.clock())
        n += len(rows)
        bar.update(len(rows))
    for rows in batched(durable.scan_seen(), BATCH):
        hot.add_seen([row for row in rows if row[1] in restored], ctx.clock())
        n += len(rows)
        bar.update(len(rows))
    return n


def restore_ranked(ctx: RestoreContext, bar) -> int:
    """Ranked feeds, newer-wins against what Redis holds."""
    from stores.ranked import RankedFeedStore

    store = RankedFeedStore(ctx.redis.client, ctx.redis.keys, ctx.cassandra)
    n = 0
    for feeds in batched(store.scan_durable(), BATCH):
        store.restore(feeds)
        n += len(feeds)
        bar.update(len(feeds))
    return n


#: View name -> restore function, in the order they run (the graph and posts
#: first: the rest reference them).
VIEWS: dict[str, Callable[[RestoreContext, object], int]] = {
    "graph": restore_graph,
    "posts": restore_posts,
    "timelines": restore_timelines,
    "feeds": restore_feeds,
    "activity": restore_activity,
    "features": restore_features,
    "stories": restore_stories,
    "ranked": restore_ranked,
}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def restore(ctx: RestoreContext, views: Iterable[str],
            progress: Callable[[str], contextlib.AbstractContextManager] | None = None
            ) -> dict[str, int]:
    """Run the named views' restores in ``VIEWS`` order; returns rows restored per
    view. ``progress(view)`` gives a context manager yielding a bar (``update(n)``)."""
    names = set(views)
    out = {}
    for name, fn in VIEWS.items():
        if name not in names:
            continue
        with (progress(name) if progress else contextlib.nullcontext(_NoBar())) as bar:
            out[name] = fn(ctx, bar)
    return out


# -- healing ---------------------------------------------------------------------------


class RedisNotRestored(redis_errors.TimeoutError):
    """Redis lost its data and is not restored yet (the restore failed, or another
    job's takes longer than we wait). A ``redis.TimeoutError``, so ``stores.retry``
    treats it as transient: the batch is tried again whole, then fails its bundle,
    and is never dead-lettered: nothing is wrong with its records."""


@dataclasses.dataclass(frozen=True)
class CassandraRestore:
    """Every view of ``stores`` restored from its Cassandra keyspace, with ``settings``;
    called with a progress bar (``update(n)``). Picklable (a pipeline's applier config
    carries it); it opens its own clients for the time of the restore.

    ``catch_up``: the consumer groups that write Cassandra from a log (the fan-out's
    and the stories' durable steps) and the wait for them to apply what their logs hold before
    Cassandra is read (bounded; the restore goes on without it when it times out)."""

    stores: StoreConfig
    settings: RestoreSettings = RestoreSettings()
    catch_up: LogCatchUp | None = None

    def __call__(self, bar) -> dict[str, int]:
        if self.catch_up is not None:
            self._wait_for_log(bar)
        with open_restore(self.stores, self.settings) as ctx:
            return restore(ctx, VIEWS, lambda _: contextlib.nullcontext(bar))

    def _wait_for_log(self, bar) -> None:
        c = self.catch_up
        logs = "; ".join(f"{one.group!r} to apply {', '.join(one.topics)}" for one in c.each())
        log.warning("Redis restore: waiting up to %.0fs for the consumer groups of the durable "
                    "logs (%s) before reading Cassandra", c.timeout_s, logs)
        # bar.update(0) keeps the restore lock while we wait.
        behind = c.wait(on_poll=lambda: bar.update(0))
        if behind:
            log.warning("Redis restore: the durable logs' groups (%s) are still %d records "
                        "behind after %.0fs; restoring without them: what they write to "
                        "Cassandra reaches Redis only with the next rebuild", logs, behind,
                        c.timeout_s)


class _KeepLock:
    """A progress bar that keeps the restore lock: extends it every ``every_s``."""

    def __init__(self, generation: RedisGeneration, holder: str, every_s: float,
                 clock: Callable[[], float]):
        self._generation, self._holder = generation, holder
        self._every_s, self._clock = every_s, clock
        self._next = clock() + every_s
        self.rows = 0

    def update(self, n: int = 1) -> None:
        self.rows += n
        if self._clock() >= self._next:
            self._generation.extend(self._holder)
            self._next = self._clock() + self._every_s


class RedisHealer:
    """A job's check that Redis still holds its data, and the restore when it does not.

    ``check()`` reads the generation marker (one GET) and returns its token; when
    the marker is missing, Redis lost its data: the one caller that takes the
    restore lock runs ``restore`` (``CassandraRestore``: the views of ``feedbeam
    rebuild``) and writes a new token, the others wait for the token, then all
    return it. A caller compares tokens to tell whether Redis was lost (and maybe
    restored by another job) while it wrote (``current()``).
    """

    def __init__(self, generation: RedisGeneration, restore: Callable[[object], object],
                 poll_s: float = 0.2, wait_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.generation = generation
        self._restore = restore
        self._poll_s, self._wait_s = poll_s, wait_s
        self._clock, self._sleep = clock, sleep
        self.restores = 0   # restores this healer ran (the caller's metrics)
        self.reruns = 0     # work run again by run_whole after a loss (the caller's metrics)
        self._seen: str | None = None   # the token run_whole last saw

    def current(self) -> str | None:
        """The generation token as Redis holds it now (None: lost); one GET."""
        return self.generation.read()

    def check(self) -> str:
        """The generation token, after restoring Redis first if the marker is missing."""
        token = self.generation.read()
        return token if token is not None else self.heal()

    def run_whole(self, work: Callable[[], T]) -> T:
        """``work()``'s result, from a run during which Redis kept its data.

        The marker is read once after ``work()`` (and once before the first call):
        the token it held after the previous call means no loss since, so the
        reads ``work()`` made were of a whole Redis. Otherwise Redis is restored
        (or the restore waited for) and ``work()`` runs again. ``work`` must be
        safe to run again (its writes idempotent); what it writes after the
        check (a result written once this returns) may land in a Redis lost
        since, which the next restore repairs."""
        known = self._seen
        if known is None:
            known = self.check()
        while True:
            result = work()
            now = self.generation.read()
            if now is not None and now == known:
                self._seen = now
                return result
            self.reruns += 1
            log.warning("Redis prefix %r lost its data while work ran on it: running it "
                        "again on the restored Redis", self.generation.keys.prefix)
            known = now if now is not None else self.heal()

    def write_whole(self, work: Callable[[], T]) -> T:
        """``work()``'s result, from a run that began and ended on one generation: the
        marker is checked first (a lost Redis is restored before anything is written to
        it) and read again after; on a change, Redis was lost while ``work`` wrote, and
        ``work`` (idempotent) runs again on the restored Redis. For a batch's Redis
        writes whose results decide what goes to Cassandra next."""
        generation = self.check()
        while True:
            result = work()
            now = self.generation.read()
            if now is not None and now == generation:
                return result
            self.reruns += 1
            log.warning("Redis prefix %r lost its data while a batch was written to it: "
                        "writing the batch again on the restored Redis",
                        self.generation.keys.prefix)
            generation = now if now is not None else self.heal()

    def heal(self) -> str:
        """Restore Redis (or wait for whoever does) and return the new token; raises
        ``RedisNotRestored`` if that fails or takes over ``wait_s``."""
        me = new_token()
        deadline = self._clock() + self._wait_s
        while True:
            if self.generation.try_lock(me):
                try:
                    token = self._restore_locked(me)
                finally:
                    self.generation.unlock(me)
                if token is not None:
                    return token
                continue  # the lock vanished under us: Redis was lost again
            self._sleep(self._poll_s)
            token = self.generation.read()
            if token is not None:
                return token
            if self._clock() > deadline:
                raise RedisNotRestored(f"Redis prefix {self.generation.keys.prefix!r} lost its "
                                       f"data and was not restored within {self._wait_s:.0f}s")

    def _restore_locked(self, me: str) -> str | None:
        token = self.generation.read()
        if token is not None:  # restored by the holder before us
            return token
        started = self._clock()
        log.warning("Redis prefix %r lost its data (no generation marker): restoring it "
                    "from Cassandra", self.generation.keys.prefix)
        keeper = _KeepLock(self.generation, me, self.generation.lock_ttl_ms / 4000, self._clock)
        try:
            self._restore(keeper)
        except Exception as exc:
            raise RedisNotRestored(f"restoring Redis from Cassandra failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
        if not self.generation.extend(me):
            log.warning("Redis lost the restore lock while restoring: restoring again")
            return None
        self.restores += 1
        token = self.generation.mark()
        log.warning("Redis prefix %r restored from Cassandra (%d rows) in %.1fs: generation %s",
                    self.generation.keys.prefix, keeper.rows, self._clock() - started, token)
        return token


def open_healer(stores: StoreConfig, settings: RestoreSettings, client,
                catch_up: LogCatchUp | None = None) -> RedisHealer:
    """A ``RedisHealer`` of ``stores``' prefix on ``client`` (redis-py, not closed here)
    that restores with ``CassandraRestore``, waiting first for ``catch_up`` (default
    ``stores.restore_log``: every job's restore waits for the same durable log)."""
    from schemas.keys import KeyLayout

    return RedisHealer(RedisGeneration(client, KeyLayout(stores.redis_key_prefix)),
                       CassandraRestore(stores, settings,
                                        catch_up if catch_up is not None
                                        else stores.restore_log))
