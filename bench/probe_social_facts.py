"""Probe: what the features pipeline's ``social`` sink costs, in process and in Redis.

    .venv/bin/python bench/probe_social_facts.py [--events 200000] [--batch 1000] [--runs 3]

Applies ``--events`` engagement events (two thirds views; power-law posts and
viewers, as ``bench_features.py`` draws them) to the local Redis through
``stores.redis.social.SocialFacts.apply`` in batches of ``--batch``, no Beam and
no Kafka, and prints per run the events/s, the new firsts, and the CPU that the
Redis server spent per event (from its ``/proc`` counters), for the whole sink
and for the firsts alone (the decayed sums left out). The keys are removed
afterwards. The figures of the sink in the pipeline: docs/ranking.md, "Online".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from domain.features import COMMENT, LIKE, VIEW  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from jobs.clean import unlink_keys  # noqa: E402
from schemas.keys import KeyLayout  # noqa: E402
from stores.redis.client import new_client  # noqa: E402
from stores.redis.social import SocialFacts  # noqa: E402


def redis_cpu_s(port: int) -> float:
    """CPU seconds (user + system) of the local redis-server listening on ``port``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"redis-server" in cmdline and f":{port}".encode() in cmdline:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    raise SystemExit(f"no redis-server on port {port} on this machine: start the stack "
                     "(feedbeam infra up)")


def events(n: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    kind = rng.choice([VIEW] * 6 + [LIKE, LIKE, COMMENT], n)
    post = rng.zipf(1.3, n) % 20_000 + 1
    viewer = rng.zipf(1.2, n) % 50_000 + 1
    t = 1_780_000_000_000 + np.sort(rng.integers(0, 6 * 3_600_000, n))
    return kind, t, viewer, post, post % 3_000 + 1


def run_once(client, port: int, data, batch: int, sums: bool) -> dict:
    prefix = "probesf" + uuid.uuid4().hex[:8]
    facts = SocialFacts(client, KeyLayout(prefix))
    if not sums:
        facts._add_sums = lambda *args: None  # the firsts alone
    n = len(data[0])
    cpu, started, new = redis_cpu_s(port), time.perf_counter(), 0
    for lo in range(0, n, batch):
        new += facts.apply(*(column[lo:lo + batch] for column in data))
    seconds = time.perf_counter() - started
    redis_s = redis_cpu_s(port) - cpu
    unlink_keys(client, prefix + "*")
    return {"per_s": n / seconds, "new": new, "redis_us": redis_s / n * 1e6}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    data = events(args.events)
    try:
        for label, sums in (("whole sink", True), ("firsts only", False)):
            runs = [run_once(client, settings.redis_port, data, args.batch, sums)
                    for _ in range(args.runs)]
            for i, r in enumerate(runs, 1):
                print(f"{label} run {i}: {r['per_s']:,.0f} events/s, {r['new']:,} new firsts, "
                      f"Redis CPU {r['redis_us']:.2f} us/event", flush=True)
            print(f"{label}: median {statistics.median(r['per_s'] for r in runs):,.0f} events/s, "
                  f"Redis CPU {statistics.median(r['redis_us'] for r in runs):.2f} us/event "
                  f"({args.events:,} events, batches of {args.batch:,})", flush=True)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
