"""``feedbeam demo``: the whole system, as far as it exists, on the local stack.

Brings the local servers up, creates the topics, applies the Cassandra schema,
produces a synthetic workload to Kafka and prints what landed there: events
per topic and partition, dead-letter counts, and a decoded sample of each
topic. Every step is the same code path as the matching subcommand, so the
demo shows exactly what a data engineer would get running them one by one.
"""
from __future__ import annotations

import argparse
import json
import time

from infra import stack
from infra.settings import StackSettings
from jobs.errors import UserFacingError
from schemas.events import TOPICS, dlq_topic

# A workload that shows every feature (celebrities above the push threshold,
# active stories) yet is produced in well under a minute on two cores.
DEMO_GENERATE_ARGS = [
    "--seed", "7", "--users", "5000", "--avg-following", "60",
    "--celebrities", "2", "--push-threshold", "1000", "--duration", "2h",
    "--posts-per-day", "2", "--stories-per-day", "1",
]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="set up the local stack, produce a workload, show what landed",
        description=__doc__.split("\n\n")[1])
    p.add_argument("--partitions", type=int, default=3,
                   help="partitions per topic when the topics are created (default 3)")
    p.add_argument("--samples", type=int, default=2,
                   help="decoded events to show per topic (default 2)")
    p.add_argument("--skip-generate", action="store_true",
                   help="do not produce a new workload; only show what is in Kafka")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace, settings: StackSettings) -> int:
    from jobs import generate, topics
    from schemas.cassandra import DEFAULT_KEYSPACE, migrate, new_cluster

    started = time.monotonic()
    _step("1/4 local stack: Kafka, Cassandra, Redis (installs on first run)")
    for service in stack.up(settings):
        print("   " + service.line())

    _step("2/4 topics and their dead-letter twins")
    created = topics.create_topics(
        settings.kafka_bootstrap, topics.feed_topics(), partitions=args.partitions)
    print("   " + ", ".join(f"{name} ({state})" for name, state in created.items()))

    _step(f"3/4 Cassandra schema (keyspace {DEFAULT_KEYSPACE})")
    cluster = new_cluster(settings.host, settings.cassandra_port)
    try:
        for result in migrate(cluster.connect(), DEFAULT_KEYSPACE):
            print(f"   {result.version:04d} {result.name}: {result.status}")
    finally:
        cluster.shutdown()

    if not args.skip_generate:
        _step("4/4 synthetic workload -> Kafka")
        from jobs.cli import build_parser

        gen_args = build_parser().parse_args(["generate", *DEMO_GENERATE_ARGS])
        generate.run_generate(gen_args, settings)

    _step("what is in Kafka now")
    _print_topics(settings)
    _print_samples(settings, args.samples)
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s. The servers keep "
          "running; `.venv/bin/feedbeam infra down` stops them.")
    return 0


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _print_topics(settings: StackSettings) -> None:
    from jobs.topics import describe_topics

    described = {name: (parts, total) for name, parts, total in
                 describe_topics(settings.kafka_bootstrap)}
    missing = [t for t in TOPICS if t not in described]
    if missing:
        raise UserFacingError(f"topics missing after creation: {missing}")
    print(f"   {'topic':<20} {'partitions':>10} {'events':>10} {'dead letters':>13}")
    for topic in TOPICS:
        parts, total = described[topic]
        dead = described.get(dlq_topic(topic), (0, 0))[1]
        print(f"   {topic:<20} {parts:>10} {total:>10} {dead:>13}")


def _print_samples(settings: StackSettings, per_topic: int) -> None:
    """Decode the first ``per_topic`` records of partition 0 of each topic."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas.codec import WireCodec

    if per_topic <= 0:
        return
    codec = WireCodec()
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": "feedbeam-demo-sample",
        "enable.auto.commit": False,
    })
    try:
        for topic in TOPICS:
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            messages = consumer.consume(num_messages=per_topic, timeout=5.0)
            print(f"\n   {topic} (partition 0, first {len(messages)}):")
            for message in messages:
                if message.error():
                    print(f"     error: {message.error()}")
                    continue
                event = codec.decode(message.value())
                print(f"     offset {message.offset()}: "
                      + json.dumps(event.to_avro(), separators=(",", ":")))
    finally:
        consumer.close()
