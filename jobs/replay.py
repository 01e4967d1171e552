"""``feedbeam replay``: read a time or offset range of an event topic, into Parquet or a pipeline.

    feedbeam replay engagement-events --from 2024-05-01T10:00Z --to 2024-05-01T12:00Z --out /tmp/eng
    feedbeam replay engagement-events --from-offset 0 --to-offset 5000 --out /tmp/eng
    feedbeam replay post-events --partition-offsets "0:10-200,2:0-" --pipeline fanout

This module is the command line; the range options are ``jobs.replay_range``,
``--out`` is ``jobs.replay_parquet`` and ``--pipeline`` is
``jobs.replay_pipeline``. ``docs/operations.md`` explains how a time range
maps to offsets and what each kind of replay guarantees.
"""
from __future__ import annotations

import argparse

from infra.errors import UserFacingError
from infra.settings import StackSettings
from jobs.replay_parquet import DEFAULT_BATCH, run_parquet_replay
from jobs.replay_pipeline import PIPELINES, run_pipeline_replay


def run_replay(args: argparse.Namespace, settings: StackSettings) -> int:
    if args.pipeline is not None:
        if not args.pipeline or args.pipeline[0] not in PIPELINES:
            raise UserFacingError(f"--pipeline needs a pipeline name first: one of "
                                  f"{', '.join(sorted(PIPELINES))}")
        name, beam_args = args.pipeline[0], args.pipeline[1:]
        if beam_args[:1] == ["--"]:
            beam_args = beam_args[1:]
        return run_pipeline_replay(args, settings, name, beam_args)
    return run_parquet_replay(args, settings)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a topic's time or offset range into Parquet or a pipeline",
        usage="%(prog)s TOPIC RANGE (--out DIR | --pipeline fanout [BEAM_ARGS ...])",
        description="Read a time or offset range of an event topic and write it as a Parquet "
        "dataset partitioned by event date and hour (date=YYYY-MM-DD/hour=HH, UTC). Records "
        "that do not decode, or break the pipelines' validation rules (schemas/validation.py), "
        "go to DIR/_dead_letters/. The same range always gives the same "
        "files. Exits non-zero if rows + dead letters do not add up to the records read.",
        epilog="A time range [--from, --to) selects, per partition, the offsets from the first "
        "record with timestamp >= --from to the first with timestamp >= --to (Kafka's time "
        "index; timestamps here are event times, which are not ordered in a partition, so a "
        "few records in the range may lie outside the times). The resolved offsets are "
        "printed: pass them as --partition-offsets to repeat the replay exactly. "
        "With --pipeline, the range is re-run through a Beam pipeline in batch instead "
        "(see --pipeline).")
    p.add_argument("topic", metavar="TOPIC", help="event topic, e.g. post-events or "
                   "test1.post-events")
    g = p.add_argument_group("range (one kind)")
    g.add_argument("--from", dest="from_time", default=None, metavar="TIME",
                   help="start time, inclusive: ISO 8601 (naive = UTC) or epoch ms "
                   "(default with --to: the beginning)")
    g.add_argument("--to", dest="to_time", default=None, metavar="TIME",
                   help="end time, exclusive (default with --from: the current end)")
    g.add_argument("--from-offset", type=int, default=None, metavar="N",
                   help="first offset in every partition (clamped to what the partition has)")
    g.add_argument("--to-offset", type=int, default=None, metavar="M",
                   help="end offset, exclusive, in every partition (clamped to its end)")
    g.add_argument("--partition-offsets", default=None, metavar="SPEC",
                   help="explicit ranges, e.g. '0:10-200,1:0-' (end exclusive; an empty side "
                   "is open); only these partitions are read; out-of-range offsets are errors")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", default=None, metavar="DIR",
                        help="output directory (empty or new) of a Parquet replay")
    target.add_argument("--pipeline", nargs=argparse.REMAINDER, default=None,
                   metavar="NAME [BEAM_ARGS]",
                   help="last on the line: instead of Parquet, re-run pipeline NAME ("
                   + ", ".join(sorted(PIPELINES)) + ") over the range in batch, committing no "
                   "offsets; everything after NAME is its Beam and pipeline options (--runner "
                   "(default Prism), --redis_key_prefix, --cassandra_keyspace, --push_threshold, "
                   "...). fanout reads post-events and follow-events: TOPIC must be one of them "
                   "and only its range is read, so the other topic's effects (the follow graph, "
                   "for post-events) must already be in the stores")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier replay in DIR (only a directory with _replay.json)")
    p.add_argument("--topic-prefix", default=None,
                   help="prefix of TOPIC before the event topic name (default: derived from "
                   "TOPIC, so test1.post-events has prefix test1.)")
    p.add_argument("--bootstrap", default=None,
                   help="Kafka bootstrap servers (default: the local stack's)")
    p.add_argument("--schema-registry", default=None, metavar="URL",
                   help="decode with schema ids from this Schema Registry (default: static ids)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, metavar="N",
                   help="records per chunk: memory bound and file granularity; chunks are "
                   "aligned to offsets (offset // N), so file names do not depend on where the "
                   "range starts (default: %(default)s)")
    p.add_argument("--max-event-ahead-s", type=float, default=None, metavar="S",
                   help="dead-letter an event whose times lie more than S past its record's "
                   "Kafka timestamp or the wall clock, as the pipelines' --max_event_ahead_s "
                   "(default 3600); with --pipeline pass that after the pipeline's name")
    p.add_argument("--max-event-age-s", type=float, default=None, metavar="S",
                   help="dead-letter an event whose time lies more than S before its record's "
                   "Kafka timestamp, as the pipelines' --max_event_age_s (default: no limit)")
    p.add_argument("--dlq-to-kafka", action="store_true",
                   help="also produce dead letters to TOPIC.dlq (with the pipeline's headers). "
                   "Off by default: the pipelines dead-letter these records already, and a "
                   "replay must not put duplicates on the DLQ")
    p.set_defaults(handler=run_replay)
