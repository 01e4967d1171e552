"""``feedbeam rebuild``: refill Redis from Cassandra after Redis lost its data.

    feedbeam rebuild                        # every view, local stack
    feedbeam rebuild --views feeds,posts    # some of them
    feedbeam rebuild --key-prefix fb --keyspace feedbeam --feed-cap 1000

Redis is the hot copy; every view the pipelines materialize is also in
Cassandra (the durable copy), written with the same idempotent rules. This job
scans those tables and writes them back through the same store modules the
pipelines and the API use, so the API answers as it did before the loss:

* ``graph``: followers/following sorted sets and their edge versions
  (re-applied as the FOLLOW events that made the live edges);
* ``posts``: post metadata hashes and tombstones (so a replayed create still
  cannot resurrect a deleted post), and the authors' deleted-posts sets;
* ``timelines``: authors' timelines, capped at ``--timeline-cap``;
* ``feeds``: home feeds, the newest ``--feed-cap`` entries of each user;
* ``activity``: last feed reads (the fan-out's inactivity rule);
* ``features``, ``stories``, ``ranked``: feature hashes, active stories and
  ranked feeds, when their pipelines are part of this build.

Every write is idempotent (sorted-set adds, newer-wins scripts), so the job can
run while pipelines run, be interrupted and be run again. A progress bar per
view counts the rows read. Scans read whole tables: fine for one node or a
few million rows; for more, run it per token range (not built yet).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import heapq
import time
from typing import Callable, Iterable, Iterator

from infra.settings import StackSettings
from jobs.errors import UserFacingError
from pipelines.fanout_logic import FanoutPolicy

_BATCH = 2000


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


def _batched(rows: Iterable, size: int = _BATCH) -> Iterator[list]:
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


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


#: View name -> rebuild function, in the order they run (the graph and posts
#: first: the rest reference them).
VIEWS: dict[str, Callable[[RebuildContext, object], int]] = {
    "graph": rebuild_graph,
    "posts": rebuild_posts,
    "timelines": rebuild_timelines,
    "feeds": rebuild_feeds,
    "activity": rebuild_activity,
}


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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run_rebuild)


def run_rebuild(args: argparse.Namespace, settings: StackSettings) -> int:
    from pipelines.io.cassandra_store import CassandraFeedStore
    from pipelines.io.redis_store import RedisFeedStore
    from schemas.cassandra import new_cluster

    views = [v for v in args.views.split(",") if v]
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise UserFacingError(f"unknown view(s) {', '.join(unknown)}; choose from "
                              + ", ".join(VIEWS))
    if args.feed_cap < 1 or args.timeline_cap < 1:
        raise UserFacingError("--feed-cap and --timeline-cap must be >= 1")
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
                             args.timeline_cap)
        started = time.monotonic()
        counts = rebuild(ctx, views, progress=not args.no_progress)
        print(f"rebuilt {', '.join(f'{v} {n:,}' for v, n in counts.items())} "
              f"in {time.monotonic() - started:.1f}s from keyspace {args.keyspace} "
              f"into Redis prefix {args.key_prefix}")
    finally:
        redis.close()
        cluster.shutdown()
    return 0
