"""Benchmark: what the four streaming jobs cost while nothing arrives (issue 15's idle bar).

    .venv/bin/python bench/bench_idle.py [--settle-s 60] [--measure-s 60] [--samples 3]
        [--pipelines fanout,stories,features,ranking]

Starts the pipelines as the demo does (``feedbeam submit``'s command: the shared
Prism job server of ``feedbeam infra up``, LOOPBACK workers in each job's own
process) on empty topics of their own (a fresh prefix, Redis key prefix and
keyspace), waits ``--settle-s`` for start-up to pass, then reads the CPU time
(utime + stime from ``/proc``) of the Prism job server and of every process of
the jobs' sessions ``--samples`` times over ``--measure-s`` each, and prints
it as a share of one core: the median, and per process; each sample also
prints the busiest threads of each group by name (``/proc/<pid>/task``: the
Python threads, gRPC's ``event_engine``, librdkafka's ``rdk:*``). The bar:
under 5 % of one core for the four jobs together, Prism included.

The ranking job needs a promoted model: the demo's (``.state/demo/models``) is
used, or ``--model-dir``; without one the ranking job is left out (said so).
Everything made for the run is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from infra import processes  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from cpu import TICKS_PER_S, cpu_ticks, session_pids, thread_ticks  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "idle.json"


def measure(groups: dict[str, list[int]], seconds: float) -> dict[str, float]:
    """Share of one core each group of pids used over ``seconds``; prints the busiest
    threads of each (threads that ended meanwhile count in the shares only)."""
    before = {name: sum(cpu_ticks(p) for p in pids) for name, pids in groups.items()}
    threads_before = {name: thread_ticks(pids) for name, pids in groups.items()}
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    for name, pids in groups.items():
        after = thread_ticks(pids)
        spent = sorted(((ticks - threads_before[name].get(thread, 0), thread)
                        for thread, ticks in after.items()), reverse=True)
        print(f"  {name}: " + ", ".join(f"{thread} {ticks / TICKS_PER_S / elapsed:.2%}"
                                        for ticks, thread in spent[:6] if ticks > 0))
    return {name: (sum(cpu_ticks(p) for p in pids) - before[name]) / TICKS_PER_S / elapsed
            for name, pids in groups.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settle-s", type=float, default=60.0)
    parser.add_argument("--measure-s", type=float, default=60.0)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--pipelines", default="fanout,stories,features,ranking")
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--job-args", default="",
                        help="more options for every job, space-separated (e.g. --idle_wait_ms=5000)")
    args = parser.parse_args(argv)

    from jobs import topics
    from jobs.clean import unlink_keys
    from jobs.demo import FanoutJob
    from stores.cassandra.session import migrate, new_cluster

    settings = StackSettings.from_env()
    prism_pid = processes.running_pid(settings, "prism")
    if prism_pid is None:
        sys.exit("the Prism job server is not running: start the stack with `feedbeam infra up`")
    run = uuid.uuid4().hex[:8]
    prefix, key_prefix, keyspace = f"idle{run}.", f"idle{run}", f"idle_{run}"
    model_dir = args.model_dir or settings.state_dir / "demo" / "models"
    names = args.pipelines.split(",")
    if "ranking" in names and not (model_dir / "latest").exists():
        print(f"no promoted model in {model_dir}: the ranking job is left out")
        names.remove("ranking")

    topics.create_topics(settings.kafka_bootstrap, topics.feed_topics(prefix), partitions=3)
    cluster = new_cluster(settings.host, settings.cassandra_port)
    jobs: list[FanoutJob] = []
    log_dir = settings.state_dir / "logs"
    try:
        list(migrate(cluster.connect(), keyspace))
        for name in names:
            extra = [f"--consumer_group=idle-{run}-{name}", "--fallback_start=earliest",
                     f"--topic_prefix={prefix}", f"--redis_key_prefix={key_prefix}",
                     f"--cassandra_keyspace={keyspace}", *args.job_args.split()]
            if name == "ranking":
                extra.append(f"--model_dir={model_dir}")
            if name == "features":
                extra.append(f"--feature_log_dir={settings.state_dir / 'bench-idle' / run}")
            jobs.append(FanoutJob.start(settings, log_dir / f"bench-idle-{name}.log", extra,
                                        pipeline=name))
        print(f"{len(jobs)} jobs started ({', '.join(names)}) on the shared Prism "
              f"(pid {prism_pid}); settling {args.settle_s:.0f} s")
        time.sleep(args.settle_s)
        for job in jobs:
            if job.process.poll() is not None:
                sys.exit(f"{job.name} exited ({job.process.returncode}):\n{job.log_tail()}")
        samples = []
        for i in range(args.samples):
            groups = {"prism": [prism_pid]}
            for job in jobs:
                groups[job.name] = session_pids(os.getsid(job.process.pid))
            shares = measure(groups, args.measure_s)
            shares["total"] = sum(shares.values())
            samples.append(shares)
            print(f"sample {i + 1}: " + "  ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    finally:
        for job in jobs:
            job.stop()
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        for future in admin.delete_topics(topics.feed_topics(prefix),
                                          operation_timeout=30).values():
            future.result()
        session = cluster.connect()
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        cluster.shutdown()
        client = redis.Redis.from_url(settings.redis_url)
        unlink_keys(client, f"{key_prefix}:*")
        client.close()

    median = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
    print(f"\nidle CPU over {args.measure_s:.0f} s, median of {len(samples)} samples, "
          f"share of one core:")
    for name, share in median.items():
        print(f"  {name:10s} {share:6.1%}")
    verdict = "meets" if median["total"] < 0.05 else "misses"
    print(f"  the {len(names)} jobs with Prism: {median['total']:.1%} "
          f"({verdict} the bar of < 5 % for the four)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"pipelines": names, "samples": samples, "median": median,
                                   "measure_s": args.measure_s}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
