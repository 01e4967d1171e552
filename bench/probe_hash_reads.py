"""Probe: reading fields of many small hashes, per design, and parsing what they hold.

    .venv/bin/python bench/probe_hash_reads.py [--posts 6000] [--viewers 256]
        [--authors-each 56] [--runs 7]

What a ranking batch reads: the features of ``--posts`` posts (one hash each, all
``POST_FEATURES``) and, for ``--viewers`` viewers, ``--authors-each`` fields of
each viewer's affinity hash (120 authors held). Per design and run, the wall time
of the read (client packing to parsed replies) and the CPU the Redis server spent
(from ``/proc``), medians of ``--runs``:

* ``script``: one Lua call per 2,000 keys returning every key's HMGET as one
  nested reply (the design before ``HashReads``; its text is kept here);
* ``pipeline``: redis-py's pipeline of one HMGET per key;
* ``packed``: ``stores.redis.multiread.HashReads``: plain HMGETs packed as RESP,
  written in one send, replies read off the connection.

Then the parse of the values read (``"<value>@<stamp us>"``): NumPy's conversion
of the split strings (the design before) and ``parse_stamped`` (Arrow's CSV
reader). The keys are removed afterwards. The figures: docs/benchmarks.md
("Ranking").
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
from schemas.features import POST_FEATURES  # noqa: E402
from stores.redis.client import new_client  # noqa: E402
from stamped_layout import parse_stamped  # noqa: E402  (bench/ is on the path)
from stores.redis.multiread import HashReads  # noqa: E402

SAME_SCRIPT = """
local fields = {}
for f in string.gmatch(ARGV[1], '[^,]+') do
  fields[#fields + 1] = f
end
local out = {}
for i = 1, #KEYS do
  out[i] = redis.call('HMGET', KEYS[i], unpack(fields))
end
return out
"""
EACH_SCRIPT = """
local out = {}
for i = 1, #KEYS do
  local fields = {}
  for f in string.gmatch(ARGV[i], '[^,]+') do
    fields[#fields + 1] = f
  end
  out[i] = redis.call('HMGET', KEYS[i], unpack(fields))
end
return out
"""
CHUNK = 2000


def load(client, prefix: str, posts: int, viewers: int, each: int, rng):
    """``(post keys, viewer keys, each viewer's fields)``, written."""
    stamp = int(time.time() * 1e6)
    post_keys = [f"{prefix}:p:{i}" for i in range(posts)]
    viewer_keys = [f"{prefix}:v:{i}" for i in range(viewers)]
    fields = []
    pipe = client.pipeline(transaction=False)
    for key in post_keys:
        pipe.hset(key, mapping={f: f"{rng.random() * 100:.6g}@{stamp}" for f in POST_FEATURES})
    for key in viewer_keys:
        held = rng.choice(100_000, size=120, replace=False)
        pipe.hset(key, mapping={str(a): f"{rng.random():.6g}@{stamp}" for a in held})
        fields.append(sorted(rng.choice(held, size=each, replace=False).tolist()))
    pipe.execute()
    return post_keys, viewer_keys, fields


def read_script(client, scripts, post_keys, viewer_keys, fields) -> list:
    same, each = scripts
    pipe = client.pipeline(transaction=False)
    joined = ",".join(POST_FEATURES)
    for i in range(0, len(post_keys), CHUNK):
        same(keys=post_keys[i:i + CHUNK], args=[joined], client=pipe)
    for i in range(0, len(viewer_keys), CHUNK):
        each(keys=viewer_keys[i:i + CHUNK],
             args=[",".join(map(str, f)) for f in fields[i:i + CHUNK]], client=pipe)
    return [r for chunk in pipe.execute() for r in chunk]


def read_pipeline(client, scripts, post_keys, viewer_keys, fields) -> list:
    pipe = client.pipeline(transaction=False)
    for key in post_keys:
        pipe.hmget(key, POST_FEATURES)
    for key, names in zip(viewer_keys, fields):
        pipe.hmget(key, names)
    return pipe.execute()


def read_packed(client, scripts, post_keys, viewer_keys, fields) -> list:
    with HashReads(client) as reads:
        reads.same(post_keys, POST_FEATURES)
        reads.each(viewer_keys, fields)
        return reads.replies()


DESIGNS = {"script": read_script, "pipeline": read_pipeline, "packed": read_packed}


def parse_split(raw: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The parse before ``parse_stamped``: split strings converted by NumPy."""
    parts = np.array(b"@".join(raw).split(b"@"))
    return parts[0::2].astype(np.float64), parts[1::2].astype(np.int64) // 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=6000)
    parser.add_argument("--viewers", type=int, default=256)
    parser.add_argument("--authors-each", type=int, default=56)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    settings = StackSettings.from_env()
    client = new_client(settings.redis_url)
    prefix = f"probehr{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    try:
        post_keys, viewer_keys, fields = load(client, prefix, args.posts, args.viewers,
                                              args.authors_each, rng)
        scripts = (client.register_script(SAME_SCRIPT), client.register_script(EACH_SCRIPT))
        values = args.posts * len(POST_FEATURES) + args.viewers * args.authors_each
        wall: dict[str, list[float]] = {d: [] for d in DESIGNS}
        server: dict[str, list[float]] = {d: [] for d in DESIGNS}
        reference = None
        for _ in range(args.runs):
            for name, read in DESIGNS.items():
                cpu, t = redis_cpu_s(settings.redis_port), time.perf_counter()
                replies = read(client, scripts, post_keys, viewer_keys, fields)
                wall[name].append(time.perf_counter() - t)
                server[name].append(redis_cpu_s(settings.redis_port) - cpu)
                if reference is None:
                    reference = replies
                elif [list(r) for r in replies] != [list(r) for r in reference]:
                    raise SystemExit(f"{name}: replies differ from the other designs'")
        raw = [v for r in reference for v in r]
        parses = {"numpy split": parse_split, "parse_stamped": parse_stamped}
        parse_s: dict[str, list[float]] = {p: [] for p in parses}
        for _ in range(args.runs):
            for name, parse in parses.items():
                t = time.perf_counter()
                parse(raw)
                parse_s[name].append(time.perf_counter() - t)
    finally:
        unlink_keys(client, f"{prefix}:*")
        client.close()
    print(f"== hash reads: {args.posts:,} post hashes x {len(POST_FEATURES)} fields + "
          f"{args.viewers} viewers x {args.authors_each} fields = {values:,} values, "
          f"medians of {args.runs} ==")
    print(f"{'design':10s} {'wall ms':>9s} {'Redis CPU ms':>13s} {'values/s':>12s}")
    for name in DESIGNS:
        w, s = statistics.median(wall[name]), statistics.median(server[name])
        print(f"{name:10s} {w * 1000:9.1f} {s * 1000:13.1f} {values / w:12,.0f}")
    print("(Redis CPU from /proc: 10 ms clock ticks)")
    for name, samples in parse_s.items():
        p = statistics.median(samples)
        print(f"parse, {name:14s} {p * 1000:7.2f} ms  {len(raw) / p:12,.0f} values/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
