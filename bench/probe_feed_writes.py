"""Probe: what the durable home-feed rows cost Cassandra, per design of the writes.

    .venv/bin/python bench/probe_feed_writes.py [--posts 4000] [--followers 200]
        [--users 20000] [--chunk-posts 250] [--runs 3] [--designs in-200,rows-50,grouped-50]

Pushes ``--posts`` posts, each to ``--followers`` random users of ``--users``, into
``home_feed_by_user`` of a fresh keyspace of the local Cassandra (no Beam, no
Kafka), ``--chunk-posts`` posts per call as the fan-out's durable step would
(one call per batch it applies), once per design and run. Prints feed entries/s
and the CPU seconds this process and the Cassandra server spent per 1,000
entries (``/proc``), the server's also over ``--tail-s`` after the last write
(memtable flushes and compaction the writes left behind). A design:

* ``in-N``: the store's ``push``, one ``UPDATE ... WHERE user_id IN ?`` per post
  and N followers (what the fan-out does);
* ``rows-N``: one row statement per entry (``push_one``) in post order, N per
  unlogged batch;
* ``grouped-N``: the same rows in the order of their partition (user, week), N
  per unlogged batch, so a batch holds a few partitions with several rows each.

The keyspace is dropped afterwards. Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.probe_graph_writes import cpu_s, probe_keyspace  # noqa: E402
from schemas import cassandra as cs  # noqa: E402
from stores.cassandra.feeds import CassandraFeedStore, pack_batches  # noqa: E402

_T0_MS = 1_780_000_000_000


def posts(n: int, followers: int, users: int, seed: int) -> list[tuple[int, int, int, list]]:
    """``(post_id, author_id, created_at_ms, follower ids)`` of ``n`` posts."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        targets = rng.choice(users, size=followers, replace=False) + 1
        out.append((seed * 10_000_000 + i + 1, int(rng.integers(1, users + 1)),
                    _T0_MS + seed * 10_000_000 + i * 4, targets.tolist()))
    return out


def rows_of(chunk: list) -> list[tuple]:
    """``push_one``'s parameters for every entry of ``chunk``, in post order."""
    out = []
    for post_id, author, created, targets in chunk:
        ts, bucket = cs.event_timestamp_us(created), cs.time_bucket(created)
        out.extend((ts, author, user, bucket, created, post_id) for user in targets)
    return out


def write(store: CassandraFeedStore, chunk: list, design: str) -> None:
    if design == "in":
        with store.deferred():
            for post_id, author, created, targets in chunk:
                store.push(targets, post_id, author, created)
        return
    from cassandra.concurrent import execute_concurrent

    rows = rows_of(chunk)
    if design == "grouped":
        rows.sort(key=lambda r: (r[2], r[3], -r[4], -r[5]))
    stmt = store.statement("push_one")
    work = pack_batches([(stmt, r) for r in rows], store.batch_rows)
    for ok, value in execute_concurrent(store.session, work, concurrency=store.concurrency):
        if not ok:
            raise value


def run_once(store: CassandraFeedStore, server: int, workload: list, chunk_posts: int,
             design: str, tail_s: float) -> dict:
    entries = sum(len(p[3]) for p in workload)
    me0, srv0, t0 = cpu_s("self"), cpu_s(server), time.perf_counter()
    for i in range(0, len(workload), chunk_posts):
        write(store, workload[i:i + chunk_posts], design)
    wall = time.perf_counter() - t0
    me, srv = cpu_s("self") - me0, cpu_s(server) - srv0
    time.sleep(tail_s)
    tail = cpu_s(server) - srv0
    return {"rate": entries / wall, "client_ms": me / entries * 1e6,
            "server_ms": srv / entries * 1e6, "server_tail_ms": tail / entries * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--posts", type=int, default=4000)
    parser.add_argument("--followers", type=int, default=200)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--chunk-posts", type=int, default=250,
                        help="posts per call (one durable-step batch)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tail-s", type=float, default=5.0,
                        help="seconds of server CPU counted after the last write")
    parser.add_argument("--designs", default="in-200,rows-50,grouped-50")
    args = parser.parse_args(argv)
    designs = []
    for design in args.designs.split(","):
        kind, _, n = design.partition("-")
        if kind not in ("in", "rows", "grouped") or not n.isdigit() or int(n) < 1:
            parser.error(f"not a design: {design!r} (in-N, rows-N or grouped-N)")
        designs.append((design, kind, int(n)))
    figures: dict[str, list[dict]] = {}
    with probe_keyspace("probe_feed") as (session, keyspace, server):
        for run in range(args.runs):
            for d, (design, kind, n) in enumerate(designs):
                workload = posts(args.posts, args.followers, args.users,
                                 seed=run * len(designs) + d + 1)
                store = CassandraFeedStore(session, keyspace, batch_rows=n,
                                           users_per_statement=n)
                got = run_once(store, server, workload, args.chunk_posts, kind, args.tail_s)
                figures.setdefault(design, []).append(got)
                print(f"run {run + 1} {design:>12}: {got['rate']:9,.0f} entries/s  client "
                      f"{got['client_ms']:5.1f} ms  server {got['server_ms']:5.1f} ms "
                      f"({got['server_tail_ms']:5.1f} with the tail) CPU per 1,000 entries",
                      flush=True)
        print(f"==== {args.posts:,} posts x {args.followers} followers of {args.users:,} users, "
              f"{args.chunk_posts} posts a call, median of {args.runs} ====")
        for design, got in figures.items():
            med = {k: statistics.median(g[k] for g in got) for k in got[0]}
            print(f"{design:>12}: {med['rate']:9,.0f} entries/s  client {med['client_ms']:5.1f} ms"
                  f"  server {med['server_ms']:5.1f} ms ({med['server_tail_ms']:5.1f} with the "
                  f"tail) CPU per 1,000 entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
