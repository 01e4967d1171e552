"""``feedbeam rebuild``: refill Redis from Cassandra after Redis lost its data.

    feedbeam rebuild                        # every view, local stack
    feedbeam rebuild --views feeds,posts    # some of them
    feedbeam rebuild --key-prefix fb --keyspace feedbeam --feed-cap 1000

Scans the durable tables and writes them back through the store modules the
pipelines and the API use. Every write is idempotent, so it can run beside the
pipelines, be interrupted and run again. What each view restores, and what is
not restored: docs/operations.md, "rebuild: refill Redis from Cassandra".
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import time
from typing import Callable, Iterable

from infra.settings import StackSettings
from infra.errors import UserFacingError
from domain.fanout import FanoutPolicy
from stores.cassandra.feeds import batched
from domain.stories import HOUR_MS, StoryPolicy
from schemas.features import DAY_MS, DEFAULT_HALF_LIFE_MS, FeatureTTLs

_BATCH = 2000


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass
class RebuildContext:
    redis: object        # RedisFeedStore
    cassandra: object    # CassandraFeedStore
    redis_url: str
    key_prefix: str
    session: object
    keyspace: str
    feed_cap: int
    timeline_cap: int
    feature_ttls: FeatureTTLs = FeatureTTLs()
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    top_followers_keep: int = 10_000
    story_policy: StoryPolicy = StoryPolicy()
    clock: Callable[[], int] = _now_ms   # "now" in ms, read per batch (expiries, TTLs)


def _batched(rows: Iterable) -> Iterable[list]:
    return batched(rows, _BATCH)


def rebuild_graph(ctx: RebuildContext, bar) -> int:
    n = 0
    for edges in _batched(ctx.cassandra.scan_follow_edges()):
        ctx.redis.apply_edges(edges)
        n += len(edges)
        bar.update(len(edges))
    return n


def rebuild_posts(ctx: RebuildContext, bar) -> int:
    from schemas.events import PostEventKind

    n = 0
    for posts in _batched(ctx.cassandra.scan_posts()):
        created = [p for p in posts if p.kind is PostEventKind.CREATED]
        ctx.redis.put_posts(created)
        for p in posts:
            if p.kind is PostEventKind.DELETED:
                ctx.redis.tombstone_post(p)
                ctx.redis.remove_from_timeline(p.author_id, [(p.post_id, p.created_at)],
                                               ctx.timeline_cap)
        n += len(posts)
        bar.update(len(posts))
    return n


def _newest_per_key(rows: Iterable[tuple[int, int, int]], cap: int, bar) -> dict[int, list]:
    """``{key: [(post_id, created_at), ...]}`` keeping the newest ``cap`` per key."""
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


def rebuild_timelines(ctx: RebuildContext, bar) -> int:
    newest = _newest_per_key(ctx.cassandra.scan_timelines(), ctx.timeline_cap, bar)
    entries = [(author, p, c) for author, kept in newest.items() for p, c in kept]
    for batch in _batched(entries):
        ctx.redis.add_to_timelines(batch, ctx.timeline_cap)
    return len(entries)


def rebuild_feeds(ctx: RebuildContext, bar) -> int:
    newest = _newest_per_key(ctx.cassandra.scan_home_feeds(), ctx.feed_cap, bar)
    for user, kept in newest.items():
        ctx.redis.merge_into_feed(user, kept, ctx.feed_cap)
    return sum(len(v) for v in newest.values())


def rebuild_activity(ctx: RebuildContext, bar) -> int:
    n = 0
    for user, at_ms in ctx.cassandra.scan_last_reads():
        ctx.redis.set_last_read(user, at_ms)
        n += 1
        bar.update(1)
    return n


def rebuild_features(ctx: RebuildContext, bar) -> int:
    """Online feature hashes (fresh values only) and the authors' top followers."""
    from stores.cassandra.features import CassandraFeatureStore, refill_online
    from domain.features import follower_scores
    from stores.redis.features import OnlineFeatureStore
    from schemas.features import VIEWER_AUTHOR

    online = OnlineFeatureStore(ctx.redis.client, ctx.redis.keys, ctx.feature_ttls,
                                ctx.half_life_ms)

    def after_batch(entity_type: str, values: list) -> None:
        if entity_type == VIEWER_AUTHOR:
            # Every affinity, expired ones too: the ranking keeps them (no TTL).
            ctx.redis.apply_follower_engagement(follower_scores(values, ctx.half_life_ms),
                                                keep=ctx.top_followers_keep)
        bar.update(len(values))

    counts = refill_online(CassandraFeatureStore(ctx.session, ctx.keyspace), online,
                           batch_size=_BATCH, now_ms=ctx.clock(), on_batch=after_batch)
    return sum(n for key, n in counts.items() if key.startswith("read."))


def rebuild_stories(ctx: RebuildContext, bar) -> int:
    """Deletions, active stories, their views, then the seen sets (see the module doc)."""
    from stores.cassandra.stories import CassandraStoryStore
    from stores.redis.stories import PUBLISHED, RedisStoryStore
    from domain.stories import republished_event, reviewed_event

    policy = ctx.story_policy
    durable = CassandraStoryStore(ctx.session, ctx.keyspace, policy)
    hot = RedisStoryStore(ctx.redis.client, ctx.redis.keys, policy)
    restored: dict[int, int] = {}   # story id -> author, of the stories written back
    n = 0
    for rows in _batched(durable.scan_deletions()):
        hot.restore_deletions(rows, ctx.clock())
        n += len(rows)
        bar.update(len(rows))
    for rows in _batched(durable.scan_stories()):
        now = ctx.clock()
        live = [s for s in rows if s.active(now)]
        statuses = hot.publish([republished_event(s, policy) for s in live], now)
        restored.update((s.story_id, s.author_id) for s, status in zip(live, statuses)
                        if status == PUBLISHED)
        n += len(rows)
        bar.update(len(rows))
    for rows in _batched(durable.scan_views()):
        hot.record_views([reviewed_event(sid, restored[sid], viewer, at)
                          for sid, viewer, at in rows if sid in restored], ctx.clock())
        n += len(rows)
        bar.update(len(rows))
    for rows in _batched(durable.scan_seen()):
        hot.add_seen([row for row in rows if row[1] in restored], ctx.clock())
        n += len(rows)
        bar.update(len(rows))
    return n


def rebuild_ranked(ctx: RebuildContext, bar) -> int:
    """Ranked feeds, newer-wins against what Redis holds."""
    from stores.ranked import RankedFeedStore

    store = RankedFeedStore(ctx.redis.client, ctx.redis.keys, ctx.cassandra)
    n = 0
    for feeds in _batched(store.scan_durable()):
        store.restore(feeds)
        n += len(feeds)
        bar.update(len(feeds))
    return n


#: View name -> rebuild function, in the order they run (the graph and posts
#: first: the rest reference them).
VIEWS: dict[str, Callable[[RebuildContext, object], int]] = {
    "graph": rebuild_graph,
    "posts": rebuild_posts,
    "timelines": rebuild_timelines,
    "feeds": rebuild_feeds,
    "activity": rebuild_activity,
    "features": rebuild_features,
    "stories": rebuild_stories,
    "ranked": rebuild_ranked,
}


def parse_views(text: str) -> list[str]:
    """The views named in ``--views`` (comma-separated; repeats once), in the
    order they must run; ``UserFacingError`` for an unknown or no name."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in dict.fromkeys(names) if v not in VIEWS]
    if unknown:
        raise UserFacingError(f"unknown view(s) {', '.join(unknown)}; choose from "
                              + ", ".join(VIEWS))
    if not names:
        raise UserFacingError("--views names no view; choose from " + ", ".join(VIEWS))
    return [v for v in VIEWS if v in names]


def rebuild(ctx: RebuildContext, views: Iterable[str], progress: bool = True) -> dict[str, int]:
    """Run the named views' rebuilds; returns rows restored per view."""
    from tqdm import tqdm

    out = {}
    for name in views:
        with tqdm(desc=f"rebuild {name}", unit="row", unit_scale=True, dynamic_ncols=True,
                  disable=not progress, leave=True) as bar:
            out[name] = VIEWS[name](ctx, bar)
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser("rebuild", help="refill Redis from Cassandra after a Redis loss",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--views", default=",".join(VIEWS),
                   help=f"comma-separated, in this order by default: {','.join(VIEWS)}")
    p.add_argument("--key-prefix", default="fb", help="Redis key prefix of the deployment")
    p.add_argument("--keyspace", default="feedbeam", help="Cassandra keyspace")
    d = FanoutPolicy()
    p.add_argument("--feed-cap", type=int, default=d.feed_cap)
    p.add_argument("--timeline-cap", type=int, default=d.timeline_cap)
    t = FeatureTTLs()
    p.add_argument("--post-ttl-h", type=float, default=t.post_ms / HOUR_MS,
                   help="features: the features pipeline's --post_ttl_h")
    p.add_argument("--author-ttl-h", type=float, default=t.author_ms / HOUR_MS,
                   help="features: the features pipeline's --author_ttl_h")
    p.add_argument("--affinity-ttl-days", type=float, default=t.viewer_author_ms / DAY_MS,
                   help="features: the features pipeline's --affinity_ttl_days")
    p.add_argument("--half-life-days", type=float, default=DEFAULT_HALF_LIFE_MS / DAY_MS,
                   help="features: the features pipeline's --half_life_days")
    p.add_argument("--top-followers-keep", type=int, default=RebuildContext.top_followers_keep,
                   help="features: the features pipeline's --top_followers_keep")
    p.add_argument("--story-grace-s", type=float, default=StoryPolicy().grace_ms / 1000,
                   help="stories: the stories pipeline's --grace_s")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_rebuild)


def run_rebuild(args: argparse.Namespace, settings: StackSettings) -> int:
    from stores.cassandra.feeds import CassandraFeedStore
    from stores.redis.feeds import RedisFeedStore
    from stores.cassandra.session import new_cluster

    views = parse_views(args.views)
    if args.feed_cap < 1 or args.timeline_cap < 1 or args.top_followers_keep < 1:
        raise UserFacingError("--feed-cap, --timeline-cap and --top-followers-keep must be >= 1")
    try:
        affinity_ms = int(args.affinity_ttl_days * DAY_MS)
        ttls = FeatureTTLs(post_ms=int(args.post_ttl_h * HOUR_MS),
                           author_ms=int(args.author_ttl_h * HOUR_MS),
                           viewer_author_ms=affinity_ms, viewer_media_ms=affinity_ms)
        half_life_ms = int(args.half_life_days * DAY_MS)
        if half_life_ms < 1:
            raise ValueError("--half-life-days must be positive")
        story_policy = StoryPolicy(grace_ms=int(args.story_grace_s * 1000))
    except ValueError as exc:
        raise UserFacingError(f"bad option: {exc}") from None
    try:
        cluster = new_cluster(settings.host, settings.cassandra_port)
        session = cluster.connect()
    except Exception as exc:
        raise UserFacingError(f"Cassandra is not answering at {settings.host}:"
                              f"{settings.cassandra_port} ({exc}); it is the source of a "
                              "rebuild: start it with `feedbeam infra up`") from None
    redis = RedisFeedStore.from_url(settings.redis_url, key_prefix=args.key_prefix)
    try:
        try:
            redis.client.ping()
        except Exception as exc:
            raise UserFacingError(f"Redis is not answering at {settings.redis_url} ({exc})") \
                from None
        ctx = RebuildContext(redis, CassandraFeedStore(session, args.keyspace), settings.redis_url,
                             args.key_prefix, session, args.keyspace, args.feed_cap,
                             args.timeline_cap, ttls, half_life_ms, args.top_followers_keep,
                             story_policy)
        started = time.monotonic()
        counts = rebuild(ctx, views, progress=not args.no_progress)
        print(f"rebuilt {', '.join(f'{v} {n:,}' for v, n in counts.items())} "
              f"in {time.monotonic() - started:.1f}s from keyspace {args.keyspace} "
              f"into Redis prefix {args.key_prefix}")
    finally:
        redis.close()
        cluster.shutdown()
    return 0
