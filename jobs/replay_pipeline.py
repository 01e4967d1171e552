"""``feedbeam replay TOPIC RANGE --pipeline NAME [BEAM_ARGS]``: re-run a pipeline over a range.

    feedbeam replay post-events --from 2024-05-01T10:00Z --to 2024-05-01T12:00Z --pipeline fanout
    feedbeam replay t1.follow-events --partition-offsets "0:0-" --pipeline fanout \\
        --redis_key_prefix=t1 --cassandra_keyspace=t1 --push_threshold=1000

The range is resolved as for Parquet and handed to the pipeline's
``build(..., ranges=...)`` as ``--replay_ranges``; the pipeline runs in batch
(Prism unless a ``--runner`` follows its name), commits no offsets, and the
pipeline's counters are printed and reconciled against the range.
``docs/operations.md`` says what a re-run of one topic can and cannot change.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import time

from infra.errors import UserFacingError
from infra.settings import StackSettings
from jobs.replay_range import event_type_for_topic, range_from_args, ranges_line, resolve_ranges
from pipelines.runtime import has_flag
from stores.kafka import offsets as kafka_offsets
from schemas.records import base_topic

log = logging.getLogger(__name__)

#: Pipelines ``--pipeline`` re-runs: name -> (module with ``build(pipeline,
#: options, ranges=...)``, the event topics it reads, less any prefix).
PIPELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "fanout": ("pipelines.fanout", ("post-events", "follow-events")),
    "features": ("pipelines.features", ("engagement-events", "post-events")),
}
#: Options ``replay`` sets itself; given after ``--`` they would contradict the range.
_RESERVED_BEAM_ARGS = ("--replay_ranges", "--streaming", "--topic_prefix")


@dataclasses.dataclass
class PipelineReplayResult:
    """Counts of a pipeline re-run, from the pipeline's Beam counters."""

    topic: str
    ranges: dict[int, tuple[int, int]]
    counters: dict[str, int] | None  # "namespace:name" -> value; None: runner gave none

    def get(self, name: str) -> int | None:
        return None if self.counters is None else self.counters.get(name, 0)

    @property
    def records_in_range(self) -> int:
        return kafka_offsets.total_records(self.ranges)

    @property
    def invalid(self) -> int | None:
        """Dead letters of records that decoded but broke a validation rule (the decode
        step's ``invalid`` counter), sent to ``<TOPIC>.dlq`` as the live job does."""
        return self.get("feedbeam.decode:invalid")

    def _reasons(self) -> str:
        head = "feedbeam.decode:dead_letter_"
        reasons = sorted((name[len(head):], n) for name, n in (self.counters or {}).items()
                         if name.startswith(head) and n)
        return "; " + ", ".join(f"{r} {n}" for r, n in reasons) if reasons else ""

    @property
    def reconciles(self) -> bool | None:
        """records read = decoded + dead letters <= records in range; None without counters."""
        if self.counters is None:
            return None
        read, decoded, dead = (self.get("feedbeam.kafka:records_read"),
                               self.get("feedbeam.decode:decoded"),
                               self.get("feedbeam.decode:dead_letter"))
        return read == decoded + dead and read <= self.records_in_range

    def reconciliation(self) -> str:
        if self.counters is None:
            return (f"records in range {self.records_in_range}; the runner reported no "
                    f"counters, so the events decoded and dead letters are unknown")
        read, decoded, dead = (self.get("feedbeam.kafka:records_read"),
                               self.get("feedbeam.decode:decoded"),
                               self.get("feedbeam.decode:dead_letter"))
        line = f"records in range {self.records_in_range} = events decoded {decoded} " \
               f"+ dead letters {dead} ({self.invalid} invalid{self._reasons()})"
        gaps = self.records_in_range - read
        if gaps:
            line += f" + offsets without a record {gaps}"
        return line + ("" if self.reconciles else f"  MISMATCH: {read} records were read")


def pipeline_argv(pipeline: str, topic: str, prefix: str, ranges: dict[int, tuple[int, int]],
                  bootstrap: str, settings: StackSettings, beam_args: list[str]) -> list[str]:
    """The pipeline's argv: local-stack defaults, then ``beam_args``, then the range.

    Defaults: the local Kafka, Redis and Cassandra, and Prism (LOOPBACK) unless
    ``beam_args`` name a ``--runner``; later arguments win, so ``beam_args``
    override any default.
    """
    import json

    if pipeline not in PIPELINES:
        raise UserFacingError(f"--pipeline {pipeline!r}: choose one of {', '.join(PIPELINES)}")
    reads = PIPELINES[pipeline][1]
    if base_topic(topic, prefix) not in reads:
        raise UserFacingError(
            f"the {pipeline} pipeline reads {' and '.join(prefix + t for t in reads)}, not "
            f"{topic}; replay one of those (one topic's range per run)")
    for arg in beam_args:
        if arg.split("=", 1)[0] in _RESERVED_BEAM_ARGS:
            raise UserFacingError(f"{arg.split('=', 1)[0]} is set by replay from TOPIC and "
                                  f"the range; do not pass it to the pipeline")
    argv = [f"--kafka_bootstrap={bootstrap}", f"--redis_url={settings.redis_url}",
            f"--cassandra_host={settings.cassandra_host}", f"--cassandra_port={settings.cassandra_port}"]
    if not has_flag(beam_args, "--runner"):
        from infra.install import prism_binary

        argv += ["--runner=PrismRunner", f"--prism_location={prism_binary(settings)}",
                 "--environment_type=LOOPBACK"]
    ranges_json = json.dumps({topic: {str(p): [s, e] for p, (s, e) in sorted(ranges.items())}},
                             separators=(",", ":"))
    return argv + list(beam_args) + [f"--topic_prefix={prefix}",
                                      f"--replay_ranges={ranges_json}"]


def run_pipeline(pipeline: str, topic: str, ranges: dict[int, tuple[int, int]],
                 argv: list[str]) -> PipelineReplayResult:
    """Run ``pipeline`` in batch over ``ranges`` of ``topic`` and wait for it to end.

    ``argv`` are the pipeline's options (``pipeline_argv``). Raises
    ``UserFacingError`` if the job does not end DONE.
    """
    import importlib

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.runner import PipelineState

    module = importlib.import_module(PIPELINES[pipeline][0])
    options = PipelineOptions(argv)
    options.view_as(StandardOptions).streaming = False
    p = beam.Pipeline(options=options)
    module.build(p, options, ranges={topic: ranges})
    result = p.run()
    state = result.wait_until_finish()
    if state != PipelineState.DONE:
        raise UserFacingError(f"the {pipeline} re-run ended {state}, not DONE")
    return PipelineReplayResult(topic, dict(sorted(ranges.items())), _counters(result))


def _counters(result) -> dict[str, int] | None:
    """``namespace:name`` -> value summed over steps (committed, else attempted)."""
    try:
        found = result.metrics().query()["counters"]
    except Exception as exc:  # a runner without a metrics service: say so, do not fail
        log.warning("no counters from the runner: %s", exc)
        return None
    out: collections.Counter = collections.Counter()
    for r in found:
        value = r.committed if r.committed is not None else r.attempted
        out[f"{r.key.metric.namespace}:{r.key.metric.name}"] += int(value or 0)
    return dict(out)


def run_pipeline_replay(args: argparse.Namespace, settings: StackSettings, pipeline: str,
                        beam_args: list[str]) -> int:
    spec = range_from_args(args)
    record_type, prefix = event_type_for_topic(args.topic, args.topic_prefix)
    bootstrap = args.bootstrap or settings.kafka_bootstrap
    if args.overwrite or args.dlq_to_kafka or args.schema_registry:
        raise UserFacingError("--overwrite, --dlq-to-kafka and --schema-registry are for "
                              "Parquet replays; with --pipeline, pipeline options follow its "
                              "name")
    if args.max_event_ahead_s is not None or args.max_event_age_s is not None:
        raise UserFacingError("with --pipeline the validation limits are the pipeline's "
                              "options: pass --max_event_ahead_s / --max_event_age_s after "
                              "its name")
    ranges = resolve_ranges(bootstrap, args.topic, spec)
    argv = pipeline_argv(pipeline, args.topic, prefix, ranges, bootstrap, settings, beam_args)
    total = kafka_offsets.total_records(ranges)
    print(f"replay {args.topic} ({record_type.__name__}) from {bootstrap} through the "
          f"{pipeline} pipeline ({_runner_of(argv)}, batch)")
    print(ranges_line(ranges))
    if total == 0:
        print("nothing to replay: the range is empty")
        return 0
    started = time.perf_counter()
    result = run_pipeline(pipeline, args.topic, ranges, argv)
    elapsed = time.perf_counter() - started
    print(f"{pipeline} re-run of {total} offsets in {elapsed:.1f}s")
    for name, value in sorted((result.counters or {}).items()):
        # The pipeline's own counters; the read and decode ones are in the line below.
        if name.startswith("feedbeam.") and not name.startswith(("feedbeam.kafka:",
                                                                  "feedbeam.decode:")):
            print(f"  {name:<40} {value:>10}")
    print(result.reconciliation())
    return 0 if result.reconciles is not False else 1


def _runner_of(argv: list[str]) -> str:
    runner = "PrismRunner"
    for a in argv:
        if a.startswith("--runner="):
            runner = a.split("=", 1)[1]
    return runner



__all__ = ["PIPELINES", "PipelineReplayResult", "pipeline_argv", "run_pipeline",
           "run_pipeline_replay"]
