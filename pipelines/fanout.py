"""fanout: new posts into followers' home feeds (hybrid push/pull), graph upkeep, deletes.

    python -m pipelines.fanout --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK [--push_threshold 10000 ...] [--replay_ranges JSON]

Reads ``post-events`` and ``follow-events`` and applies them to Redis and
Cassandra through ``FanOutToFollowerFeeds`` (``stores.fanout.FeedFanout``);
streaming, or a batch re-run over ``--replay_ranges``. Design: docs/pipelines/fanout.md.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from domain.fanout import FanoutPolicy, FreshnessHistogram
from pipelines.common import Counters, Ranges, ReplayOptions, StoreOptions, module_main
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.sink import ApplyInBatches
from pipelines.io.source import ReadEvents
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import FollowEvent, PostEvent
from schemas.fanout import FanoutOutcome
from stores.config import StoreConfig
from stores.fanout import FeedFanout

if __name__ == "__main__":
    # Before the classes below: the job must run the importable module, not
    # this __main__ copy (see ``module_main``).
    sys.exit(module_main("pipelines.fanout"))

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.fanout"
DEFAULT_GROUP = "feedbeam-fanout"


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
                            help="feeds per Redis pipeline / Cassandra batch of a push")
        parser.add_argument("--max_batch", type=int, default=500,
                            help="events buffered before they are applied within a bundle")
        parser.add_argument("--freshness_log_s", type=float, default=60.0,
                            help="period of the freshness p50/p99 log line")

    def policy(self) -> FanoutPolicy:
        return FanoutPolicy(
            push_threshold=self.push_threshold, feed_cap=self.feed_cap,
            celebrity_top_n=self.celebrity_top_n, inactive_days=self.inactive_days,
            follow_merge_limit=self.follow_merge_limit, timeline_cap=self.timeline_cap,
            push_chunk_size=self.push_chunk_size)


@dataclasses.dataclass(frozen=True)
class FanoutApplierConfig:
    """What the sink pickles: where the stores are and the policy; ``open()`` connects."""

    stores: StoreConfig
    policy: FanoutPolicy
    freshness_log_s: float = 60.0

    def open(self) -> "_FanoutApplier":
        return _FanoutApplier(FeedFanout.open(self.stores, self.policy), self.freshness_log_s)


class _FanoutApplier:
    """``FeedFanout.apply`` on a batch, then its outcomes counted in ``NAMESPACE``."""

    def __init__(self, fanout: FeedFanout, freshness_log_s: float):
        self._fanout = fanout
        self._counters = Counters(NAMESPACE)
        self._freshness = Metrics.distribution(NAMESPACE, "freshness_ms")
        self._histogram = FreshnessHistogram(freshness_log_s, now_s=time.monotonic())

    def apply(self, events: list) -> list[FanoutOutcome | None]:
        outcomes = self._fanout.apply(events)
        for outcome in outcomes:
            if outcome is not None:
                self._record(outcome)
        self._maybe_log_freshness()
        return outcomes

    def close(self) -> None:
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
    """Apply post and follow events to the feed stores (hybrid push/pull fan-out).

    Args:
      stores: where Redis and Cassandra are.
      policy: threshold, caps, top N, inactivity, merge limit.
      max_batch: events applied at once within a bundle.
      freshness_log_s: period of the freshness log line.

    Takes a ``PCollection`` of ``PostEvent`` and ``FollowEvent`` (other events
    are ignored and counted). Returns a ``PCollection[FanoutOutcome]``, one per
    event (none for a follow event superseded within its batch), emitted once
    the event's writes are done. Keep it fused with the read (no GroupByKey
    before it): the source commits offsets only after the bundle that applied
    them ends.
    """

    def __init__(self, stores: StoreConfig, policy: FanoutPolicy, max_batch: int = 500,
                 freshness_log_s: float = 60.0):
        super().__init__()
        self._config = FanoutApplierConfig(stores, policy, freshness_log_s)
        self._max_batch = max_batch

    def expand(self, events):
        return events | "ApplyToStores" >> ApplyInBatches(
            self._config, NAMESPACE, self._max_batch, output_type=FanoutOutcome)


def build(pipeline: beam.Pipeline, options: PipelineOptions, ranges: Ranges | None = None):
    """Wire the fan-out job into ``pipeline``; returns the outcomes PCollection.

    Without ``ranges`` (and without ``--replay_ranges``) the job follows
    ``post-events`` and ``follow-events`` from the consumer group's offsets.
    With ``ranges`` (which win over the option) it reads exactly those offsets
    once; topics not in them are not read.
    """
    kafka = options.view_as(KafkaReadOptions)
    fanout = options.view_as(FanoutOptions)
    config = kafka.source_config(default_group=DEFAULT_GROUP)
    prefix = kafka.topic_prefix
    if ranges is None:
        ranges = options.view_as(ReplayOptions).ranges()
    read = ReadEvents(config, [prefix + PostEvent.TOPIC, prefix + FollowEvent.TOPIC],
                      ranges=ranges, topic_prefix=prefix)
    return (pipeline
            | "ReadPostAndFollowEvents" >> read
            | "FanOutToFollowerFeeds" >> FanOutToFollowerFeeds(
                options.view_as(StoreOptions).config(), fanout.policy(), fanout.max_batch,
                fanout.freshness_log_s))


def run(argv=None):
    """Parse options, build the pipeline and run it until it ends or is cancelled
    (``pipelines.runtime``): streaming, or a batch job over ``--replay_ranges``."""
    options = pipeline_options(argv)
    bounded = options.view_as(ReplayOptions).ranges() is not None
    options.view_as(StandardOptions).streaming = not bounded
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)
