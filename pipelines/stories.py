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
import time
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
    story_expiry,
    wakeups,
)
from pipelines.common import (
    STORIES_DURABLE_LOG_TOPIC,
    STORIES_GROUP,
    Counters,
    StoreOptions,
    module_main,
)
from pipelines.io.durable_log import (
    ApplyDurableLog,
    DurableLog,
    DurableLogOptions,
    LogWriter,
    durable_source,
    own_restore_wait,
)
from pipelines.io.kafka import KafkaReadOptions, KafkaSourceConfig
from pipelines.io.kafka_write import KafkaMessage, WriteToKafka
from pipelines.io.sink import FROM_OPTIONS, ApplyInBatches, DeadLetterTarget, PartialPolls
from pipelines.io.source import ReadEventBatches, producer_config_of
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import StoryEvent, dlq_topic
from schemas.records import EventBatch
from schemas.stories import (
    StoryDurableWrites,
    StoryExpired,
    StoryOutcome,
    decode_story_writes,
    encode_story_writes,
)
from stores.cassandra.stories import CassandraStoryStore
from stores.config import StoreConfig
from stores.fanout import ensure_log_topics
from stores.kafka.lag import GroupPriority
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
DURABLE_NAMESPACE = "feedbeam.stories_durable"
DEFAULT_GROUP = STORIES_GROUP
#: Records a bundle of the stories job reads at most (``--max_records_per_bundle``).
BUNDLE_RECORDS = 50_000
#: Polls buffered at most before they are applied once one is not full.
PARTIAL_BATCHES = 8


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
        parser.add_argument("--stories_max_batches", type=int, default=50,
                            help="event batches (one partition poll each) buffered before they "
                                 "are applied together within a bundle, when the polls are full "
                                 "(a backlog); else they are applied once "
                                 f"{PARTIAL_BATCHES} are buffered (latency)")
        parser.add_argument("--expired_topic", default=None,
                            help="also write a JSON record per expired story to this topic "
                                 "(with --topic_prefix)")
        parser.add_argument("--expiry_shards", type=int, default=4,
                            help=f"keys of the expiry timers (1..{EXPIRY_SHARDS}); each owns "
                                 "whole shards of the durable expiry index")
        parser.add_argument("--no_sweep", action="store_true",
                            help="do not re-arm timers from the expiry index on start")
        parser.add_argument("--durable_give_way", type=int, default=20_000,
                            help="the durable step waits before each batch (up to 30 s) while "
                                 "the Redis step is more than this many events behind and "
                                 "draining: trays first on a shared machine (0: never)")

    def policy(self) -> StoryPolicy:
        return StoryPolicy(grace_ms=int(self.grace_s * 1000),
                           max_life_ms=int(self.max_story_life_h * HOUR_MS))


# --------------------------------------------------------------------------- apply


@dataclasses.dataclass(frozen=True)
class StoryApplierConfig:
    """What the apply step pickles: where the stores are, the ``StoryPolicy`` and the
    durable log (None: Cassandra is written within each batch); ``open()``
    connects (in the DoFn's ``setup``)."""

    stores: StoreConfig
    policy: StoryPolicy = StoryPolicy()
    durable_log: DurableLog | None = None

    def open(self) -> "_StoryApplier":
        writer = open_story_writer(self.stores, self.policy)
        try:
            log_writer = None if self.durable_log is None else LogWriter(
                self.durable_log, NAMESPACE)
        except Exception:
            writer.close()
            raise
        healer = open_healer(self.stores, RestoreSettings(story_policy=self.policy),
                             writer.redis.client)
        return _StoryApplier(writer, Counters(NAMESPACE), healer, log_writer)


class _StoryApplier:
    """``ApplyInBatches``' applier: the story events of a list of ``EventBatch``es
    through one ``StoryWriter.apply_to_redis``, then their Cassandra writes
    (``StoryWriter.write_durable``, or with a ``log_writer`` the durable log
    with every record delivered); per event batch, its ``StoryOutcome``s in
    order. Other events have no outcome and are counted (the pipeline reads only
    ``story-events``). With a ``healer``, Redis' generation marker is read before
    and after the batch's Redis writes (``RedisHealer.write_whole``): a Redis that
    lost its data is restored from Cassandra before the batch is applied, so a
    deleted story's tombstone is back before its replayed publish, and a batch
    during which Redis was lost is written again before its Cassandra writes
    (which its Redis results decide)."""

    def __init__(self, writer: StoryWriter, counters: Counters,
                 healer: RedisHealer | None = None, log_writer: LogWriter | None = None):
        self._writer = writer
        self._counters = counters
        self._healer = healer
        self._log_writer = log_writer

    def apply(self, batches: list[EventBatch]) -> list[tuple[StoryOutcome, ...]]:
        per_batch = [[e for e in b.events if isinstance(e, StoryEvent)] for b in batches]
        events = [e for events in per_batch for e in events]
        if self._healer is None:
            applied, writes = self._writer.apply_to_redis(events)
        else:
            restores, reruns = self._healer.restores, self._healer.reruns
            applied, writes = self._writer.apply_to_redis(events,
                                                          redis_whole=self._healer.write_whole)
            self._counters.inc("redis_restores", self._healer.restores - restores)
            self._counters.inc("batches_redone_after_redis_loss", self._healer.reruns - reruns)
        if self._log_writer is None:
            self._writer.write_durable(writes)
        else:  # delivered, or the batch fails
            self._log_writer.write(encode_story_writes(writes))
        out, start = [], 0
        for events in per_batch:
            out.append(tuple(applied[start:start + len(events)]))
            start += len(events)
        # Counted only once the whole batch is written: a retried batch counts once.
        self._counters.inc("events_not_story", sum(len(b) for b in batches) - len(applied))
        self._counters.inc("durable_writes", writes.size)
        for action, n in collections.Counter(o.action for o in applied).items():
            self._counters.inc(f"events_{action}", n)
        return out

    def close(self) -> None:
        try:
            if self._log_writer is not None:
                self._log_writer.close()
        finally:
            self._writer.close()


# --------------------------------------------------------------------------- the durable step


@dataclasses.dataclass(frozen=True)
class StoryDurableApplierConfig:
    """What the durable step pickles; ``open()`` connects to Cassandra (and, with
    ``give_way``, to Kafka for the Redis step's lag)."""

    stores: StoreConfig
    policy: StoryPolicy = StoryPolicy()
    give_way: GroupPriority | None = None

    def open(self) -> "_StoryDurableApplier":
        s = self.stores
        cassandra = CassandraStoryStore.connect(
            s.cassandra_host, s.cassandra_port, s.cassandra_keyspace, self.policy,
            **s.cassandra_options)
        try:
            waiter = None if self.give_way is None else self.give_way.open()
        except Exception:
            cassandra.close()
            raise
        return _StoryDurableApplier(cassandra, waiter=waiter)


class _StoryDurableApplier:
    """The writes of a batch of durable log record batches to Cassandra, at most
    ``chunk`` writes per ``CassandraStoryStore.write`` (a backlog comes in large
    batches); per record batch, ``(story_id, expires_at)`` of the stories it
    published, for the expiry timers (which read the expiry index this wrote).
    With a ``waiter`` (``stores.kafka.lag.PriorityWait``), each batch first gives
    way to the Redis step while that one drains a backlog."""

    def __init__(self, cassandra: CassandraStoryStore, chunk: int = 20_000, waiter=None):
        self._cassandra = cassandra
        self._chunk = chunk
        self._waiter = waiter
        self._counters = Counters(DURABLE_NAMESPACE)

    def apply(self, elements: list[list[StoryDurableWrites]]) -> list[tuple[tuple[int, int], ...]]:
        if self._waiter is not None:
            self._counters.inc("gave_way_ms", int(self._waiter.wait() * 1000))
        pending: list[StoryDurableWrites] = []
        size = 0
        for writes in (w for records in elements for w in records):
            pending.append(writes)
            size += writes.size
            if size >= self._chunk:
                self._write(pending)
                pending, size = [], 0
        self._write(pending)
        return [tuple((e.story_id, story_expiry(e)) for w in records for e in w.publishes)
                for records in elements]

    def _write(self, pending: list[StoryDurableWrites]) -> None:
        if not pending:
            return
        self._cassandra.write_decided(pending, int(time.time() * 1000))
        self._counters.inc("writes", sum(w.size for w in pending))

    def close(self) -> None:
        try:
            if self._waiter is not None:
                self._waiter.close()
        finally:
            self._cassandra.close()


def ApplyDurableStoryLog(source: KafkaSourceConfig, topic: str, stores: StoreConfig,
                         policy: StoryPolicy = StoryPolicy(), max_batch: int = 10,
                         producer_config: dict | None = None,
                         give_way: GroupPriority | None = None) -> ApplyDurableLog:
    """Read the stories' durable log with its own consumer group (``source``'s
    ``group.id``, committed after the Cassandra writes) and write it to
    Cassandra, giving way to the Redis step's backlog with ``give_way``; returns,
    per record batch, the ``(story_id, expires_at)`` of the stories it published.
    A record that does not decode goes to ``<topic>.dlq``."""
    return ApplyDurableLog(source, [topic], StoryDurableApplierConfig(stores, policy, give_way),
                           DURABLE_NAMESPACE, decode_story_writes, max_batch, producer_config,
                           output_type=tuple[tuple[int, int], ...])


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


@dataclasses.dataclass(frozen=True)
class DurableStep:
    """The durable log of ``MaterializeStories``: where the Redis step writes it
    (``log``) and how the durable step reads it (``source``, its own consumer
    group; ``max_batch`` record batches at once; ``give_way``: the Redis step's
    group and topic it waits for while that one drains a backlog)."""

    log: DurableLog
    source: KafkaSourceConfig
    max_batch: int = 10
    give_way: GroupPriority | None = None


class ExpireStories(beam.PTransform):
    """Timer wakeups ``(timer key, at)`` -> one ``StoryExpired`` per story the
    expiry timers removed, timestamped at its ``expires_at`` (or the firing, if
    later); with ``sweep``, the wakeups of the durable expiry index on start too.
    The wakeups must come after the expiry index holds their stories (the timers
    read it)."""

    def __init__(self, stores: StoreConfig, policy: StoryPolicy, shards: int, sweep: bool = True):
        super().__init__()
        index_shards_of(0, shards)  # validates
        self._stores, self._policy, self._shards, self._sweep = stores, policy, shards, sweep

    def expand(self, wakes):
        if self._sweep:
            rearm = (wakes.pipeline
                     | "StartSweep" >> beam.Impulse()
                     | "SweepExpiryIndex" >> beam.ParDo(
                         _SweepExpiryIndexFn(self._stores, self._policy, self._shards))
                     .with_output_types(tuple[int, int]))
            wakes = (wakes, rearm) | "WithRearms" >> beam.Flatten()
        return (wakes
                | "ExpireAtWatermark" >> beam.ParDo(
                    _ExpiryTimerFn(self._stores, self._policy, self._shards))
                .with_output_types(StoryExpired))


def durable_wakeups(published: tuple[tuple[int, int], ...], shards: int) -> list[tuple[int, int]]:
    """``(timer key, at)`` for the stories a durable log batch published (``wakeups``)."""
    return wakeups(list(published), shards)


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
      durable: the durable log (``DurableStep``) the Cassandra writes go
        through, applied by a step of its own that also arms the expiry
        timers; None writes Cassandra within each batch.
      flush_early: applies the buffered event batches before ``max_batches``
        (``ApplyInBatches``; the job's: ``PartialPolls``).

    Takes a ``PCollection`` of ``EventBatch`` of story events (in the global
    window, as ``ReadEventBatches`` emits them). Returns ``StoryResults``:
    ``outcomes``, per event batch a tuple of one ``StoryOutcome`` per event once
    its writes are done (keep this step fused with the read: no GroupByKey
    before it), and ``expired`` (``ExpireStories``).
    """

    def __init__(self, stores: StoreConfig, policy: StoryPolicy = StoryPolicy(),
                 max_batches: int = 8, sweep: bool = True, expiry_shards: int = 4,
                 dead_letters: DeadLetterTarget | str | None = FROM_OPTIONS,
                 durable: DurableStep | None = None, flush_early=None):
        super().__init__()
        self._expire = ExpireStories(stores, policy, expiry_shards, sweep)
        self._flush_early = flush_early
        self._dead_letters = dead_letters
        self._stores = stores
        self._policy = policy
        self._max_batches = max_batches
        self._shards = expiry_shards
        self._durable = durable

    def expand(self, batches):
        shards, durable = self._shards, self._durable
        outcomes = batches | "ApplyToStores" >> ApplyInBatches(
            StoryApplierConfig(self._stores, self._policy, durable and durable.log),
            namespace=NAMESPACE, max_batch=self._max_batches,
            output_type=tuple[StoryOutcome, ...], dead_letters=self._dead_letters,
            flush_early=self._flush_early)
        if durable is None:
            wakes = (outcomes
                     | "TimerWakeups" >> beam.FlatMap(timer_wakeups, shards)
                     .with_output_types(tuple[int, int]))
        else:
            wakes = durable_steps(batches.pipeline, durable, self._stores, self._policy, shards)
        return StoryResults(outcomes, wakes | "ExpireStories" >> self._expire)


def durable_steps(pipeline, durable: DurableStep, stores: StoreConfig, policy: StoryPolicy,
                  shards: int):
    """The durable step on ``pipeline``: the log applied to Cassandra, and the timer
    wakeups of the stories it published."""
    producer = durable.log.producer_config
    return (pipeline
            | "ApplyDurableStoryLog" >> ApplyDurableStoryLog(
                durable.source, durable.log.topic, stores, policy, durable.max_batch, producer,
                durable.give_way)
            | "DurableWakeups" >> beam.FlatMap(durable_wakeups, shards)
            .with_output_types(tuple[int, int]))


def expired_message(topic: str, expired: StoryExpired) -> KafkaMessage:
    """The ``--expired_topic`` record of an expiry: JSON, keyed by author like story-events."""
    value = json.dumps(dataclasses.asdict(expired), separators=(",", ":")).encode()
    return KafkaMessage(topic, str(expired.author_id).encode(), value,
                        timestamp_ms=expired.removed_at)


# --------------------------------------------------------------------------- job


def build(pipeline: beam.Pipeline, options: PipelineOptions) -> StoryResults | None:
    """Wire the stories job into ``pipeline``: follow ``story-events`` from the
    consumer group's offsets; returns the composite's outputs (None when the job
    runs one part only). With ``--durable_copy=log`` (the default), creates the
    durable log topic if it is missing."""
    kafka = options.view_as(KafkaReadOptions)
    opts = options.view_as(StoriesOptions)
    # Expiry is event-time timers, and no story event is ever too late to apply: an
    # idle partition follows the clock, not its last record's age (a drained backlog
    # held every expiry back as long).
    # A backlog drains in batches of up to BUNDLE_RECORDS events: the Redis step's
    # round trips and each bundle's own cost are paid per batch
    # (docs/benchmarks.md, "Stories").
    config = kafka.source_config(default_group=DEFAULT_GROUP, default_idle_watermark="clock",
                                 default_max_records_per_bundle=BUNDLE_RECORDS)
    prefix = kafka.topic_prefix
    topics = [prefix + StoryEvent.TOPIC]
    store_options = options.view_as(StoreOptions)
    stores = store_options.config()
    policy = opts.policy()
    durable = None
    durable_options = options.view_as(DurableLogOptions)
    if durable_options.durable_copy == "log":
        log_topic = prefix + STORIES_DURABLE_LOG_TOPIC
        producer = producer_config_of(config)
        ensure_log_topics(producer, [log_topic, dlq_topic(log_topic)], like=topics)
        source = durable_source(config, DEFAULT_GROUP)
        give_way = None if opts.durable_give_way <= 0 else GroupPriority(
            kafka.kafka_bootstrap, config.consumer_config["group.id"], tuple(topics),
            opts.durable_give_way)
        durable = DurableStep(DurableLog(log_topic, producer, source.consumer_config["group.id"],
                                         store_options.restore_log_wait_s),
                              source, durable_options.durable_max_batch, give_way)
    # A restore this job runs waits for its own durable step (none when it writes inline).
    stores = dataclasses.replace(stores, restore_log=own_restore_wait(
        stores.restore_log, prefix + STORIES_DURABLE_LOG_TOPIC, durable and durable.log))
    parts = durable_options.parts if durable is not None else "all"
    if parts == "durable":
        wakes = durable_steps(pipeline, durable, stores, policy, opts.expiry_shards)
        expired = wakes | "ExpireStories" >> ExpireStories(
            stores, policy, opts.expiry_shards, sweep=not opts.no_sweep)
        _write_expired(expired, opts, kafka)
        return None
    batches = (pipeline
               | "ReadStoryEvents" >> ReadEventBatches(config, topics, topic_prefix=prefix))
    flush_early = PartialPolls(config.batch_records, PARTIAL_BATCHES)
    if parts == "redis":
        _ = batches | "ApplyToStores" >> ApplyInBatches(
            StoryApplierConfig(stores, policy, durable.log), namespace=NAMESPACE,
            max_batch=opts.stories_max_batches, output_type=tuple[StoryOutcome, ...],
            dead_letters=FROM_OPTIONS, flush_early=flush_early)
        return None
    results = batches | "MaterializeStories" >> MaterializeStories(
        stores, policy, opts.stories_max_batches, sweep=not opts.no_sweep,
        expiry_shards=opts.expiry_shards, durable=durable, flush_early=flush_early)
    _write_expired(results.expired, opts, kafka)
    return results


def _write_expired(expired, opts: StoriesOptions, kafka: KafkaReadOptions) -> None:
    """With ``--expired_topic``, a JSON record per expired story to that topic."""
    if opts.expired_topic:
        topic = kafka.topic_prefix + opts.expired_topic
        _ = (expired
             | "ExpiredToMessages" >> beam.Map(lambda e, t=topic: expired_message(t, e))
             | "WriteExpired" >> WriteToKafka({"bootstrap.servers": kafka.kafka_bootstrap}))


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
