"""Probe: what the push's check for unfollows, and the pushes' grouping by feed, cost
the fan-out's Redis step on posts.

    .venv/bin/python bench/probe_post_recheck.py [--users 100000] [--posts 3000]
        [--post-batch 1000] [--runs 4] [--designs counter,per_post,recheck]

``--posts`` new posts by authors of 200 random followers each (of ``--users``;
their follows applied first, untimed) go through the fan-out's Redis step
(``FeedFanout.apply_to_redis``) in this process, no Beam and no Kafka, in
batches of ``--post-batch``, once per design and run, in an order that turns
around every run; the feeds are emptied after each. Designs:

* ``counter``: the store as it is: the pushes read which targets no longer
  follow only for authors whose unfollow counter moved since their followers
  were read (``KeyLayout.unfollowed``), here none; a batch whose feeds get
  ``GROUP_PUSHES_FROM`` posts each or more on average is written feed by feed;
* ``per_post``: the same, but every batch written post by post (one ``ZADD``
  and trim per post and feed, the design before the grouping);
* ``by_feed``: the same, but every batch written feed by feed (one ``ZADD`` of
  the feed's posts and one trim per feed), however few posts a feed gets;
* ``recheck``: every push reads which of its targets no longer follow (one
  member test per target, the design before the counter), post by post.

Per design: feed inserts/s, the Redis server's CPU per insert (from ``/proc``),
this process' CPU per insert, and the Redis commands' own time per insert
(``INFO commandstats``, reset before each pass). Medians over the runs. The
figures: docs/benchmarks.md ("The push's check for unfollows").
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probe_social_facts import redis_cpu_s  # noqa: E402  (bench/ is on the path)
from probe_worker_gc import FOLLOWERS, post_events, post_graph  # noqa: E402
from domain.fanout import FanoutPolicy  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from jobs.clean import unlink_keys  # noqa: E402
from pipelines.common import WORKER_GC_THRESHOLDS  # noqa: E402
from schemas.keys import KeyLayout  # noqa: E402
from stores.fanout import FeedFanout  # noqa: E402
from stores.redis.client import new_client  # noqa: E402
from stores.redis.feeds import RedisFeedStore  # noqa: E402

#: The commands whose own time is printed (the rest is in the scripts' total).
SHOWN = ("evalsha", "zadd", "zcard", "zmscore", "mget", "zrange")


class PerPost(RedisFeedStore):
    """The store before the grouping by feed: every batch pushed post by post."""

    def __init__(self, client, keys: KeyLayout):
        super().__init__(client, keys, group_pushes_from=float("inf"))


class ByFeed(RedisFeedStore):
    """Every batch pushed feed by feed."""

    def __init__(self, client, keys: KeyLayout):
        super().__init__(client, keys, group_pushes_from=0.0)


class RecheckEveryPush(PerPost):
    """The store before the unfollow counter: every push reads all its targets back."""

    def push_posts(self, pushes, cap, chunk_size=1000, unfollows=None):
        return super().push_posts(pushes, cap, chunk_size)


def one_pass(client, port: int, fanout: FeedFanout, posts: list, batch: int) -> dict:
    client.config_resetstat()
    redis_cpu, wall, cpu = redis_cpu_s(port), time.perf_counter(), time.process_time()
    for lo in range(0, len(posts), batch):
        fanout.apply_to_redis(posts[lo:lo + batch])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    redis_cpu = redis_cpu_s(port) - redis_cpu
    inserts = len(posts) * FOLLOWERS
    stats = client.info("commandstats")
    own = {name: stats.get(f"cmdstat_{name}", {}).get("usec", 0) / inserts for name in SHOWN}
    return {"per_s": inserts / wall, "redis_us": redis_cpu / inserts * 1e6,
            "python_us": cpu / inserts * 1e6, **{f"{n}_us": v for n, v in own.items()}}


def line(res: dict) -> str:
    own = ", ".join(f"{n} {res[f'{n}_us']:.2f}" for n in SHOWN)
    return (f"{res['per_s']:9,.0f} inserts/s  Redis {res['redis_us']:.2f} µs CPU an insert, "
            f"Python {res['python_us']:.2f} µs; commands' own µs an insert: {own}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--posts", type=int, default=3_000)
    parser.add_argument("--post-batch", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--designs", default="counter,per_post,recheck")
    args = parser.parse_args(argv)
    designs = [d for d in args.designs.split(",") if d]
    stores = {"counter": RedisFeedStore, "per_post": PerPost, "by_feed": ByFeed,
              "recheck": RecheckEveryPush}
    if not designs or any(d not in stores for d in designs):
        parser.error(f"--designs: comma-separated of {', '.join(stores)}")
    if min(args.users, args.posts, args.post_batch, args.runs) < 1:
        parser.error("--users, --posts, --post-batch and --runs must be at least 1")
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    gc.set_threshold(*WORKER_GC_THRESHOLDS)   # as in the job's workers
    graph, authors = post_graph(args.users, max(1, args.posts // 3))
    prefix = f"probe_recheck_{uuid.uuid4().hex[:8]}"
    keys, policy = KeyLayout(prefix), FanoutPolicy()
    fanouts = {d: FeedFanout(stores[d](client, keys), None, policy) for d in designs}
    print(f"{args.posts:,} posts by {len(authors):,} authors of {FOLLOWERS} followers "
          f"among {args.users:,} users, batches of {args.post_batch:,}", flush=True)
    results: dict[str, list[dict]] = {d: [] for d in designs}
    first_post = 10**12
    try:
        loader = fanouts[designs[0]]
        for lo in range(0, len(graph), 50_000):
            loader.apply_to_redis(graph[lo:lo + 50_000])
        for run in range(args.runs):
            for design in designs if run % 2 == 0 else designs[::-1]:
                posts = post_events(authors, args.posts, first_post)
                first_post += args.posts
                res = one_pass(client, settings.redis_port, fanouts[design], posts,
                               args.post_batch)
                unlink_keys(client, f"{prefix}:feed:*", batch=5000)
                results[design].append(res)
                print(f"run {run + 1} {design:>8}: {line(res)}", flush=True)
    finally:
        unlink_keys(client, f"{prefix}:*", batch=5000)
    print(f"==== median of {args.runs} ====")
    for design, got in results.items():
        print(f"{design:>8}: {line({k: statistics.median(r[k] for r in got) for k in got[0]})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
