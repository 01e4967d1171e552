"""Probe: what a feed insert costs Redis, per design of the push.

    .venv/bin/python bench/probe_feed_push.py [--feeds 100000] [--posts 3000]
        [--followers 200] [--cap 1000] [--runs 3]

Pushes ``--posts`` posts into ``--followers`` random home feeds each (of
``--feeds``), no Beam and no Kafka, once per design and run, in pipelines of
script calls of 200 feeds as ``RedisFeedStore.push_posts`` sends them, and prints
the inserts/s with the CPU the Redis server spent per insert (from ``/proc``):

* ``exact``: the store's push script (per feed a ``ZADD``, a ``ZCARD`` and, over
  ``--cap``, a trim), the cap exact after every push;
* ``soft``: a ``ZADD`` per feed, and the ``ZCARD`` and trim only for one post in 16
  (by post id), so a feed may hold up to about 16 pushes more than the cap;
* ``zadd``: a bare pipelined ``ZADD`` per insert, no script (what
  ``redis-benchmark`` measures).

The keys are removed afterwards. The figures: docs/benchmarks.md ("Fan-out").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from probe_social_facts import redis_cpu_s  # noqa: E402  (bench/ is on the path)
from infra.settings import StackSettings  # noqa: E402
from jobs.clean import unlink_keys  # noqa: E402
from stores.redis.client import new_client  # noqa: E402
from stores.redis.feeds import _PUSH  # noqa: E402

SOFT_PUSH = """
local member, score, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
local trim = tonumber(member) % 16 == 0
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, score, member)
  if trim and redis.call('ZCARD', key) > cap then
    redis.call('ZREMRANGEBYRANK', key, 0, -cap - 1)
  end
end
return #KEYS
"""
CHUNK = 200


def push_all(client, design: str, scripts: dict, prefix: str, targets: np.ndarray,
             first_post: int, cap: int) -> None:
    pipe = client.pipeline(transaction=False)
    for i, feeds in enumerate(targets):
        post, score = first_post + i, 1_780_000_000_000 + first_post + i
        keys = [f"{prefix}:{u}" for u in feeds.tolist()]
        if design == "zadd":
            for key in keys:
                pipe.zadd(key, {post: score})
            continue
        for lo in range(0, len(keys), CHUNK):
            scripts[design](keys=keys[lo:lo + CHUNK], args=[post, score, cap], client=pipe)
        if len(pipe.command_stack) >= 1_000:
            pipe.execute()
    pipe.execute()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feeds", type=int, default=100_000)
    parser.add_argument("--posts", type=int, default=3_000)
    parser.add_argument("--followers", type=int, default=200)
    parser.add_argument("--cap", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    scripts = {"exact": client.register_script(_PUSH),
               "soft": client.register_script(SOFT_PUSH)}
    prefix = f"probe_push_{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    figures: dict[str, list[tuple[float, float]]] = {}
    post = 1
    try:
        for run in range(args.runs):
            for design in ("exact", "soft", "zadd"):
                targets = rng.integers(1, args.feeds + 1, (args.posts, args.followers))
                inserts = targets.size
                cpu0, t0 = redis_cpu_s(settings.redis_port), time.perf_counter()
                push_all(client, design, scripts, f"{prefix}:{design}", targets, post, args.cap)
                wall = time.perf_counter() - t0
                cpu = redis_cpu_s(settings.redis_port) - cpu0
                post += args.posts
                figures.setdefault(design, []).append((inserts / wall, cpu / inserts * 1e6))
                print(f"run {run + 1} {design:>5}: {inserts / wall:9,.0f} inserts/s  "
                      f"Redis {cpu / inserts * 1e6:4.2f} µs CPU per insert", flush=True)
        print(f"==== {args.posts:,} posts x {args.followers} feeds of {args.feeds:,}, "
              f"median of {args.runs} ====")
        for design, got in figures.items():
            rate = statistics.median(g[0] for g in got)
            cpu = statistics.median(g[1] for g in got)
            print(f"{design:>5}: {rate:9,.0f} inserts/s  Redis {cpu:4.2f} µs CPU per insert")
    finally:
        unlink_keys(client, f"{prefix}:*")
    return 0


if __name__ == "__main__":
    sys.exit(main())
