"""Probe: reading and writing a batch's viewer-author affinities, per state layout.

    .venv/bin/python bench/probe_affinity_layout.py [--viewers 256] [--held 60]
        [--wanted 56] [--runs 9] [--writes 20000] [--write-batch 500]

A ranking batch of ``--viewers`` users needs each one's affinity to ``--wanted`` of
the ``--held`` authors it has one for. Two layouts, the same values, per run the
wall time from the first command sent to one float per (viewer, author) pair
(median of ``--runs``) and the CPU the Redis server spent (from ``/proc``, its
10 ms ticks summed over the runs, per run):

* ``hash`` (the layout until 2026-12-06): one hash per viewer, a field per author
  holding ``"<value>@<stamp us>"``; read with one HMGET per viewer
  (``HashReads.pick``) and parsed by ``parse_stamped``, as the ranker did;
* ``blob`` (``stores.redis.affinities``, what the store writes now): one string
  per viewer holding its authors sorted, with value and stamp, as fixed-width
  binary; read with one GET per viewer and looked up for the whole batch
  (``affinities.lookup``).

The write side, as the features pipeline's Redis sink sends it: ``--writes``
newer values of random (viewer, author) pairs among the held ones, in batches of
``--write-batch`` (one pipeline each, one script call per viewer): the hash
layout's per-field newer-wins script against the string's merge
(``affinities.MERGE``: a binary search per author and one rewrite of the
string); values written per second and Redis CPU per value. Keys are removed
afterwards. The figures: docs/benchmarks.md ("Ranking").
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
from stores.redis import affinities  # noqa: E402
from stamped_layout import WRITE_NEWER, parse_stamped  # noqa: E402  (bench/ is on the path)
from stores.redis.multiread import HashReads  # noqa: E402


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
        pipe.set(f"{prefix}:b:{v}", affinities.pack(authors, values, [stamp] * held))
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
        values, _ = affinities.lookup(reads.take(at), names, index, bounds)
    return values


def write_hash(client, prefix, batch) -> int:
    script = client.register_script(WRITE_NEWER)
    pipe = client.pipeline(transaction=False)
    for viewer, changes in batch.items():
        args: list = [86_400_000]
        for author, value, stamp in changes:
            args += (str(author), repr(value), stamp)
        script(keys=[f"{prefix}:h:{viewer}"], args=args, client=pipe)
    return sum(pipe.execute())


def write_blob(client, prefix, batch) -> int:
    script = client.register_script(affinities.MERGE)
    pipe = client.pipeline(transaction=False)
    for viewer, changes in batch.items():
        authors, values, stamps = zip(*changes)
        script(keys=[f"{prefix}:b:{viewer}"], client=pipe,
               args=[86_400_000, affinities.pack(authors, values, stamps), 0, affinities.PRUNE_AT])
    return sum(pipe.execute())


def write_batches(client, prefix, viewers: int, writes: int, size: int, rng) -> list[dict]:
    """``writes`` newer values of held pairs, grouped per viewer within each batch (one
    value per pair in a batch, as the store's ``write`` sends only a batch's winner)."""
    stamp = int(time.time() * 1e6) + 1
    batches = []
    for start in range(0, writes, size):
        batch: dict[int, dict[int, tuple]] = {}
        for _ in range(min(size, writes - start)):
            viewer = int(rng.integers(viewers))
            held = client.hkeys(f"{prefix}:h:{viewer}") if viewer not in batch else None
            author = int(rng.choice(held)) if held else next(iter(batch[viewer]))
            batch.setdefault(viewer, {})[author] = (author, float(rng.random()), stamp)
            stamp += 1
        batches.append({v: list(c.values()) for v, c in batch.items()})
    return batches


DESIGNS = {"hash": (read_hash, write_hash), "blob": (read_blob, write_blob)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, default=256)
    parser.add_argument("--held", type=int, default=60)
    parser.add_argument("--wanted", type=int, default=56)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--write-batch", type=int, default=500)
    args = parser.parse_args(argv)
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    prefix = f"probeal{uuid.uuid4().hex[:8]}"
    wall: dict[str, list[float]] = {d: [] for d in DESIGNS}
    server: dict[str, list[float]] = {d: [] for d in DESIGNS}
    written: dict[str, tuple[float, float, int]] = {}
    try:
        names, index, bounds, expected = load(client, prefix, args.viewers, args.held,
                                              args.wanted, np.random.default_rng(3))
        for _ in range(args.runs):
            for name, (read, _) in DESIGNS.items():
                cpu, t = redis_cpu_s(settings.redis_port), time.perf_counter()
                values = read(client, prefix, args.viewers, names, index, bounds)
                wall[name].append(time.perf_counter() - t)
                server[name].append(redis_cpu_s(settings.redis_port) - cpu)
                if not np.array_equal(values, expected):
                    raise SystemExit(f"{name}: values differ from the ones written")
        batches = write_batches(client, prefix, args.viewers, args.writes, args.write_batch,
                                np.random.default_rng(5))
        values_sent = sum(len(c) for b in batches for c in b.values())
        for name, (_, write) in DESIGNS.items():
            cpu, t = redis_cpu_s(settings.redis_port), time.perf_counter()
            applied = sum(write(client, prefix, batch) for batch in batches)
            written[name] = (time.perf_counter() - t, redis_cpu_s(settings.redis_port) - cpu,
                             applied)
            if applied != values_sent:
                raise SystemExit(f"{name}: wrote {applied} of {values_sent} newer values")
        again = read_blob(client, prefix, args.viewers, names, index, bounds)
        if not np.array_equal(again, read_hash(client, prefix, args.viewers, names, index,
                                               bounds)):
            raise SystemExit("the two layouts differ after the writes")
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
    print(f"== writes: {values_sent:,} newer values in {len(batches)} batches of "
          f"{args.write_batch} (both layouts read the same afterwards) ==")
    for name, (w, s, applied) in written.items():
        print(f"{name:5s} {applied / w:12,.0f} values/s  {s / applied * 1e6:6.1f} us Redis "
              f"CPU per value")
    print("(Redis CPU from /proc: 10 ms clock ticks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
