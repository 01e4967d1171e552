"""``feedbeam rebuild``: refill Redis from Cassandra after Redis lost its data.

    feedbeam rebuild                        # every view, local stack
    feedbeam rebuild --views feeds,posts    # some of them
    feedbeam rebuild --redis-key-prefix fb --cassandra-keyspace feedbeam --feed-cap 1000

Scans the durable tables and writes them back through the store modules the
pipelines and the API use (``stores.restore``, the code the jobs run by
themselves when they find Redis empty). Every write is idempotent, so it can
run beside the pipelines, be interrupted and run again; a rebuild of every
view ends by writing the prefix's generation marker. What each view restores,
and what is not restored: docs/operations.md, "rebuild: refill Redis from
Cassandra".
"""
from __future__ import annotations

import argparse
import time
from typing import Iterable

from infra.settings import StackSettings
from infra.errors import UserFacingError
from domain.fanout import FanoutPolicy
from domain.stories import HOUR_MS, StoryPolicy
from schemas.features import DAY_MS, DEFAULT_HALF_LIFE_MS, FeatureTTLs
from stores.restore import VIEWS, RestoreContext, RestoreSettings, restore

__all__ = ["VIEWS", "parse_views", "rebuild", "register", "run_rebuild"]


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


def rebuild(ctx: RestoreContext, views: Iterable[str], progress: bool = True) -> dict[str, int]:
    """Restore the named views (``stores.restore``); returns rows restored per view.
    A rebuild of every view writes a new generation marker (``KeyLayout.generation``):
    the jobs and the API then take Redis as whole again."""
    from tqdm import tqdm

    from stores.redis.generation import RedisGeneration

    views = list(views)
    counts = restore(ctx, views, lambda name: tqdm(
        desc=f"rebuild {name}", unit="row", unit_scale=True, dynamic_ncols=True,
        disable=not progress, leave=True))
    if set(views) >= set(VIEWS):
        RedisGeneration(ctx.redis.client, ctx.redis.keys).mark()
    return counts


def register(subparsers) -> None:
    p = subparsers.add_parser("rebuild", help="refill Redis from Cassandra after a Redis loss",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--views", default=",".join(VIEWS),
                   help=f"comma-separated, in this order by default: {','.join(VIEWS)}")
    p.add_argument("--redis-key-prefix", "--key-prefix", dest="key_prefix", default="fb",
                   help="Redis key prefix of the deployment")
    p.add_argument("--cassandra-keyspace", "--keyspace", dest="keyspace", default="feedbeam",
                   help="Cassandra keyspace")
    d = FanoutPolicy()
    p.add_argument("--feed-cap", type=int, default=d.feed_cap)
    p.add_argument("--timeline-cap", type=int, default=d.timeline_cap)
    t = FeatureTTLs()
    p.add_argument("--post-ttl-h", type=float, default=t.post_ms / HOUR_MS,
                   help="features: the features pipeline's --post-ttl-h")
    p.add_argument("--author-ttl-h", type=float, default=t.author_ms / HOUR_MS,
                   help="features: the features pipeline's --author-ttl-h")
    p.add_argument("--affinity-ttl-days", type=float, default=t.viewer_author_ms / DAY_MS,
                   help="features: the features pipeline's --affinity-ttl-days")
    p.add_argument("--half-life-days", type=float, default=DEFAULT_HALF_LIFE_MS / DAY_MS,
                   help="features: the features pipeline's --half-life-days")
    p.add_argument("--top-followers-keep", type=int, default=RestoreSettings.top_followers_keep,
                   help="features: the features pipeline's --top-followers-keep")
    p.add_argument("--story-grace-s", type=float, default=StoryPolicy().grace_ms / 1000,
                   help="stories: the stories pipeline's --grace-s")
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
        cluster = new_cluster(settings.cassandra_host, settings.cassandra_port)
        session = cluster.connect()
    except Exception as exc:
        raise UserFacingError(f"Cassandra is not answering at {settings.cassandra_host}:"
                              f"{settings.cassandra_port} ({exc}); it is the source of a "
                              "rebuild: start it with `feedbeam infra up`") from None
    redis = RedisFeedStore.from_url(settings.redis_url, key_prefix=args.key_prefix)
    try:
        try:
            redis.client.ping()
        except Exception as exc:
            raise UserFacingError(f"Redis is not answering at {settings.redis_url} ({exc})") \
                from None
        ctx = RestoreContext(redis, CassandraFeedStore(session, args.keyspace), RestoreSettings(
            args.feed_cap, args.timeline_cap, ttls, half_life_ms, args.top_followers_keep,
            story_policy))
        started = time.monotonic()
        counts = rebuild(ctx, views, progress=not args.no_progress)
        print(f"rebuilt {', '.join(f'{v} {n:,}' for v, n in counts.items())} "
              f"in {time.monotonic() - started:.1f}s from keyspace {args.keyspace} "
              f"into Redis prefix {args.key_prefix}")
    finally:
        redis.close()
        cluster.shutdown()
    return 0
