"""stories: 24 h stories from ``story-events`` into Redis and Cassandra, expired by Beam timers.

    python -m pipelines.stories --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--grace_s 3600 --expired_topic T ...]

``MaterializeStories`` applies event batches to both stores (``stores.stories.StoryWriter``)
and removes stories in batches when the watermark passes their ``expires_at``; ``run``
wires it to the Kafka source. Design (expiry, start-up sweep, delivery, idempotence):
``docs/pipelines/stories.md``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import sys
from typing import NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import (
    PipelineOptions,
    PortableOptions,
    StandardOptions,
)
from apache_beam.coders import PickleCoder
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from domain.stories import (
    EXPIRY_SHARDS,
    HOUR_MS,
    StoryPolicy,
    add_pending,
    index_shards_of,
    wakeups,
)
from pipelines.common import Counters, StoreOptions, module_main
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.kafka_write import KafkaMessage, WriteToKafka
from pipelines.io.sink import FROM_OPTIONS, ApplyInBatches, DeadLetterTarget
from pipelines.io.source import ReadEventBatches
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import StoryEvent
from schemas.records import EventBatch
from schemas.stories import StoryExpired, StoryOutcome
from stores.config import StoreConfig
from stores.retry import RetryPolicy
from stores.redis.stories import PUBLISHED
from stores.restore import RedisHealer, RestoreSettings, open_healer
from stores.stories import StoryWriter, open_story_writer

if __name__ == "__main__":
    # Before the classes below: running them as __main__ would define the options
    # a second time (see ``module_main``).
    sys.exit(module_main("pipelines.stories"))

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.stories"
DEFAULT_GROUP = "feedbeam-stories"


class StoriesOptions(PipelineOptions):
    """The stories pipeline's own flags (stores: ``StoreOptions``; Kafka: ``KafkaReadOptions``)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        d = StoryPolicy()
        parser.add_argument("--grace_s", type=float, default=d.grace_ms / 1000,
                            help="how long story state may outlive expires_at (Redis EXPIREAT and "
                                 "Cassandra TTL); readers never serve it meanwhile")
        parser.add_argument("--max_story_life_h", type=float, default=d.max_life_ms / HOUR_MS,
                            help="latest expires_at accepted, after the publish's event time; the "
                                 "start-up sweep reads the expiry index this far ahead")
        parser.add_argument("--stories_max_batches", type=int, default=8,
                            help="event batches (one partition poll each) buffered before they "
                                 "are applied together within a bundle")
        parser.add_argument("--expired_topic", default=None,
                            help="also write a JSON record per expired story to this topic "
                                 "(with --topic_prefix)")
        parser.add_argument("--expiry_shards", type=int, default=4,
                            help=f"keys of the expiry timers (1..{EXPIRY_SHARDS}); each owns "
                                 "whole shards of the durable expiry index")
        parser.add_argument("--no_sweep", action="store_true",
                            help="do not re-arm timers from the expiry index on start")

    def policy(self) -> StoryPolicy:
        return StoryPolicy(grace_ms=int(self.grace_s * 1000),
                           max_life_ms=int(self.max_story_life_h * HOUR_MS))


# --------------------------------------------------------------------------- apply


@dataclasses.dataclass(frozen=True)
class StoryApplierConfig:
    """What the apply step pickles: where the stores are and the ``StoryPolicy``;
    ``open()`` connects (in the DoFn's ``setup``)."""

    stores: StoreConfig
    policy: StoryPolicy = StoryPolicy()

    def open(self) -> "_StoryApplier":
        writer = open_story_writer(self.stores, self.policy)
        healer = open_healer(self.stores, RestoreSettings(story_policy=self.policy),
                             writer.redis.client)
        return _StoryApplier(writer, Counters(NAMESPACE), healer)


class _StoryApplier:
    """``ApplyInBatches``' applier: the story events of a list of ``EventBatch``es
    through one ``StoryWriter.apply``; per event batch, its ``StoryOutcome``s in
    order. Other events have no outcome and are counted (the pipeline reads only
    ``story-events``). With a ``healer``, Redis' generation marker is read before
    and after the batch's Redis writes (``RedisHealer.write_whole``): a Redis that
    lost its data is restored from Cassandra before the batch is applied, so a
    deleted story's tombstone is back before its replayed publish, and a batch
    during which Redis was lost is written again before its Cassandra writes
    (which its Redis results decide)."""

    def __init__(self, writer: StoryWriter, counters: Counters,
                 healer: RedisHealer | None = None):
        self._writer = writer
        self._counters = counters
        self._healer = healer

    def apply(self, batches: list[EventBatch]) -> list[tuple[StoryOutcome, ...]]:
        per_batch = [[e for e in b.events if isinstance(e, StoryEvent)] for b in batches]
        events = [e for events in per_batch for e in events]
        if self._healer is None:
            applied = self._writer.apply(events)
        else:
            restores, reruns = self._healer.restores, self._healer.reruns
            applied = self._writer.apply(events, redis_whole=self._healer.write_whole)
            self._counters.inc("redis_restores", self._healer.restores - restores)
            self._counters.inc("batches_redone_after_redis_loss", self._healer.reruns - reruns)
        out, start = [], 0
        for events in per_batch:
            out.append(tuple(applied[start:start + len(events)]))
            start += len(events)
        # Counted only once the whole batch is written: a retried batch counts once.
        self._counters.inc("events_not_story", sum(len(b) for b in batches) - len(applied))
        for action, n in collections.Counter(o.action for o in applied).items():
            self._counters.inc(f"events_{action}", n)
        return out

    def close(self) -> None:
        self._writer.close()


def timer_wakeups(outcomes: tuple[StoryOutcome, ...], shards: int) -> list[tuple[int, int]]:
    """``(timer key, at)`` for the stories an event batch wrote: the earliest expiry
    per key and index bucket (``domain.stories.wakeups``)."""
    return wakeups([(o.story_id, o.expires_at) for o in outcomes if o.action == PUBLISHED],
                   shards)


# --------------------------------------------------------------------------- expiry


class _SweepExpiryIndexFn(beam.DoFn):
    """On start (one Impulse element): for every timer key, a wakeup per bucket of
    the durable expiry index holding its stories (``StoryWriter.pending``)."""

    def __init__(self, stores: StoreConfig, policy: StoryPolicy, shards: int):
        self._stores = stores
        self._policy = policy
        self._shards = shards

    def process(self, _):
        writer = open_story_writer(self._stores, self._policy)
        try:
            found = {key: writer.pending(index_shards_of(key, self._shards))
                     for key in range(self._shards)}
        finally:
            writer.close()
        n = sum(len(p) for p in found.values())
        Counters(NAMESPACE).inc("rearmed", n)
        log.info("stories: re-arming %d timer keys: %d hours of the expiry index hold stories",
                 len(found), n)
        for key, pending in found.items():
            for at in pending.values():
                yield key, at


def _timestamp(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


class _ExpiryTimerFn(beam.DoFn):
    """Keyed by timer key (``domain.stories.timer_shard``): one event-time timer
    per key at the earliest pending expiry of its index shards. State: what is
    pending, as expiry-index bucket -> earliest ``expires_at`` (one entry per
    hour with stories, whatever their number). A wakeup ``(key, at)`` adds to
    it and moves the timer earlier. When the timer fires, every due story of
    the key is removed in one batch (``StoryWriter.expire_due``, retried whole
    with ``RetryPolicy``), read from the durable expiry index; a ``StoryExpired``
    per story is emitted, and the timer is set at what is left.
    """

    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)
    PENDING = userstate.ReadModifyWriteStateSpec("pending", PickleCoder())

    def __init__(self, stores: StoreConfig, policy: StoryPolicy, shards: int,
                 retry: RetryPolicy = RetryPolicy()):
        self._stores = stores
        self._policy = policy
        self._shards = shards
        self._retry = retry

    def setup(self):
        self._writer = open_story_writer(self._stores, self._policy)
        self._counters = Counters(NAMESPACE)
        self._delay = Metrics.distribution(NAMESPACE, "expiry_delay_ms")

    def teardown(self):
        writer = getattr(self, "_writer", None)
        if writer is not None:
            self._writer = None
            writer.close()

    def process(self, element, expiry=beam.DoFn.TimerParam(EXPIRY),
                pending_state=beam.DoFn.StateParam(PENDING)):
        _, at = element
        pending = pending_state.read() or {}
        earliest = min(pending.values(), default=None)
        if add_pending(pending, at):
            pending_state.write(pending)
            if earliest is None or at < earliest:
                expiry.set(_timestamp(at))
                self._counters.inc("timers_set")

    @userstate.on_timer(EXPIRY)
    def on_expiry(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                  expiry=beam.DoFn.TimerParam(EXPIRY),
                  pending_state=beam.DoFn.StateParam(PENDING)):
        fire_ms = fired.micros // 1000
        shards = index_shards_of(key, self._shards)
        pending = pending_state.read() or {}
        done = self._retry.call(
            lambda: self._writer.expire_due(shards, pending, fire_ms),
            what=f"stories: expire timer key {key} at {fire_ms}",
            on_retry=lambda _: self._counters.inc("expire_retries"))
        if done.pending:
            pending_state.write(done.pending)
            expiry.set(_timestamp(max(min(done.pending.values()), fire_ms)))
        else:
            pending_state.clear()
        self._counters.inc("expiry_rounds")
        self._counters.inc("expired_after_delete", done.after_delete)
        self._counters.inc("stories_expired", len(done.expired))
        for expired in done.expired:
            self._delay.update(expired.removed_at - expired.expires_at)
            yield TimestampedValue(expired, _timestamp(max(expired.expires_at, fire_ms)))


# --------------------------------------------------------------------------- composite


class StoryResults(NamedTuple):
    """The outputs of ``MaterializeStories``."""

    outcomes: beam.PCollection
    expired: beam.PCollection


class MaterializeStories(beam.PTransform):
    """Apply story events to the stores and expire stories with event-time timers.

    Args:
      stores: where Redis and Cassandra are.
      policy: grace period and longest story life (``StoryPolicy``).
      max_batches: event batches applied together within a bundle.
      sweep: re-arm timers from the durable expiry index when the job starts
        (see ``docs/pipelines/stories.md``); off only in tests that want no
        start-up state.
      expiry_shards: keys of the expiry timers (1..``EXPIRY_SHARDS``).
      dead_letters: where the apply step sends an event it cannot apply
        (``ApplyInBatches``: a ``DeadLetterTarget``, ``FROM_OPTIONS``, the
        default, or None to fail the bundle).

    Takes a ``PCollection`` of ``EventBatch`` of story events (in the global
    window, as ``ReadEventBatches`` emits them). Returns ``StoryResults``:
    ``outcomes``, per event batch a tuple of one ``StoryOutcome`` per event once
    its writes are done (keep this step fused with the read: no GroupByKey
    before it), and ``expired``, one ``StoryExpired`` per story the expiry
    timers removed, timestamped at its ``expires_at`` (or the firing, if later).
    """

    def __init__(self, stores: StoreConfig, policy: StoryPolicy = StoryPolicy(),
                 max_batches: int = 8, sweep: bool = True, expiry_shards: int = 4,
                 dead_letters: DeadLetterTarget | str | None = FROM_OPTIONS):
        super().__init__()
        index_shards_of(0, expiry_shards)  # validates
        self._dead_letters = dead_letters
        self._stores = stores
        self._policy = policy
        self._max_batches = max_batches
        self._sweep = sweep
        self._shards = expiry_shards

    def expand(self, batches):
        shards = self._shards
        outcomes = batches | "ApplyToStores" >> ApplyInBatches(
            StoryApplierConfig(self._stores, self._policy), namespace=NAMESPACE,
            max_batch=self._max_batches, output_type=tuple[StoryOutcome, ...],
            dead_letters=self._dead_letters)
        wakes = (outcomes
                 | "TimerWakeups" >> beam.FlatMap(timer_wakeups, shards)
                 .with_output_types(tuple[int, int]))
        if self._sweep:
            rearm = (batches.pipeline
                     | "StartSweep" >> beam.Impulse()
                     | "SweepExpiryIndex" >> beam.ParDo(
                         _SweepExpiryIndexFn(self._stores, self._policy, shards))
                     .with_output_types(tuple[int, int]))
            wakes = (wakes, rearm) | "WithRearms" >> beam.Flatten()
        expired = (wakes
                   | "ExpireAtWatermark" >> beam.ParDo(
                       _ExpiryTimerFn(self._stores, self._policy, shards))
                   .with_output_types(StoryExpired))
        return StoryResults(outcomes, expired)


def expired_message(topic: str, expired: StoryExpired) -> KafkaMessage:
    """The ``--expired_topic`` record of an expiry: JSON, keyed by author like story-events."""
    value = json.dumps(dataclasses.asdict(expired), separators=(",", ":")).encode()
    return KafkaMessage(topic, str(expired.author_id).encode(), value,
                        timestamp_ms=expired.removed_at)


# --------------------------------------------------------------------------- job


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> StoryResults:
    """Wire the stories job into ``pipeline``: follow ``story-events`` from the
    consumer group's offsets; returns the composite's outputs."""
    kafka = options.view_as(KafkaReadOptions)
    opts = options.view_as(StoriesOptions)
    # Expiry is event-time timers, and no story event is ever too late to apply: an
    # idle partition follows the clock, not its last record's age (a drained backlog
    # held every expiry back as long).
    config = kafka.source_config(default_group=DEFAULT_GROUP, default_idle_watermark="clock")
    prefix = kafka.topic_prefix
    batches = (pipeline
               | "ReadStoryEvents" >> ReadEventBatches(config, [prefix + StoryEvent.TOPIC],
                                                       topic_prefix=prefix))
    results = batches | "MaterializeStories" >> MaterializeStories(
        options.view_as(StoreOptions).config(), opts.policy(), opts.stories_max_batches,
        sweep=not opts.no_sweep, expiry_shards=opts.expiry_shards)
    if opts.expired_topic:
        topic = prefix + opts.expired_topic
        _ = (results.expired
             | "ExpiredToMessages" >> beam.Map(lambda e, t=topic: expired_message(t, e))
             | "WriteExpired" >> WriteToKafka({"bootstrap.servers": kafka.kafka_bootstrap}))
    return results


#: Deadline of the launcher's watch on the job (``--job_server_timeout``). Beam's
#: portable runner puts that option (default 300 s) on the job-state stream as
#: a gRPC deadline, and ``wait_until_finish()`` raises when it passes: the
#: launcher, with the LOOPBACK workers inside it, would end a streaming job on
#: Prism after five minutes.
WATCH_S = 365 * 24 * 3600


def job_options(argv=None) -> PipelineOptions:
    """The job's options: streaming, and (unless given) a job-server timeout that
    lets the launcher watch a streaming job for as long as it runs."""
    options = pipeline_options(argv)
    options.view_as(StandardOptions).streaming = True
    given = any(a.split("=")[0] in ("--job_server_timeout", "--job-server-timeout")
                for a in argv or ())
    if not given:
        options.view_as(PortableOptions).job_server_timeout = WATCH_S
    return options


def run(argv=None):
    """Parse options, build the streaming job and run it until it is cancelled
    (SIGTERM or Ctrl-C cancel the job on the runner, see ``pipelines.runtime``)."""
    options = job_options(argv)
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)
