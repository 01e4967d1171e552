"""The recent records of some topics, read once with a plain consumer (no group, no commit).

    for batch in read_window({"bootstrap.servers": "127.0.0.1:9092"},
                             ["post-events"], since_ms=now - 600_000, max_records=100_000):
        ...  # schemas.records.RecordBatch, offset order per partition

For a job that must derive again what it derived from its recent input, when a
store lost it (the ranking job's pending refreshes after a Redis loss). Per
partition the window runs from the first record whose timestamp is at or after
``since_ms`` (Kafka's time index, ``stores.kafka.offsets.resolve_time_range``)
to the end the partition had when the window was resolved; over
``max_records`` in all, each partition keeps its newest share.
"""
from __future__ import annotations

import time
from typing import Iterator, Mapping, Sequence

from schemas.records import RecordBatch
from stores.kafka.offsets import resolve_time_range

#: Records per batch handed out.
DEFAULT_BATCH = 1000


class WindowReadError(RuntimeError):
    """The window's records did not all arrive within the timeout."""


def window_ranges(config: Mapping, topics: Sequence[str], since_ms: int,
                  max_records: int) -> dict[tuple[str, int], tuple[int, int]]:
    """``{(topic, partition): (start, stop)}`` of the window (empty ranges left out)."""
    ranges = {(topic, p): r for topic in topics
              for p, r in resolve_time_range(config, topic, since_ms, None).items()
              if r[1] > r[0]}
    total = sum(stop - start for start, stop in ranges.values())
    if total > max_records:
        share = max(1, max_records // len(ranges))
        ranges = {tp: (max(start, stop - share), stop) for tp, (start, stop) in ranges.items()}
    return ranges


def read_window(config: Mapping, topics: Sequence[str], since_ms: int, max_records: int,
                batch: int = DEFAULT_BATCH, timeout_s: float = 60.0) -> Iterator[RecordBatch]:
    """The window's records as ``RecordBatch``es of up to ``batch`` records of one
    partition; raises ``WindowReadError`` if they are not all read within ``timeout_s``."""
    from confluent_kafka import Consumer, TopicPartition

    ranges = window_ranges(config, topics, since_ms, max_records)
    if not ranges:
        return
    consumer = Consumer({**config, "group.id": "feedbeam-window", "enable.auto.commit": False,
                         "enable.partition.eof": False})
    try:
        consumer.assign([TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()])
        left = {tp: stop for tp, (_, stop) in ranges.items()}
        held: dict[tuple[str, int], list] = {}
        deadline = time.monotonic() + timeout_s
        while left:
            if time.monotonic() > deadline:
                raise WindowReadError(f"{sum(left.values())} records of {sorted(left)} not read "
                                      f"within {timeout_s:.0f}s")
            for message in consumer.consume(batch, timeout=0.5):
                if message.error() is not None:
                    continue  # partition EOF and the like: the offsets tell when we are done
                tp = (message.topic(), message.partition())
                stop = left.get(tp)
                if stop is None or message.offset() >= stop:
                    continue
                rows = held.setdefault(tp, [])
                rows.append(message)
                if message.offset() >= stop - 1:
                    del left[tp]
                if len(rows) >= batch or tp not in left:
                    yield _batch(tp, held.pop(tp))
            # A partition may end in records no consumer sees (transaction markers):
            # its position past the stop says it is done.
            for position in consumer.position([TopicPartition(t, p) for t, p in left]):
                tp = (position.topic, position.partition)
                if position.offset >= left[tp]:
                    del left[tp]
                    rows = held.pop(tp, None)
                    if rows:
                        yield _batch(tp, rows)
        for tp, rows in held.items():
            if rows:
                yield _batch(tp, rows)
    finally:
        consumer.close()


def _batch(tp: tuple[str, int], messages: list) -> RecordBatch:
    return RecordBatch(tp[0], tp[1], [m.offset() for m in messages], [m.key() for m in messages],
                       [m.value() for m in messages], [m.timestamp()[1] for m in messages])


__all__ = ["read_window", "window_ranges", "WindowReadError", "DEFAULT_BATCH"]
