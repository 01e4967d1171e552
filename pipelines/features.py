"""The features pipeline: engagement features for ranking, written to Redis (online),
Cassandra (durable), the Parquet log (offline) and each author's top-followers ranking.

    python -m pipelines.features --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--slide_s 300 --allowed_lateness_s 3600 ...]

Reads ``engagement-events`` and ``post-events`` and computes the features of
``schemas.features`` (``AggregateEngagementFeatures``); ``--sinks`` picks where
they go, ``--replay_ranges`` makes it a bounded re-run. Design (state layout,
windows, lateness, dedup, delivery, restarts): ``docs/pipelines/features.md``.
"""
from __future__ import annotations

import struct
import sys
import time
from typing import List, NamedTuple, Tuple

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import PCollection, TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from domain.features import (
    POST_CREATED,
    TO_AUTHOR_STAGE,
    TO_VIEWER_STAGE,
    AuthorStage,
    FeatureParams,
    FirstStage,
    Item,
    PostState,
    Shard,
    ViewerStage,
    ViewerState,
    WindowState,
    engagement_item,
    event_of,
    first_stage_key,
    parse_weights,
    post_item,
    shard_of,
)
from pipelines.common import Counters, Ranges, ReplayOptions, StoreOptions, module_main
from pipelines.features_sinks import (
    DEFAULT_SINK_BATCH,
    NAMESPACE,
    FeatureSinkConfig,
    UpdateTopFollowers,
    WriteDurableFeatures,
    WriteFeatureLog,
    WriteOnlineFeatures,
)
from pipelines.io.deadletter import WriteDeadLetters
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.source import ReadEvents, producer_config_of
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import EngagementEvent, PostEvent, PostEventKind
from schemas.features import DAY_MS, FeatureTTLs, FeatureValue
from schemas.records import DeadLetter
from stores.config import StoreConfig

if __name__ == "__main__":
    # Before anything is defined here: the job runs the imported module, and options
    # classes defined a second time (in this __main__ copy) would clash.
    sys.exit(module_main("pipelines.features"))

DEFAULT_GROUP = "feedbeam-features"
STEP = "features"
TOO_LATE = "too_late"
SINKS = ("redis", "cassandra", "log", "top_followers")
DEFAULT_SHARDS = 16
#: A bounded re-run's timer granularity: no shard fires before its input is read.
BOUNDED_TIMER_GRANULARITY_MS = 100 * 365 * DAY_MS


# --------------------------------------------------------------------------- coders


class ItemCoder(coders.Coder):
    """Eight signed 64-bit ints: an ``Item`` in 64 bytes, no pickling."""

    _S = struct.Struct(">8q")

    def encode(self, item: Item) -> bytes:
        return self._S.pack(*item)

    def decode(self, data: bytes) -> Item:
        return Item._make(self._S.unpack(data))

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return Item


class FeatureValueCoder(coders.Coder):
    """``FeatureValue`` as ``type|id|name`` text plus value, valid_at and version."""

    _S = struct.Struct(">dqqH")

    def encode(self, v: FeatureValue) -> bytes:
        text = f"{v.entity_type}|{v.entity_id}|{v.name}".encode()
        return self._S.pack(v.value, v.valid_at_ms, v.version, len(text)) + text

    def decode(self, data: bytes) -> FeatureValue:
        value, valid_at, version, n = self._S.unpack_from(data)
        entity_type, entity_id, name = data[self._S.size:self._S.size + n].decode().split("|")
        return FeatureValue(entity_type, entity_id, name, value, valid_at, version)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return FeatureValue


beam.coders.registry.register_coder(Item, ItemCoder)
beam.coders.registry.register_coder(FeatureValue, FeatureValueCoder)


# --------------------------------------------------------------------------- options


class FeaturesOptions(PipelineOptions):
    """The features pipeline's own flags (Kafka: ``KafkaReadOptions``; stores:
    ``StoreOptions``; ``--replay_ranges``: ``ReplayOptions``)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        d = FeatureParams()
        t = FeatureTTLs()
        parser.add_argument("--slide_s", type=float, default=d.slide_ms / 1000,
                            help="slide of the 1 h and 24 h post windows (divides 1 h); also how "
                                 "often a changed affinity is emitted")
        parser.add_argument("--author_slide_s", type=float, default=d.author_slide_ms / 1000,
                            help="slide of the 7-day author windows (divides 7 days)")
        parser.add_argument("--allowed_lateness_s", type=float,
                            default=d.allowed_lateness_ms / 1000,
                            help="events up to this far behind the watermark still count; "
                                 "later ones go to the DLQ as too_late")
        parser.add_argument("--dedup_horizon_s", type=float, default=d.dedup_horizon_ms / 1000,
                            help="how long (event time past the watermark) an event_id is "
                                 "remembered; keep it >= the allowed lateness")
        parser.add_argument("--half_life_days", type=float, default=d.half_life_ms / DAY_MS,
                            help="half-life of the affinity decay")
        parser.add_argument("--affinity_weights", default="",
                            help="weights per kind, e.g. like=1,comment=2,share=3,save=2,"
                                 "view=0.5,profile_view=1 (views scale with dwell up to "
                                 "--dwell_ref_ms)")
        parser.add_argument("--dwell_ref_ms", type=int, default=d.dwell_ref_ms,
                            help="dwell at which a view has its full weight")
        parser.add_argument("--post_ttl_h", type=float, default=t.post_ms / 3_600_000,
                            help="online TTL of post features")
        parser.add_argument("--author_ttl_h", type=float, default=t.author_ms / 3_600_000,
                            help="online TTL of author features")
        parser.add_argument("--affinity_ttl_days", type=float, default=t.viewer_author_ms / DAY_MS,
                            help="online TTL of affinities, and how long the pipeline keeps a "
                                 "pair without events")
        parser.add_argument("--sinks", default=",".join(SINKS),
                            help=f"where features go, comma-separated subset of {SINKS}")
        parser.add_argument("--feature_log_dir", default="out/feature_log",
                            help="root of the Parquet feature log (sink 'log')")
        parser.add_argument("--log_shards", type=int, default=4,
                            help="Parquet files per hour of valid_at per flush")
        parser.add_argument("--log_flush_s", type=float, default=60.0,
                            help="processing time between feature log flushes")
        parser.add_argument("--top_followers_keep", type=int, default=10_000,
                            help="followers kept per author in the top_followers ranking")
        parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS,
                            help="keys per aggregation stage: entities are grouped into this "
                                 "many shards, each one keyed state and one timer (more "
                                 "shards: more parallelism, more per-key overhead)")
        parser.add_argument("--sink_batch", type=int, default=DEFAULT_SINK_BATCH,
                            help="values buffered per sink before a write within a bundle")

    def params(self) -> FeatureParams:
        ttls = self.ttls()
        return FeatureParams(
            slide_ms=int(self.slide_s * 1000), author_slide_ms=int(self.author_slide_s * 1000),
            allowed_lateness_ms=int(self.allowed_lateness_s * 1000),
            dedup_horizon_ms=int(self.dedup_horizon_s * 1000),
            half_life_ms=int(self.half_life_days * DAY_MS), affinity_ttl_ms=ttls.viewer_author_ms,
            weights=parse_weights(self.affinity_weights), dwell_ref_ms=self.dwell_ref_ms)

    def ttls(self) -> FeatureTTLs:
        affinity_ms = int(self.affinity_ttl_days * DAY_MS)
        return FeatureTTLs(post_ms=int(self.post_ttl_h * 3_600_000),
                           author_ms=int(self.author_ttl_h * 3_600_000),
                           viewer_author_ms=affinity_ms, viewer_media_ms=affinity_ms)

    def sink_config(self, stores: StoreConfig) -> FeatureSinkConfig:
        return FeatureSinkConfig(stores, ttls=self.ttls(),
                                 half_life_ms=int(self.half_life_days * DAY_MS),
                                 top_followers_keep=self.top_followers_keep)

    def sink_names(self) -> tuple[str, ...]:
        names = tuple(s.strip() for s in self.sinks.split(",") if s.strip())
        unknown = sorted(set(names) - set(SINKS))
        if unknown:
            raise ValueError(f"--sinks: unknown sinks {unknown}; choose from {SINKS}")
        return names


# --------------------------------------------------------------------------- stages


_DEAD_LETTERS = "dead_letters"
_TO_AUTHOR_TAG = "author"
_TO_VIEWER_TAG = "viewer"


class _ToItemsFn(beam.DoFn):
    """Events -> ``(shard, (post key, (event_id, Item, post bytes)))``; post bytes are the
    re-encoded post event (empty for engagements), kept for a dead letter."""

    def __init__(self, topic_prefix: str, shards: int):
        self._topic_prefix = topic_prefix
        self._shards = shards

    def setup(self):
        from schemas.codec import WireCodec

        self._codec = WireCodec()
        self._ignored = Metrics.counter(NAMESPACE, "events_ignored")

    def process(self, event):
        if type(event) is EngagementEvent:
            item = engagement_item(event)
            key = first_stage_key(item)
            yield shard_of(key, self._shards), (key, (event.event_id, item, b""))
        elif type(event) is PostEvent and event.kind is PostEventKind.CREATED:
            raw = self._codec.encode(event, self._topic_prefix + PostEvent.TOPIC)
            yield (shard_of(event.post_id, self._shards),
                   (event.post_id, (event.event_id, post_item(event), raw)))
        else:
            self._ignored.inc()  # post deletions and other topics do not change features


class _GroupPerBundle(beam.DoFn):
    """``(shard, value)`` -> ``(shard, [values])``, one per shard per bundle, in arrival
    order: the next stage then reads and writes a shard's state once per bundle.
    Emitted in ``finish_bundle`` with the group's earliest timestamp (the bundle's
    elements hold the watermark until then)."""

    def start_bundle(self):
        self._groups: dict = {}

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        key, value = element
        group = self._groups.get(key)
        if group is None:
            self._groups[key] = [timestamp, window, [value]]
        else:
            group[2].append(value)
            if timestamp < group[0]:
                group[0] = timestamp

    def finish_bundle(self):
        groups, self._groups = self._groups, {}
        for key, (timestamp, window, values) in groups.items():
            yield WindowedValue((key, values), timestamp, [window])


class _ShardedStageFn(beam.DoFn):
    """One keyed stage, keyed by shard: a ``Shard`` of entity states in keyed state and
    one event-time timer per shard, at the earliest time any of its entities needs.

    Subclasses build the stage logic in ``setup()`` (``self._stage`` with
    ``new_state``, ``fire``, ``next_timer`` and ``empty``) and say how one
    ``(entity key, value)`` applies.
    """

    STATE = ReadModifyWriteStateSpec("shard", coders.PickleCoder())
    TIMER = TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, params: FeatureParams, timer_granularity_ms: int):
        self._params = params
        self._granularity = timer_granularity_ms

    def start_bundle(self):
        self._not_yet_valid = Metrics.counter(NAMESPACE, "values_not_yet_valid")

    def _apply(self, state, key, value):
        """Apply one element to its entity's ``state``; yields outputs."""
        raise NotImplementedError

    def process(self, element, state=beam.DoFn.StateParam(STATE),
                timer=beam.DoFn.TimerParam(TIMER)):
        _, values = element
        shard = state.read() or Shard()
        stage = self._stage
        touched = set()
        for key, value in values:
            s = shard.entities.get(key)
            if s is None:
                s = shard.entities[key] = stage.new_state()
            yield from self._apply(s, key, value)
            touched.add(key)
        for key in touched:
            self._reschedule(shard, key)
        self._arm(shard, timer)
        state.write(shard)

    @on_timer(TIMER)
    def on_tick(self, fired=beam.DoFn.TimestampParam, state=beam.DoFn.StateParam(STATE),
                timer=beam.DoFn.TimerParam(TIMER)):
        shard = state.read()
        if shard is None:
            return
        shard.timer_at = None
        at = fired.micros // 1000
        now_ms = time.time() * 1000
        while shard.agenda:
            # Earliest first, including times scheduled by the entities fired here.
            when = min(shard.agenda)
            if when > at:
                break
            for key in shard.due(when):
                for value in self._stage.fire(shard.entities[key], key, when):
                    # A bounded run ends with the watermark at infinity and drains
                    # every window; values valid after the wall clock are not facts
                    # yet (the live job will compute them from more events).
                    if value.valid_at_ms <= now_ms:
                        yield value
                    else:
                        self._not_yet_valid.inc()
                self._reschedule(shard, key)
        if not shard.entities:
            state.clear()
            return
        self._arm(shard, timer)
        state.write(shard)

    def _reschedule(self, shard: Shard, key) -> None:
        s = shard.entities[key]
        if self._stage.empty(s):
            del shard.entities[key]
            shard.schedule(key, None)
        else:
            shard.schedule(key, self._stage.next_timer(s))

    def _arm(self, shard: Shard, timer) -> None:
        """Keep the shard's one timer at its earliest agenda time, rounded up to the timer
        granularity (set only when it moves); a firing handles every time up to its own."""
        wanted = shard.next_time()
        if wanted is not None:
            wanted = -(-wanted // self._granularity) * self._granularity
        if wanted is not None and wanted != shard.timer_at:
            timer.set(Timestamp(micros=wanted * 1000))
            shard.timer_at = wanted


class _FirstStageFn(_ShardedStageFn):
    """Dedup, lateness, unlike pairing and post windows (``FirstStage``), per post."""

    def __init__(self, params: FeatureParams, timer_granularity_ms: int, topic_prefix: str,
                 shards: int):
        super().__init__(params, timer_granularity_ms)
        self._topic_prefix = topic_prefix
        self._shards = shards

    def setup(self):
        from schemas.codec import WireCodec

        self._stage = FirstStage(self._params)
        self._codec = WireCodec()
        self._counters = Counters(NAMESPACE)

    def _apply(self, s: PostState, key, value):
        event_id, item, raw = value
        outcome = self._stage.apply(s, event_id, item)
        self._counters.inc(f"events_{outcome.status}")
        if outcome.unmatched_unlike:
            self._counters.inc("unlikes_unmatched")
        if outcome.status == TOO_LATE:
            yield TaggedOutput(_DEAD_LETTERS, self._dead_letter(event_id, item, raw, s))
            return
        yield from outcome.features
        shards = self._shards
        for fwd in outcome.forward:
            if fwd.kind in TO_AUTHOR_STAGE:
                yield TaggedOutput(_TO_AUTHOR_TAG, (shard_of(fwd.author, shards),
                                                    (fwd.author, fwd)))
            if fwd.kind in TO_VIEWER_STAGE:
                yield TaggedOutput(_TO_VIEWER_TAG, (shard_of(fwd.viewer, shards),
                                                    (fwd.viewer, fwd)))

    def _dead_letter(self, event_id: str, item: Item, raw: bytes, s: PostState) -> DeadLetter:
        if item.kind == POST_CREATED:
            topic, key = self._topic_prefix + PostEvent.TOPIC, str(item.author).encode()
        else:
            event = event_of(event_id, item)
            topic, key = self._topic_prefix + EngagementEvent.TOPIC, event.key
            raw = self._codec.encode(event, topic)
        error = (f"event time {item.t} is more than {self._params.allowed_lateness_ms} ms behind "
                 f"the watermark {self._stage.watermark(s)}; value re-encoded with WireCodec, "
                 f"source partition and offset unknown")
        return DeadLetter(topic=topic, partition=-1, offset=-1, key=key, value=raw,
                          timestamp_ms=item.t, step=STEP, reason=TOO_LATE, error=error,
                          failed_at_ms=int(time.time() * 1000))


class _AuthorStageFn(_ShardedStageFn):
    """7-day author windows (``AuthorStage``), per author."""

    def setup(self):
        self._stage = AuthorStage(self._params)

    def _apply(self, s: WindowState, author, item):
        return self._stage.apply(s, author, item)


class _ViewerStageFn(_ShardedStageFn):
    """Decayed affinities (``ViewerStage``), per viewer."""

    def setup(self):
        self._stage = ViewerStage(self._params)

    def _apply(self, s: ViewerState, viewer, item):
        self._stage.apply(s, item)
        return ()


class FeatureOutputs(NamedTuple):
    """The outputs of ``AggregateEngagementFeatures``."""

    features: PCollection  # PCollection[FeatureValue]
    dead_letters: PCollection  # PCollection[DeadLetter] (too-late events)


class AggregateEngagementFeatures(beam.PTransform):
    """Engagement and post events -> feature values (``docs/pipelines/features.md``).

    Args:
      params: windows, lateness, dedup horizon, decay and weights (``FeatureParams``).
      topic_prefix: prefix of the topic names, for the dead letters' topics.
      shards: keys per stage (``--shards``).
      timer_granularity_ms: how far apart a shard's timers are (default the slide: values
        appear as soon as the watermark passes their window end). Every change point is
        still computed at its own time, in order; a coarser granularity only fires a
        shard's timer less often (each firing costs a runner round trip). A bounded
        re-run passes ``BOUNDED_TIMER_GRANULARITY_MS`` (a century): its shards fire
        once, when the input is read, and work through all their windows then.

    Takes a ``PCollection`` of ``EngagementEvent`` and ``PostEvent`` (others are
    counted and ignored). Returns ``FeatureOutputs``: every emitted
    ``FeatureValue`` (post, author, viewer_author, viewer_media), and a
    ``DeadLetter`` per too-late event.
    """

    def __init__(self, params: FeatureParams | None = None, topic_prefix: str = "",
                 shards: int = DEFAULT_SHARDS, timer_granularity_ms: int | None = None):
        super().__init__()
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self._params = params or FeatureParams()
        self._prefix = topic_prefix
        self._shards = shards
        self._granularity = timer_granularity_ms or self._params.slide_ms
        if self._granularity < 1:
            raise ValueError("timer_granularity_ms must be at least 1")

    def expand(self, events) -> FeatureOutputs:
        p, g = self._params, self._granularity
        keyed = Tuple[int, Tuple[int, Item]]
        grouped = Tuple[int, List[Tuple[int, Item]]]
        first = (events
                 | "ToItems" >> beam.ParDo(_ToItemsFn(self._prefix, self._shards))
                 .with_output_types(Tuple[int, Tuple[int, Tuple[str, Item, bytes]]])
                 | "GroupByPostShard" >> beam.ParDo(_GroupPerBundle())
                 .with_output_types(Tuple[int, List[Tuple[int, Tuple[str, Item, bytes]]]])
                 | "DedupLatenessPostWindows" >> beam.ParDo(
                     _FirstStageFn(p, g, self._prefix, self._shards))
                 .with_output_types(FeatureValue, **{_TO_AUTHOR_TAG: keyed,
                                                     _TO_VIEWER_TAG: keyed,
                                                     _DEAD_LETTERS: DeadLetter})
                 .with_outputs(_TO_AUTHOR_TAG, _TO_VIEWER_TAG, _DEAD_LETTERS, main="posts"))
        authors = (first[_TO_AUTHOR_TAG]
                   | "GroupByAuthorShard" >> beam.ParDo(_GroupPerBundle())
                   .with_output_types(grouped)
                   | "AuthorWindows" >> beam.ParDo(_AuthorStageFn(p, g))
                   .with_output_types(FeatureValue))
        viewers = (first[_TO_VIEWER_TAG]
                   | "GroupByViewerShard" >> beam.ParDo(_GroupPerBundle())
                   .with_output_types(grouped)
                   | "ViewerAffinity" >> beam.ParDo(_ViewerStageFn(p, g))
                   .with_output_types(FeatureValue))
        features = ((first.posts, authors, viewers)
                    | "AllFeatures" >> beam.Flatten().with_output_types(FeatureValue))
        dead = first[_DEAD_LETTERS]
        return FeatureOutputs(features, dead)


# --------------------------------------------------------------------------- wiring


def build(pipeline: beam.Pipeline, options: PipelineOptions,
          ranges: Ranges | None = None) -> FeatureOutputs:
    """Wire the features job into ``pipeline``: read, aggregate, write to ``--sinks``.

    Without ``ranges`` (nor ``--replay_ranges``) it follows ``engagement-events``
    and ``post-events`` from the consumer group's offsets, rewinding on start
    by the state horizon (``--rewind_s``, default the affinity TTL). With
    ranges it reads exactly those offsets once (a bounded re-run).
    """
    kafka = options.view_as(KafkaReadOptions)
    opts = options.view_as(FeaturesOptions)
    params = opts.params()
    sinks = opts.sink_names()
    config = kafka.source_config(default_group=DEFAULT_GROUP,
                                 default_rewind_s=params.affinity_ttl_ms / 1000)
    prefix = kafka.topic_prefix
    if ranges is None:
        ranges = options.view_as(ReplayOptions).ranges()
    read = ReadEvents(config, [prefix + EngagementEvent.TOPIC, prefix + PostEvent.TOPIC],
                      ranges=ranges, topic_prefix=prefix)
    events = pipeline | "ReadEngagementAndPostEvents" >> read
    out = events | "AggregateEngagementFeatures" >> AggregateEngagementFeatures(
        params, prefix, opts.shards,
        timer_granularity_ms=BOUNDED_TIMER_GRANULARITY_MS if ranges else None)
    _ = out.dead_letters | "WriteTooLate" >> WriteDeadLetters(producer_config_of(config))
    store = opts.sink_config(options.view_as(StoreOptions).config())
    if "redis" in sinks:
        _ = out.features | "WriteOnlineFeatures" >> WriteOnlineFeatures(store, opts.sink_batch)
    if "cassandra" in sinks:
        _ = out.features | "WriteDurableFeatures" >> WriteDurableFeatures(store, opts.sink_batch)
    if "top_followers" in sinks:
        _ = out.features | "UpdateTopFollowers" >> UpdateTopFollowers(store, opts.sink_batch)
    if "log" in sinks:
        _ = out.features | "WriteFeatureLog" >> WriteFeatureLog(
            opts.feature_log_dir, opts.log_shards, opts.log_flush_s, bounded=ranges is not None)
    return out


def run(argv=None):
    """Parse options, build the pipeline and run it until it ends or is cancelled.

    Streaming unless ``--replay_ranges`` is given (then a batch job over them).
    """
    options = pipeline_options(argv)
    bounded = options.view_as(ReplayOptions).ranges() is not None
    options.view_as(StandardOptions).streaming = not bounded
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)

