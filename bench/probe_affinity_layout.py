"""Probe: the floor of reading a batch's viewer-author affinities, per state layout.

    .venv/bin/python bench/probe_affinity_layout.py [--viewers 256] [--held 60]
        [--wanted 56] [--runs 9]

A ranking batch of ``--viewers`` users needs each one's affinity to ``--wanted`` of
the ``--held`` authors it has one for. Two layouts, the same values, per run the
wall time from the first command sent to one float per (viewer, author) pair
(median of ``--runs``) and the CPU the Redis server spent (from ``/proc``, its
10 ms ticks summed over the runs, per run):

* ``hash`` (what the features pipeline writes): one hash per viewer, a field per
  author holding ``"<value>@<stamp us>"``; read with one HMGET per viewer
  (``HashReads.pick``) and parsed by ``parse_stamped``, as the ranker does;
* ``blob`` (not built): one string per viewer holding its authors sorted, with
  value and stamp, as fixed-width binary; read with one GET per viewer and
  looked up with one ``searchsorted`` for the whole batch.

The blob layout's write side (a newer-wins merge of one author into a viewer's
string) is not measured here: it would cost the features pipeline a
read-modify-write of the whole string per change. Keys are removed afterwards.
The figures: docs/benchmarks.md ("Ranking").
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
from stores.redis.features import parse_stamped  # noqa: E402
from stores.redis.multiread import HashReads  # noqa: E402

BLOB = np.dtype([("author", "<i8"), ("value", "<f8"), ("stamp", "<i8")])
AUTHOR_BITS = 40  # the probe's author ids are below 2**40


def load(client, prefix: str, viewers: int, held: int, wanted: int, rng):
    """Both layouts written; returns the batch's distinct authors, each viewer's
    wanted authors as indexes into them, and the expected values per pair."""
    stamp = int(time.time() * 1e6)
    pool = np.sort(rng.choice(1 << 30, size=held * 8, replace=False))
    pipe = client.pipeline(transaction=False)
    per_viewer, expected = [], []
    for v in range(viewers):
        authors = np.sort(rng.choice(pool, size=held, replace=False))
        values = np.round(rng.random(held), 6)
        pipe.hset(f"{prefix}:h:{v}", mapping={str(a): f"{x!r}@{stamp}"
                                              for a, x in zip(authors.tolist(), values.tolist())})
        blob = np.empty(held, BLOB)
        blob["author"], blob["value"], blob["stamp"] = authors, values, stamp
        pipe.set(f"{prefix}:b:{v}", blob.tobytes())
        pick = np.sort(rng.choice(held, size=wanted, replace=False))
        per_viewer.append(authors[pick])
        expected.append(values[pick])
    pipe.execute()
    names, index = np.unique(np.concatenate(per_viewer), return_inverse=True)
    bounds = np.cumsum([0] + [len(p) for p in per_viewer]).tolist()
    return names, index, bounds, np.concatenate(expected)


def read_hash(client, prefix, viewers, names, index, bounds) -> np.ndarray:
    with HashReads(client) as reads:
        at = reads.pick([f"{prefix}:h:{v}" for v in range(viewers)], names.tolist(), index,
                        bounds)
        values, _ = parse_stamped([x for r in reads.take(at) for x in r])
    return values


def read_blob(client, prefix, viewers, names, index, bounds) -> np.ndarray:
    with HashReads(client) as reads:
        at = reads.calls([("GET", f"{prefix}:b:{v}") for v in range(viewers)])
        blobs = reads.take(at)
    held = np.frombuffer(b"".join(blobs), BLOB)
    sizes = np.array([len(b) // BLOB.itemsize for b in blobs])
    held_key = (np.repeat(np.arange(viewers), sizes) << AUTHOR_BITS) | held["author"]
    row_viewer = np.repeat(np.arange(viewers), np.diff(bounds))
    wanted = (row_viewer << AUTHOR_BITS) | names[index]
    at = np.searchsorted(held_key, wanted)
    return held["value"][at]


DESIGNS = {"hash": read_hash, "blob": read_blob}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=256)
    parser.add_argument("--held", type=int, default=60)
    parser.add_argument("--wanted", type=int, default=56)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args(argv)
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    prefix = f"probeal{uuid.uuid4().hex[:8]}"
    wall: dict[str, list[float]] = {d: [] for d in DESIGNS}
    server: dict[str, list[float]] = {d: [] for d in DESIGNS}
    try:
        names, index, bounds, expected = load(client, prefix, args.viewers, args.held,
                                              args.wanted, np.random.default_rng(3))
        for _ in range(args.runs):
            for name, read in DESIGNS.items():
                cpu, t = redis_cpu_s(settings.redis_port), time.perf_counter()
                values = read(client, prefix, args.viewers, names, index, bounds)
                wall[name].append(time.perf_counter() - t)
                server[name].append(redis_cpu_s(settings.redis_port) - cpu)
                if not np.array_equal(values, expected):
                    raise SystemExit(f"{name}: values differ from the ones written")
    finally:
        unlink_keys(client, f"{prefix}:*")
        client.close()
    pairs = len(expected)
    print(f"== affinities of {args.viewers} viewers x {args.wanted} of {args.held} authors "
          f"= {pairs:,} pairs, medians of {args.runs} ==")
    for name in DESIGNS:
        w, s = statistics.median(wall[name]), sum(server[name]) / len(server[name])
        print(f"{name:5s} {w * 1000:7.2f} ms wall  {s * 1000:5.1f} ms Redis CPU (mean)  "
              f"{pairs / w:12,.0f} pairs/s")
    print("(Redis CPU from /proc: 10 ms clock ticks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
