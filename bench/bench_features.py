"""Benchmark: the features pipeline beside a raw consume + decode loop, its per-event cost on
small and large states, its recovery after kill -9, and the floors of other state designs.

    .venv/bin/python bench/bench_features.py [--events 200000] [--partitions 2] [--runs 3]
        [--sinks redis,cassandra,log,top_followers[,social]] [--skip throughput,flat,recovery,floors]
        [--flat-sizes 10000,1000000] [--flat-events 200000]
        [--recovery-events 1000000] [--snapshot-interval-s 10] [--reads 2000]

Every section uses its own topics, consumer groups, Redis key prefixes, keyspaces and
directories, removed at the end. Needs the local stack (``feedbeam infra up``) and Prism.

* throughput (``--events`` engagements of power-law posts and viewers over six hours, their
  posts' creations; medians of ``--runs``): **raw**, the limit, one confluent-kafka
  consumer and ``fastavro.schemaless_reader`` per record; **pipeline**, ``pipelines.features``
  as a bounded re-run on Prism writing to ``--sinks``, with and without the fixed start-up
  of a one-record job; **aggregate**, the same with no sink; **beam state**, the same with
  the state in Beam state (``--state_store=beam``, the Flink layout); **source + decode**,
  the same read with only a count after it (the ceiling of any pipeline on this source).
  Then ``hydrate()`` of 200 candidates on what the pipeline wrote: p50/p99.
* flat: states of each of ``--flat-sizes`` distinct (viewer, author) pairs, viewers and posts
  (built in process and saved as the job's snapshot), then the same ``--flat-events``
  engagements, applied by the streaming job on Prism with every sink on top of each.
  Too-late sentinel records go first and last on every partition: the job starts on the
  first ones alone, and their dead letters say it restored its state; then the input and
  the last sentinels are produced, and the rate runs from there to the last ones seen on
  the DLQ, after their bundle's values were written (polled every 50 ms). Beside it the
  same input applied to the restored
  ``FeatureAggregator`` in this process (no Beam, no stores).
* recovery: ``--recovery-events`` engagements of history (plus a tenth more) produced,
  run A follows them uninterrupted; run B is killed with SIGKILL (its process group: the
  launcher, its LOOPBACK workers and its Prism) once its group committed the history,
  and restarted: time from the restart to lag 0 (committed = end offsets, target < 60 s)
  and to a snapshot that covers the end; then B's Redis equals A's (values to 1e-9;
  events are over eight days old, so every window has drained and the comparison does not
  depend on when each run stopped).
* floors: what the other state layouts cost per bundle: the whole state in one pickled
  value and as NumPy columns in ``ReadModifyWriteState``, read and written back once per
  element of 1,000 events, on Prism, at two state sizes; and this design's aggregation
  alone in process on the throughput input.

Prints medians (and each run), the ratios against the limits and the targets, and writes
``bench/results/features.json``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fastavro  # noqa: E402
import numpy as np  # noqa: E402

from infra.settings import StackSettings  # noqa: E402
from jobs.generate import PRODUCER_CONFIG  # noqa: E402
from jobs.replay_range import CONSUMER_CONFIG  # noqa: E402
from stores.kafka import offsets as kafka_offsets  # noqa: E402
from schemas.codec import HEADER_SIZE, WireCodec  # noqa: E402
from schemas.events import (EngagementEvent, EngagementKind, FollowEvent, MediaType,  # noqa: E402
                            PostEvent, PostEventKind, StoryEvent, dlq_topic)

M = 60_000
HOUR = 60 * M
DAY = 24 * HOUR
TARGET = 0.50
FLAT_LIMIT = 0.25
RECOVERY_TARGET_S = 60.0
RESULTS = REPO / "bench" / "results" / "features.json"
K = EngagementKind


# ------------------------------------------------------------------ workloads


def workload(n: int, end_ms: int, seed: int = 11, span: int = 6 * HOUR,
             id_prefix: str = "") -> list:
    """~``n`` engagements over the ``span`` before ``end_ms`` and their posts' creations."""
    rng = random.Random(seed)
    posts, viewers, authors = max(50, n // 10), max(100, n // 4), max(10, n // 100)
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
            e = EngagementEvent(f"{id_prefix}e{i}", t, kind, viewer, author)
        else:
            created.add(post)
            e = EngagementEvent(f"{id_prefix}e{i}", t, kind, viewer, author, post,
                                media[post % 4],
                                rng.randrange(30_000) if kind is K.VIEW else None)
        events.append(e)
        if kind is K.LIKE and rng.random() < 0.05:
            events.append(EngagementEvent(f"{id_prefix}u{i}",
                                          t + rng.randrange(60_000, min(1_800_000, span)),
                                          K.UNLIKE, viewer, author, post, e.media_type))
        if rng.random() < 0.02:
            events.append(e)
    born = start - min(HOUR, span)
    events += [PostEvent(f"{id_prefix}p{p}", born + p % HOUR, PostEventKind.CREATED, p,
                         p % authors, born + p % HOUR, media[p % 4]) for p in created]
    return sorted(events, key=lambda e: e.event_time)


def produce(bootstrap: str, prefix: str, events: list, partitions: int | None = None) -> None:
    """``events`` to ``<prefix><topic>``; with ``partitions``, engagements go to partition
    ``key % partitions`` (so a test can put records first and last on each)."""
    from confluent_kafka import Producer

    codec = WireCodec()
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    for start in range(0, len(events), 20_000):
        for e in events[start:start + 20_000]:
            topic = prefix + e.TOPIC
            extra = {}
            if partitions and isinstance(e, EngagementEvent):
                extra["partition"] = int(e.key) % partitions
            producer.produce(topic, codec.encode(e, topic), e.key, timestamp=e.event_time,
                             **extra)
        if producer.flush(120):
            raise RuntimeError("events were not all delivered")


def create_topics(bootstrap: str, prefix: str, partitions: int) -> list[str]:
    from confluent_kafka.admin import AdminClient, NewTopic

    topics = [prefix + t for t in (EngagementEvent.TOPIC, PostEvent.TOPIC)]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, parts in [(t, partitions) for t in topics] + [(dlq_topic(t), 1) for t in topics]:
        admin.create_topics([NewTopic(name, parts, 1)])[name].result(timeout=60)
    return topics


def ranges_of(bootstrap: str, topics: list[str]) -> dict:
    return {t: kafka_offsets.resolve_offset_range({"bootstrap.servers": bootstrap}, t, None,
                                                  None) for t in topics}


# ------------------------------------------------------------------ raw loop


def raw_loop(bootstrap: str, ranges: dict[str, dict[int, tuple[int, int]]],
             stamps: dict | None = None) -> int:
    """Consume every range of the topics and decode each body with its schema; returns
    records decoded. ``stamps`` (if given) gets ``first`` and ``last``: perf_counter
    times of the first and last record decoded (the consumer's start-up excluded)."""
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
                n += 1
                if stamps is not None:
                    stamps.setdefault("first", time.perf_counter())
                key = (msg.topic(), msg.partition())
                remaining[key] -= 1
                if not remaining[key]:
                    del remaining[key]
        if stamps is not None:  # the last record was just decoded
            stamps["last"] = time.perf_counter()
            stamps.setdefault("first", stamps["last"])
    finally:
        consumer.close()
    return n


# ------------------------------------------------------------------ jobs


def store_args(settings: StackSettings, key_prefix: str, keyspace: str) -> list[str]:
    return [f"--redis_url={settings.redis_url}", f"--redis_key_prefix={key_prefix}",
            f"--cassandra_host={settings.host}", f"--cassandra_port={settings.cassandra_port}",
            f"--cassandra_keyspace={keyspace}"]


def run_bounded(settings: StackSettings, prism: str, prefix: str, ranges: dict, sinks: str,
                key_prefix: str, keyspace: str, log_dir: str, extra: tuple = ()) -> float:
    """One bounded features job over ``ranges``; returns its wall seconds."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.runner import PipelineState

    from pipelines import features

    options = PipelineOptions([
        "--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK",
        f"--kafka_bootstrap={settings.kafka_bootstrap}", f"--topic_prefix={prefix}",
        *store_args(settings, key_prefix, keyspace), f"--feature_log_dir={log_dir}",
        f"--sinks={sinks}", *extra])
    pipeline = beam.Pipeline(options=options)
    features.build(pipeline, options, ranges=ranges)
    t0 = time.perf_counter()
    state = pipeline.run().wait_until_finish()
    seconds = time.perf_counter() - t0
    if state != PipelineState.DONE:
        raise RuntimeError(f"the features job ended {state}")
    return seconds


def run_source_only(settings: StackSettings, prism: str, prefix: str, ranges: dict) -> float:
    """The same bounded read and decode (``ReadEventBatches``) with only a count after it:
    the ceiling of any pipeline on this source. Returns its wall seconds."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.io.kafka import KafkaReadOptions
    from pipelines.io.source import ReadEventBatches

    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism}",
                               "--environment_type=LOOPBACK",
                               f"--kafka_bootstrap={settings.kafka_bootstrap}",
                               f"--topic_prefix={prefix}"])
    config = options.view_as(KafkaReadOptions).source_config(default_group="bench-source")
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline | ReadEventBatches(config, ranges=ranges, topic_prefix=prefix)
         | beam.Map(len) | beam.CombineGlobally(sum))
    t0 = time.perf_counter()
    pipeline.run().wait_until_finish()
    return time.perf_counter() - t0


class Job:
    """``python -m pipelines.features`` streaming on Prism, in its own process group (the
    launcher with its LOOPBACK workers, and the Prism it starts)."""

    def __init__(self, settings: StackSettings, prism: str, prefix: str, group: str,
                 key_prefix: str, keyspace: str, state_dir: Path, log_dir: Path,
                 log_path: Path, extra: tuple = ()):
        self.args = [
            "--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK",
            "--streaming", f"--kafka_bootstrap={settings.kafka_bootstrap}",
            f"--consumer_group={group}", f"--topic_prefix={prefix}", "--fallback_start=earliest",
            *store_args(settings, key_prefix, keyspace), f"--feature_state_dir={state_dir}",
            f"--feature_log_dir={log_dir}", *extra]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.features",
                                          *self.args], cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the features job exited ({self.proc.returncode}):\n{tail}")

    def kill(self) -> None:
        """SIGKILL to the whole group: nothing gets to clean up or flush."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=wait_s)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def wait_for(predicate, timeout_s: float, what: str, job: Job | None = None, every_s=0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if job is not None:
            job.check()
        time.sleep(every_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def new_keyspace(settings: StackSettings) -> str:
    from stores.cassandra.session import migrate, new_cluster

    keyspace = f"bench_{uuid.uuid4().hex[:8]}"
    cluster = new_cluster(settings.host, settings.cassandra_port)
    try:
        migrate(cluster.connect(), keyspace)
    finally:
        cluster.shutdown()
    return keyspace


def clean(settings: StackSettings, **names) -> None:
    from jobs.clean import clean as clean_run

    try:
        clean_run(settings, **{k: v for k, v in names.items() if v})
    except Exception as exc:  # report and go on: the measurements are what matter here
        print(f"  (cleanup of {names} failed: {exc})")


def read_latency(settings: StackSettings, key_prefix: str, events: list, reads: int,
                 candidates: int = 200) -> dict[str, float]:
    """``hydrate`` of ``candidates`` posts for random viewers, ``reads`` times: ms."""
    from stores.redis.features import OnlineFeatureStore

    rng = random.Random(5)
    posts = sorted({e.post_id for e in events if isinstance(e, EngagementEvent) and e.post_id})
    author_of = {e.post_id: e.author_id for e in events if isinstance(e, EngagementEvent)}
    viewers = sorted({e.viewer_id for e in events if isinstance(e, EngagementEvent)})
    store = OnlineFeatureStore.from_url(settings.redis_url, key_prefix=key_prefix)
    now = int(time.time() * 1000)
    samples = []
    try:
        for i in range(reads + 50):
            batch = rng.sample(posts, min(candidates, len(posts)))
            t0 = time.perf_counter()
            store.hydrate(rng.choice(viewers), batch, [author_of[p] for p in batch], now)
            if i >= 50:  # warm-up: connection, script cache
                samples.append((time.perf_counter() - t0) * 1000)
    finally:
        store.close()
    samples.sort()
    return {"p50_ms": samples[len(samples) // 2], "p99_ms": samples[int(len(samples) * 0.99)],
            "reads": len(samples), "candidates": candidates}


# ------------------------------------------------------------------ throughput


def throughput(settings, prism, args, work: Path, out: dict) -> None:
    bootstrap = settings.kafka_bootstrap
    prefix = f"benchf{uuid.uuid4().hex[:8]}."
    topics = create_topics(bootstrap, prefix, args.partitions)
    last_prefix = None
    try:
        end = int(time.time() * 1000) // HOUR * HOUR - HOUR
        events = workload(args.events, end)
        produce(bootstrap, prefix, events)
        ranges = ranges_of(bootstrap, topics)
        total = sum(kafka_offsets.total_records(r) for r in ranges.values())
        first = topics[0]
        one = {first: {p: (s, s + 1) for p, (s, e) in list(ranges[first].items())[:1]}}
        print(f"throughput: {total:,} records on {', '.join(topics)}", flush=True)
        run_bounded(settings, prism, prefix, one, "", "unused", "unused", str(work / "w"))
        res = out["throughput"] = {"records": total, "raw": [], "pipeline": [],
                                   "aggregate": [], "beam_state": [], "source_only": [],
                                   "startup_s": []}
        for _ in range(args.runs):
            res["startup_s"].append(run_bounded(settings, prism, prefix, one, "", "unused",
                                                "unused", str(work / "w")))
        startup = statistics.median(res["startup_s"])
        for run in range(args.runs):
            t0 = time.perf_counter()
            n = raw_loop(bootstrap, ranges)
            raw_s = time.perf_counter() - t0
            assert n == total, (n, total)
            res["raw"].append(n / raw_s)
            key_prefix = f"benchf{uuid.uuid4().hex[:8]}"
            keyspace = new_keyspace(settings) if "cassandra" in args.sinks else ""
            try:
                seconds = run_bounded(settings, prism, prefix, ranges, args.sinks, key_prefix,
                                      keyspace or "unused", str(work / f"log{run}"))
            finally:
                clean(settings, keyspace=keyspace)
            if last_prefix:
                clean(settings, key_prefix=last_prefix)
            last_prefix = key_prefix
            res["pipeline"].append({"seconds": seconds, "per_s": total / seconds,
                                    "excl_startup": total / max(seconds - startup, 1e-9)})
            agg_s = run_bounded(settings, prism, prefix, ranges, "", "unused", "unused",
                                str(work / "none"))
            res["aggregate"].append({"seconds": agg_s, "per_s": total / agg_s})
            beam_s = run_bounded(settings, prism, prefix, ranges, "", "unused", "unused",
                                 str(work / "none"), ("--state_store=beam",))
            res["beam_state"].append({"seconds": beam_s, "per_s": total / beam_s})
            source_s = run_source_only(settings, prism, prefix, ranges)
            res["source_only"].append({"seconds": source_s, "per_s": total / source_s})
            print(f"  run {run + 1}: raw {n / raw_s:,.0f}/s  pipeline {total / seconds:,.0f}/s "
                  f"({seconds:.1f}s; {total / max(seconds - startup, 1e-9):,.0f}/s excl. "
                  f"start-up {startup:.1f}s)  no sinks {total / agg_s:,.0f}/s  "
                  f"beam state, no sinks {total / beam_s:,.0f}/s  source + decode only "
                  f"{total / source_s:,.0f}/s", flush=True)
        if "redis" in args.sinks and last_prefix and args.reads:
            res["read"] = read_latency(settings, last_prefix, events, args.reads)
        res["events_for_floor"] = events
    finally:
        clean(settings, key_prefix=last_prefix, topic_prefix=prefix)


# ------------------------------------------------------------------ flat


def history_state(size: int, t0: int, params, state_dir: Path) -> dict:
    """A state of ``size`` viewers, (viewer, author) pairs, (viewer, media) pairs and posts,
    from views over the 22 h to 2 h before ``t0``, fired up to 30 minutes before it, saved
    as a snapshot under ``state_dir``. Returns its sizes and how long it took."""
    from domain.feature_aggregator import FeatureAggregator, ItemColumns
    from domain.features import VIEW
    from pipelines.features import params_fingerprint
    from stores.files.feature_state import SnapshotStore

    started = time.perf_counter()
    agg = FeatureAggregator(params)
    span = 20 * HOUR
    step = 20_000
    for lo in range(0, size, step):
        i = np.arange(lo, min(size, lo + step), dtype=np.int64)
        t = t0 - 22 * HOUR + i * span // size
        agg.apply(ItemColumns(np.full(len(i), VIEW), t, 10_000_000 + i, 1 + i % 5000,
                              100_000_000 + i, i % 4, np.full(len(i), 5_000),
                              [f"h{x}".encode() for x in i.tolist()]))
        agg.fire(int(t[-1]) - int(t[-1]) % params.slide_ms)
    agg.fire(t0 - 30 * M)
    SnapshotStore(state_dir).write(agg.export(), {"offsets": [],
                                                  "params": params_fingerprint(params),
                                                  "fired": agg.fired, "sizes": agg.sizes()})
    return {"sizes": agg.sizes(), "build_s": time.perf_counter() - started}


def flat_input(n: int, t0: int, partitions: int) -> tuple[list, list]:
    """``n`` engagements over the 10 minutes from ``t0`` (no post creations: the posts are
    new to the state) and, per partition, a too-late sentinel to go first and last."""
    events = [e for e in workload(n, t0 + 10 * M, seed=23, span=10 * M, id_prefix="in")
              if isinstance(e, EngagementEvent)]
    for e in events:
        assert int(e.key) >= 0
    late = t0 - 3 * HOUR  # more than the lateness behind the restored watermark
    sentinels = {(p, edge): EngagementEvent(f"sentinel-{edge}-{p}", late, K.LIKE, 1, 1,
                                            # a post id that falls on partition p
                                            10**9 * partitions + p, MediaType.PHOTO)
                 for p in range(partitions) for edge in ("first", "last")}
    return events, sentinels


def flat(settings, prism, args, work: Path, out: dict) -> None:
    from domain.feature_aggregator import FeatureAggregator
    from domain.features import FeatureParams
    from pipelines.features import sourced_items
    from pipelines.io.deadletter import read_dead_letters
    from schemas.records import EventBatch
    from stores.files.feature_state import SnapshotStore

    bootstrap = settings.kafka_bootstrap
    params = FeatureParams()
    t0 = int(time.time() * 1000) // params.slide_ms * params.slide_ms - 15 * M
    events, sentinels = flat_input(args.flat_events, t0, args.partitions)
    res = out["flat"] = {"events": len(events), "sizes": {}}
    for size in args.flat_sizes:
        prepared = work / f"state-{size}"
        built = history_state(size, t0, params, prepared)
        entry = res["sizes"][str(size)] = {"state": built, "pipeline": [], "in_process": []}
        print(f"flat: state of {built['sizes']} built in {built['build_s']:.0f}s", flush=True)
        # The same input on the restored state in this process: the aggregation alone.
        for _ in range(args.runs):
            tables, _ = SnapshotStore(prepared).read()
            agg = FeatureAggregator.restore(params, tables)
            codec = WireCodec()
            batches = [sourced_items(EventBatch(
                "engagement-events", 0, events[i:i + 1000], [e.event_time for e in
                                                              events[i:i + 1000]],
                list(range(i, i + len(events[i:i + 1000]))), [e.key for e in events[i:i + 1000]],
                [codec.encode(e, "engagement-events") for e in events[i:i + 1000]]))[0]
                for i in range(0, len(events), 1000)]
            t = time.perf_counter()
            for b in batches:
                agg.apply(b.items)
                agg.fire(int(b.items.t.max()) - int(b.items.t.max()) % params.slide_ms)
            entry["in_process"].append(len(events) / (time.perf_counter() - t))
        for run in range(args.runs):
            prefix = f"benchflat{uuid.uuid4().hex[:8]}."
            key_prefix = f"benchflat{uuid.uuid4().hex[:8]}"
            group = f"bench-flat-{uuid.uuid4().hex[:8]}"
            keyspace = new_keyspace(settings) if "cassandra" in args.sinks else ""
            state_dir = work / f"state-{size}-{run}"
            shutil.copytree(prepared, state_dir)
            topics = create_topics(bootstrap, prefix, args.partitions)
            job = None
            try:
                # The first sentinels alone: their dead letters say the job restored its
                # state and reads. Only then the input, so the clock covers applying it
                # on that state, not the restore (which grows with the state).
                produce(bootstrap, prefix, [sentinels[(p, "first")]
                                            for p in range(args.partitions)], args.partitions)
                job = Job(settings, prism, prefix, group, key_prefix, keyspace or "unused",
                          state_dir, work / f"flatlog{size}-{run}", work / f"flat{size}.log",
                          (f"--sinks={args.sinks}", "--snapshot_interval_s=600"))
                job.start()
                dlq = dlq_topic(topics[0])
                sentinel_ids = {e.event_id for e in sentinels.values()}
                codec = WireCodec()

                def letters_of(edge: str):
                    wanted = {e.event_id for (_, side), e in sentinels.items() if side == edge}
                    found = {codec.decode(lt.value).event_id
                             for lt in read_dead_letters(bootstrap, dlq, timeout_s=10)}
                    if found - sentinel_ids:
                        raise RuntimeError(f"dead letters other than the sentinels: "
                                           f"{sorted(found - sentinel_ids)[:5]}")
                    return found if wanted <= found else None

                wait_for(lambda: letters_of("first"), 600, "the first sentinels' dead letters",
                         job, every_s=0.2)
                started = time.perf_counter()
                produce(bootstrap, prefix, events + [sentinels[(p, "last")]
                                                     for p in range(args.partitions)],
                        args.partitions)
                produced_s = time.perf_counter() - started
                # The end: the last sentinels' dead letters, written at the end of their
                # bundle, after its values: the time includes the writes.
                wait_for(lambda: letters_of("last"), 1200, "the last sentinels' dead letters",
                         job, every_s=0.05)
                took = time.perf_counter() - started
                rate = len(events) / took
                entry["pipeline"].append(rate)
                print(f"  state {size:,}, run {run + 1}: {rate:,.0f} events/s "
                      f"({took:.1f}s from producing the input to its last sentinels' letters; "
                      f"producing took {produced_s:.1f}s of it)", flush=True)
            finally:
                if job is not None:
                    job.stop()
                clean(settings, topic_prefix=prefix, groups=[group], key_prefix=key_prefix,
                      keyspace=keyspace)
                shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(prepared, ignore_errors=True)


# ------------------------------------------------------------------ recovery


#: Ids of the clock records: left out of the comparison (their windows are still open).
CLOCK = 999_999_990


def clock(bootstrap: str, prefix: str, partitions: int) -> None:
    """A record at the current time on every partition: each partition's watermark moves
    there, past every window of the (older) events before it."""
    from confluent_kafka import Producer

    codec = WireCodec()
    now = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    for p in range(partitions):
        for e in (EngagementEvent(f"clock-e{p}", now, K.VIEW, CLOCK, CLOCK, CLOCK + p),
                  PostEvent(f"clock-p{p}", now, PostEventKind.CREATED, CLOCK + p, CLOCK, now)):
            topic = prefix + e.TOPIC
            producer.produce(topic, codec.encode(e, topic), e.key, partition=p, timestamp=now)
    if producer.flush(60):
        raise RuntimeError("the clock records were not delivered")


def committed_total(bootstrap: str, group: str, topics: list[str]) -> int:
    from stores.kafka.lag import committed_offsets

    return sum(v or 0 for v in committed_offsets(bootstrap, group, topics).values())


def applied_through(state_dir: Path, ends: dict, drained_at: int) -> bool:
    """The latest snapshot holds every record and its watermark passed every window."""
    from pipelines.features import snapshot_restart
    from stores.files.feature_state import SnapshotStore

    meta = SnapshotStore(state_dir).read_meta()
    if meta is None or (meta.get("fired") or 0) < drained_at:
        return False
    restart = snapshot_restart(state_dir)
    return all(restart.get(tp, 0) >= end for tp, end in ends.items() if end > 0)


def _string_fields(key: str, blob: bytes) -> dict[bytes, bytes]:
    """A feature string (slots of a post, an author or a viewer's media, a viewer's
    affinity records) as the hash fields it replaced (``value@stamp``)."""
    from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES
    from stores.redis import affinities, slots

    for kind, names in ((":feat:post.", POST_FEATURES), (":feat:author.", AUTHOR_FEATURES),
                        (":feat:aff_media.", MEDIA_TYPES)):
        if kind in key:
            return {n.encode(): f"{v!r}@{s}".encode()
                    for n, (v, s) in slots.fields(names, blob).items()}
    authors, values, stamps = affinities.unpack(blob)
    return {str(a).encode(): f"{v!r}@{s}".encode()
            for a, v, s in zip(authors.tolist(), values.tolist(), stamps.tolist())}


def compare_redis(settings: StackSettings, a: str, b: str) -> dict:
    """Every key of prefix ``a`` against prefix ``b``: feature values to 1e-9 (their stamps
    separately), zset members and scores, anything else exactly."""
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    marker = str(CLOCK)[:-1]
    # The generation marker names each run's Redis (stores.redis.generation): never equal.
    generation = ":meta:generation"
    keys_a = sorted(k.decode()[len(a):] for k in client.scan_iter(match=f"{a}:*", count=5000)
                    if marker not in k.decode() and not k.decode().endswith(generation))
    keys_b = {k.decode()[len(b):] for k in client.scan_iter(match=f"{b}:*", count=5000)
              if marker not in k.decode() and not k.decode().endswith(generation)}
    report = {"keys": len(keys_a), "missing": len(set(keys_a) - keys_b),
              "extra": len(keys_b - set(keys_a)), "values": 0, "different": 0,
              "stamps_different": 0, "examples": []}
    for start in range(0, len(keys_a), 2000):
        chunk = keys_a[start:start + 2000]
        got = {}
        for prefix in (a, b):
            pipe = client.pipeline(transaction=False)
            for key in chunk:
                pipe.type(prefix + key)
            types = pipe.execute()
            pipe = client.pipeline(transaction=False)
            for key, kind in zip(chunk, types):
                if kind == b"hash":
                    pipe.hgetall(prefix + key)
                elif kind == b"zset":
                    pipe.zrange(prefix + key, 0, -1, withscores=True)
                elif kind == b"string" and ":feat:" in key:  # slots or affinity records
                    pipe.get(prefix + key)
                else:
                    pipe.dump(prefix + key)
            got[prefix] = [_string_fields(key, v) if isinstance(v, bytes) and ":feat:" in key
                           else v for key, v in zip(chunk, pipe.execute())]
        for key, x, y in zip(chunk, got[a], got[b]):
            report["values"] += 1
            if isinstance(x, dict) and ":feat:" in key and isinstance(y, dict):
                for field in set(x) | set(y):
                    vx, _, sx = (x.get(field) or b"nan@-1").decode().partition("@")
                    vy, _, sy = (y.get(field) or b"nan@-1").decode().partition("@")
                    if not abs(float(vx) - float(vy)) <= 1e-9 * max(1.0, abs(float(vx))):
                        report["different"] += 1
                        if len(report["examples"]) < 5:
                            report["examples"].append((key, field.decode(), f"{vx}@{sx}",
                                                       f"{vy}@{sy}"))
                    elif sx != sy:
                        report["stamps_different"] += 1
            elif isinstance(x, list) and isinstance(y, list):
                same = ([m for m, _ in x] == [m for m, _ in y] and all(
                    abs(s - t) <= 1e-9 * max(1.0, abs(s)) for (_, s), (_, t) in zip(x, y)))
                if not same:
                    report["different"] += 1
                    if len(report["examples"]) < 5:
                        report["examples"].append((key, x[:3], y[:3]))
            elif x != y:
                report["different"] += 1
                if len(report["examples"]) < 5:
                    report["examples"].append((key, str(x)[:80], str(y)[:80]))
    client.close()
    return report


def dead_letter_reasons(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """How many dead letters ``topics`` hold, per (step, reason) and the first example's
    message."""
    from pipelines.io.deadletter import read_dead_letters

    counts: dict[str, int] = {}
    spans: dict[str, tuple[int, int, int, int]] = {}
    for topic in topics:
        for letter in read_dead_letters(bootstrap, topic):
            key = f"{letter.step}/{letter.reason}"
            if key not in counts:
                print(f"  dead letter {key}: {letter.error[:200]}", flush=True)
            counts[key] = counts.get(key, 0) + 1
            where = f"{key} {letter.topic.rsplit('.', 1)[-1]}[{letter.partition}]"
            lo, hi, t0, t1 = spans.get(where, (letter.offset, letter.offset, letter.failed_at_ms,
                                               letter.failed_at_ms))
            spans[where] = (min(lo, letter.offset), max(hi, letter.offset),
                            min(t0, letter.failed_at_ms), max(t1, letter.failed_at_ms))
    for where, (lo, hi, t0, t1) in sorted(spans.items()):
        print(f"    {where}: offsets {lo}..{hi}, written {t0 / 1000:.1f}..{t1 / 1000:.1f}",
              flush=True)
    return counts


def recovery(settings, prism, args, work: Path, out: dict) -> None:
    from stores.kafka.lag import end_offsets

    bootstrap = settings.kafka_bootstrap
    prefix = f"benchrec{uuid.uuid4().hex[:8]}."
    topics = create_topics(bootstrap, prefix, args.partitions)
    runs = {name: {"group": f"bench-rec-{name}-{uuid.uuid4().hex[:6]}",
                   "key_prefix": f"benchrec{name}{uuid.uuid4().hex[:6]}",
                   "keyspace": new_keyspace(settings) if "cassandra" in args.sinks else ""}
            for name in ("a", "b")}
    jobs: list[Job] = []
    res = out["recovery"] = {}
    try:
        history = args.recovery_events
        end = int(time.time() * 1000) // HOUR * HOUR - 8 * DAY
        events = workload(history + history // 10, end, seed=31, span=DAY, id_prefix="r")
        t = time.perf_counter()
        produce(bootstrap, prefix, events)
        clock(bootstrap, prefix, args.partitions)
        ends = end_offsets(bootstrap, topics)
        total = sum(ends.values())
        newest = max(e.event_time for e in events)
        drained_at = newest - newest % HOUR + 7 * DAY + HOUR  # the last author window end
        print(f"recovery: {total:,} records produced in {time.perf_counter() - t:.0f}s",
              flush=True)

        def job(name: str) -> Job:
            r = runs[name]
            return Job(settings, prism, prefix, r["group"], r["key_prefix"],
                       r["keyspace"] or "unused", work / f"state-{name}", work / f"log-{name}",
                       work / f"recovery-{name}.log",
                       (f"--sinks={args.sinks}",
                        f"--snapshot_interval_s={args.snapshot_interval_s}"))

        a = job("a")
        jobs.append(a)
        t = time.perf_counter()
        a.start()
        wait_for(lambda: applied_through(work / "state-a", ends, drained_at), 3600,
                 "run A to apply everything", a, every_s=2)
        res["uninterrupted_s"] = time.perf_counter() - t
        a.stop()
        dlq = [dlq_topic(topic) for topic in topics]
        letters_a = dead_letter_reasons(bootstrap, dlq)
        res["dead_letters_a"] = sum(letters_a.values())
        print(f"  run A (uninterrupted) applied everything in {res['uninterrupted_s']:.0f}s",
              flush=True)

        b = job("b")
        jobs.append(b)
        b.start()
        wait_for(lambda: committed_total(bootstrap, runs["b"]["group"], topics) >= history,
                 3600, "run B to commit the history", b, every_s=0.5)
        b.kill()
        killed_at = committed_total(bootstrap, runs["b"]["group"], topics)
        res["killed_after_committed"] = killed_at
        from pipelines.features import snapshot_restart

        res["snapshot_held"] = sum((snapshot_restart(work / "state-b") or {}).values())
        t = time.perf_counter()
        b.start()
        wait_for(lambda: committed_total(bootstrap, runs["b"]["group"], topics) >= total, 3600,
                 "run B to reach lag 0", b, every_s=0.2)
        res["to_lag0_s"] = time.perf_counter() - t
        wait_for(lambda: applied_through(work / "state-b", ends, drained_at), 3600,
                 "run B to apply everything", b, every_s=0.5)
        res["to_applied_s"] = time.perf_counter() - t
        b.stop()
        letters = dead_letter_reasons(bootstrap, dlq)
        res["dead_letters_b"] = sum(letters.values()) - res["dead_letters_a"]
        res["dead_letter_reasons"] = {"a": letters_a, "all": letters}
        res["compare"] = compare_redis(settings, runs["a"]["key_prefix"],
                                       runs["b"]["key_prefix"])
        c = res["compare"]
        print(f"  run B killed after {killed_at:,} committed records, its snapshot holding "
              f"{res['snapshot_held']:,}; restarted: lag 0 in "
              f"{res['to_lag0_s']:.1f}s, everything applied (a snapshot covering the end) "
              f"within {res['to_applied_s']:.1f}s", flush=True)
        print(f"  Redis after: {c['keys']:,} keys of run A, {c['missing']} missing in run B, "
              f"{c['extra']} extra, {c['different']} values different "
              f"({c['stamps_different']} write stamps differ with equal values); dead letters: "
              f"run A {res['dead_letters_a']:,}, run B {res['dead_letters_b']:,}", flush=True)
    finally:
        for j in jobs:
            j.stop()
        clean(settings, topic_prefix=prefix, groups=[r["group"] for r in runs.values()])
        for r in runs.values():
            clean(settings, key_prefix=r["key_prefix"], keyspace=r["keyspace"])


# ------------------------------------------------------------------ floors


def rmw_floor(prism: str, layout: str, size: int, elements: int) -> float:
    """Events/s of a stateful DoFn on Prism that reads its whole state (``size`` entries,
    a pickled dict or NumPy columns) from ``ReadModifyWriteState``, updates 1,000 entries
    and writes it back, once per element of 1,000 events."""
    import apache_beam as beam
    from apache_beam.coders import coders
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

    class Update(beam.DoFn):
        STATE = ReadModifyWriteStateSpec("s", coders.PickleCoder())

        def process(self, element, state=beam.DoFn.StateParam(STATE)):
            _, i = element
            current = state.read()
            if current is None:
                current = ({k: (1.0, k, 1) for k in range(size)} if layout == "dict" else
                           {"score": np.ones(size), "ref": np.arange(size),
                            "events": np.ones(size, np.int64)})
            keys = (np.arange(1000) * 7919 + i * 1000) % size
            if layout == "dict":
                for k in keys.tolist():
                    score, ref, n = current[k]
                    current[k] = (score + 1.0, ref, n + 1)
            else:
                current["score"][keys] += 1.0
                current["events"][keys] += 1
            state.write(current)

    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism}",
                               "--environment_type=LOOPBACK"])
    pipeline = beam.Pipeline(options=options)
    _ = (pipeline | beam.Create([(0, i) for i in range(elements)])
         | beam.ParDo(Update()))
    t = time.perf_counter()
    pipeline.run().wait_until_finish()
    return elements * 1000 / (time.perf_counter() - t)


def floors(settings, prism, args, out: dict) -> None:
    from domain.feature_aggregator import FeatureAggregator
    from domain.features import FeatureParams
    from pipelines.features import sourced_items
    from schemas.records import EventBatch

    res = out["floors"] = {}
    events = out.get("throughput", {}).pop("events_for_floor", None)
    if events is None:
        events = workload(args.events, int(time.time() * 1000) // HOUR * HOUR - HOUR)
    params = FeatureParams()
    rates = []
    for _ in range(args.runs):
        batches = []
        for i in range(0, len(events), 1000):
            chunk = events[i:i + 1000]
            for typ in (EngagementEvent, PostEvent):
                part = [e for e in chunk if type(e) is typ]
                if part:
                    batches.append(EventBatch(typ.TOPIC, 0, part, [e.event_time for e in part],
                                              list(range(len(part))), [None] * len(part),
                                              [None] * len(part)))
        agg = FeatureAggregator(params)
        t = time.perf_counter()
        for batch in batches:
            items = sourced_items(batch)[0]
            if items is not None:
                agg.apply(items.items)
                top = int(items.items.t.max())
                agg.fire(top - top % params.slide_ms - HOUR)
        agg.fire(max(e.event_time for e in events) + 30 * DAY)
        rates.append(len(events) / (time.perf_counter() - t))
    res["aggregation_in_process"] = rates
    print(f"floors: this design's aggregation in process (items + apply + fire): "
          f"{statistics.median(rates):,.0f} events/s", flush=True)
    for layout in ("dict", "numpy"):
        for size in args.floor_sizes:
            elements = 50 if size >= 1_000_000 and layout == "dict" else 200
            rate = rmw_floor(prism, layout, size, elements)
            res[f"rmw_{layout}_{size}"] = rate
            print(f"  the whole state as one {'pickled dict' if layout == 'dict' else 'set of NumPy columns'} "
                  f"in ReadModifyWriteState, {size:,} entries: {rate:,.0f} events/s", flush=True)


# ------------------------------------------------------------------ main


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summary(out: dict) -> None:
    print("\nsummary (medians)")
    th = out.get("throughput")
    if th:
        raw = _median(th["raw"])
        pipe = _median([r["per_s"] for r in th["pipeline"]])
        steady = _median([r["excl_startup"] for r in th["pipeline"]])
        agg = _median([r["per_s"] for r in th["aggregate"]])
        beam = _median([r["per_s"] for r in th["beam_state"]])
        source = _median([r["per_s"] for r in th["source_only"]])
        th["summary"] = {"raw": raw, "pipeline": pipe, "pipeline_excl_startup": steady,
                         "aggregate": agg, "beam_state": beam, "source_only": source,
                         "ratio": pipe / raw, "ratio_excl_startup": steady / raw,
                         "target": TARGET}
        print(f"  records                    {th['records']:,}")
        print(f"  raw consume + decode       {raw:>10,.0f} /s   (the limit)")
        print(f"  pipeline, sinks on         {pipe:>10,.0f} /s   {pipe / raw:.1%} of raw "
              f"(target >= {TARGET:.0%}); excl. start-up {steady:,.0f} /s = {steady / raw:.1%}")
        print(f"  pipeline, no sinks         {agg:>10,.0f} /s   {agg / raw:.1%}")
        print(f"  Beam-state layout, no sinks {beam:>9,.0f} /s   {beam / raw:.1%}")
        print(f"  source + decode, nothing else {source:>7,.0f} /s   {source / raw:.1%} "
              "(the ceiling of any pipeline on this source)")
        if "read" in th:
            r = th["read"]
            print(f"  hydrate {r['candidates']} candidates: p50 {r['p50_ms']:.2f} ms, "
                  f"p99 {r['p99_ms']:.2f} ms")
    fl = out.get("flat")
    if fl and len(fl["sizes"]) >= 2:
        rates = {int(s): _median(e["pipeline"]) for s, e in fl["sizes"].items()}
        alone = {int(s): _median(e["in_process"]) for s, e in fl["sizes"].items()}
        spread = max(rates.values()) / min(rates.values()) - 1
        fl["summary"] = {"pipeline": rates, "in_process": alone, "spread": spread,
                         "limit": FLAT_LIMIT}
        for size in sorted(rates):
            print(f"  {fl['events']:,} events on a state of {size:>9,}: pipeline "
                  f"{rates[size]:>8,.0f} /s   aggregation alone {alone[size]:>9,.0f} /s")
        print(f"  rates differ by {spread:.1%} (limit < {FLAT_LIMIT:.0%})")
    rec = out.get("recovery")
    if rec and "to_lag0_s" in rec:
        print(f"  recovery after kill -9: lag 0 in {rec['to_lag0_s']:.1f} s (target < "
              f"{RECOVERY_TARGET_S:.0f} s), applied within {rec['to_applied_s']:.1f} s; "
              f"values equal to the uninterrupted run: "
              f"{rec['compare']['different'] == 0 and rec['compare']['missing'] == 0} "
              f"(extra keys {rec['compare']['extra']}; dead letters A "
              f"{rec.get('dead_letters_a', '?')}, B {rec.get('dead_letters_b', '?')})")
    fo = out.get("floors")
    if fo:
        print("  floors: " + ", ".join(f"{k} {(_median(v) if isinstance(v, list) else v):,.0f}/s"
                                        for k, v in fo.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sinks", default="redis,cassandra,log,top_followers")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--flat-sizes", default="10000,1000000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--flat-events", type=int, default=200_000)
    parser.add_argument("--recovery-events", type=int, default=1_000_000)
    parser.add_argument("--snapshot-interval-s", type=float, default=10.0)
    parser.add_argument("--floor-sizes", default="10000,1000000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the work directory (job logs, snapshots) and say where")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from infra.install import prism_binary

    settings = StackSettings.from_env()
    prism = str(prism_binary(settings))
    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    out: dict = {"config": vars(args)}
    try:
        if "throughput" not in skip:
            throughput(settings, prism, args, work, out)
        if "flat" not in skip:
            flat(settings, prism, args, work, out)
        if "recovery" not in skip:
            recovery(settings, prism, args, work, out)
        if "floors" not in skip:
            floors(settings, prism, args, out)
    finally:
        if args.keep_work:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        out.get("throughput", {}).pop("events_for_floor", None)
    summary(out)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"results in {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
