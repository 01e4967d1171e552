"""Benchmark: ``feedbeam replay`` to Parquet against a raw consume + Avro decode loop.

    .venv/bin/python bench/bench_replay.py [--events 300000] [--partitions 3] [--runs 3]

Produces ``--events`` engagement events (wire format, record timestamps =
event times over 6 hours) to a fresh topic on the local Kafka, then, on that
same topic, alternately runs

* raw: the physical limit of Python on this machine: one confluent-kafka
  consumer with replay's consumer settings, ``consume(num_messages=...)``
  batches, ``fastavro.schemaless_reader`` on the body after the 5-byte header,
  no dataclass, nothing written;
* replay: ``jobs.replay.replay()`` over the whole topic into a fresh
  directory (decode with accept/reject checks, Arrow columns, Parquet files).

Each ``--runs`` times; prints the median records/s of both and their ratio.
The topic is deleted afterwards. Needs the local stack (``feedbeam infra up``).
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
from jobs.replay import CONSUMER_CONFIG, replay, resolve_ranges, RangeSpec  # noqa: E402
from schemas.codec import HEADER_SIZE, WireCodec  # noqa: E402
from schemas.events import EngagementEvent, EngagementKind, MediaType  # noqa: E402

T0 = 1_714_557_600_000  # 2024-05-01T10:00Z
SPAN_MS = 6 * 3_600_000


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


def raw_loop(bootstrap: str, topic: str, ranges: dict[int, tuple[int, int]]) -> int:
    """Consume every range and decode each body with fastavro; returns records decoded."""
    from confluent_kafka import Consumer, TopicPartition

    codec = WireCodec()
    writer = codec._decoder(codec.schema_id_of(EngagementEvent)).writer
    consumer = Consumer({"bootstrap.servers": bootstrap, **CONSUMER_CONFIG})
    consumer.assign([TopicPartition(topic, p, s) for p, (s, e) in ranges.items() if e > s])
    remaining = {p: e - s for p, (s, e) in ranges.items() if e > s}
    n = 0
    reader = fastavro.schemaless_reader
    try:
        while remaining:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is not None:
                    continue  # partition EOF
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bootstrap", default=None)
    args = parser.parse_args(argv)
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap = args.bootstrap or StackSettings.from_env().kafka_bootstrap
    topic = f"bench.{uuid.uuid4().hex[:8]}.engagement-events"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, args.partitions, 1)])[topic].result(timeout=60)
    try:
        t0 = time.perf_counter()
        produce(bootstrap, topic, args.events)
        print(f"produced {args.events} engagement events to {topic} "
              f"in {time.perf_counter() - t0:.1f}s")
        ranges = resolve_ranges(bootstrap, topic, RangeSpec("offset"))
        total = sum(e - s for s, e in ranges.values())
        raw_rates, replay_rates = [], []
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            for run in range(args.runs):
                t0 = time.perf_counter()
                n = raw_loop(bootstrap, topic, ranges)
                raw_rates.append(n / (time.perf_counter() - t0))
                out = Path(tmp) / f"run{run}"
                t0 = time.perf_counter()
                result = replay(bootstrap, topic, ranges, out, progress=False)
                replay_rates.append(result.records_read / (time.perf_counter() - t0))
                assert n == total and result.reconciles and result.rows_written == total, \
                    (n, total, result.reconciliation())
                print(f"run {run + 1}: raw {raw_rates[-1]:>10,.0f} rec/s   "
                      f"replay {replay_rates[-1]:>10,.0f} rec/s   ({result.files} files)")
    finally:
        admin.delete_topics([topic])[topic].result(timeout=60)
    raw, rep = statistics.median(raw_rates), statistics.median(replay_rates)
    print(f"median of {args.runs}: raw consume+decode {raw:,.0f} rec/s, "
          f"replay to Parquet {rep:,.0f} rec/s, ratio {rep / raw:.0%} (target >= 70%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
