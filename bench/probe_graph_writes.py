"""Probe: what writing follow edges to Cassandra costs, per design of the writes.

    .venv/bin/python bench/probe_graph_writes.py [--edges 200000] [--users 100000] [--runs 3]
        [--designs event-50,event-200,event-350,grouped-50,grouped-200,store-50]
        (also tables-N, keyed-N)

Writes ``--edges`` random follow edges (power-law followees, as a social graph
has) with the statements of ``CassandraFeedStore`` into a fresh keyspace of the
local Cassandra, no Beam and no Kafka, once per design and run, and prints the
edges/s with the CPU seconds this process and the Cassandra server spent per
1,000 edges (from ``/proc``). A design is an order and the rows per unlogged
batch: ``event-N`` both rows of each edge in event order, ``grouped-N`` each
table's rows in the order of its partition key (a batch holds fewer
partitions), ``store-N`` the store's own ``write_edges``; with each
followee's count as the fan-out writes it, ``tables-N`` each table's rows in
partition order one table after the other (the store's order), ``keyed-N``
all rows in the order of their partition key, so that a user's rows of the
three tables share a batch (one mutation per partition). The keyspace is
dropped afterwards. The figures: docs/benchmarks.md ("Cassandra graph rows by
design").
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from infra.settings import StackSettings  # noqa: E402
from stores.cassandra.feeds import CassandraFeedStore, pack_batches  # noqa: E402
from stores.cassandra.session import migrate, new_cluster  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")
ORDERS = ("event", "grouped", "store", "tables", "keyed")


def cassandra_pid() -> int:
    """The pid of the local Cassandra server (its JVM's main class on the command line)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"CassandraDaemon" in cmdline:
            return int(pid)
    raise SystemExit("no Cassandra server (CassandraDaemon) on this machine: start the stack "
                     "(feedbeam infra up)")


def cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system) of process ``pid`` ("self" for this one)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@contextlib.contextmanager
def probe_keyspace(name: str):
    """``(session, keyspace, server pid)``: a fresh migrated keyspace ``name_<id>`` of
    the local Cassandra, dropped afterwards."""
    settings = StackSettings.from_env()
    server = cassandra_pid()
    cluster = new_cluster(settings.host, settings.cassandra_port)
    session = cluster.connect()
    keyspace = f"{name}_{uuid.uuid4().hex[:8]}"
    try:
        migrate(session, keyspace)
        yield session, keyspace, server
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        cluster.shutdown()


def edges(n: int, users: int, seed: int) -> list[tuple[int, int, int, bool]]:
    rng = np.random.default_rng(seed)
    follower = rng.integers(1, users + 1, n)
    followee = rng.zipf(1.5, n) % users + 1
    t = 1_780_000_000_000 + np.arange(n)
    return [(int(a), int(b), int(c), True) for a, b, c in zip(follower, followee, t)]


def work_of(store: CassandraFeedStore, rows: list, order: str) -> list:
    """Both directions of ``rows`` as ``(statement, params)`` (and the followees'
    counts for ``tables`` and ``keyed``) in the order of ``order``."""
    follow_in, follow_out = store.statement("follow_in"), store.statement("follow_out")
    ins = [(followee, follower, t, t * 1000) for follower, followee, t, _ in rows]
    outs = [(follower, followee, t, t * 1000) for follower, followee, t, _ in rows]
    if order == "grouped":
        return [(follow_in, p) for p in sorted(ins)] + [(follow_out, p) for p in sorted(outs)]
    if order in ("tables", "keyed"):
        count = store.statement("set_count")
        newest = {followee: t for _, followee, t, _ in rows}
        counts = [(followee, (t * 1000, 1, followee)) for followee, t in sorted(newest.items())]
        if order == "tables":
            return ([(follow_in, p) for p in sorted(ins)] + [(follow_out, p) for p in sorted(outs)]
                    + [(count, p) for _, p in counts])
        keyed = ([(p[0], 0, follow_in, p) for p in ins] + [(p[0], 1, follow_out, p) for p in outs]
                 + [(user, 2, count, p) for user, p in counts])
        keyed.sort(key=lambda r: (r[0], r[1], r[3]))
        return [(stmt, p) for _, _, stmt, p in keyed]
    return [pair for a, b in zip(ins, outs) for pair in ((follow_in, a), (follow_out, b))]


def write(store: CassandraFeedStore, rows: list, order: str) -> None:
    if order == "store":
        store.write_edges(rows)
        return
    from cassandra.concurrent import execute_concurrent

    work = pack_batches(work_of(store, rows, order), store.batch_rows)
    for ok, value in execute_concurrent(store.session, work, concurrency=store.concurrency):
        if not ok:
            raise value


def run_once(store: CassandraFeedStore, server: int, rows: list, chunk: int,
             order: str) -> dict:
    me0, srv0, t0 = cpu_s("self"), cpu_s(server), time.perf_counter()
    for i in range(0, len(rows), chunk):
        write(store, rows[i:i + chunk], order)
    wall = time.perf_counter() - t0
    me, srv = cpu_s("self") - me0, cpu_s(server) - srv0
    return {"rate": len(rows) / wall, "client_ms": me / len(rows) * 1e6,
            "server_ms": srv / len(rows) * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=50_000,
                        help="edges per write_edges call (one durable-step batch)")
    parser.add_argument("--designs", default="event-50,event-200,event-350,grouped-50,grouped-200,store-50")
    args = parser.parse_args(argv)
    figures: dict[str, list[dict]] = {}
    with probe_keyspace("probe_graph") as (session, keyspace, server):
        for run in range(args.runs):
            rows = edges(args.edges, args.users, seed=run)
            for design in args.designs.split(","):
                order, _, batch_rows = design.partition("-")
                if order not in ORDERS or not batch_rows.isdigit():
                    parser.error(f"not a design: {design!r} (one of {', '.join(ORDERS)}, "
                                 "a dash and the rows per batch)")
                store = CassandraFeedStore(session, keyspace, batch_rows=int(batch_rows))
                got = run_once(store, server, rows, args.chunk, order)
                figures.setdefault(design, []).append(got)
                print(f"run {run + 1} {design:>10}: {got['rate']:9,.0f} edges/s  "
                      f"client {got['client_ms']:5.1f} ms  server {got['server_ms']:5.1f} ms "
                      f"CPU per 1,000 edges", flush=True)
        print(f"==== {args.edges:,} edges, median of {args.runs} ====")
        for design, got in figures.items():
            med = {k: statistics.median(g[k] for g in got) for k in got[0]}
            print(f"{design:>10}: {med['rate']:9,.0f} edges/s  client {med['client_ms']:5.1f} ms  "
                  f"server {med['server_ms']:5.1f} ms CPU per 1,000 edges")
    return 0


if __name__ == "__main__":
    sys.exit(main())
