"""Probe: what a follow costs the fan-out's Redis step, its Python and the server.

    .venv/bin/python bench/probe_follow_scripts.py [--users 100000] [--follows 200000]
        [--batch 50000] [--runs 3]

The first ``--follows`` FOLLOW events of a ``--users`` workload graph (the events
``bench_fanout.py``'s follows runs produce) applied by ``FeedFanout.apply_to_redis``
in batches of ``--batch``, no Beam, no Kafka, no Cassandra, on the local Redis
under a scratch key prefix (deleted afterwards), once per run on empty keys. Per
run: follows/s, this process' CPU per follow, the Redis server's CPU per follow
(``/proc``) and the time Redis spent in the edge scripts (``INFO commandstats``,
EVALSHA) per follow. Medians over the runs. The figures: docs/benchmarks.md
("fan-out follows, the Redis step").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from probe_social_facts import redis_cpu_s  # noqa: E402  (bench/ is on the path)
from domain.fanout import FanoutPolicy  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from jobs.clean import unlink_keys  # noqa: E402
from jobs.workload import Workload, WorkloadConfig  # noqa: E402
from schemas.events import FollowEvent  # noqa: E402
from schemas.keys import KeyLayout  # noqa: E402
from stores.fanout import FeedFanout  # noqa: E402
from stores.redis.client import new_client  # noqa: E402
from stores.redis.feeds import RedisFeedStore  # noqa: E402


def follow_events(users: int, n: int, policy: FanoutPolicy) -> list[FollowEvent]:
    """The first ``n`` FOLLOW events of the benchmark's workload graph."""
    workload = Workload(WorkloadConfig(start_ms=1_714_557_600_000, seed=42, users=users,
                                       avg_following=200, celebrities=3,
                                       push_threshold=policy.push_threshold))
    out: list[FollowEvent] = []
    for _, _, event in workload.events():
        if not isinstance(event, FollowEvent) or len(out) >= n:
            break
        out.append(event)
    return out


def script_usec(client) -> int:
    """Microseconds Redis has spent in EVALSHA since its statistics were reset."""
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def run_once(client, port: int, events: list[FollowEvent], batch: int,
             policy: FanoutPolicy) -> dict:
    prefix = f"probefs{uuid.uuid4().hex[:8]}"
    fanout = FeedFanout(RedisFeedStore(client, KeyLayout(prefix)), None, policy)
    try:
        scripts, server = script_usec(client), redis_cpu_s(port)
        wall, cpu = time.perf_counter(), time.process_time()
        for lo in range(0, len(events), batch):
            fanout.apply_to_redis(events[lo:lo + batch])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server = redis_cpu_s(port) - server
        scripts = script_usec(client) - scripts
    finally:
        unlink_keys(client, f"{prefix}:*", batch=5000)
    n = len(events)
    return {"per_s": n / wall, "python_us": cpu / n * 1e6, "redis_us": server / n * 1e6,
            "scripts_us": scripts / n}


def figures_line(res: dict) -> str:
    return (f"{res['per_s']:,.0f} follows/s; per follow: Python {res['python_us']:.1f} us, "
            f"Redis server {res['redis_us']:.1f} us (edge scripts {res['scripts_us']:.1f} us)")


def add_follow_arguments(parser: argparse.ArgumentParser) -> None:
    """``--users``, ``--follows`` and ``--batch``: which follows, and how many a call."""
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--follows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=50_000,
                        help="events a call (a backlog bundle holds up to 50,000 records)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_follow_arguments(parser)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if min(args.users, args.follows, args.batch, args.runs) < 1:
        parser.error("--users, --follows, --batch and --runs must be at least 1")
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    policy = FanoutPolicy()
    events = follow_events(args.users, args.follows, policy)
    print(f"{len(events):,} follow events of a {args.users:,}-user graph, batches of "
          f"{args.batch}", flush=True)
    runs = []
    for run in range(args.runs):
        runs.append(run_once(client, settings.redis_port, events, args.batch, policy))
        print(f"run {run + 1}: {figures_line(runs[-1])}", flush=True)
    print(f"median of {args.runs}: "
          f"{figures_line({k: statistics.median(r[k] for r in runs) for k in runs[0]})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
