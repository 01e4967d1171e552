"""Benchmark: the features pipeline's events/s beside a raw consume + decode loop, and the
online feature read latency of a 200-candidate batch, in one run.

    .venv/bin/python bench/bench_features.py [--events 50000] [--partitions 2] [--runs 3]
                                             [--sinks redis,cassandra,log,top_followers]
                                             [--reads 2000] [--candidates 200]

Produces ``--events`` engagement events (power-law popular posts and active viewers, views
with dwell, likes, comments, shares, saves, unlikes, profile views, 2 % repeated ids) over
six hours of event time ending an hour ago, plus the post-created events of their posts, to
two fresh topics on the local Kafka; then, on those topics, ``--runs`` times each:

* raw: the physical limit in Python: one confluent-kafka consumer over both topics,
  ``consume()`` batches, ``fastavro.schemaless_reader`` on each body, nothing else;
* pipeline: ``pipelines.features.build`` over the same offsets (``--replay_ranges``, a
  bounded job on Prism, LOOPBACK) writing to ``--sinks`` (a fresh Redis prefix, keyspace
  and log directory per run): records / wall time of ``run().wait_until_finish()``. The
  same job over one record gives its fixed start-up cost, so the rate excluding
  start-up is printed too;
* aggregate: the same job with no sinks (what the three keyed stages cost alone).

Then ``--reads`` times ``OnlineFeatureStore.hydrate(viewer, 200 posts, their authors, now)``
on what the last pipeline run wrote (one Redis round trip each): p50/p99/max latency.

Prints medians, the ratio pipeline/raw (target >= 50 %) and writes
``bench/results/features.json``. Topics, Redis keys, keyspaces and files are removed
afterwards. Needs the local stack (``feedbeam infra up``) and the Prism binary.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastavro  # noqa: E402

from infra.settings import StackSettings  # noqa: E402
from jobs.generate import PRODUCER_CONFIG  # noqa: E402
from jobs.replay_range import CONSUMER_CONFIG  # noqa: E402
from stores.kafka import offsets as kafka_offsets  # noqa: E402
from schemas.codec import HEADER_SIZE, WireCodec  # noqa: E402
from schemas.events import (EngagementEvent, EngagementKind, FollowEvent, MediaType,  # noqa: E402
                            PostEvent, PostEventKind, StoryEvent)

HOUR = 3_600_000
TARGET = 0.50
RESULTS = Path(__file__).resolve().parent / "results" / "features.json"
K = EngagementKind


# ------------------------------------------------------------------ workload


def workload(n: int, end_ms: int, seed: int = 11) -> list:
    """~``n`` engagements over the six hours before ``end_ms`` and their posts' creations."""
    rng = random.Random(seed)
    posts, viewers, authors = max(50, n // 10), max(100, n // 4), max(10, n // 100)
    span = 6 * HOUR
    start = end_ms - span
    media = list(MediaType)
    kinds = [K.VIEW] * 12 + [K.LIKE] * 4 + [K.COMMENT] * 2 + [K.SHARE, K.SAVE, K.PROFILE_VIEW]
    events: list = []
    created: set[int] = set()
    for i in range(n):
        post = int(rng.paretovariate(1.2)) % posts  # a few popular posts, a long tail
        viewer = int(rng.paretovariate(1.1)) % viewers
        author = post % authors
        t = start + rng.randrange(span)
        kind = rng.choice(kinds)
        if kind is K.PROFILE_VIEW:
            e = EngagementEvent(f"e{i}", t, kind, viewer, author)
        else:
            created.add(post)
            e = EngagementEvent(f"e{i}", t, kind, viewer, author, post, media[post % 4],
                                rng.randrange(30_000) if kind is K.VIEW else None)
        events.append(e)
        if kind is K.LIKE and rng.random() < 0.05:
            events.append(EngagementEvent(f"u{i}", t + rng.randrange(60_000, 1_800_000),
                                          K.UNLIKE, viewer, author, post, e.media_type))
        if rng.random() < 0.02:
            events.append(e)
    events += [PostEvent(f"p{p}", start - HOUR + p % HOUR, PostEventKind.CREATED, p,
                         p % authors, start - HOUR + p % HOUR, media[p % 4]) for p in created]
    return sorted(events, key=lambda e: e.event_time)


def produce(bootstrap: str, prefix: str, events: list) -> None:
    from confluent_kafka import Producer

    codec = WireCodec()
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    # Chunks well below the producer's queue limit, each flushed before the next.
    for start in range(0, len(events), 20_000):
        for e in events[start:start + 20_000]:
            topic = prefix + e.TOPIC
            producer.produce(topic, codec.encode(e, topic), e.key, timestamp=e.event_time)
        if producer.flush(120):
            raise RuntimeError("events were not all delivered")


# ------------------------------------------------------------------ raw loop


def raw_loop(bootstrap: str, ranges: dict[str, dict[int, tuple[int, int]]],
             stamps: dict | None = None) -> int:
    """Consume every range of the topics (any of the four event topics) and decode each
    body with its schema; returns records decoded. ``stamps``, if given, gets the
    ``perf_counter`` of the first and the last record (``"first"``, ``"last"``)."""
    from confluent_kafka import Consumer, TopicPartition

    codec = WireCodec()
    types = (EngagementEvent, PostEvent, StoryEvent, FollowEvent)
    writers = {topic: codec._decoder(codec.schema_id_of(
        next(t for t in types if topic.endswith(t.TOPIC)))).writer for topic in ranges}
    consumer = Consumer({"bootstrap.servers": bootstrap, **CONSUMER_CONFIG})
    consumer.assign([TopicPartition(t, p, s) for t, parts in ranges.items()
                     for p, (s, e) in parts.items() if e > s])
    remaining = {(t, p): e - s for t, parts in ranges.items() for p, (s, e) in parts.items()
                 if e > s}
    reader = fastavro.schemaless_reader
    n = 0
    try:
        while remaining:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is not None:
                    continue
                buf = io.BytesIO(msg.value())
                buf.seek(HEADER_SIZE)
                reader(buf, writers[msg.topic()], None)
                if not n and stamps is not None:
                    stamps["first"] = time.perf_counter()
                n += 1
                key = (msg.topic(), msg.partition())
                remaining[key] -= 1
                if not remaining[key]:
                    del remaining[key]
    finally:
        consumer.close()
    if stamps is not None:
        stamps["last"] = time.perf_counter()
    return n


# ------------------------------------------------------------------ the pipeline


def run_pipeline(settings: StackSettings, prism: str, prefix: str, ranges: dict, sinks: str,
                 key_prefix: str, keyspace: str, log_dir: str) -> float:
    """One bounded features job over ``ranges``; returns its wall seconds."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import PipelineState

    from pipelines import features

    options = PipelineOptions([
        "--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK",
        f"--kafka_bootstrap={settings.kafka_bootstrap}", f"--topic_prefix={prefix}",
        f"--redis_url={settings.redis_url}", f"--redis_key_prefix={key_prefix}",
        f"--cassandra_host={settings.host}", f"--cassandra_port={settings.cassandra_port}",
        f"--cassandra_keyspace={keyspace}", f"--feature_log_dir={log_dir}", f"--sinks={sinks}",
    ])
    pipeline = beam.Pipeline(options=options)
    features.build(pipeline, options, ranges=ranges)
    t0 = time.perf_counter()
    state = pipeline.run().wait_until_finish()
    seconds = time.perf_counter() - t0
    if state != PipelineState.DONE:
        raise RuntimeError(f"the features job ended {state}")
    return seconds


def read_latency(settings: StackSettings, key_prefix: str, events: list, reads: int,
                 candidates: int) -> dict[str, float]:
    """``hydrate`` of ``candidates`` posts for random viewers, ``reads`` times: ms percentiles."""
    from stores.redis.features import OnlineFeatureStore

    rng = random.Random(5)
    posts = sorted({e.post_id for e in events if isinstance(e, EngagementEvent) and e.post_id})
    author_of = {e.post_id: e.author_id for e in events if isinstance(e, EngagementEvent)}
    viewers = sorted({e.viewer_id for e in events if isinstance(e, EngagementEvent)})
    store = OnlineFeatureStore.from_url(settings.redis_url, key_prefix=key_prefix)
    now = int(time.time() * 1000)
    samples = []
    found = 0
    try:
        for i in range(reads + 50):
            batch = rng.sample(posts, min(candidates, len(posts)))
            authors = [author_of[p] for p in batch]
            t0 = time.perf_counter()
            got = store.hydrate(rng.choice(viewers), batch, authors, now)
            elapsed = (time.perf_counter() - t0) * 1000
            if i >= 50:  # warm-up: connection, script cache
                samples.append(elapsed)
                found += sum(1 for p in got.posts if p)
    finally:
        store.close()
    samples.sort()
    return {"p50_ms": samples[len(samples) // 2], "p99_ms": samples[int(len(samples) * 0.99)],
            "max_ms": samples[-1], "reads": len(samples), "candidates": candidates,
            "posts_with_features": found / len(samples)}


def _cleanup(settings: StackSettings, key_prefix: str | None, keyspace: str | None) -> None:
    import redis

    if key_prefix:
        client = redis.Redis.from_url(settings.redis_url)
        keys = list(client.scan_iter(match=f"{key_prefix}:*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start:start + 5000])
        client.close()
    if keyspace:
        from stores.cassandra.session import new_cluster

        cluster = new_cluster(settings.host, settings.cassandra_port)
        try:
            cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        finally:
            cluster.shutdown()


def _new_keyspace(settings: StackSettings) -> str:
    from stores.cassandra.session import migrate, new_cluster

    keyspace = f"bench_{uuid.uuid4().hex[:8]}"
    cluster = new_cluster(settings.host, settings.cassandra_port)
    try:
        migrate(cluster.connect(), keyspace)
    finally:
        cluster.shutdown()
    return keyspace


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sinks", default="redis,cassandra,log,top_followers")
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=200)
    args = parser.parse_args(argv)
    from confluent_kafka.admin import AdminClient, NewTopic

    from infra.install import prism_binary

    settings = StackSettings.from_env()
    prism = str(prism_binary(settings))
    bootstrap = settings.kafka_bootstrap
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    topics = [prefix + t for t in (EngagementEvent.TOPIC, PostEvent.TOPIC)]
    dlqs = [t + ".dlq" for t in topics]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, parts in [(t, args.partitions) for t in topics] + [(t, 1) for t in dlqs]:
        admin.create_topics([NewTopic(name, parts, 1)])[name].result(timeout=60)
    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    out: dict = {"config": vars(args), "raw": [], "pipeline": [], "aggregate": [],
                 "startup_s": []}
    last_prefix = None
    try:
        end = int(time.time() * 1000) // HOUR * HOUR - HOUR
        events = workload(args.events, end)
        t0 = time.perf_counter()
        produce(bootstrap, prefix, events)
        print(f"produced {len(events)} events to {', '.join(topics)} in "
              f"{time.perf_counter() - t0:.1f}s")
        ranges = {t: kafka_offsets.resolve_offset_range({"bootstrap.servers": bootstrap}, t,
                                                        None, None) for t in topics}
        total = sum(kafka_offsets.total_records(r) for r in ranges.values())
        one = {topics[0]: dict(list(ranges[topics[0]].items())[:1])}
        one[topics[0]] = {p: (s, s + 1) for p, (s, _) in one[topics[0]].items()}
        run_pipeline(settings, prism, prefix, one, "", "bench-warmup", "", str(work / "w"))
        for _ in range(args.runs):
            out["startup_s"].append(run_pipeline(settings, prism, prefix, one, "",
                                                 "bench-warmup", "", str(work / "w")))
        startup = statistics.median(out["startup_s"])
        print(f"job start-up (1 record, no sinks): {startup:.2f}s")
        for run in range(args.runs):
            t0 = time.perf_counter()
            n = raw_loop(bootstrap, ranges)
            raw_s = time.perf_counter() - t0
            assert n == total, (n, total)
            out["raw"].append(n / raw_s)
            key_prefix = f"bench{uuid.uuid4().hex[:8]}"
            keyspace = _new_keyspace(settings) if "cassandra" in args.sinks else ""
            try:
                seconds = run_pipeline(settings, prism, prefix, ranges, args.sinks, key_prefix,
                                       keyspace or "unused", str(work / f"log{run}"))
            finally:
                if keyspace:
                    _cleanup(settings, None, keyspace)
            if last_prefix:
                _cleanup(settings, last_prefix, None)
            last_prefix = key_prefix
            out["pipeline"].append({"seconds": seconds, "events_per_s": total / seconds,
                                    "excl_startup": total / max(seconds - startup, 1e-9)})
            agg_s = run_pipeline(settings, prism, prefix, ranges, "", "unused", "unused",
                                 str(work / "none"))
            out["aggregate"].append({"seconds": agg_s, "events_per_s": total / agg_s})
            print(f"run {run + 1}: raw {n / raw_s:,.0f}/s  pipeline {total / seconds:,.0f}/s "
                  f"({seconds:.1f}s, {total / max(seconds - startup, 1e-9):,.0f}/s excl. "
                  f"start-up)  aggregate only {total / agg_s:,.0f}/s ({agg_s:.1f}s)", flush=True)
        if "redis" in args.sinks and last_prefix:
            out["read"] = read_latency(settings, last_prefix, events, args.reads,
                                       args.candidates)
    finally:
        if last_prefix:
            _cleanup(settings, last_prefix, None)
        for future in admin.delete_topics(topics + dlqs, operation_timeout=30).values():
            future.result(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    raw = statistics.median(out["raw"])
    pipe = statistics.median(r["events_per_s"] for r in out["pipeline"])
    steady = statistics.median(r["excl_startup"] for r in out["pipeline"])
    agg = statistics.median(r["events_per_s"] for r in out["aggregate"])
    out["summary"] = {"records": total, "raw_per_s": raw, "pipeline_per_s": pipe,
                      "pipeline_excl_startup_per_s": steady, "aggregate_per_s": agg,
                      "ratio": pipe / raw, "ratio_excl_startup": steady / raw, "target": TARGET}
    print(f"\nrecords {total} (medians of {args.runs} runs)")
    print(f"  raw consume + decode   {raw:>10,.0f} /s   (the limit)")
    print(f"  features pipeline      {pipe:>10,.0f} /s   ratio {pipe / raw:.1%} "
          f"(target >= {TARGET:.0%}); excl. start-up {steady:,.0f} /s = {steady / raw:.1%}")
    print(f"  aggregation, no sinks  {agg:>10,.0f} /s   ratio {agg / raw:.1%}")
    if "read" in out:
        r = out["read"]
        print(f"  hydrate {r['candidates']} candidates: p50 {r['p50_ms']:.2f} ms  "
              f"p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.2f} ms over {r['reads']} reads "
              f"({r['posts_with_features']:.0f} posts with features per read)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
