"""fanout: new posts into followers' home feeds (hybrid push/pull), graph upkeep, deletes.

    python -m pipelines.fanout --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK [--push_threshold 10000 ...] [--replay_ranges JSON]

Reads ``post-events`` and ``follow-events`` as event batches and applies them to
Redis (``FanOutToFollowerFeeds``, ``stores.fanout.FeedFanout``); the Cassandra
writes it decides go through the durable log topic ``fanout-durable`` to a
step of their own with its own consumer group (``ApplyDurableFeedLog``), or
inline with ``--durable_copy=inline`` (always in a ``--replay_ranges`` re-run).
Design: docs/pipelines/fanout.md.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from domain.fanout import FanoutPolicy, FreshnessHistogram
from pipelines.common import (
    DURABLE_LOG_TOPIC,
    FANOUT_GROUP,
    Counters,
    Ranges,
    ReplayOptions,
    StoreOptions,
    module_main,
)
from pipelines.io.durable_log import (
    ApplyDurableLog,
    BusySteps,
    DurableLog,
    DurableLogOptions,
    LogWriter,
    durable_source,
    own_restore_wait,
    row_chunks,
)
from pipelines.io.kafka import KafkaReadOptions, KafkaSourceConfig
from pipelines.io.sink import ApplyInBatches
from pipelines.io.source import ReadEventBatches, producer_config_of
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import FollowEvent, PostEvent, dlq_topic
from schemas.fanout import (
    CelebrityAdd,
    CelebrityRemove,
    FanoutOutcome,
    FeedAdd,
    FeedRemove,
    decode_durable_writes,
    encode_durable_writes,
)
from schemas.records import EventBatch
from stores.config import StoreConfig
from stores.fanout import DurableFeedWriter, FeedFanout, FeedStores, ensure_log_topics
from stores.restore import RedisHealer, RestoreSettings, open_healer

if __name__ == "__main__":
    # Before the classes below: the job must run the importable module, not
    # this __main__ copy (see ``module_main``).
    sys.exit(module_main("pipelines.fanout"))

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.fanout"
DURABLE_NAMESPACE = "feedbeam.fanout_durable"
DEFAULT_GROUP = FANOUT_GROUP
DECODE_STEP = "decode_durable_log"
#: Records a bundle of the fan-out reads at most (``--max_records_per_bundle``): a
#: backlog of follows is applied in batches of up to this many events, each in a
#: constant number of round trips.
BUNDLE_RECORDS = 50_000
#: Post events a batch of the fan-out holds at most: a post's writes grow with its
#: followers (about 200 feed rows each), a follow's do not.
BATCH_POSTS = 5_000
#: The Redis step's applies in this worker process, which the durable step gives
#: way to: it waits up to ``DURABLE_GIVE_WAY_S`` a batch for them to end, checking
#: before each chunk of about ``DURABLE_CHUNK_ROWS`` Cassandra rows.
REDIS_STEP = BusySteps()
DURABLE_GIVE_WAY_S = 0.5
DURABLE_CHUNK_ROWS = 4_000


class FanoutOptions(PipelineOptions):
    """The fan-out's own flags (stores: ``StoreOptions``, Kafka: ``KafkaReadOptions``)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        d = FanoutPolicy()
        parser.add_argument("--push_threshold", type=int, default=d.push_threshold,
                            help="authors with at least this many followers are pulled at read "
                                 "time (timeline) instead of pushed to every follower")
        parser.add_argument("--feed_cap", type=int, default=d.feed_cap,
                            help="entries kept per Redis home feed (newest)")
        parser.add_argument("--celebrity_top_n", type=int, default=d.celebrity_top_n,
                            help="followers of an author above the threshold who still get a push")
        parser.add_argument("--inactive_days", type=float, default=d.inactive_days,
                            help="followers without a feed read for this long get no push")
        parser.add_argument("--follow_merge_limit", type=int, default=d.follow_merge_limit,
                            help="recent posts of the followee merged into a feed on a new follow")
        parser.add_argument("--timeline_cap", type=int, default=d.timeline_cap,
                            help="posts kept per author timeline in Redis (>= feed_cap so an "
                                 "unfollow can clean everything it pushed)")
        parser.add_argument("--push_chunk_size", type=int, default=d.push_chunk_size,
                            help="feeds (or edges) per Redis script call")
        parser.add_argument("--max_batch", type=int, default=500,
                            help="elements (event batches of the source) buffered before they "
                                 "are applied within a bundle")
        parser.add_argument("--freshness_log_s", type=float, default=60.0,
                            help="period of the freshness p50/p99 log line")

    def policy(self) -> FanoutPolicy:
        return FanoutPolicy(
            push_threshold=self.push_threshold, feed_cap=self.feed_cap,
            celebrity_top_n=self.celebrity_top_n, inactive_days=self.inactive_days,
            follow_merge_limit=self.follow_merge_limit, timeline_cap=self.timeline_cap,
            push_chunk_size=self.push_chunk_size)


# -- the Redis step -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FanoutApplierConfig:
    """What the sink pickles: where the stores are, the policy, and the durable log
    (None: Cassandra is written within each batch); ``open()`` connects."""

    stores: StoreConfig
    policy: FanoutPolicy
    freshness_log_s: float = 60.0
    durable_log: DurableLog | None = None

    def open(self) -> "_FanoutApplier":
        fanout = FeedFanout.open(self.stores, self.policy, durable=self.durable_log is None)
        try:
            log_writer = None if self.durable_log is None else LogWriter(
                self.durable_log, NAMESPACE)
        except Exception:
            fanout.close()
            raise
        # With a durable log, a restore first waits for the durable step to apply it
        # (``stores.restore_log``, set by ``build``).
        healer = open_healer(self.stores, RestoreSettings(
            feed_cap=self.policy.feed_cap, timeline_cap=self.policy.timeline_cap),
            fanout.redis.client)
        return _FanoutApplier(fanout, self.freshness_log_s, log_writer, healer)


def _events_of(element) -> Sequence:
    return element.events if isinstance(element, EventBatch) else (element,)


class _FanoutApplier:
    """``FeedFanout`` on a batch of elements (event batches, or single events): Redis,
    then the durable copy (Cassandra, or the durable log with every record delivered),
    then the batch's threshold crossings settled; outcomes counted in ``NAMESPACE``.

    With a ``healer``, Redis' generation marker is read before the batch (restoring
    Redis from Cassandra first if it lost its data) and again before the durable
    copy: a batch that Redis was lost under is applied again on the restored Redis,
    so nothing derived from a partial Redis (follower counts, pushes) reaches
    Cassandra."""

    def __init__(self, fanout: FeedFanout, freshness_log_s: float,
                 log_writer: LogWriter | None = None, healer: RedisHealer | None = None):
        self._fanout = fanout
        self._healer = healer
        self._durable = None if fanout.cassandra is None else DurableFeedWriter(fanout.cassandra)
        self._log_writer = log_writer
        self._counters = Counters(NAMESPACE)
        self._freshness = Metrics.distribution(NAMESPACE, "freshness_ms")
        self._histogram = FreshnessHistogram(freshness_log_s, now_s=time.monotonic())

    def apply(self, elements: list) -> list[tuple[FanoutOutcome, ...] | None]:
        groups = [_events_of(element) for element in elements]
        with REDIS_STEP.busy():
            batch = self._apply_to_redis([e for events in groups for e in events])
        if self._durable is not None:
            self._durable.apply(batch.writes)
        else:  # delivered, or the batch fails
            self._log_writer.write(encode_durable_writes(batch.writes))
        self._fanout.settle(batch)
        self._counters.inc("durable_writes", len(batch.writes))
        out: list[tuple[FanoutOutcome, ...] | None] = []
        start = 0
        for events in groups:
            outcomes = tuple(o for o in batch.outcomes[start:start + len(events)] if o is not None)
            start += len(events)
            for outcome in outcomes:
                self._record(outcome)
            out.append(outcomes or None)
        self._maybe_log_freshness()
        return out

    def _apply_to_redis(self, events: list):
        if self._healer is None:
            return self._fanout.apply_to_redis(events)
        restores, reruns = self._healer.restores, self._healer.reruns
        batch = self._healer.write_whole(lambda: self._fanout.apply_to_redis(events))
        self._counters.inc("redis_restores", self._healer.restores - restores)
        self._counters.inc("batches_redone_after_redis_loss", self._healer.reruns - reruns)
        return batch

    def close(self) -> None:
        try:
            if self._log_writer is not None:
                self._log_writer.close()
        finally:
            self._fanout.close()

    def _record(self, o: FanoutOutcome) -> None:
        count = self._counters.inc
        count(f"events_{o.action}")
        count("skipped_inactive", o.skipped_inactive)
        if o.action in ("push", "celebrity"):
            count("feed_inserts", o.feeds)
            freshness = o.written_at_ms - o.event_time
            self._freshness.update(freshness)
            self._histogram.add(freshness)
        elif o.action == "delete":
            count("delete_feed_removals", o.feeds)
        elif o.action == "merge":
            count("merged_posts", o.feeds)
        elif o.action == "remove":
            count("unfollow_removals", o.feeds)

    def _maybe_log_freshness(self) -> None:
        now = time.monotonic()
        if self._histogram.due(now):
            summary = self._histogram.flush(now)
            if summary:
                count, p50, p99 = summary
                log.info("fanout freshness over the last %.0fs: %d posts pushed, p50 %.0f ms, "
                         "p99 %.0f ms", self._histogram.period_s, count, p50, p99)


class FanOutToFollowerFeeds(beam.PTransform):
    """Apply post and follow events to Redis (hybrid push/pull fan-out), and their
    durable copy to Cassandra or to the durable log.

    Args:
      stores: where Redis and Cassandra are.
      policy: threshold, caps, top N, inactivity, merge limit.
      max_batch: elements applied at once within a bundle.
      freshness_log_s: period of the freshness log line.
      durable_log: where to write the Cassandra writes as durable log records
        (``ApplyDurableFeedLog`` applies them); None writes Cassandra within
        each batch.

    Takes a ``PCollection`` of ``EventBatch`` (the source's batches) or of single
    ``PostEvent``/``FollowEvent``s (other events are ignored and counted).
    Returns a ``PCollection`` of tuples of ``FanoutOutcome``: per input element
    the outcomes of its events (none for a follow event superseded within its
    batch), emitted once the batch's writes are done, durable log records
    delivered. Keep it fused with the read (no GroupByKey before it): the
    source commits offsets only after the bundle that applied them ends.
    """

    def __init__(self, stores: StoreConfig, policy: FanoutPolicy, max_batch: int = 500,
                 freshness_log_s: float = 60.0, durable_log: DurableLog | None = None):
        super().__init__()
        self._config = FanoutApplierConfig(stores, policy, freshness_log_s, durable_log)
        self._max_batch = max_batch

    def expand(self, events):
        return events | "ApplyToStores" >> ApplyInBatches(
            self._config, NAMESPACE, self._max_batch, output_type=tuple[FanoutOutcome, ...],
            dead_letters="from_options", flush_early=PostsAtMost(BATCH_POSTS))


@dataclasses.dataclass(frozen=True)
class PostsAtMost:
    """``flush_early`` of the fan-out's sink: apply once the buffered elements hold
    ``limit`` post events, so that a backlog of posts is applied in batches of about
    ``limit`` posts while one of follows fills whole bundles. An element is a poll of
    one topic's partition (``EventBatch``) or a single event."""

    limit: int

    def __call__(self, pending: list) -> bool:
        posts = 0
        for element in pending:
            if isinstance(element, EventBatch):
                if element.topic.endswith(PostEvent.TOPIC):
                    posts += len(element.events)
            elif isinstance(element, PostEvent):
                posts += 1
        return posts >= self.limit


# -- the durable step -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DurableApplierConfig:
    """What the durable sink pickles; ``open()`` connects to Cassandra."""

    stores: StoreConfig

    def open(self) -> "_DurableApplier":
        return _DurableApplier(FeedStores.open_cassandra(self.stores))


def _rows(write) -> int:
    """Cassandra rows a durable write stands for, about: one per user of a feed or
    followed-celebrity write, else one."""
    if isinstance(write, (FeedAdd, FeedRemove, CelebrityRemove)):
        return max(1, len(write.user_ids))
    if isinstance(write, CelebrityAdd):
        return max(1, len(write.followers))
    return 1


class _DurableApplier:
    """``DurableFeedWriter`` on the writes of a batch of log record batches, at most
    ``chunk`` writes and about ``DURABLE_CHUNK_ROWS`` rows per Cassandra execution
    (a backlog comes in large batches); before a chunk it gives way to the Redis
    step's applies in this process, ``give_way_s`` a batch at most."""

    def __init__(self, cassandra, chunk: int = 20_000, give_way_s: float = DURABLE_GIVE_WAY_S):
        self._cassandra = cassandra
        self._writer = DurableFeedWriter(cassandra)
        self._chunk = chunk
        self._give_way_s = give_way_s
        self._counters = Counters(DURABLE_NAMESPACE)

    def apply(self, elements: list) -> None:
        writes = [w for batch in elements for record in batch for w in record]
        budget = self._give_way_s
        for chunk in row_chunks(writes, _rows, DURABLE_CHUNK_ROWS, self._chunk):
            if budget > 0:
                waited = REDIS_STEP.wait_idle(budget)
                budget -= waited
                self._counters.inc("gave_way_ms", int(waited * 1000))
            self._counters.inc("writes", self._writer.apply(chunk))
        return None

    def close(self) -> None:
        self._cassandra.close()


def ApplyDurableFeedLog(source: KafkaSourceConfig, topics: Sequence[str], stores: StoreConfig,
                        max_batch: int = 10, producer_config: dict | None = None
                        ) -> ApplyDurableLog:
    """Read the durable log with its own consumer group (``source``'s ``group.id``,
    committed after the Cassandra writes) and write it to Cassandra, ``max_batch``
    record batches at once; a record that does not decode goes to ``<topic>.dlq``
    (``pipelines.io.durable_log.ApplyDurableLog``)."""
    return ApplyDurableLog(source, topics, DurableApplierConfig(stores), DURABLE_NAMESPACE,
                           decode_durable_writes, max_batch, producer_config)


# -- the job ------------------------------------------------------------------------------


def build(pipeline: beam.Pipeline, options: PipelineOptions, ranges: Ranges | None = None):
    """Wire the fan-out job into ``pipeline``; returns the outcomes PCollection (None
    when the job runs only the durable step).

    Without ``ranges`` (and without ``--replay_ranges``) the job follows
    ``post-events`` and ``follow-events`` from the consumer group's offsets and,
    with ``--durable_copy=log``, creates the durable log topic if it is missing.
    With ``ranges`` (which win over the option) it reads exactly those offsets
    once, writes Cassandra inline and commits nothing; topics not in them are
    not read.
    """
    kafka = options.view_as(KafkaReadOptions)
    fanout = options.view_as(FanoutOptions)
    config = kafka.source_config(default_group=DEFAULT_GROUP,
                                 default_max_records_per_bundle=BUNDLE_RECORDS)
    prefix = kafka.topic_prefix
    stores = options.view_as(StoreOptions).config()
    if ranges is None:
        ranges = options.view_as(ReplayOptions).ranges()
    topics = [prefix + PostEvent.TOPIC, prefix + FollowEvent.TOPIC]
    durable_log = None
    durable_options = options.view_as(DurableLogOptions)
    parts = durable_options.parts
    if not ranges and durable_options.durable_copy == "log":
        log_topic = prefix + DURABLE_LOG_TOPIC
        producer = producer_config_of(config)
        ensure_log_topics(producer, [log_topic, dlq_topic(log_topic)], like=topics)
        source = durable_source(config, DEFAULT_GROUP)
        durable_log = DurableLog(log_topic, producer, source.consumer_config["group.id"],
                                 options.view_as(StoreOptions).restore_log_wait_s)
        if parts in ("all", "durable"):
            _ = pipeline | "ApplyDurableFeedLog" >> ApplyDurableFeedLog(
                source, [log_topic], stores, durable_options.durable_max_batch, producer)
        if parts == "durable":
            return None
    # A restore this job runs waits for its own durable step (none when it writes inline).
    stores = dataclasses.replace(stores, restore_log=own_restore_wait(
        stores.restore_log, prefix + DURABLE_LOG_TOPIC, durable_log))
    read = ReadEventBatches(config, topics, ranges=ranges, topic_prefix=prefix)
    return (pipeline
            | "ReadPostAndFollowEvents" >> read
            | "FanOutToFollowerFeeds" >> FanOutToFollowerFeeds(
                stores, fanout.policy(), fanout.max_batch, fanout.freshness_log_s, durable_log))


def run(argv=None):
    """Parse options, build the pipeline and run it until it ends or is cancelled
    (``pipelines.runtime``): streaming, or a batch job over ``--replay_ranges``."""
    options = pipeline_options(argv)
    bounded = options.view_as(ReplayOptions).ranges() is not None
    options.view_as(StandardOptions).streaming = not bounded
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)
