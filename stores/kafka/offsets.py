"""Resolve a time range or an offset range of a topic to per-partition offset ranges.

Plain functions over a confluent-kafka ``Consumer`` (or a consumer config
dict, from which a short-lived consumer is built), shared by
``feedbeam replay`` and the bounded Beam Kafka read. Every function returns
``dict[int, tuple[int, int]]``: partition -> half-open offset range
``[start, stop)``; ``start == stop`` is an empty partition range::

    ranges = resolve_time_range(consumer, "post-events", from_ms, to_ms)
    ranges = resolve_offset_range(consumer, "post-events", 0, 1000)   # same for all
    ranges = resolve_partition_offsets(consumer, "post-events",
                                       parse_partition_offsets("0:10-200,1:0-"))

Time ranges and Kafka's time index: ``offsets_for_times(t)`` answers the
*first offset whose record timestamp is >= t*. A time range ``[from, to)``
becomes, per partition, ``start = first offset with timestamp >= from`` and
``stop = first offset with timestamp >= to`` (the end offset if there is
none). With ``CreateTime`` timestamps (the producer's, here the event time)
timestamps are not monotonic in offsets, so the resolved range is *every
record between those two boundary offsets*: a late record inside it may carry
a timestamp before ``from``, and a record after ``stop`` may carry one before
``to``. Nothing is filtered by timestamp afterwards; that keeps a replay
exactly the offset range it prints, so counts reconcile with the topic and
the printed ranges reproduce the replay.

Open ends (no ``to``, a partition range ``0:10-``) resolve to the partition's
high watermark *at resolve time*, so the range is bounded even while
producers keep writing.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Mapping, Union

OffsetRanges = dict[int, tuple[int, int]]

DEFAULT_TIMEOUT_S = 15.0


class OffsetRangeError(ValueError):
    """A range cannot be resolved: the message says what is wrong and what to do."""


class UnknownTopicError(OffsetRangeError):
    """The topic does not exist on the cluster."""


# ------------------------------------------------------------------ consumers


@contextmanager
def _consumer(consumer_or_config) -> Iterator:
    """Use a given consumer as is, or build one from a config dict and close it after."""
    if isinstance(consumer_or_config, Mapping):
        from confluent_kafka import Consumer

        config = {"group.id": "feedbeam-offsets", "enable.auto.commit": False,
                  **consumer_or_config}
        consumer = Consumer(config)
        try:
            yield consumer
        finally:
            consumer.close()
    else:
        yield consumer_or_config


ConsumerOrConfig = Union["Consumer", Mapping[str, object]]  # noqa: F821


def partitions_of(consumer_or_config: ConsumerOrConfig, topic: str,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> list[int]:
    """The partition ids of ``topic``, sorted; ``UnknownTopicError`` if it does not exist."""
    from confluent_kafka import KafkaError, KafkaException

    with _consumer(consumer_or_config) as consumer:
        try:
            metadata = consumer.list_topics(topic, timeout=timeout_s)
        except KafkaException as exc:
            raise OffsetRangeError(f"cannot read metadata of topic {topic!r}: {exc}") from None
    info = metadata.topics.get(topic)
    if info is None or (info.error is not None
                        and info.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
        raise UnknownTopicError(f"topic {topic!r} does not exist")
    if info.error is not None:
        raise OffsetRangeError(f"topic {topic!r}: {info.error}")
    if not info.partitions:
        raise UnknownTopicError(f"topic {topic!r} has no partitions")
    return sorted(info.partitions)


def watermarks(consumer_or_config: ConsumerOrConfig, topic: str,
               partitions: list[int] | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}``: first retained offset and the end offset (next to write)."""
    from confluent_kafka import KafkaException, TopicPartition

    with _consumer(consumer_or_config) as consumer:
        parts = partitions if partitions is not None else partitions_of(consumer, topic, timeout_s)
        out = {}
        for p in parts:
            try:
                out[p] = tuple(consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=timeout_s, cached=False))
            except KafkaException as exc:
                raise OffsetRangeError(
                    f"cannot read the offsets of {topic}[{p}]: {exc}") from None
    return out


# ------------------------------------------------------------------ time ranges


def resolve_time_range(consumer_or_config: ConsumerOrConfig, topic: str,
                       from_ms: int | None, to_ms: int | None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> OffsetRanges:
    """Per-partition ``[start, stop)`` of the records between times ``[from_ms, to_ms)``.

    ``start`` is the first offset with timestamp >= ``from_ms`` (the low
    watermark if ``from_ms`` is None), ``stop`` the first offset with
    timestamp >= ``to_ms`` (the high watermark if None or if no record is that
    late). See the module docstring for non-monotonic timestamps.
    """
    from confluent_kafka import KafkaException, TopicPartition

    if from_ms is not None and to_ms is not None and from_ms > to_ms:
        raise OffsetRangeError(f"time range is reversed: from {from_ms} > to {to_ms}")
    with _consumer(consumer_or_config) as consumer:
        marks = watermarks(consumer, topic, timeout_s=timeout_s)

        def lookup(ms: int | None, default_low: bool) -> dict[int, int]:
            if ms is None:
                return {p: (lo if default_low else hi) for p, (lo, hi) in marks.items()}
            try:
                found = consumer.offsets_for_times(
                    [TopicPartition(topic, p, ms) for p in marks], timeout=timeout_s)
            except KafkaException as exc:
                raise OffsetRangeError(f"offsets_for_times on {topic}: {exc}") from None
            out = {}
            for tp in found:
                if tp.error is not None:
                    raise OffsetRangeError(f"offsets_for_times on {topic}[{tp.partition}]: "
                                           f"{tp.error}")
                lo, hi = marks[tp.partition]
                # -1 (OFFSET_END): no record at or after ms in this partition.
                out[tp.partition] = hi if tp.offset < 0 else min(max(tp.offset, lo), hi)
            return out

        starts = lookup(from_ms, default_low=True)
        stops = lookup(to_ms, default_low=False)
    # offsets_for_times is monotonic in time, so start <= stop; max() guards
    # against a partition growing between the two lookups.
    return {p: (starts[p], max(starts[p], stops[p])) for p in sorted(marks)}


# ------------------------------------------------------------------ offset ranges


def clamp_range(partition: int, start: int | None, stop: int | None, low: int, high: int,
                strict: bool) -> tuple[int, int]:
    """``[start, stop)`` checked against the watermarks ``[low, high)``; None means open.

    ``strict``: an offset outside ``[low, high]`` is an error (the caller
    named this partition). Otherwise it is clamped into it (one range for
    all partitions, which may be of different lengths).
    """
    s = low if start is None else start
    e = high if stop is None else stop
    if s < 0 or e < 0:
        raise OffsetRangeError(f"partition {partition}: offsets must be >= 0, got {s}-{e}")
    if s > e:
        raise OffsetRangeError(f"partition {partition}: from-offset {s} is after "
                               f"to-offset {e}")
    if strict:
        if s < low:
            raise OffsetRangeError(
                f"partition {partition}: from-offset {s} is before the first retained "
                f"offset {low} (older records were deleted by retention)")
        if e > high:
            raise OffsetRangeError(
                f"partition {partition}: to-offset {e} is past the end offset {high}; "
                f"use at most {high} or leave the end open ('{partition}:{s}-')")
        return s, e
    s = min(max(s, low), high)
    return s, min(max(e, s), high)


def resolve_offset_range(consumer_or_config: ConsumerOrConfig, topic: str,
                         from_offset: int | None, to_offset: int | None,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> OffsetRanges:
    """The same ``[from_offset, to_offset)`` in every partition, clamped to its watermarks."""
    if from_offset is not None and to_offset is not None and from_offset > to_offset:
        raise OffsetRangeError(f"from-offset {from_offset} is after to-offset {to_offset}")
    marks = watermarks(consumer_or_config, topic, timeout_s=timeout_s)
    return {p: clamp_range(p, from_offset, to_offset, lo, hi, strict=False)
            for p, (lo, hi) in sorted(marks.items())}


def resolve_partition_offsets(consumer_or_config: ConsumerOrConfig, topic: str,
                              spec: Mapping[int, tuple[int | None, int | None]],
                              timeout_s: float = DEFAULT_TIMEOUT_S) -> OffsetRanges:
    """Explicit per-partition ranges (None = open end), validated strictly.

    Only the partitions in ``spec`` are read; a partition the topic does not
    have is an error.
    """
    with _consumer(consumer_or_config) as consumer:
        parts = partitions_of(consumer, topic, timeout_s)
        unknown = sorted(set(spec) - set(parts))
        if unknown:
            raise OffsetRangeError(f"topic {topic!r} has partitions {parts[0]}..{parts[-1]}, "
                                   f"not {', '.join(map(str, unknown))}")
        marks = watermarks(consumer, topic, sorted(spec), timeout_s)
    return {p: clamp_range(p, *spec[p], *marks[p], strict=True) for p in sorted(spec)}


_PART_SPEC = re.compile(r"^\s*(\d+)\s*:\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_partition_offsets(text: str) -> dict[int, tuple[int | None, int | None]]:
    """``"0:10-200,1:0-,2:-50"`` -> ``{0: (10, 200), 1: (0, None), 2: (None, 50)}``.

    Each item is ``PARTITION:FROM-TO`` with ``TO`` exclusive; an empty side is
    open (the first retained offset, or the end offset).
    """
    out: dict[int, tuple[int | None, int | None]] = {}
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise OffsetRangeError("no partition ranges given: use e.g. '0:10-200,1:0-'")
    for item in items:
        m = _PART_SPEC.match(item)
        if not m:
            raise OffsetRangeError(
                f"bad partition range {item.strip()!r}: use PARTITION:FROM-TO, e.g. 0:10-200 "
                f"(TO exclusive; leave a side empty for open, 0:10-)")
        p = int(m[1])
        start = int(m[2]) if m[2] else None
        stop = int(m[3]) if m[3] else None
        if p in out:
            raise OffsetRangeError(f"partition {p} is given twice")
        if start is not None and stop is not None and start > stop:
            raise OffsetRangeError(f"partition {p}: from-offset {start} is after to-offset {stop}")
        out[p] = (start, stop)
    return out


def total_records(ranges: OffsetRanges) -> int:
    """Offsets covered by ``ranges`` (records, unless compaction or markers left gaps)."""
    return sum(stop - start for start, stop in ranges.values())


__all__ = ["OffsetRanges", "OffsetRangeError", "UnknownTopicError", "partitions_of",
           "watermarks", "resolve_time_range", "clamp_range", "resolve_offset_range",
           "resolve_partition_offsets", "parse_partition_offsets", "total_records"]
