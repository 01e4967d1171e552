"""The range of a ``feedbeam replay``: options, resolved to per-partition offsets.

``range_from_args`` reads ``--from/--to``, ``--from-offset/--to-offset`` or
``--partition-offsets`` into a ``RangeSpec``; ``resolve_ranges`` turns it into
``{partition: (start, stop)}`` with ``stores.kafka.offsets``; ``ranges_line``
prints it so that the replay can be repeated exactly. Shared by
``jobs.replay_parquet`` and ``jobs.replay_pipeline``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import re

from infra.errors import UserFacingError
from stores.kafka import offsets as kafka_offsets
from schemas.records import base_topic
from schemas.events import TOPIC_TYPES, TOPICS

#: Consumer settings for bounded reads: no group membership or commits (the
#: group id is required by librdkafka but never joined, since partitions are
#: assigned), EOF events to end a partition early, big fetches, and an
#: error instead of a silent reset if a start offset was deleted meanwhile.
CONSUMER_CONFIG: dict[str, object] = {
    "group.id": "feedbeam-replay",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,
    "auto.offset.reset": "error",
    "fetch.max.bytes": 64 * 1024 * 1024,
    "max.partition.fetch.bytes": 16 * 1024 * 1024,
    "queued.max.messages.kbytes": 256 * 1024,
}


def parse_time(text: str, option: str) -> int:
    """An ISO 8601 time (naive means UTC, ``Z`` allowed) or epoch ms -> ms."""
    s = text.strip()
    if re.fullmatch(r"\d+", s):
        return int(s)
    try:
        when = dt.datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UserFacingError(
            f"bad {option} {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) or epoch ms") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


@dataclasses.dataclass(frozen=True)
class RangeSpec:
    """What the user asked for, before it is resolved against the topic.

    ``kind`` is ``"time"`` (``start``/``stop`` in ms), ``"offset"`` (the same
    offsets in every partition) or ``"partitions"`` (``partitions`` maps
    partition -> (from, to)); None means an open end.
    """

    kind: str
    start: int | None = None
    stop: int | None = None
    partitions: dict[int, tuple[int | None, int | None]] | None = None


def range_from_args(args: argparse.Namespace) -> RangeSpec:
    """The one range the options name; ``UserFacingError`` for none or a mix."""
    given = {
        "time": args.from_time is not None or args.to_time is not None,
        "offset": args.from_offset is not None or args.to_offset is not None,
        "partitions": args.partition_offsets is not None,
    }
    kinds = [k for k, v in given.items() if v]
    if not kinds:
        raise UserFacingError("give a range: --from/--to (times), --from-offset/--to-offset, "
                              "or --partition-offsets")
    if len(kinds) > 1:
        raise UserFacingError("give one kind of range: --from/--to, --from-offset/--to-offset "
                              "and --partition-offsets do not mix")
    kind = kinds[0]
    if kind == "time":
        start = None if args.from_time is None else parse_time(args.from_time, "--from")
        stop = None if args.to_time is None else parse_time(args.to_time, "--to")
        if start is not None and stop is not None and start >= stop:
            raise UserFacingError(f"--from {args.from_time} is not before --to {args.to_time}")
        return RangeSpec("time", start, stop)
    if kind == "offset":
        for name, value in (("--from-offset", args.from_offset),
                            ("--to-offset", args.to_offset)):
            if value is not None and value < 0:
                raise UserFacingError(f"{name} must be >= 0, got {value}")
        if (args.from_offset is not None and args.to_offset is not None
                and args.from_offset > args.to_offset):
            raise UserFacingError(
                f"--from-offset {args.from_offset} is after --to-offset {args.to_offset}")
        return RangeSpec("offset", args.from_offset, args.to_offset)
    try:
        return RangeSpec("partitions",
                         partitions=kafka_offsets.parse_partition_offsets(args.partition_offsets))
    except kafka_offsets.OffsetRangeError as exc:
        raise UserFacingError(f"--partition-offsets: {exc}") from None


def event_type_for_topic(topic: str, topic_prefix: str | None = None) -> tuple[type, str]:
    """``(event type, topic prefix)`` of a topic name; the prefix is derived if None."""
    if topic_prefix is not None:
        record_type = TOPIC_TYPES.get(base_topic(topic, topic_prefix))
        if record_type is None or not topic.startswith(topic_prefix):
            raise UserFacingError(
                f"topic {topic!r} less prefix {topic_prefix!r} is not an event topic "
                f"({', '.join(TOPICS)})")
        return record_type, topic_prefix
    for canonical in TOPICS:
        if topic.endswith(canonical):
            return TOPIC_TYPES[canonical], topic[:-len(canonical)]
    raise UserFacingError(
        f"cannot tell the event type of topic {topic!r}: its name must be an event topic "
        f"({', '.join(TOPICS)}), optionally prefixed (test1.post-events)")

def resolve_ranges(bootstrap: str, topic: str, spec: RangeSpec) -> dict[int, tuple[int, int]]:
    """Resolve ``spec`` against the topic; Kafka-side problems become ``UserFacingError``."""
    config = {"bootstrap.servers": bootstrap, **CONSUMER_CONFIG}
    try:
        if spec.kind == "time":
            return kafka_offsets.resolve_time_range(config, topic, spec.start, spec.stop)
        if spec.kind == "offset":
            return kafka_offsets.resolve_offset_range(config, topic, spec.start, spec.stop)
        return kafka_offsets.resolve_partition_offsets(config, topic, spec.partitions)
    except kafka_offsets.UnknownTopicError as exc:
        raise UserFacingError(f"{exc} on {bootstrap} (`feedbeam topics list` shows the "
                              f"event topics)") from None
    except kafka_offsets.OffsetRangeError as exc:
        raise UserFacingError(str(exc)) from None


def ranges_line(ranges: dict[int, tuple[int, int]]) -> str:
    """The resolved ranges as the ``--partition-offsets`` that repeat them, and their size."""
    return ("  --partition-offsets " + ",".join(f"{p}:{s}-{e}" for p, (s, e) in ranges.items())
            + f"   ({kafka_offsets.total_records(ranges)} offsets)")


__all__ = ["CONSUMER_CONFIG", "RangeSpec", "parse_time", "range_from_args",
           "event_type_for_topic", "resolve_ranges", "ranges_line"]
