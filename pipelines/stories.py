"""stories: 24 h stories from ``story-events`` into Redis and Cassandra, expired by Beam timers.

    python -m pipelines.stories --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--grace_s 3600 --expired_topic T ...]

reads ``story-events`` (``ReadEvents``) and, through ``MaterializeStories``:

1. **applies** each bundle to the stores (``StoryWriter`` over
   ``stores.redis.stories``): PUBLISHED writes the story (metadata, the
   author's active set scored by ``expires_at``, durable rows and the expiry
   index), VIEWED adds the viewer to the story's viewer set (unique view
   count) and the story to the viewer's seen set, DELETED removes all of it
   and leaves a tombstone until the story would have expired;
2. **expires** stories with event-time timers: a keyed DoFn (key: a shard of
   ``story_id``) arms a timer per story at ``expires_at`` for each written
   publish, and when the watermark passes it removes the story from both
   stores and emits
   a ``StoryExpired`` (counted, its delay in a distribution, optionally
   written to ``--expired_topic`` as JSON). A DELETED event cancels the timer.
   The source's idle watermark (wall clock less ``--idle_skew_s`` on a
   caught-up partition) lets timers fire when traffic stops.

Readers (``RedisStoryStore.tray`` / ``CassandraStoryStore.tray``) filter on
``expires_at > now`` themselves, so an expired story is never served even
while this pipeline is stopped or behind; the timers only garbage-collect.

Design
------
**Writes before the shuffle.** Store writes happen in a stateless ParDo fused
with the Kafka read, flushed before the bundle ends, so the offsets the source
commits on bundle finalization never pass an event whose writes are not done
(as in ``pipelines.fanout``). Only the timer bookkeeping comes after the
shuffle to the stateful DoFn. Had the writes come after the shuffle, a
``kill -9`` between the shuffle and the write would lose events: the read
stage's bundle is finalized (offsets committed) once its output is in the
runner's shuffle, and Prism keeps that shuffle and all state in memory.

**What a crash loses, and how restart converges.** With writes upstream, a
crash loses only runner state: the armed timers. A
restarted job starts with empty state and reads from the committed offsets,
so the timers of stories published before them would never be armed again.
On start the job therefore **sweeps the durable expiry index**
(``story_expiry_index``, buckets from now - grace to now + max story life)
and re-arms a timer for every story in it; a story that expired while the job
was down fires at once and is removed. Alternatives weighed: rewinding the
source by a day (``--rewind_s``) re-reads a full day of views on every start;
a periodic sweep instead of timers gives up event-time semantics. The sweep
is one bounded read, O(live stories).

**Keying and state.** Weighed first: key the timer step by ``story_id`` with
state ``(expires_at, deleted)``. Measured on Prism, every key costs about a
bundle: 5,000 keys with a timer each take 12.7 s where 50 keys take 1.0 s,
and after draining a 10k-story backlog such a step needed 157 s more to take
in its commands, which hold the watermark and so every expiry meanwhile.
So the step is keyed by ``story_id % --expiry_shards`` (default 64) and
keeps one *dynamic* timer per story, tagged ``story:author:expires_at``: the
tag carries everything the firing needs, so there is no state to read or
write (5,000 such timers over 64 keys: 3.7 s). A delete clears the story's
tag; re-setting a tag (redelivered publish, start-up sweep) replaces it.
Commands arrive in no particular order after the shuffle; a redelivered
publish after a delete is refused by the store (tombstone), so only the
start-up sweep racing a delete can arm after the cancel: the timer then
fires, the store reports the story as deleted, and nothing is emitted.
Views never reach the timer step: whether a view counts is decided by the
store against the story as stored (exists, not deleted, view event time
before ``expires_at``, not yet expired at apply time), so a view of an
unknown, deleted or expired story never recreates state.
``story-events`` are keyed by ``author_id``, so a story's publish, views and
delete share a partition and arrive in produce order; a view produced before
its publish (a misbehaving client) is ignored as ``view_unknown`` and counted.

**Idempotence.** A redelivered publish rewrites the same hash fields and
ZADDs the same member; a redelivered view SADDs/ZADDs the same members; a
removal is repeatable (Cassandra deletes at ``USING TIMESTAMP expires_at``,
which shadows every accepted write). A publish that is already expired when
applied (e.g. a backlog drained after a long stop) writes nothing, so a
restart leaves exactly the state an uninterrupted run would have once the
timers due have fired.

Not covered: a publish whose ``expires_at`` lies more than
``--max_story_life_h`` after its event time is refused (the sweep would not
find it) and counted as ``events_beyond_horizon``; seen entries written by
serving's ``mark_seen`` without a VIEWED event are not in the viewer set, so
a removal leaves them to their TTL (readers ignore them: only active stories
are matched against the seen set).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import Callable, Iterable, NamedTuple, Sequence

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
from apache_beam.utils.windowed_value import WindowedValue

# Registers FanoutOptions before StoriesOptions: it adds the shared store flags
# (--redis_url, ...) unconditionally, so it must come first for ``_add_once``
# below to skip them rather than clash with it in whichever order both load.
import pipelines.fanout  # noqa: F401
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.kafka_write import KafkaMessage, WriteToKafka
from pipelines.io.source import ReadEvents
from pipelines.runtime import pipeline_options, run_until_done
from domain.stories import (
    HOUR_MS,
    StoryPolicy,
    parse_timer_tag,
    story_expiry,
    timer_shard,
    timer_tag,
)
from schemas.events import STORY_TTL_MS, StoryEvent, StoryEventKind
from schemas.stories import ExpiryCommand, StoryExpired, StoryOutcome


if __name__ == "__main__":
    # `python -m pipelines.stories`: run the importable module, not this __main__
    # copy: Beam pickles transforms and coders by reference to their module, and
    # options classes defined a second time would clash.
    from pipelines.stories import main

    sys.exit(main())

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.stories"
DEFAULT_GROUP = "feedbeam-stories"


# --------------------------------------------------------------------------- options


def _add_once(parser, name: str, **kwargs) -> None:
    """Add ``name`` unless another options class did: the store locations are shared
    by every pipeline's options, and Beam parses all of them with one parser."""
    if name not in parser._option_string_actions:  # argparse has no public lookup
        parser.add_argument(name, **kwargs)


class StoriesOptions(PipelineOptions):
    """Options of the stories pipeline (Kafka settings are ``KafkaReadOptions``)."""

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
        _add_once(parser, "--redis_url", default="redis://127.0.0.1:6379/0")
        _add_once(parser, "--redis_key_prefix", default="fb")
        _add_once(parser, "--cassandra_host", default="127.0.0.1")
        _add_once(parser, "--cassandra_port", type=int, default=9042)
        _add_once(parser, "--cassandra_keyspace", default="feedbeam")

    def policy(self) -> StoryPolicy:
        return StoryPolicy(grace_ms=int(self.grace_s * 1000),
                           max_life_ms=int(self.max_story_life_h * HOUR_MS))

    def stores(self) -> "StoryStoreConfig":
        return StoryStoreConfig(self.redis_url, self.redis_key_prefix, self.cassandra_host,
                                self.cassandra_port, self.cassandra_keyspace, self.policy())


# --------------------------------------------------------------------------- stores


@dataclasses.dataclass(frozen=True)
class StoryStoreConfig:
    """Where the stores are (pickled into DoFns instead of clients); ``open()`` connects."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "fb"
    cassandra_host: str = "127.0.0.1"
    cassandra_port: int = 9042
    cassandra_keyspace: str = "feedbeam"
    policy: StoryPolicy = StoryPolicy()

    def open(self) -> "StoryWriter":
        from stores.cassandra.stories import CassandraStoryStore
        from stores.redis.stories import RedisStoryStore

        redis_store = RedisStoryStore.from_url(self.redis_url, self.redis_key_prefix, self.policy)
        try:
            cassandra_store = CassandraStoryStore.connect(
                self.cassandra_host, self.cassandra_port, self.cassandra_keyspace, self.policy)
        except Exception:
            redis_store.close()
            raise
        return StoryWriter(redis_store, cassandra_store)


def _now_ms() -> int:
    return int(time.time() * 1000)


class StoryWriter:
    """Applies story events and expiries to both stores (no Beam; DoFns adapt it).

    Redis decides what is accepted (tombstones, expiry, unknown stories) and
    Cassandra follows, so the two hold the same stories. ``clock`` gives the
    wall-clock ms that "already expired" is judged against.
    """

    def __init__(self, redis, cassandra, clock: Callable[[], int] = _now_ms):
        self.redis = redis
        self.cassandra = cassandra
        self._clock = clock

    def close(self) -> None:
        self.redis.close()
        self.cassandra.close()

    def apply(self, events: Sequence[StoryEvent]) -> list[StoryOutcome]:
        """Apply events in order: consecutive publishes or views as one batch each,
        deletes one by one. One outcome per event, in order."""
        now = self._clock()
        out: list[StoryOutcome] = []
        for kind, run in _runs(events):
            if kind is StoryEventKind.PUBLISHED:
                out += self._publish(run, now)
            elif kind is StoryEventKind.VIEWED:
                out += self._view(run, now)
            else:
                out += [self._delete(e) for e in run]
        return out

    def _publish(self, events: Sequence[StoryEvent], now: int) -> list[StoryOutcome]:
        statuses = self.redis.publish(events, now)
        self.cassandra.publish([e for e, s in zip(events, statuses) if s == "published"], now)
        return [StoryOutcome(e.event_id, s, e.story_id, e.author_id, story_expiry(e),
                             e.event_time) for e, s in zip(events, statuses)]

    def _view(self, events: Sequence[StoryEvent], now: int) -> list[StoryOutcome]:
        results = self.redis.record_views(events, now)
        self.cassandra.record_views([(e, r.author_id, r.expires_at)
                                     for e, r in zip(events, results) if r.counted], now)
        return [StoryOutcome(e.event_id, r.status if r.counted else f"view_{r.status}",
                             e.story_id, e.author_id, r.expires_at, e.event_time)
                for e, r in zip(events, results)]

    def _delete(self, event: StoryEvent) -> StoryOutcome:
        durable = self.cassandra.story(event.story_id)
        fallback = durable.expires_at if durable else event.event_time + STORY_TTL_MS
        # Redis first: if we crash before Cassandra's removal, the retry still
        # finds the viewers in Cassandra's rows (removed last).
        removal = self.redis.remove(event.story_id, event.author_id, fallback, deleted=True)
        self.cassandra.remove(event.story_id, removal.author_id, removal.expires_at,
                              removal.viewers, deleted=True, now_ms=self._clock())
        return StoryOutcome(event.event_id, "deleted", event.story_id, removal.author_id,
                            removal.expires_at, event.event_time)

    def expire(self, story_id: int, author_id: int, expires_at: int) -> StoryExpired | None:
        """Remove an expired story from both stores (idempotent). None when the story
        turns out to have been deleted (its timer was re-armed after the delete)."""
        removal = self.redis.remove(story_id, author_id, expires_at, deleted=False)
        self.cassandra.remove(story_id, removal.author_id, removal.expires_at, removal.viewers)
        if removal.removed_as == "deleted":
            return None
        return StoryExpired(story_id, removal.author_id, removal.expires_at, self._clock())


def _runs(events: Iterable[StoryEvent]) -> list[tuple[StoryEventKind, list[StoryEvent]]]:
    runs: list[tuple[StoryEventKind, list[StoryEvent]]] = []
    for e in events:
        if runs and runs[-1][0] is e.kind:
            runs[-1][1].append(e)
        else:
            runs.append((e.kind, [e]))
    return runs


def expiry_command(outcome: StoryOutcome) -> ExpiryCommand | None:
    """The timer command an applied event implies: arm for a written publish,
    cancel for a delete, none otherwise."""
    if outcome.action == "published":
        return ExpiryCommand(outcome.story_id, outcome.author_id, outcome.expires_at, False)
    if outcome.action == "deleted":
        return ExpiryCommand(outcome.story_id, outcome.author_id, outcome.expires_at, True)
    return None


# --------------------------------------------------------------------------- Beam: apply


def _transient_errors() -> tuple[type[BaseException], ...]:
    import redis
    from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable

    return (redis.ConnectionError, redis.TimeoutError, OperationTimedOut, ReadTimeout,
            WriteTimeout, Unavailable, NoHostAvailable)


def retrying(call: Callable[[], object], what: str, attempts: int, backoff_s: float,
             on_retry: Callable[[], None]):
    """``call()``, re-run on a transient store error up to ``attempts`` times in all
    with exponential backoff (only for idempotent work); the last error is raised."""
    transient = _transient_errors()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except transient as exc:
            if attempt == attempts:
                raise
            on_retry()
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning("stories: transient store error in %s (attempt %d/%d), retrying in "
                        "%.1fs: %s", what, attempt, attempts, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


class _Counters:
    """Beam counters of one namespace, created on first use."""

    def __init__(self, namespace: str):
        self._namespace = namespace
        self._made: dict[str, object] = {}

    def inc(self, name: str, n: int = 1) -> None:
        counter = self._made.get(name)
        if counter is None:
            counter = self._made[name] = Metrics.counter(self._namespace, name)
        counter.inc(n)


class _ApplyStoryEventsFn(beam.DoFn):
    """Buffers a bundle's story events and applies them (``StoryWriter``) before it ends.

    Emits one ``StoryOutcome`` per event, at the event's timestamp, once its
    writes are done. Events of other types are counted and dropped here (the
    pipeline reads only ``story-events``).
    """

    def __init__(self, stores: StoryStoreConfig, max_batch: int = 500, attempts: int = 4,
                 backoff_s: float = 0.5):
        self._config = stores
        self._max_batch = max_batch
        self._attempts = attempts
        self._backoff_s = backoff_s

    def setup(self):
        self._writer = self._config.open()
        self._counters = _Counters(NAMESPACE)

    def start_bundle(self):
        self._buffer: list[tuple[StoryEvent, object, object]] = []

    def process(self, event, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        if not isinstance(event, StoryEvent):
            self._counters.inc("events_not_story")
            return
        self._buffer.append((event, timestamp, window))
        if len(self._buffer) >= self._max_batch:
            yield from self._apply_buffer()

    def finish_bundle(self):
        yield from self._apply_buffer()

    def teardown(self):
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.close()

    def _apply_buffer(self):
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        events = [e for e, _, _ in batch]
        outcomes = retrying(lambda: self._writer.apply(events), "apply", self._attempts,
                            self._backoff_s, lambda: self._counters.inc("batch_retries"))
        self._counters.inc("batches")
        for outcome, (_, timestamp, window) in zip(outcomes, batch):
            self._counters.inc(f"events_{outcome.action}")
            yield WindowedValue(outcome, timestamp, [window])


# --------------------------------------------------------------------------- Beam: expiry


class _SweepExpiryIndexFn(beam.DoFn):
    """On start (one Impulse element): a re-arm command for every story in the
    durable expiry index (``CassandraStoryStore.sweep``)."""

    def __init__(self, stores: StoryStoreConfig):
        self._config = stores

    def process(self, _):
        writer = self._config.open()
        try:
            indexed = writer.cassandra.sweep(_now_ms())
        finally:
            writer.close()
        Metrics.counter(NAMESPACE, "rearmed").inc(len(indexed))
        log.info("stories: re-arming %d timers from the expiry index", len(indexed))
        for s in indexed:
            yield ExpiryCommand(s.story_id, s.author_id, s.expires_at, False)


def _timestamp(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


class _ExpiryTimerFn(beam.DoFn):
    """Keyed by a shard of story_id: one event-time timer per story, tagged
    ``story:author:expires_at`` (``timer_tag``) and set at ``expires_at``; when it
    fires the story is removed (``StoryWriter.expire``) and a ``StoryExpired``
    emitted. A cancel (delete) clears the story's timer. No state: the tag
    carries what the firing needs, and setting the same tag again (a
    redelivered publish, the start-up sweep) just replaces the timer.

    An arm that reaches the key after its cancel (the shuffle keeps no order;
    a redelivered publish is refused by the store, so in practice only the
    start-up sweep racing a delete) sets the timer again; when it fires, the
    store's tombstone says the story was deleted and nothing is emitted
    (``expired_after_delete``).
    """

    EXPIRY = userstate.TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, stores: StoryStoreConfig, attempts: int = 4, backoff_s: float = 0.5):
        self._config = stores
        self._attempts = attempts
        self._backoff_s = backoff_s

    def setup(self):
        self._writer = self._config.open()
        self._counters = _Counters(NAMESPACE)
        self._delay = Metrics.distribution(NAMESPACE, "expiry_delay_ms")

    def teardown(self):
        writer = getattr(self, "_writer", None)
        if writer is not None:
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
        expired = retrying(lambda: self._writer.expire(story_id, author_id, expires_at),
                           "expire", self._attempts, self._backoff_s,
                           lambda: self._counters.inc("expire_retries"))
        if expired is None:
            self._counters.inc("expired_after_delete")
            return
        self._counters.inc("stories_expired")
        self._delay.update(expired.removed_at - expired.expires_at)
        yield expired


class StoryResults(NamedTuple):
    """The outputs of ``MaterializeStories``."""

    outcomes: beam.PCollection
    expired: beam.PCollection


class MaterializeStories(beam.PTransform):
    """Apply story events to the stores and expire stories with event-time timers.

    Args:
      stores: where Redis and Cassandra are, with the ``StoryPolicy``
        (``StoryStoreConfig``; its ``open()`` returns a ``StoryWriter``).
      max_batch: events applied at once within a bundle.
      sweep: re-arm timers from the durable expiry index when the job starts
        (see the module doc); off only in tests that want no start-up state.
      expiry_shards: keys the per-story timers are spread over.

    Takes a ``PCollection`` of ``StoryEvent`` (in the global window, as the
    Kafka source emits them). Returns ``StoryResults``: ``outcomes``, one
    ``StoryOutcome`` per event once its writes are done (keep this step fused
    with the read: no GroupByKey before it), and ``expired``, one
    ``StoryExpired`` per story the expiry timer removed, timestamped at its
    ``expires_at``.
    """

    def __init__(self, stores: StoryStoreConfig, max_batch: int = 500, sweep: bool = True,
                 expiry_shards: int = 64):
        super().__init__()
        if expiry_shards < 1:
            raise ValueError("expiry_shards must be >= 1")
        self._stores = stores
        self._max_batch = max_batch
        self._sweep = sweep
        self._shards = expiry_shards

    def expand(self, events):
        outcomes = (events
                    | "ApplyToStores" >> beam.ParDo(
                        _ApplyStoryEventsFn(self._stores, self._max_batch))
                    .with_output_types(StoryOutcome))
        commands = (outcomes
                    | "TimerCommands" >> beam.FlatMap(_timer_commands)
                    .with_output_types(ExpiryCommand))
        if self._sweep:
            rearm = (events.pipeline
                     | "StartSweep" >> beam.Impulse()
                     | "SweepExpiryIndex" >> beam.ParDo(_SweepExpiryIndexFn(self._stores))
                     .with_output_types(ExpiryCommand))
            commands = (commands, rearm) | "WithRearms" >> beam.Flatten()
        shards = self._shards
        expired = (commands
                   | "KeyByShard" >> beam.Map(lambda c: (timer_shard(c.story_id, shards), c))
                   .with_output_types(tuple[int, ExpiryCommand])
                   | "ExpireAtWatermark" >> beam.ParDo(_ExpiryTimerFn(self._stores))
                   .with_output_types(StoryExpired))
        return StoryResults(outcomes, expired)


def _timer_commands(outcome: StoryOutcome) -> list[ExpiryCommand]:
    cmd = expiry_command(outcome)
    return [] if cmd is None else [cmd]


def expired_message(topic: str, expired: StoryExpired) -> KafkaMessage:
    """The ``--expired_topic`` record of an expiry: JSON, keyed by author like story-events."""
    value = json.dumps(dataclasses.asdict(expired), separators=(",", ":")).encode()
    return KafkaMessage(topic, str(expired.author_id).encode(), value,
                        timestamp_ms=expired.removed_at)


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
        opts.stores(), opts.stories_max_batch, sweep=not opts.no_sweep,
        expiry_shards=opts.expiry_shards)
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


def main(argv=None) -> int:
    """``python -m pipelines.stories``: log at INFO, run until the job ends or is cancelled."""
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    run(sys.argv[1:] if argv is None else argv)
    return 0
