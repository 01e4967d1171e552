"""What every pipeline module shares: store options, replay ranges, counters, ``main``.

    class FanoutOptions(PipelineOptions): ...      # the pipeline's own flags only
    stores = options.view_as(StoreOptions).config()
    ranges = options.view_as(ReplayOptions).ranges()

    if __name__ == "__main__":
        sys.exit(module_main("pipelines.fanout"))

Beam parses the flags of every imported ``PipelineOptions`` subclass with one
parser, so a flag shared by several pipelines is declared once, here. A
pipeline's options are the classes its module imports by name: ``module_main``
lists them for ``--help`` and refuses any option neither they nor Beam declare.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import sys

from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.runtime import OptionsError, check_options, options_help, wants_help
from stores.cassandra.session import CONSISTENCY_NAMES
from stores.config import (
    AUTO_CONSISTENCY,
    DEFAULT_CASSANDRA_BATCH_ROWS,
    DEFAULT_CASSANDRA_HOST,
    DEFAULT_CASSANDRA_PORT,
    DEFAULT_KEY_PREFIX,
    DEFAULT_KEYSPACE,
    DEFAULT_REDIS_URL,
    StoreConfig,
    check_batch_rows,
)

log = logging.getLogger(__name__)

#: ``{topic: {partition: (start, stop)}}``: offsets a bounded re-run reads, stop exclusive.
Ranges = dict[str, dict[int, tuple[int, int]]]

#: The fan-out job's default consumer group.
FANOUT_GROUP = "feedbeam-fanout"
#: The fan-out's durable log: the Cassandra writes its Redis step decided (``<prefix>`` +
#: this), applied by its durable step under the job's group plus ``DURABLE_GROUP_SUFFIX``.
DURABLE_LOG_TOPIC = "fanout-durable"
DURABLE_GROUP_SUFFIX = "-durable"
#: The stories job's default consumer group, and its durable log (as the fan-out's).
STORIES_GROUP = "feedbeam-stories"
STORIES_DURABLE_LOG_TOPIC = "stories-durable"


class StoreOptions(PipelineOptions):
    """Where Redis and Cassandra are: the flags of every store-writing pipeline."""

    @classmethod
    def _add_argparse_args(cls, parser):
        group = parser.add_argument_group("stores")
        group.add_argument("--redis_url", default=DEFAULT_REDIS_URL,
                           help="Redis the hot views are written to")
        group.add_argument("--redis_key_prefix", default=DEFAULT_KEY_PREFIX,
                           help="prefix of every Redis key (isolates a run's keys)")
        group.add_argument("--cassandra_host", default=DEFAULT_CASSANDRA_HOST,
                           help="Cassandra contact point")
        group.add_argument("--cassandra_port", type=int, default=DEFAULT_CASSANDRA_PORT)
        group.add_argument("--cassandra_keyspace", default=DEFAULT_KEYSPACE,
                           help="keyspace of the durable views (created by `feedbeam migrate`)")
        for kind in ("read", "write"):
            group.add_argument(f"--cassandra_{kind}_consistency", default=AUTO_CONSISTENCY,
                               choices=CONSISTENCY_NAMES,
                               help=f"consistency level of Cassandra {kind}s; auto: LOCAL_QUORUM "
                                    "when the keyspace has more than one replica, else LOCAL_ONE")
        group.add_argument("--cassandra_batch_rows", type=_batch_rows_option,
                           default=DEFAULT_CASSANDRA_BATCH_ROWS,
                           help="statements per unlogged batch of the Cassandra writes (1: "
                                "each row on its own, routed to its replicas; on a cluster of "
                                "many nodes a small number spares the coordinator)")
        group.add_argument("--worker_gc", type=_worker_gc_option,
                           default=",".join(map(str, WORKER_GC_THRESHOLDS)),
                           help="garbage-collection thresholds of the worker processes "
                                "(gc.set_threshold a,b,c: a young collection every a container "
                                "allocations, an older one every b of those, a full one every "
                                f"c of these); {PYTHON_GC}: Python's own (700,10,10)")
        group = parser.add_argument_group("Redis restore")
        group.add_argument("--restore_log_wait_s", type=float, default=60.0,
                           help="how long a restore of a Redis that lost its data (run by "
                                "whichever job finds it) waits for the durable steps of the "
                                "fan-out and the stories jobs to apply their logs to Cassandra "
                                "before reading it (0: no wait)")
        group.add_argument("--fanout_consumer_group", default=FANOUT_GROUP,
                           help="the fan-out job's consumer group, whose durable step "
                                f"(<group>{DURABLE_GROUP_SUFFIX}) that restore waits for; the "
                                "fan-out itself uses its own --consumer_group")
        group.add_argument("--stories_consumer_group", default=STORIES_GROUP,
                           help="the stories job's consumer group, whose durable step that "
                                "restore waits for too")

    def config(self) -> StoreConfig:
        return StoreConfig(self.redis_url, self.redis_key_prefix, self.cassandra_host,
                           self.cassandra_port, self.cassandra_keyspace,
                           self.cassandra_read_consistency, self.cassandra_write_consistency,
                           self.restore_log(self.fanout_consumer_group,
                                            self.stories_consumer_group),
                           self.cassandra_batch_rows)

    def restore_log(self, fanout_group: str, stories_group: str | None = None):
        """The wait a restore runs before reading Cassandra: the durable steps of the
        fan-out reading as ``fanout_group`` and of the stories job reading as
        ``stories_group`` (when given), on this job's Kafka and topic prefix (a
        ``stores.kafka.lag.LogCatchUp``; None with ``--restore_log_wait_s=0``)."""
        from pipelines.io.kafka import KafkaReadOptions
        from stores.kafka.lag import LogCatchUp

        if self.restore_log_wait_s <= 0:
            return None
        kafka = self.view_as(KafkaReadOptions)
        stories = () if stories_group is None else (LogCatchUp(
            kafka.kafka_bootstrap, stories_group + DURABLE_GROUP_SUFFIX,
            (kafka.topic_prefix + STORIES_DURABLE_LOG_TOPIC,), self.restore_log_wait_s),)
        return LogCatchUp(kafka.kafka_bootstrap, fanout_group + DURABLE_GROUP_SUFFIX,
                          (kafka.topic_prefix + DURABLE_LOG_TOPIC,), self.restore_log_wait_s,
                          also=stories)


class ReplayOptions(PipelineOptions):
    """``--replay_ranges``: a bounded re-run over offsets instead of following the topics."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--replay_ranges", default=None, metavar="JSON",
                            help="re-run over bounded offset ranges instead of following the "
                                 "topics: {\"<topic>\": {\"<partition>\": [start, stop]}} "
                                 "(stop exclusive, topic names with their prefix); the job "
                                 "runs in batch mode and commits no offsets "
                                 "(`feedbeam replay TOPIC ... --pipeline NAME` builds it)")

    def ranges(self) -> Ranges | None:
        """``--replay_ranges`` parsed (``parse_replay_ranges``); None when not given."""
        return None if self.replay_ranges is None else parse_replay_ranges(self.replay_ranges)


def parse_replay_ranges(text: str) -> Ranges:
    """``{"topic": {"0": [start, stop]}}`` JSON -> ``{topic: {0: (start, stop)}}``.

    ``ValueError`` names what is wrong; an empty mapping is an error too (a
    bounded job over nothing is almost certainly a mistake in the caller).
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--replay_ranges is not JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError("--replay_ranges must be a non-empty JSON object of topics")
    out: Ranges = {}
    for topic, parts in raw.items():
        if not isinstance(parts, dict):
            raise ValueError(f"--replay_ranges[{topic!r}] must map partitions to [start, stop]")
        out[topic] = {}
        for partition, bounds in parts.items():
            try:
                start, stop = (int(b) for b in bounds)
                p = int(partition)
            except (TypeError, ValueError):
                raise ValueError(f"--replay_ranges[{topic!r}][{partition!r}] must be "
                                 f"[start, stop], got {bounds!r}") from None
            if p < 0 or start < 0 or stop < start:
                raise ValueError(f"--replay_ranges[{topic!r}][{partition!r}]: bad range "
                                 f"[{start}, {stop})")
            out[topic][p] = (start, stop)
    return out


#: ``gc.set_threshold`` in a pipeline worker (``--worker_gc``): Python's young
#: generations (a collection every 700 container allocations, an older one every
#: 10 of those), but a full collection every 1,000 of these instead of every 10.
#: A worker holds a bundle's batch (up to 50,000 records, their events and store
#: commands) until it is written, so its containers reach the old generation, and
#: with Python's thresholds each full collection scanned all of them and the SDK
#: harness again (docs/benchmarks.md, "Garbage collection in the workers").
WORKER_GC_THRESHOLDS = (700, 10, 1000)
#: ``--worker_gc`` value that leaves the worker's collections as Python schedules them.
PYTHON_GC = "python"
_worker_gc_set = False


def worker_gc_thresholds(value: str) -> tuple[int, int, int] | None:
    """``--worker_gc``'s value as ``gc.set_threshold`` arguments; None for ``python``.
    Raises ValueError for anything but ``python`` or three integers ``a,b,c``
    (``a`` at least 1)."""
    text = value.strip().lower()
    if text == PYTHON_GC:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1:
        raise ValueError(f"--worker_gc takes {PYTHON_GC!r} or three integers a,b,c "
                         f"(a >= 1), not {value!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def _batch_rows_option(value: str) -> int:
    try:
        return check_batch_rows(int(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _worker_gc_option(value: str) -> str:
    try:
        worker_gc_thresholds(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def collect_for_batches(thresholds: tuple[int, int, int] | None) -> None:
    """Give this worker process ``thresholds`` (``gc.set_threshold``), once: a store
    sink's ``setup`` calls it, and the setting is the process's, whichever sink
    sets it first. None leaves Python's thresholds.

    Cycles are still found as soon as before while they are young (the young
    generations keep Python's schedule by default); those that reached the old
    generation wait for the next full collection, which still runs, less often."""
    global _worker_gc_set
    if _worker_gc_set:
        return
    _worker_gc_set = True
    if thresholds is None:
        log.info("worker garbage collection: Python's thresholds %s", gc.get_threshold())
        return
    gc.set_threshold(*thresholds)
    log.info("worker garbage collection: thresholds %s", thresholds)


class Counters:
    """Beam counters of one namespace, made on first use (a DoFn builds one in ``setup``)."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self._made: dict[str, object] = {}

    def inc(self, name: str, n: int = 1) -> None:
        if not n:
            return
        counter = self._made.get(name)
        if counter is None:
            counter = self._made[name] = Metrics.counter(self.namespace, name)
        counter.inc(n)


def configure_logging() -> None:
    """INFO to stderr. ``force``: importing Beam already configured the root logger at
    WARNING, which would hide the pipelines' periodic progress lines."""
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cassandra").setLevel(logging.WARNING)


def module_main(module: str, argv=None) -> int:
    """``python -m pipelines.<name>``: print ``--help``, or check the options and call
    ``<module>.run(args)`` logging at INFO; an unknown option exits 2 before anything
    starts (``pipelines.runtime.check_options``).

    The module's ``__main__`` block calls this with its importable name, so the
    job runs the imported module, not the ``__main__`` copy: Beam pickles
    transforms and coders by reference to their module, and options classes
    defined a second time would clash.
    """
    configure_logging()
    args = sys.argv[1:] if argv is None else list(argv)
    pipeline = importlib.import_module(module)
    if wants_help(args):
        print(options_help(pipeline, f"python -m {module}"))
        return 0
    try:
        checked = check_options(pipeline, args)
    except OptionsError as exc:
        print(f"{module}: error: {exc}", file=sys.stderr)
        return 2
    if checked.unchecked:
        logging.getLogger(module).warning("passed on unchecked (%s): %s", checked.why,
                                          " ".join(checked.unchecked))
    pipeline.run(checked.args)
    return 0
