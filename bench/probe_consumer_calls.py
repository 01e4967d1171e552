"""Probe: does a call on a confluent-kafka consumer wait for a ``consume()`` running on it in
another thread?

    .venv/bin/python bench/probe_consumer_calls.py [--wait-s 3]

The Kafka source keeps one consumer per partition, and a caught-up partition's bundle waits
in ``consume()`` for its next record. Other threads touch such a consumer: the runner's
bundle finalization commits offsets, and another bundle's idle wait looks whether the
partition has records waiting. Each call is timed on a consumer of its own (the baseline)
and on one whose ``consume(timeout=--wait-s)`` runs in another thread.

Measured 2026-12-04 (confluent-kafka 2.16.1, librdkafka 2.16.0; loopback broker): all three
wait for it. ``get_watermark_offsets(cached=True)`` 2.700 s behind a 3 s wait (0.000 s on a
free consumer), ``position`` 2.701 s (0.000 s), a synchronous ``commit`` 2.700 s (0.001 s).
So the source commits through a client of its own, and a bundle looks only at consumers it
can lock (``pipelines.io.kafka._CursorPool.records_waiting``).
"""
import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from infra.settings import StackSettings  # noqa: E402


def timed(call) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wait-s", type=float, default=3.0)
    args = parser.parse_args()
    bootstrap = StackSettings.from_env().kafka_bootstrap
    topic = f"probe-calls-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    try:
        group = f"probe-{uuid.uuid4().hex[:8]}"
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                             "enable.auto.commit": False})
        tp = TopicPartition(topic, 0)
        consumer.assign([TopicPartition(topic, 0, 0)])
        consumer.consume(num_messages=1, timeout=1.0)  # joined, metadata fetched
        calls = {
            "get_watermark_offsets(cached=True)":
                lambda: consumer.get_watermark_offsets(tp, cached=True),
            "position": lambda: consumer.position([tp]),
            "commit (synchronous)": lambda: consumer.commit(
                offsets=[TopicPartition(topic, 0, 0)], asynchronous=False),
        }
        for name, call in calls.items():
            free = timed(call)
            waiting = threading.Thread(target=consumer.consume,
                                       kwargs={"num_messages": 1, "timeout": args.wait_s})
            waiting.start()
            time.sleep(0.3)
            busy = timed(call)
            waiting.join()
            print(f"{name:36s} free {free:.3f} s   during a {args.wait_s:.0f} s consume() "
                  f"in another thread {busy:.3f} s", flush=True)
        consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


if __name__ == "__main__":
    main()
