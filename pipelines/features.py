"""features: engagement features for ranking, online (Redis), durable (Cassandra), offline (Parquet).

    python -m pipelines.features --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--slide_s 300 --allowed_lateness_s 3600 ...]

reads ``engagement-events`` and ``post-events`` (``ReadEvents``; consumer group
``feedbeam-features``) and computes, per ``schemas.features``:

* per post: like/comment/share/save/view counts over 1 h and 24 h windows
  sliding every ``--slide_s`` (an UNLIKE cancels the like it undoes), and the
  engagement rate (likes + comments + shares + saves over views) of each;
* per author: engagement rate and number of posts created over 7 days,
  sliding every ``--author_slide_s`` (post frequency needs ``post-events``);
* per viewer-author pair and per viewer-media type: time-decayed affinity
  (weights per kind ``--affinity_weights``, views scaled by dwell, half-life
  ``--half_life_days``);

and writes every value to Redis (``WriteOnlineFeatures``, TTL per entity
type, newer-wins), Cassandra (``WriteDurableFeatures``), the Parquet log
(``WriteFeatureLog`` under ``--feature_log_dir``) and keeps each author's
``top_followers`` ranking (``UpdateTopFollowers``) for the fan-out's celebrity
push. ``--sinks`` picks a subset. Bounded re-runs: ``--replay_ranges`` as in
``pipelines.fanout``.

Design
------
Three keyed stateful stages (``AggregateEngagementFeatures``); plain logic in
``domain.features``, one state object per entity:

1. **First stage, per post** (profile views per author, post events per
   post): drops repeated ``event_id``s, decides lateness, pairs unlikes with
   likes, and keeps the post's windows. Accepted events go on to stages 2
   and 3 as compact ``Item`` tuples (an unlike as a ``CANCEL`` carrying its
   like's time); too-late ones go to the dead-letter topic.
2. **Author stage, per author**: 7-day windows of engagements, views and
   created posts.
3. **Viewer stage, per viewer**: decayed sums per author and media type,
   emitted once per slide per changed pair.

Each stage is keyed by *shard* (``--shards``, an entity hash), not by entity:
a shard's keyed state holds its entities' states and an agenda of when each
needs the watermark, and one event-time timer per shard (at the earliest
agenda time) serves them all. A runner pays per key and bundle (on Prism a
bundle and state round trip per key: milliseconds, against microseconds of
Python per event), so per-entity keys made the runner the bottleneck. Before
each stage a bundle's elements are grouped per shard, so a shard's state is
read and written once per bundle. A bounded re-run (``--replay_ranges``)
arms timers a century apart: each shard fires once its input is read and
works through every change point in order then.

Why not Beam's ``SlidingWindows`` + ``CombinePerKey``: a 24 h window sliding
by 5 min puts every event in 288 windows (7 days by 1 h: 168), and Beam drops
data past the allowed lateness inside the runner, where no dead-letter output
can see it. Here windows are buckets of ``slide`` in keyed state; a value
is computed only at the window ends where it can change (a bucket entering or
leaving a window) and emitted only if it changed, so a post whose engagement
stops gets a last emission of zeros.

* **Lateness.** Beam gives a DoFn no watermark, but a fired event-time timer
  proves the stage's input watermark passed its time: the first stage judges
  an event against the latest timer fired for its entity or, if later, for
  any entity of the same DoFn instance (every entity with an event needs a
  timer at the end of the event's slide, so this trails the watermark by
  about a slide). An
  event more than ``--allowed_lateness_s`` behind that is *too late*: counted
  (``events_too_late``) and dead-lettered with reason ``too_late``. The
  decoded event has no bytes any more: the dead letter holds the event
  re-encoded with ``WireCodec`` (the same bytes as the original when it was
  written with the current schema), its key, ``partition``/``offset`` -1, and
  the times in the error text. An accepted late event updates its buckets and
  re-emits the change points it affects with the same ``valid_at`` and a
  higher ``version``, which the stores and the log prefer. A worker that just
  (re)started has seen no timer yet and accepts everything until one fires.
  Caveat (Prism): a Kafka partition whose read has not started holds no
  watermark, so while a backlog is read one topic can run ahead of the other.
* **Dedup.** The first stage remembers the ids of its key's events for
  ``--dedup_horizon_s`` of event time past the key's watermark (keyed state,
  forgotten by the key's timer); all duplicates of an event share its post, so
  they meet at one key. With the horizon at least the allowed lateness
  (default 2 h vs 1 h), every duplicate of a counted event is either caught
  or too late.
* **Unlikes** cancel the viewer's latest earlier like of the post, in either
  arrival order, for windows ending after the unlike, the author's
  engagement and the affinities. An unlike with no like within the post
  state's horizon (24 h + slide) changes nothing (``unlikes_unmatched``).
* **Per-element work** is small: a decode to an 8-int tuple with a struct
  coder (``ItemCoder``), dict updates in the shard's state, and at most one
  timer set per shard per bundle; values are computed per entity per change
  point.
* **Writes** are newer-wins by ``valid_at_ms * 1000 + version`` in Redis (Lua)
  and Cassandra (``USING TIMESTAMP``), so replays never roll a value back.
  Versions count the events behind a value (``features_logic``), so the same
  events give the same stamp and a replay rewrites nothing. A bounded run
  drains every window at its end; values valid after the wall clock are not
  emitted (``values_not_yet_valid``).
  The Parquet log is idempotent by content-addressed file names and dedup at
  read (``stores.files.feature_log``).
* **Restarts.** The aggregation state is Beam state: Flink with checkpoints
  restores it; Prism has no durable state, so the job rewinds its source by
  the state horizon (``--rewind_s``, default the affinity TTL: 30 days, or the
  whole topic) and recomputes; the re-emitted values are the same and the
  writes idempotent. A shorter rewind restarts affinities and windows from
  what it re-reads.
"""
from __future__ import annotations

import logging
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

from pipelines.fanout import parse_replay_ranges
from domain.features import (
    CANCEL,
    COMMENT,
    LIKE,
    POST_CREATED,
    PROFILE_VIEW,
    SAVE,
    SHARE,
    VIEW,
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
from pipelines.io.feature_sinks import (
    FeatureSinkConfig,
    UpdateTopFollowers,
    WriteDurableFeatures,
    WriteFeatureLog,
    WriteOnlineFeatures,
)
from pipelines.io.kafka import KafkaReadOptions
from schemas.records import DeadLetter
from pipelines.io.deadletter import WriteDeadLetters
from pipelines.io.source import ReadEvents, producer_config_of
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import EngagementEvent, PostEvent, PostEventKind
from schemas.features import DAY_MS, FeatureTTLs, FeatureValue


if __name__ == "__main__":
    # `python -m pipelines.features`: run the importable module, not this __main__
    # copy: Beam pickles transforms and coders by reference to their module, and
    # options classes defined a second time would clash.
    from pipelines.features import main

    sys.exit(main())

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.features"
DEFAULT_GROUP = "feedbeam-features"
STEP = "features"
TOO_LATE = "too_late"
SINKS = ("redis", "cassandra", "log", "top_followers")
DEFAULT_SHARDS = 16
#: A bounded re-run's timer granularity: no shard fires before its input is read.
BOUNDED_TIMER_GRANULARITY_MS = 100 * 365 * DAY_MS

_TO_AUTHOR = frozenset({LIKE, COMMENT, SHARE, SAVE, VIEW, CANCEL, POST_CREATED})
_TO_VIEWER = frozenset({LIKE, COMMENT, SHARE, SAVE, VIEW, PROFILE_VIEW, CANCEL})


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


def _add_shared(parser, flag: str, **kwargs) -> None:
    """``parser.add_argument(flag, ...)`` unless another options class already added it."""
    if flag not in parser._option_string_actions:  # argparse has no public "has option"
        parser.add_argument(flag, **kwargs)


class FeaturesOptions(PipelineOptions):
    """Options of the features pipeline (Kafka settings are ``KafkaReadOptions``)."""

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
        parser.add_argument("--sink_batch", type=int, default=2000,
                            help="values buffered per sink before a write within a bundle")
        # Flags every store-writing pipeline has: Beam parses the options of all
        # imported pipelines with one parser, so whichever class comes first
        # defines them (same names, same defaults, same meaning).
        _add_shared(parser, "--redis_url", default="redis://127.0.0.1:6379/0")
        _add_shared(parser, "--redis_key_prefix", default="fb")
        _add_shared(parser, "--cassandra_host", default="127.0.0.1")
        _add_shared(parser, "--cassandra_port", type=int, default=9042)
        _add_shared(parser, "--cassandra_keyspace", default="feedbeam")
        _add_shared(parser, "--replay_ranges", default=None, metavar="JSON",
                    help="re-run over bounded offset ranges: {\"<topic>\": {\"<partition>\": "
                         "[start, stop]}} (stop exclusive, prefixed topic names); batch mode, "
                         "no offsets committed")

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

    def sink_config(self) -> FeatureSinkConfig:
        return FeatureSinkConfig(
            redis_url=self.redis_url, redis_key_prefix=self.redis_key_prefix,
            cassandra_host=self.cassandra_host, cassandra_port=self.cassandra_port,
            cassandra_keyspace=self.cassandra_keyspace, ttls=self.ttls(),
            half_life_ms=int(self.half_life_days * DAY_MS),
            top_followers_keep=self.top_followers_keep)

    def sink_names(self) -> tuple[str, ...]:
        names = tuple(s.strip() for s in self.sinks.split(",") if s.strip())
        unknown = sorted(set(names) - set(SINKS))
        if unknown:
            raise ValueError(f"--sinks: unknown sinks {unknown}; choose from {SINKS}")
        return names

    def ranges(self) -> "dict[str, dict[int, tuple[int, int]]] | None":
        return None if self.replay_ranges is None else parse_replay_ranges(self.replay_ranges)


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


def _counter(cache: dict, name: str):
    counter = cache.get(name)
    if counter is None:
        counter = cache[name] = Metrics.counter(NAMESPACE, name)
    return counter


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
        self._counters: dict = {}

    def _apply(self, s: PostState, key, value):
        event_id, item, raw = value
        outcome = self._stage.apply(s, event_id, item)
        _counter(self._counters, f"events_{outcome.status}").inc()
        if outcome.unmatched_unlike:
            _counter(self._counters, "unlikes_unmatched").inc()
        if outcome.status == TOO_LATE:
            yield TaggedOutput(_DEAD_LETTERS, self._dead_letter(event_id, item, raw, s))
            return
        yield from outcome.features
        shards = self._shards
        for fwd in outcome.forward:
            if fwd.kind in _TO_AUTHOR:
                yield TaggedOutput(_TO_AUTHOR_TAG, (shard_of(fwd.author, shards),
                                                    (fwd.author, fwd)))
            if fwd.kind in _TO_VIEWER:
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
    """Engagement and post events -> feature values (see the module doc).

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
          ranges: "dict[str, dict[int, tuple[int, int]]] | None" = None) -> FeatureOutputs:
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
        ranges = opts.ranges()
    if ranges is not None:
        read = ReadEvents(config, ranges=ranges, topic_prefix=prefix)
    else:
        read = ReadEvents(config, [prefix + EngagementEvent.TOPIC, prefix + PostEvent.TOPIC],
                          topic_prefix=prefix)
    events = pipeline | "ReadEngagementAndPostEvents" >> read
    out = events | "AggregateEngagementFeatures" >> AggregateEngagementFeatures(
        params, prefix, opts.shards,
        timer_granularity_ms=BOUNDED_TIMER_GRANULARITY_MS if ranges else None)
    _ = out.dead_letters | "WriteTooLate" >> WriteDeadLetters(producer_config_of(config))
    store = opts.sink_config()
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
    bounded = options.view_as(FeaturesOptions).ranges() is not None
    options.view_as(StandardOptions).streaming = not bounded
    pipeline = beam.Pipeline(options=options)
    build(pipeline, options)
    return run_until_done(pipeline)


def main(argv=None) -> int:
    """``python -m pipelines.features``: log at INFO, run until the job ends or is cancelled."""
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cassandra").setLevel(logging.WARNING)
    run(sys.argv[1:] if argv is None else argv)
    return 0
