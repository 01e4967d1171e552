"""Benchmark: the Kafka IO paths against a raw consume + Avro decode loop, in one run.

    .venv/bin/python bench/bench_kafka_io.py [--events 300000] [--partitions 3] [--runs 3]
                                             [--skip replay,beam,floor,streaming]

Produces ``--events`` engagement events (wire format, record timestamps =
event times over 6 hours) to a fresh topic on the local Kafka, then, on that
same topic, measures ``--runs`` times each

* raw: the physical limit of Python on this machine: one confluent-kafka
  consumer with replay's consumer settings, ``consume(num_messages=...)``
  batches, the project's typed decode (``WireCodec.decode``) of each value,
  nothing written; ``raw_dict`` the same with ``fastavro.schemaless_reader``
  on the body only (no dataclass): the limit of replay, which builds columns
  from dicts;
* replay: ``jobs.replay.replay()`` over the whole topic into a fresh
  directory (decode with accept/reject checks, Arrow columns, Parquet files);
* beam: a bounded ``ReadFromKafka`` over the whole topic (ranges from
  ``stores.kafka.offsets``; one element per partition poll) into
  ``DecodeBatches`` and a sink counting per bundle, on Prism (LOOPBACK):
  wall time of ``run().wait_until_finish()``; ``flink``: the same on the
  Flink job server (``feedbeam infra up flink``; ``--skip flink`` without it).
  The same pipeline over one record gives each runner's fixed job start-up
  cost, so both the end-to-end rate and the rate excluding start-up are
  reported (the targets apply to the end-to-end rate);
* floor: Beam's own cost on Prism, with no Kafka: a splittable DoFn that
  claims an offset per record and emits ``RecordBatch``es of ``--batch``
  copies of one constant engagement event (one restriction per partition),
  an identity DoFn in decode's place, and the same counting sink; wall time
  less its one-element start-up. A source + decode in Beam pays the raw
  loop's work and this, so ``1 / (1/raw + 1/floor)`` bounds it. The same with
  the real ``DecodeBatches`` in the identity's place: what a source + decode
  gets with Kafka free;
* streaming: an unbounded ``ReadFromKafka`` of the topic from earliest into
  ``DecodeBatches`` and a sink adding each bundle's count to a Redis counter;
  the rate is records over the time from the first to the last record
  counted (start-up excluded by construction); the job is then cancelled.

Prints the median records/s of each and its ratio to raw (targets: beam
>= 70% on Prism, >= 50% on Flink, streaming >= 60%, replay >= 70% of the
dict limit), and the ceiling the floor sets. The topic and Redis keys are deleted afterwards.
Needs the local stack (``feedbeam infra up``) and the Prism binary.
"""
from __future__ import annotations

import argparse
import io
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
from jobs.replay_parquet import replay  # noqa: E402
from jobs.replay_range import CONSUMER_CONFIG  # noqa: E402
from stores.kafka import offsets as kafka_offsets  # noqa: E402
from schemas.codec import HEADER_SIZE, WireCodec  # noqa: E402
from schemas.events import EngagementEvent, EngagementKind, MediaType  # noqa: E402

T0 = 1_714_557_600_000  # 2024-05-01T10:00Z
SPAN_MS = 6 * 3_600_000
MEASURES = ("raw", "replay", "beam", "floor", "streaming", "flink")  # floor: two measures
TARGETS = {"replay": 0.70, "beam": 0.70, "streaming": 0.60, "flink": 0.50}
COUNT_NAMESPACE = "bench"


def _events(n: int):
    kinds = list(EngagementKind)
    media = list(MediaType)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        profile = kind is EngagementKind.PROFILE_VIEW
        yield EngagementEvent(
            event_id=f"e-{i:016x}", event_time=T0 + i * SPAN_MS // n, kind=kind,
            viewer_id=(i * 7919) % 100_000, author_id=(i * 104_729) % 20_000,
            post_id=None if profile else (i * 31) % 1_000_000,
            media_type=None if profile else media[i % len(media)],
            dwell_ms=1500 + i % 5000 if kind is EngagementKind.VIEW else None)


def produce(bootstrap: str, topic: str, n: int) -> None:
    from confluent_kafka import Producer

    codec = WireCodec()
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    for event in _events(n):
        value = codec.encode(event, topic)
        while True:
            try:
                producer.produce(topic, value, event.key, timestamp=event.event_time)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("events were not all delivered")


def raw_loop(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]],
             typed: bool = True) -> int:
    """Consume every range and decode each value (typed events, or with ``typed=False``
    fastavro dicts of the body only); returns records decoded."""
    from confluent_kafka import Consumer, TopicPartition

    codec = WireCodec()
    writer = codec._decoder(codec.schema_id_of(EngagementEvent)).writer
    consumer = Consumer({"bootstrap.servers": bootstrap, **CONSUMER_CONFIG})
    consumer.assign([TopicPartition(topic, p, s) for p, (s, e) in ranges.items() if e > s])
    remaining = {p: e - s for p, (s, e) in ranges.items() if e > s}
    n = 0
    reader = fastavro.schemaless_reader
    decode = codec.decode
    try:
        while remaining:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is not None:
                    continue  # partition EOF
                if typed:
                    decode(msg.value(), EngagementEvent)
                else:
                    buf = io.BytesIO(msg.value())
                    buf.seek(HEADER_SIZE)
                    reader(buf, writer, None)
                n += 1
                p = msg.partition()
                remaining[p] -= 1
                if not remaining[p]:
                    del remaining[p]
    finally:
        consumer.close()
    return n


# ------------------------------------------------------------------ Beam on Prism


def _beam_options(runner: str, *extra: str):
    """Prism (``runner`` is the binary's path) or ``flink:<job endpoint>``."""
    from apache_beam.options.pipeline_options import PipelineOptions

    if runner.startswith("flink:"):
        return PipelineOptions(["--runner=FlinkRunner", f"--job_endpoint={runner[6:]}",
                                "--environment_type=LOOPBACK", *extra])
    return PipelineOptions(["--runner=PrismRunner", f"--prism_location={runner}",
                            "--environment_type=LOOPBACK", *extra])


def _source_config(bootstrap: str):
    from pipelines.io.kafka import KafkaSourceConfig

    # The big-fetch settings of replay and the raw loop, so only the code differs.
    fetch = {k: v for k, v in CONSUMER_CONFIG.items()
             if k.startswith(("fetch.", "max.partition.", "queued."))}
    return KafkaSourceConfig(
        consumer_config={"bootstrap.servers": bootstrap,
                         "group.id": f"bench-{uuid.uuid4().hex[:8]}", **fetch},
        start_from="earliest", commit_offsets=False)


def _count_fn():
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    class CountPerBundle(beam.DoFn):
        """Counts the records of the batches; one metric update per bundle."""

        def setup(self):
            self._counter = Metrics.counter(COUNT_NAMESPACE, "counted")

        def start_bundle(self):
            self._n = 0

        def process(self, batch):
            self._n += len(batch)

        def finish_bundle(self):
            self._counter.inc(self._n)

    return CountPerBundle()


def beam_bounded(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]],
                 prism: str) -> tuple[int, float]:
    """Run ReadFromKafka(ranges) | DecodeBatches | count on Prism (or ``flink:<endpoint>``):
    ``(counted, seconds)``."""
    import apache_beam as beam

    from pipelines.io.deadletter import DecodeBatches
    from pipelines.io.kafka import ReadFromKafka

    pipeline = beam.Pipeline(options=_beam_options(prism))
    decoded = (pipeline
               | "Read" >> ReadFromKafka(_source_config(bootstrap), ranges={topic: ranges})
               | "Decode" >> DecodeBatches())
    _ = decoded.events | "Count" >> beam.ParDo(_count_fn())
    return _run_counted(pipeline)


def _run_counted(pipeline) -> tuple[int, float]:
    """Run a bounded pipeline to the end: ``(elements counted by _count_fn, wall seconds)``."""
    from apache_beam.metrics.metric import MetricsFilter

    t0 = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - t0
    found = result.metrics().query(MetricsFilter().with_name("counted"))["counters"]
    return sum(c.committed or 0 for c in found), seconds


def beam_floor(total: int, partitions: int, prism: str, decode: bool = False,
               batch: int = 1000) -> tuple[int, float]:
    """A splittable DoFn (``partitions`` restrictions) claiming ``total`` offsets one by
    one and emitting them as ``RecordBatch``es of ``batch`` records of one constant
    engagement event, | identity (or ``DecodeBatches`` if ``decode``) | count, on
    Prism: ``(counted, seconds)``."""
    import apache_beam as beam
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.transforms.core import RestrictionProvider

    from pipelines.io.deadletter import DecodeBatches
    from schemas.records import RecordBatch

    topic = EngagementEvent.TOPIC
    value = WireCodec().encode(next(_events(1)), topic)

    class Ranges(RestrictionProvider):
        def initial_restriction(self, element):
            return OffsetRange(*element)

        def create_tracker(self, restriction):
            return OffsetRestrictionTracker(restriction)

        def restriction_size(self, element, restriction):
            return restriction.size()

        def split(self, element, restriction):
            yield restriction  # one restriction per "partition", as the Kafka read

    class Emit(beam.DoFn):
        def process(self, element, tracker=beam.DoFn.RestrictionParam(Ranges())):
            position = tracker.current_restriction().start
            offsets = []
            while tracker.try_claim(position):
                offsets.append(position)
                position += 1
                if len(offsets) == batch:
                    yield _batch(offsets)
                    offsets = []
            if offsets:
                yield _batch(offsets)

    def _batch(offsets):
        n = len(offsets)
        return RecordBatch(topic, 0, offsets, [b"k"] * n, [value] * n,
                           [T0 + o for o in offsets])

    per = -(-total // partitions)
    starts = [(i * per, min(total, (i + 1) * per)) for i in range(partitions) if i * per < total]
    pipeline = beam.Pipeline(options=_beam_options(prism))
    records = (pipeline
               | "Ranges" >> beam.Create(starts)
               | "Emit" >> beam.ParDo(Emit()))
    out = ((records | "Decode" >> DecodeBatches()).events if decode
           else records | "Identity" >> beam.Map(lambda r: r))
    _ = out | "Count" >> beam.ParDo(_count_fn())
    return _run_counted(pipeline)


def _redis_count_fn(redis_url: str, key: str, total: int):
    import apache_beam as beam

    class CountToRedis(beam.DoFn):
        """Adds each bundle's count to ``key``; stamps the first and the last bundle."""

        def setup(self):
            import redis

            self._client = redis.Redis.from_url(redis_url)

        def start_bundle(self):
            self._n = 0

        def process(self, batch):
            if not self._n:
                self._client.set(f"{key}:first", time.time(), nx=True)
            self._n += len(batch)

        def finish_bundle(self):
            if self._n and self._client.incrby(key, self._n) >= total:
                self._client.set(f"{key}:last", time.time(), nx=True)

        def teardown(self):
            self._client.close()

    return CountToRedis()


def beam_streaming(bootstrap: str, topic: str, total: int, prism: str, redis_url: str,
                   timeout_s: float = 600.0) -> tuple[int, float]:
    """Stream the topic from earliest until ``total`` are counted: ``(counted, seconds)``.

    Seconds run from the first record's arrival in the sink to the bundle
    that brings the count to ``total``; the job is cancelled afterwards.
    """
    import apache_beam as beam
    import redis
    from apache_beam.runners.runner import PipelineState

    from pipelines.io.deadletter import DecodeBatches
    from pipelines.io.kafka import ReadFromKafka

    key = f"bench:{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    pipeline = beam.Pipeline(options=_beam_options(prism, "--streaming"))
    decoded = (pipeline
               | "Read" >> ReadFromKafka(_source_config(bootstrap), [topic])
               | "Decode" >> DecodeBatches())
    _ = decoded.events | "Count" >> beam.ParDo(_redis_count_fn(redis_url, key, total))
    result = pipeline.run()
    try:
        deadline = time.monotonic() + timeout_s
        while client.get(f"{key}:last") is None:
            if PipelineState.is_terminal(result.state) or time.monotonic() > deadline:
                raise RuntimeError(f"streaming job {result.state}; counted "
                                   f"{int(client.get(key) or 0)} of {total}")
            time.sleep(0.05)
        first, last = (float(client.get(f"{key}:{k}")) for k in ("first", "last"))
        return int(client.get(key)), last - first
    finally:
        result.cancel()
        deadline = time.monotonic() + 60
        while not PipelineState.is_terminal(result.state) and time.monotonic() < deadline:
            time.sleep(0.2)
        client.delete(key, f"{key}:first", f"{key}:last")
        client.close()


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--skip", default="",
                        help="comma-separated measures to leave out: replay, beam, floor, "
                             "streaming, flink")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(MEASURES[1:]):
        parser.error(f"--skip takes {', '.join(MEASURES[1:])}")
    from confluent_kafka.admin import AdminClient, NewTopic

    from infra.install import prism_binary

    settings = StackSettings.from_env()
    bootstrap = args.bootstrap or settings.kafka_bootstrap
    prism = str(prism_binary(settings))
    if "flink" in MEASURES and "flink" not in skip:
        from infra.services import flink_job_endpoint, flink_ready

        if not flink_ready(settings):
            parser.error("the Flink job server is not answering: start it with "
                         "`feedbeam infra up flink`, or --skip flink")
        flink = f"flink:{flink_job_endpoint(settings)}"
    topic = f"bench.{uuid.uuid4().hex[:8]}.engagement-events"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(timeout=60)
    rates: dict[str, list[float]] = {m: [] for m in MEASURES if m not in skip}
    rates["raw_dict"] = []
    startup: dict[str, list[float]] = {"beam": [], "flink": []}
    steady: dict[str, list[float]] = {"beam": [], "flink": []}
    try:
        t0 = time.perf_counter()
        produce(bootstrap, topic, args.events)
        print(f"produced {args.events} engagement events to {topic} "
              f"in {time.perf_counter() - t0:.1f}s")
        ranges = kafka_offsets.resolve_offset_range({"bootstrap.servers": bootstrap}, topic,
                                                    None, None)
        total = kafka_offsets.total_records(ranges)
        # Warm up (the Prism job server starts once per process), then the fixed
        # cost of a job on each runner: the same pipeline over a single record.
        one = {p: (s, s + 1) for p, (s, e) in list(ranges.items())[:1]}
        for name, runner in (("beam", prism), ("flink", flink if "flink" in rates else None)):
            if name not in rates:
                continue
            beam_bounded(bootstrap, topic, one, runner)
            for _ in range(args.runs):
                n, seconds = beam_bounded(bootstrap, topic, one, runner)
                assert n == 1, n
                startup[name].append(seconds)
            print(f"{name} job start-up (1 record): "
                  + "  ".join(f"{s:.2f}s" for s in startup[name]))
        floor_startup = 0.0
        floors: dict[str, list[float]] = {"floor": [], "floor_decode": []}

        def bounded_run(name: str, runner: str) -> str:
            """One bounded source + decode job over the topic on ``runner``: its rate,
            recorded under ``name``, whole and less the runner's job start-up."""
            n, seconds = beam_bounded(bootstrap, topic, ranges, runner)
            assert n == total, (n, total)
            rates[name].append(n / seconds)
            steady[name].append(n / max(seconds - statistics.median(startup[name]), 1e-9))
            return (f"{name} {rates[name][-1]:,.0f} ({seconds:.1f}s; "
                    f"{steady[name][-1]:,.0f} excl. start-up)")

        if "floor" in rates:
            beam_floor(1, 1, prism)
            floor_startup = statistics.median(beam_floor(1, 1, prism)[1] for _ in range(2))
        with tempfile.TemporaryDirectory(prefix="bench-kafka-io-") as tmp:
            for run in range(args.runs):
                line = [f"run {run + 1}:"]
                t0 = time.perf_counter()
                n = raw_loop(bootstrap, topic, ranges)
                rates["raw"].append(n / (time.perf_counter() - t0))
                assert n == total, (n, total)
                line.append(f"raw {rates['raw'][-1]:,.0f}")
                t0 = time.perf_counter()
                n = raw_loop(bootstrap, topic, ranges, typed=False)
                rates["raw_dict"].append(n / (time.perf_counter() - t0))
                line.append(f"raw_dict {rates['raw_dict'][-1]:,.0f}")
                if "replay" in rates:
                    t0 = time.perf_counter()
                    result = replay(bootstrap, topic, ranges, Path(tmp) / f"run{run}",
                                    progress=False)
                    rates["replay"].append(result.records_read / (time.perf_counter() - t0))
                    assert result.reconciles and result.rows_written == total, \
                        result.reconciliation()
                    line.append(f"replay {rates['replay'][-1]:,.0f}")
                if "beam" in rates:
                    line.append(bounded_run("beam", prism))
                if "floor" in rates:
                    for name, decode in (("floor", False), ("floor_decode", True)):
                        n, seconds = beam_floor(total, args.partitions, prism, decode)
                        assert n == total, (n, total)
                        floors[name].append(n / max(seconds - floor_startup, 1e-9))
                        line.append(f"{name} {floors[name][-1]:,.0f} ({seconds:.1f}s)")
                if "flink" in rates:
                    line.append(bounded_run("flink", flink))
                if "streaming" in rates:
                    n, seconds = beam_streaming(bootstrap, topic, total, prism,
                                                settings.redis_url)
                    assert n == total, (n, total)
                    rates["streaming"].append(n / seconds)
                    line.append(f"streaming {rates['streaming'][-1]:,.0f}")
                print("  ".join(line) + "  rec/s", flush=True)
    finally:
        admin.delete_topics([topic])[topic].result(timeout=60)

    raw = statistics.median(rates["raw"])
    raw_dict = statistics.median(rates["raw_dict"])
    print(f"\nmedian of {args.runs} runs, {total:,} records, {args.partitions} partitions:")
    print(f"  {'raw consume+typed decode (limit)':<36} {raw:>10,.0f} rec/s")
    print(f"  {'raw consume+dict decode (limit)':<36} {raw_dict:>10,.0f} rec/s  (replay's limit)")
    labels = {"replay": "replay to Parquet",
              "beam": "beam source+decode on Prism",
              "flink": "beam source+decode on Flink",
              "streaming": "beam streaming, first->last record"}
    if "floor" in rates:
        floor = statistics.median(floors["floor"])
        ceiling = 1 / (1 / raw + 1 / floor)
        with_decode = statistics.median(floors["floor_decode"])
        print(f"  {'beam floor (no Kafka, no decode)':<36} {floor:>10,.0f} rec/s  excl. start-up "
              f"({floor_startup:.2f}s)")
        print(f"  {'  -> ceiling for source+decode':<36} {ceiling:>10,.0f} rec/s  "
              f"{ceiling / raw:>4.0%} of raw = 1 / (1/raw + 1/floor)")
        print(f"  {'beam floor + DecodeBatches, no Kafka':<36} {with_decode:>10,.0f} rec/s  "
              f"{with_decode / raw:>4.0%} of raw (typed events: the most a source+decode gets)")
    for name, label in labels.items():
        if name not in rates:
            continue
        rate = statistics.median(rates[name])
        limit, limit_name = (raw_dict, "raw dict") if name == "replay" else (raw, "raw")
        print(f"  {label:<36} {rate:>10,.0f} rec/s  {rate / limit:>4.0%} of {limit_name} "
              f"(target >= {TARGETS[name]:.0%})")
        if name in steady:
            rate = statistics.median(steady[name])
            print(f"  {name + ', excluding start-up':<36} {rate:>10,.0f} rec/s  "
                  f"{rate / raw:>4.0%} of raw   (start-up {statistics.median(startup[name]):.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
