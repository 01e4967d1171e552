"""stories: 24 h stories from ``story-events`` into Redis and Cassandra, expired by Beam timers.

    python -m pipelines.stories --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--grace_s 3600 --expired_topic T ...]

``MaterializeStories`` applies each event to both stores (``stores.stories.StoryWriter``)
and removes each story when the watermark passes its ``expires_at``; ``run`` wires it to
the Kafka source. Design (expiry, start-up sweep, delivery, idempotence):
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
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Timestamp

from domain.stories import HOUR_MS, StoryPolicy, parse_timer_tag, timer_shard, timer_tag
from pipelines.common import Counters, StoreOptions, module_main
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.kafka_write import KafkaMessage, WriteToKafka
from pipelines.io.sink import ApplyInBatches
from pipelines.io.source import ReadEvents
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import StoryEvent
from schemas.stories import ExpiryCommand, StoryExpired, StoryOutcome
from stores.config import StoreConfig
from stores.retry import RetryPolicy
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
        parser.add_argument("--stories_max_batch", type=int, default=500,
                            help="events buffered before they are applied within a bundle")
        parser.add_argument("--expired_topic", default=None,
                            help="also write a JSON record per expired story to this topic "
                                 "(with --topic_prefix)")
        parser.add_argument("--expiry_shards", type=int, default=64,
                            help="keys the expiry timers are spread over (by story_id)")
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
        return _StoryApplier(open_story_writer(self.stores, self.policy), Counters(NAMESPACE))


class _StoryApplier:
    """``ApplyInBatches``' applier: a batch through ``StoryWriter.apply``, one
    ``StoryOutcome`` per story event; other elements have no output and are
    counted (the pipeline reads only ``story-events``)."""

    def __init__(self, writer: StoryWriter, counters: Counters):
        self._writer = writer
        self._counters = counters

    def apply(self, batch: list) -> list[StoryOutcome | None]:
        events = [e for e in batch if isinstance(e, StoryEvent)]
        applied = iter(self._writer.apply(events))
        # Counted only once the whole batch is written: a retried batch counts once.
        self._counters.inc("events_not_story", len(batch) - len(events))
        outcomes = [next(applied) if isinstance(e, StoryEvent) else None for e in batch]
        actions = collections.Counter(o.action for o in outcomes if o is not None)
        for action, n in actions.items():
            self._counters.inc(f"events_{action}", n)
        return outcomes

    def close(self) -> None:
        self._writer.close()


def expiry_command(outcome: StoryOutcome) -> ExpiryCommand | None:
    """The timer command an applied event implies: arm for a written publish,
    cancel for a delete, none otherwise."""
    if outcome.action == "published":
        return ExpiryCommand(outcome.story_id, outcome.author_id, outcome.expires_at, False)
    if outcome.action == "deleted":
        return ExpiryCommand(outcome.story_id, outcome.author_id, outcome.expires_at, True)
    return None


def _timer_commands(outcome: StoryOutcome) -> list[ExpiryCommand]:
    cmd = expiry_command(outcome)
    return [] if cmd is None else [cmd]


# --------------------------------------------------------------------------- expiry


class _SweepExpiryIndexFn(beam.DoFn):
    """On start (one Impulse element): a re-arm command for every story in the
    durable expiry index (``CassandraStoryStore.sweep``)."""

    def __init__(self, stores: StoreConfig, policy: StoryPolicy):
        self._stores = stores
        self._policy = policy

    def process(self, _):
        writer = open_story_writer(self._stores, self._policy)
        try:
            indexed = writer.cassandra.sweep(writer.now_ms())
        finally:
            writer.close()
        Counters(NAMESPACE).inc("rearmed", len(indexed))
        log.info("stories: re-arming %d timers from the expiry index", len(indexed))
        for s in indexed:
            yield ExpiryCommand(s.story_id, s.author_id, s.expires_at, False)


def _timestamp(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


class _ExpiryTimerFn(beam.DoFn):
    """Keyed by a shard of story_id: one event-time timer per story, tagged
    ``story:author:expires_at`` (``timer_tag``) and set at ``expires_at``; when it
    fires the story is removed (``StoryWriter.expire``, retried whole with
    ``RetryPolicy``) and a ``StoryExpired`` emitted. A cancel (delete) clears the
    story's timer. No state: the tag carries what the firing needs, and setting
    the same tag again (a redelivered publish, the start-up sweep) replaces the
    timer. A timer re-armed after its cancel fires into the store's tombstone
    and emits nothing (``expired_after_delete``).
    """

    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, stores: StoreConfig, policy: StoryPolicy,
                 retry: RetryPolicy = RetryPolicy()):
        self._stores = stores
        self._policy = policy
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

    def process(self, element, expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, cmd = element
        tag = timer_tag(cmd.story_id, cmd.author_id, cmd.expires_at)
        if cmd.cancel:
            expiry.clear(dynamic_timer_tag=tag)
            self._counters.inc("timers_cancelled")
        else:
            expiry.set(_timestamp(cmd.expires_at), dynamic_timer_tag=tag)
            self._counters.inc("timers_armed")

    @userstate.on_timer(EXPIRY)
    def on_expiry(self, tag=beam.DoFn.DynamicTimerTagParam):
        story_id, author_id, expires_at = parse_timer_tag(tag)
        expired = self._retry.call(
            lambda: self._writer.expire(story_id, author_id, expires_at),
            what=f"stories: expire story {story_id}",
            on_retry=lambda _: self._counters.inc("expire_retries"))
        if expired is None:
            self._counters.inc("expired_after_delete")
            return
        self._counters.inc("stories_expired")
        self._delay.update(expired.removed_at - expired.expires_at)
        yield expired


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
      max_batch: events applied at once within a bundle.
      sweep: re-arm timers from the durable expiry index when the job starts
        (see ``docs/pipelines/stories.md``); off only in tests that want no
        start-up state.
      expiry_shards: keys the per-story timers are spread over.

    Takes a ``PCollection`` of ``StoryEvent`` (in the global window, as the
    Kafka source emits them). Returns ``StoryResults``: ``outcomes``, one
    ``StoryOutcome`` per event once its writes are done (keep this step fused
    with the read: no GroupByKey before it), and ``expired``, one
    ``StoryExpired`` per story the expiry timer removed, timestamped at its
    ``expires_at``.
    """

    def __init__(self, stores: StoreConfig, policy: StoryPolicy = StoryPolicy(),
                 max_batch: int = 500, sweep: bool = True, expiry_shards: int = 64):
        super().__init__()
        if expiry_shards < 1:
            raise ValueError("expiry_shards must be >= 1")
        self._stores = stores
        self._policy = policy
        self._max_batch = max_batch
        self._sweep = sweep
        self._shards = expiry_shards

    def expand(self, events):
        outcomes = events | "ApplyToStores" >> ApplyInBatches(
            StoryApplierConfig(self._stores, self._policy), namespace=NAMESPACE,
            max_batch=self._max_batch, output_type=StoryOutcome)
        commands = (outcomes
                    | "TimerCommands" >> beam.FlatMap(_timer_commands)
                    .with_output_types(ExpiryCommand))
        if self._sweep:
            rearm = (events.pipeline
                     | "StartSweep" >> beam.Impulse()
                     | "SweepExpiryIndex" >> beam.ParDo(
                         _SweepExpiryIndexFn(self._stores, self._policy))
                     .with_output_types(ExpiryCommand))
            commands = (commands, rearm) | "WithRearms" >> beam.Flatten()
        shards = self._shards
        expired = (commands
                   | "KeyByShard" >> beam.Map(lambda c: (timer_shard(c.story_id, shards), c))
                   .with_output_types(tuple[int, ExpiryCommand])
                   | "ExpireAtWatermark" >> beam.ParDo(_ExpiryTimerFn(self._stores, self._policy))
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
    config = kafka.source_config(default_group=DEFAULT_GROUP)
    prefix = kafka.topic_prefix
    events = (pipeline
              | "ReadStoryEvents" >> ReadEvents(config, [prefix + StoryEvent.TOPIC],
                                                topic_prefix=prefix))
    results = events | "MaterializeStories" >> MaterializeStories(
        options.view_as(StoreOptions).config(), opts.policy(), opts.stories_max_batch,
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
