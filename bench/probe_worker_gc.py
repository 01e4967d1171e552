"""Probe: what Python's garbage collector costs the fan-out's steps.

    .venv/bin/python bench/probe_worker_gc.py [--users 100000] [--follows 200000]
        [--batch 50000] [--posts 3000] [--post-batch 1000] [--runs 3]
        [--settings python,worker]

The first ``--follows`` FOLLOW events of a ``--users`` workload graph (as in
``probe_follow_scripts.py``) go through the fan-out's two steps in this process,
no Beam and no Kafka: the Redis step (``FeedFanout.apply_to_redis``, batches of
``--batch``, a scratch key prefix) and the durable step (``DurableFeedWriter.apply``
on the writes it decided, into a fresh keyspace). Then ``--posts`` new posts by
authors with 200 followers each (their follows applied first, untimed) go
through the same two steps in batches of ``--post-batch``. Each run does it
once per setting of ``--settings`` (``python``: Python's thresholds (700, 10,
10); ``worker``: ``pipelines.common.WORKER_GC_THRESHOLDS``; or three numbers
``a/b/c``), in an order that turns around every run. Per step and setting:
events/s, this process' CPU per follow (every thread: the Cassandra
driver's event loop too) and the time spent in collections per follow
(``gc.callbacks``). Medians over the runs. The figures: docs/benchmarks.md
("garbage collection in the workers").
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probe_follow_scripts import (add_follow_arguments,  # noqa: E402  (bench/ on the path)
                                  follow_events)
from probe_graph_writes import probe_keyspace  # noqa: E402
from domain.fanout import FanoutPolicy  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from jobs.clean import unlink_keys  # noqa: E402
from pipelines.common import WORKER_GC_THRESHOLDS  # noqa: E402
from schemas.events import (FollowEvent, FollowKind, MediaType, PostEvent,  # noqa: E402
                            PostEventKind)
from schemas.keys import KeyLayout  # noqa: E402
from stores.cassandra.feeds import CassandraFeedStore  # noqa: E402
from stores.fanout import DurableFeedWriter, FeedFanout  # noqa: E402
from stores.redis.client import new_client  # noqa: E402
from stores.redis.feeds import RedisFeedStore  # noqa: E402

PYTHON_THRESHOLDS = (700, 10, 10)
NAMED = {"python": PYTHON_THRESHOLDS, "worker": WORKER_GC_THRESHOLDS}
FOLLOWERS = 200


class CollectionTimer:
    """Seconds spent in garbage collections since ``reset``, and how many there were."""

    def __init__(self):
        self.seconds, self.count, self._started = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.count += 1

    def reset(self) -> None:
        self.seconds, self.count = 0.0, 0


def thresholds_of(name: str) -> tuple[int, int, int]:
    if name in NAMED:
        return NAMED[name]
    parts = name.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a setting is python, worker or a/b/c (three integers), not {name!r}")
    return tuple(int(p) for p in parts)


def post_graph(users: int, authors: int, seed: int = 7) -> tuple[list, list[int]]:
    """FOLLOW events giving each of ``authors`` authors ``FOLLOWERS`` random followers,
    and the authors' ids (above the workload's users)."""
    rng = random.Random(seed)
    ids = [users + 1 + a for a in range(authors)]
    events = [FollowEvent(f"pf-{a}-{f}", 1_714_557_600_000, FollowKind.FOLLOW, f, a)
              for a in ids for f in rng.sample(range(1, users + 1), FOLLOWERS)]
    return events, ids


def post_events(authors: list[int], n: int, first_id: int) -> list[PostEvent]:
    t = 1_714_557_700_000
    return [PostEvent(f"pp-{first_id + i}", t + i, PostEventKind.CREATED, first_id + i,
                      authors[i % len(authors)], t + i, MediaType.PHOTO, 80, ("travel",))
            for i in range(n)]


def timed(step, timer: CollectionTimer, n: int) -> dict:
    """``step()`` timed: per event its wall rate, CPU and collection time."""
    timer.reset()
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"per_s": n / wall, "cpu_us": cpu / n * 1e6, "gc_us": timer.seconds / n * 1e6,
            "collections": timer.count}


def two_steps(fanout: FeedFanout, writer: DurableFeedWriter, events: list, batch: int,
              timer: CollectionTimer) -> dict:
    """``events`` through the Redis step, then their writes through the durable step."""
    writes: list[list] = []
    redis = timed(lambda: writes.extend(
        fanout.apply_to_redis(events[lo:lo + batch]).writes
        for lo in range(0, len(events), batch)), timer, len(events))
    durable = timed(lambda: [writer.apply(w) for w in writes], timer, len(events))
    return {"redis": redis, "durable": durable}


def run_once(client, session, keyspace: str, work: dict, args, policy: FanoutPolicy,
             thresholds: tuple[int, int, int], timer: CollectionTimer) -> dict:
    prefix = f"probegc{uuid.uuid4().hex[:8]}"
    fanout = FeedFanout(RedisFeedStore(client, KeyLayout(prefix)), None, policy)
    writer = DurableFeedWriter(CassandraFeedStore(session, keyspace))
    out = {}
    try:
        for lo in range(0, len(work["graph"]), args.batch):  # the authors' followers, untimed
            fanout.apply_to_redis(work["graph"][lo:lo + args.batch])
        gc.collect()
        gc.set_threshold(*thresholds)
        out["follows"] = two_steps(fanout, writer, work["follows"], args.batch, timer)
        out["posts"] = two_steps(fanout, writer, work["posts"], args.post_batch, timer)
    finally:
        gc.set_threshold(*PYTHON_THRESHOLDS)
        unlink_keys(client, f"{prefix}:*", batch=5000)
    return out


def figures_line(res: dict) -> str:
    return (f"{res['per_s']:,.0f}/s, CPU {res['cpu_us']:.1f} us an event of which "
            f"collections {res['gc_us']:.1f} us ({res['collections']:,.0f})")


def run_line(res: dict) -> str:
    return "; ".join(f"{kind} {step} {figures_line(res[kind][step])}"
                     for kind in ("follows", "posts") for step in ("redis", "durable"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_follow_arguments(parser)
    parser.add_argument("--posts", type=int, default=3000)
    parser.add_argument("--post-batch", type=int, default=1000,
                        help="posts a call (a live bundle's records)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--settings", default="python,worker",
                        help="comma-separated: python, worker or a/b/c thresholds")
    args = parser.parse_args(argv)
    if min(args.users, args.follows, args.batch, args.posts, args.post_batch, args.runs) < 1:
        parser.error("--users, --follows, --batch, --posts, --post-batch and --runs must be "
                     "at least 1")
    try:
        settings_of = {name: thresholds_of(name) for name in args.settings.split(",") if name}
    except ValueError as exc:
        parser.error(str(exc))
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    policy = FanoutPolicy()
    graph, authors = post_graph(args.users, max(1, args.posts // 3))
    work = {"follows": follow_events(args.users, args.follows, policy), "graph": graph,
            "posts": post_events(authors, args.posts, 10**12)}
    print(f"{len(work['follows']):,} follow events of a {args.users:,}-user graph, batches "
          f"of {args.batch:,}; {args.posts:,} posts by {len(authors):,} authors of "
          f"{FOLLOWERS} followers, batches of {args.post_batch:,}; settings "
          f"{settings_of}", flush=True)
    timer = CollectionTimer()
    gc.callbacks.append(timer)
    runs: dict[str, list[dict]] = {name: [] for name in settings_of}
    with probe_keyspace("probe_gc") as (session, keyspace, _):
        for run in range(args.runs):
            order = list(settings_of) if run % 2 == 0 else list(reversed(settings_of))
            for name in order:
                res = run_once(client, session, keyspace, work, args, policy,
                               settings_of[name], timer)
                runs[name].append(res)
                print(f"run {run + 1}, {name}: {run_line(res)}", flush=True)
    gc.callbacks.remove(timer)
    for name, results in runs.items():
        med = {kind: {step: {k: statistics.median(r[kind][step][k] for r in results)
                             for k in results[0][kind][step]} for step in ("redis", "durable")}
               for kind in ("follows", "posts")}
        print(f"median of {args.runs}, {name}: {run_line(med)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
