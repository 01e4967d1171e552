"""The features pipeline: engagement features for ranking, written to Redis (online),
Cassandra (durable), the Parquet log (offline) and each author's top-followers ranking.

    python -m pipelines.features --runner=PrismRunner --prism_location=<prism> \\
        --environment_type=LOOPBACK --streaming [--slide_s 300 --allowed_lateness_s 3600 ...]

Reads ``engagement-events`` and ``post-events`` as decoded batches and computes
the features of ``schemas.features`` (``AggregateEngagementFeatures``);
``--sinks`` picks where they go, ``--replay_ranges`` makes it a bounded re-run,
``--state_store`` where the aggregation's state survives a restart. Design
(state layout, windows, lateness, dedup, delivery, restarts):
``docs/pipelines/features.md``.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
import struct
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import coders
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import PCollection, TaggedOutput
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from apache_beam.utils.timestamp import Timestamp

from domain.feature_aggregator import COUNTS, AppliedOffsets, FeatureAggregator, ItemColumns
from domain.features import KIND_CODES, MEDIA_CODES, POST_CREATED, FeatureParams, parse_weights
from pipelines.common import Counters, Ranges, ReplayOptions, StoreOptions, module_main
from pipelines.features_sinks import (
    DEFAULT_SINK_BATCH,
    NAMESPACE,
    FeatureSinkConfig,
    FeatureWriterConfig,
)
from pipelines.io.deadletter import DeadLetterProducer
from pipelines.io.kafka import KafkaReadOptions
from pipelines.io.source import ReadEventBatches, producer_config_of
from pipelines.runtime import pipeline_options, run_until_done
from schemas.events import EngagementEvent, PostEvent, PostEventKind
from schemas.features import DAY_MS, FeatureColumns, FeatureTTLs, FeatureValue
from schemas.records import DeadLetter, EventBatch
from stores.config import StoreConfig
from stores.retry import RetryPolicy

if __name__ == "__main__":
    # Before anything is defined here: the job runs the imported module, and options
    # classes defined a second time (in this __main__ copy) would clash.
    sys.exit(module_main("pipelines.features"))

log = logging.getLogger(__name__)

DEFAULT_GROUP = "feedbeam-features"
STEP = "features"
TOO_LATE = "too_late"
SINKS = ("redis", "cassandra", "log", "top_followers", "social")
#: ``--sinks`` by default: all but ``social`` (the facts of the social features, which a
#: ranking model trained with ``--features social`` needs; they cost the job about a
#: third of its throughput, docs/benchmarks.md).
DEFAULT_SINKS = ("redis", "cassandra", "log", "top_followers")
#: Where the aggregation's state lives: Parquet snapshots plus the input since the latest
#: (Prism), Beam state the runner checkpoints (Flink), or memory only (bounded re-runs).
STATE_STORES = ("auto", "snapshot", "beam", "memory")
#: A bounded re-run's timer granularity: nothing fires before its input is read.
BOUNDED_TIMER_GRANULARITY_MS = 100 * 365 * DAY_MS
#: (how far behind the wall clock the next due time is, the granularity then), coarsest first.
BACKLOG_GRANULARITY_MS = ((DAY_MS, 6 * 3_600_000), (3_600_000, 3_600_000))
#: Every element goes to one key: the aggregation is one state (see the design doc).
_KEY = 0


# --------------------------------------------------------------------------- elements


class Blobs:
    """Byte strings (or None) packed in one buffer: ``blob`` and each one's length (-1:
    None). Items of a batch travel like this; one is cut out only when needed."""

    __slots__ = ("blob", "lengths", "_starts")

    def __init__(self, blob: bytes, lengths: np.ndarray):
        self.blob = blob
        self.lengths = lengths
        self._starts = None

    @classmethod
    def of(cls, items: Sequence[bytes | None]) -> "Blobs":
        items = list(items)
        if None in items:
            return cls(b"".join(b for b in items if b is not None),
                       np.array([-1 if b is None else len(b) for b in items], dtype=np.int32))
        return cls(b"".join(items), np.fromiter(map(len, items), np.int32, len(items)))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> bytes | None:
        if self._starts is None:
            self._starts = np.concatenate([[0], np.cumsum(np.maximum(self.lengths, 0))])
        n = int(self.lengths[i])
        return None if n < 0 else self.blob[self._starts[i]:self._starts[i] + n]

    def tolist(self) -> list:
        ends = np.cumsum(np.maximum(self.lengths, 0)).tolist()
        blob = self.blob
        return [None if n < 0 else blob[e - n:e] for n, e in zip(self.lengths.tolist(), ends)]


class SourcedItems(NamedTuple):
    """One source batch as the aggregation's input: its events as ``ItemColumns`` and, per
    item, where it came from (``offsets``, Kafka ``timestamps``, original ``keys`` and
    ``values`` for a dead letter). ``first``/``last`` span every offset of the batch,
    including events that are no items (post deletions). The empty ``topic`` marks the
    start-up element (``KICK``)."""

    topic: str
    partition: int
    first: int
    last: int
    offsets: np.ndarray
    timestamps: np.ndarray
    keys: Blobs
    values: Blobs
    items: ItemColumns

    def select(self, rows: np.ndarray) -> "SourcedItems":
        keys, values = self.keys.tolist(), self.values.tolist()
        picked = rows.tolist()
        return self._replace(offsets=self.offsets[rows], timestamps=self.timestamps[rows],
                             keys=Blobs.of([keys[i] for i in picked]),
                             values=Blobs.of([values[i] for i in picked]),
                             items=self.items.select(rows))


KICK = SourcedItems("", -1, -1, -1, np.empty(0, np.int64), np.empty(0, np.int64),
                    Blobs.of([]), Blobs.of([]), ItemColumns.empty())


class SourcedItemsCoder(coders.Coder):
    """``SourcedItems`` as raw columns: int64 arrays and packed byte strings, no pickling."""

    _HEAD = struct.Struct(">iqqI")  # partition, first, last, items

    def encode(self, s: SourcedItems) -> bytes:
        topic = s.topic.encode()
        it = s.items
        parts = [struct.pack(">H", len(topic)), topic,
                 self._HEAD.pack(s.partition, s.first, s.last, len(it))]
        for column in (*it.arrays(), s.offsets, s.timestamps):
            parts.append(np.ascontiguousarray(column, dtype=">i8").tobytes())
        for blobs in (Blobs.of(it.ids), s.keys, s.values):
            parts += [np.ascontiguousarray(blobs.lengths, dtype=">i4").tobytes(),
                      struct.pack(">Q", len(blobs.blob)), blobs.blob]
        return b"".join(parts)

    def decode(self, data: bytes) -> SourcedItems:
        (n_topic,) = struct.unpack_from(">H", data)
        pos = 2 + n_topic
        topic = data[2:pos].decode()
        partition, first, last, n = self._HEAD.unpack_from(data, pos)
        pos += self._HEAD.size
        columns = []
        for _ in range(9):
            columns.append(np.frombuffer(data, dtype=">i8", count=n, offset=pos)
                           .astype(np.int64))
            pos += 8 * n
        blobs = []
        for _ in range(3):
            lengths = np.frombuffer(data, dtype=">i4", count=n, offset=pos).astype(np.int32)
            pos += 4 * n
            (size,) = struct.unpack_from(">Q", data, pos)
            pos += 8
            blobs.append(Blobs(data[pos:pos + size], lengths))
            pos += size
        ids, keys, values = blobs
        return SourcedItems(topic, partition, first, last, columns[7], columns[8], keys, values,
                            ItemColumns(*columns[:7], ids.tolist()))

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self):
        return SourcedItems


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


beam.coders.registry.register_coder(SourcedItems, SourcedItemsCoder)
beam.coders.registry.register_coder(FeatureValue, FeatureValueCoder)


def sourced_items(batch: EventBatch) -> tuple[SourcedItems | None, int]:
    """A decoded batch as aggregation input, and how many of its events are no items
    (post deletions). None when it holds no item."""
    events = batch.events
    if not events:
        return None, 0
    offsets = batch.offsets
    first, last = int(offsets[0]), int(offsets[-1])
    if type(events[0]) is EngagementEvent:
        rows = None
        kind = [KIND_CODES[e.kind] for e in events]
        viewer = [e.viewer_id for e in events]
        post = [-1 if e.post_id is None else e.post_id for e in events]
        media = [MEDIA_CODES.get(e.media_type, -1) for e in events]
        dwell = [-1 if e.dwell_ms is None else e.dwell_ms for e in events]
    else:
        rows = [i for i, e in enumerate(events)
                if type(e) is PostEvent and e.kind is PostEventKind.CREATED]
        events = [events[i] for i in rows]
        kind = [POST_CREATED] * len(events)
        viewer = [-1] * len(events)
        post = [e.post_id for e in events]
        media = [MEDIA_CODES[e.media_type] for e in events]
        dwell = viewer
    ignored = len(batch.events) - len(events)
    if not events:
        return None, ignored
    items = ItemColumns.of(kind, [e.event_time for e in events], viewer,
                           [e.author_id for e in events], post, media, dwell,
                           [e.event_id.encode() for e in events])

    def pick(column):
        return list(column) if rows is None else [column[i] for i in rows]

    return SourcedItems(batch.topic, batch.partition, first, last,
                        np.asarray(pick(offsets), np.int64),
                        np.asarray(pick(batch.timestamps_ms), np.int64),
                        Blobs.of(pick(batch.keys)), Blobs.of(pick(batch.values)), items), ignored


class _ToItemsFn(beam.DoFn):
    """``EventBatch`` -> ``(key, SourcedItems)``; events that change no feature (post
    deletions) are counted as ``events_ignored``."""

    def setup(self):
        self._counters = Counters(NAMESPACE)

    def process(self, batch: EventBatch):
        sourced, ignored = sourced_items(batch)
        self._counters.inc("events_ignored", ignored)
        if sourced is not None:
            yield _KEY, sourced


class _SocialFactsFn(beam.DoFn):
    """Each batch's first views and engagements into Redis (``stores.redis.social``), the
    facts the ranking job computes the social features from; written before the
    bundle ends, so before the source commits the batch's offsets. Retried whole on
    a transient error (the facts are idempotent); counted as ``social_firsts``."""

    def __init__(self, config: FeatureSinkConfig, retry: RetryPolicy = RetryPolicy()):
        self._config = config
        self._retry = retry

    def setup(self):
        from stores.redis.client import new_client
        from stores.redis.social import SocialFacts
        from schemas.keys import KeyLayout

        self._client = new_client(self._config.stores.redis_url)
        self._facts = SocialFacts(self._client, KeyLayout(self._config.stores.redis_key_prefix))
        self._counters = Counters(NAMESPACE)

    def process(self, element):
        _, sourced = element
        items = sourced.items
        new = self._retry.call(
            lambda: self._facts.apply(items.kind, items.t, items.viewer, items.post,
                                      items.author),
            what=f"{NAMESPACE}: social facts")
        self._counters.inc("social_firsts", new)

    def teardown(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()


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
        parser.add_argument("--sinks", default=",".join(DEFAULT_SINKS),
                            help=f"where features go, comma-separated subset of {SINKS}; "
                                 "add 'social' where the ranking job serves a model trained "
                                 "with --features social")
        parser.add_argument("--feature_log_dir", default="out/feature_log",
                            help="root of the Parquet feature log (sink 'log')")
        parser.add_argument("--log_flush_s", type=float, default=60.0,
                            help="processing time log rows may wait before a file is written "
                                 "(a snapshot also writes them first)")
        parser.add_argument("--top_followers_keep", type=int, default=10_000,
                            help="followers kept per author in the top_followers ranking")
        parser.add_argument("--sink_batch", type=int, default=DEFAULT_SINK_BATCH,
                            help="values per store write (one round trip)")
        parser.add_argument("--state_store", choices=STATE_STORES, default="auto",
                            help="where the aggregation's state survives a restart: "
                                 "'snapshot' (Parquet snapshots under --feature_state_dir "
                                 "plus the input since the latest; the default except on "
                                 "Flink), 'beam' (Beam state the runner checkpoints; the "
                                 "default on Flink), 'memory' (nowhere: a restart rewinds the "
                                 "source by the state horizon; bounded re-runs use it)")
        parser.add_argument("--feature_state_dir", default=None,
                            help="directory of the snapshots (default "
                                 "out/feature_state/<consumer group>)")
        parser.add_argument("--snapshot_interval_s", type=float, default=30.0,
                            help="processing time between snapshots: what a restart re-reads")

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
                                 top_followers_keep=self.top_followers_keep, heal=True)

    def sink_names(self) -> tuple[str, ...]:
        names = tuple(s.strip() for s in self.sinks.split(",") if s.strip())
        unknown = sorted(set(names) - set(SINKS))
        if unknown:
            raise ValueError(f"--sinks: unknown sinks {unknown}; choose from {SINKS}")
        return names

    def writer_config(self, stores: StoreConfig) -> FeatureWriterConfig:
        return FeatureWriterConfig(self.sink_config(stores), self.sink_names(),
                                   self.feature_log_dir, self.log_flush_s, self.sink_batch)

    def state_config(self, runner: str, group: str, bounded: bool) -> "StateConfig":
        store = self.state_store
        if bounded:
            store = "memory"  # a re-run starts from nothing and keeps nothing
        elif store == "auto":
            store = "beam" if "flink" in runner.lower() else "snapshot"
        directory = self.feature_state_dir or str(Path("out") / "feature_state" / group)
        return StateConfig(store, str(Path(directory).resolve()), self.snapshot_interval_s)


# --------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class StateConfig:
    """Where the aggregation's state survives a restart (``--state_store``).

    ``snapshot``: a Parquet snapshot under ``directory`` every ``interval_s``,
    plus the input since it, re-read after a restart; ``beam``: Beam state
    (an operation log and a token; the runner checkpoints it); ``memory``:
    nowhere. ``instance`` tells apart the in-memory states of pipelines in
    one process.
    """

    store: str = "memory"
    directory: str = ""
    interval_s: float = 30.0
    instance: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        if self.store not in STATE_STORES[1:]:
            raise ValueError(f"state store must be one of {STATE_STORES[1:]}, not {self.store!r}")
        if self.store == "snapshot" and not self.directory:
            raise ValueError("a snapshot state store needs a directory")


def params_fingerprint(params: FeatureParams) -> str:
    """What a snapshot's state depends on: it is restored only under the same."""
    return repr(dataclasses.asdict(params) | {"weights": sorted(params.weights.items())})


def snapshot_restart(directory: str | Path) -> dict[tuple[str, int], int] | None:
    """Per partition, the offset a job restoring the latest snapshot under ``directory``
    must read from (None when there is no snapshot)."""
    from stores.files.feature_state import SnapshotStore

    meta = SnapshotStore(directory).read_meta()
    return None if meta is None else AppliedOffsets.from_json(meta["offsets"]).restart()


class _Live:
    """A state in this process: the aggregator, the source offsets it holds, the timer it
    set, and (snapshot store) when it was last made durable. One per ``StateConfig``
    (per key on Beam state), shared by every DoFn instance of the process."""

    def __init__(self, agg: FeatureAggregator, offsets: AppliedOffsets | None):
        self.agg = agg
        self.offsets = offsets
        self.lock = threading.RLock()
        self.timer_at: int | None = None
        self.unwritten = 0  # values and dead letters emitted, not yet stored
        self.snapshot_at = time.monotonic()
        self.snapshotting: threading.Thread | None = None
        self.token: str | None = None  # Beam state: which state this copy is
        self.logged = 0  # Beam state: events in the operation log since its base
        self.changed = False  # snapshot store: changes since the last snapshot
        self.snapshot_timer = False  # snapshot store: the processing-time timer is set


_LIVE: dict = {}
_LIVE_LOCK = threading.Lock()


def _restore_snapshot(params: FeatureParams, directory: str) -> _Live:
    from stores.files.feature_state import SnapshotStore

    loaded = SnapshotStore(directory).read()
    if loaded is None:
        return _Live(FeatureAggregator(params), AppliedOffsets())
    tables, meta = loaded
    if meta["params"] != params_fingerprint(params):
        raise ValueError(
            f"the features snapshot in {directory} was made with other windows, lateness, "
            "decay or weights; remove the directory (the job then rebuilds its state from "
            "the topics, --rewind_s back) or point --feature_state_dir elsewhere")
    started = time.monotonic()
    live = _Live(FeatureAggregator.restore(params, tables),
                 AppliedOffsets.from_json(meta["offsets"]))
    log.info("features: restored snapshot %s (%s) in %.1fs", directory,
             live.agg.sizes(), time.monotonic() - started)
    return live


# --------------------------------------------------------------------------- aggregation


_DEAD_LETTERS = "dead_letters"
_OP_APPLY, _OP_FIRE, _OP_BASE = b"A", b"F", b"B"
_ITEMS = SourcedItemsCoder()


class _AggregateFn(beam.DoFn):
    """The aggregation as one stateful DoFn on one key (see ``AggregateEngagementFeatures``).

    The state is a ``FeatureAggregator`` in this process (``_Live``); one
    event-time timer at the aggregator's next due time delivers the
    watermark. Values are written by the ``FeatureWriter`` (or emitted when
    there is none) and too-late events dead-lettered, all before the state is
    made durable: a Parquet snapshot (``snapshot``), or each call's operation
    appended to Beam state with a new token (``beam``; a copy in memory is
    used while its token is the state's, else it is rebuilt from the log).
    """

    TIMER = TimerSpec("tick", TimeDomain.WATERMARK)
    SNAPSHOT = TimerSpec("snapshot", TimeDomain.REAL_TIME)
    OPS = BagStateSpec("ops", coders.BytesCoder())
    TOKEN = ReadModifyWriteStateSpec("token", coders.StrUtf8Coder())

    def __init__(self, params: FeatureParams, state: StateConfig,
                 writer: FeatureWriterConfig | None, dead_letters: dict | None,
                 timer_granularity_ms: int, bounded: bool, catch_up: bool):
        self._params = params
        self._state = state
        self._writer_config = writer
        self._dlq_config = dead_letters
        self._granularity = timer_granularity_ms
        self._bounded = bounded
        self._catch_up = catch_up

    def setup(self):
        self._counters = Counters(NAMESPACE)
        self._writer = None if self._writer_config is None else self._writer_config.open()
        self._dlq = None if self._dlq_config is None else DeadLetterProducer(self._dlq_config)
        self._pending: list[FeatureColumns] = []
        self._owed = 0  # values and dead letters this instance has not stored yet
        self._live_copy: _Live | None = None

    def teardown(self):
        if getattr(self, "_writer", None) is not None:
            self._writer.close()
        if getattr(self, "_dlq", None) is not None:
            self._dlq.close()
        # The state stays: a runner tears DoFn instances down while the job runs, and the
        # next instance must find it (only a bounded run's state goes, at its end).
        live = getattr(self, "_live_copy", None)
        if live is not None and live.snapshotting is not None:
            live.snapshotting.join()

    # -- the state

    def _live(self, ops, token) -> _Live:
        s = self._state
        if s.store == "beam":
            return self._beam_live(ops, token)
        with _LIVE_LOCK:
            live = _LIVE.get(s.instance)
            if live is None:
                live = _LIVE[s.instance] = (
                    _restore_snapshot(self._params, s.directory) if s.store == "snapshot"
                    else _Live(FeatureAggregator(self._params), None))
        return live

    def _beam_live(self, ops, token) -> _Live:
        current = token.read()
        key = (self._state.instance, _KEY)
        with _LIVE_LOCK:
            live = _LIVE.get(key)
            if live is not None and live.token == current:
                return live
            agg, logged = FeatureAggregator(self._params), 0
            for op in ops.read():  # this copy is not the state: rebuild it from the log
                kind, body = op[:1], op[1:]
                if kind == _OP_BASE:
                    agg = FeatureAggregator.restore(self._params, pickle.loads(body))
                    logged = 0
                elif kind == _OP_APPLY:
                    items = _ITEMS.decode(body).items
                    agg.apply(items)
                    logged += len(items)
                else:
                    agg.fire(struct.unpack(">q", body)[0])
            live = _LIVE[key] = _Live(agg, None)
            live.token, live.logged = current, logged
            return live

    def _log_op(self, live: _Live, ops, token, op: bytes, events: int) -> None:
        """Beam state: append this call's operation (or, when the log outgrew the state, a
        new base) and name the result with a new token."""
        if self._state.store != "beam":
            return
        live.logged += events
        if live.logged > max(100_000, sum(live.agg.sizes().values())):
            ops.clear()
            op = _OP_BASE + pickle.dumps(live.agg.export(), protocol=5)
            live.logged = 0
        ops.add(op)
        live.token = uuid.uuid4().hex
        token.write(live.token)

    def _arm(self, live: _Live, timer) -> None:
        """Keep the one timer at the aggregator's next due time, rounded up to the timer
        granularity (set only when it moves; a firing handles every time up to its own).

        With ``catch_up``, while that time is far behind the wall clock (a backlog: the
        watermark may be days ahead) the granularity grows (``BACKLOG_GRANULARITY_MS``):
        each firing is a runner round trip, and every change point is still computed at
        its own time; lateness is then judged against a watermark known to within hours.
        """
        wanted = live.agg.next_timer()
        if wanted is None:
            return
        granularity = self._granularity
        behind = time.time() * 1000 - wanted
        for lag, coarser in BACKLOG_GRANULARITY_MS if self._catch_up else ():
            if behind > lag:
                granularity = max(granularity, coarser)
                break
        wanted = -(-wanted // granularity) * granularity
        if wanted != live.timer_at:
            timer.set(Timestamp(micros=wanted * 1000))
            live.timer_at = wanted

    # -- input and time

    def _use(self, live: _Live) -> None:
        self._live_copy = live

    def _arm_snapshot(self, live: _Live, timer) -> None:
        """Snapshot store: a processing-time timer brings a bundle (and its snapshot) even
        when no input comes after a change."""
        live.changed = True
        if self._state.store == "snapshot" and not live.snapshot_timer:
            timer.set(Timestamp.now() + self._state.interval_s)
            live.snapshot_timer = True

    def process(self, element, timer=beam.DoFn.TimerParam(TIMER),
                snapshot=beam.DoFn.TimerParam(SNAPSHOT),
                ops=beam.DoFn.StateParam(OPS), token=beam.DoFn.StateParam(TOKEN)):
        _, sourced = element
        live = self._live(ops, token)
        with live.lock:
            self._use(live)
            if sourced.topic:
                yield from self._apply(live, sourced, ops, token)
                self._arm_snapshot(live, snapshot)
            self._arm(live, timer)

    def _apply(self, live: _Live, sourced: SourcedItems, ops, token):
        if live.offsets is not None:
            covered = live.offsets.covered(sourced.topic, sourced.partition, sourced.offsets)
            if covered.any():  # re-read after a restart: the snapshot holds these
                self._counters.inc("events_restored", int(covered.sum()))
                sourced = sourced.select(np.flatnonzero(~covered))
        applied = live.agg.apply(sourced.items)
        for name in COUNTS:
            self._counters.inc(name if name == "unlikes_unmatched" else f"events_{name}",
                               applied.counts[name])
        for i in applied.too_late:
            letter = self._dead_letter(sourced, i)
            if self._dlq is None:
                yield TaggedOutput(_DEAD_LETTERS, letter)
            else:
                self._dlq.send(letter)
                self._owed += 1
                live.unwritten += 1
        yield from self._emit(live, applied.values)
        if live.offsets is not None:
            live.offsets.add(sourced.topic, sourced.partition, sourced.first, sourced.last)
        self._log_op(live, ops, token, _OP_APPLY + _ITEMS.encode(sourced), len(sourced.items))

    @on_timer(SNAPSHOT)
    def on_snapshot_due(self, snapshot=beam.DoFn.TimerParam(SNAPSHOT),
                        ops=beam.DoFn.StateParam(OPS), token=beam.DoFn.StateParam(TOKEN)):
        live = self._live(ops, token)
        with live.lock:
            self._use(live)
            live.snapshot_timer = False  # finish_bundle writes the snapshot if one is due
            if live.changed:
                self._arm_snapshot(live, snapshot)  # in case it is not due yet

    @on_timer(TIMER)
    def on_tick(self, fired=beam.DoFn.TimestampParam, timer=beam.DoFn.TimerParam(TIMER),
                snapshot=beam.DoFn.TimerParam(SNAPSHOT),
                ops=beam.DoFn.StateParam(OPS), token=beam.DoFn.StateParam(TOKEN)):
        live = self._live(ops, token)
        with live.lock:
            self._use(live)
            live.timer_at = None
            at = fired.micros // 1000
            values = live.agg.fire(at)
            # A bounded run ends with the watermark at infinity and drains every window;
            # values valid after the wall clock are not facts yet (the live job will
            # compute them from more events).
            valid = values.valid_at_ms <= time.time() * 1000
            if not valid.all():
                self._counters.inc("values_not_yet_valid", int((~valid).sum()))
                values = values.select(valid)
            yield from self._emit(live, values)
            self._log_op(live, ops, token, _OP_FIRE + struct.pack(">q", at), 0)
            self._arm_snapshot(live, snapshot)
            if self._bounded and self._state.store == "memory":
                # The one firing of a bounded run comes after all its input: done.
                with _LIVE_LOCK:
                    _LIVE.pop(self._state.instance, None)
                return
            self._arm(live, timer)

    def _emit(self, live: _Live, values: FeatureColumns):
        if not len(values):
            return
        if self._writer is None:
            yield from values.values()
        else:
            self._pending.append(values)
            self._owed += len(values)
            live.unwritten += len(values)

    def _dead_letter(self, sourced: SourcedItems, i: int) -> DeadLetter:
        t = int(sourced.items.t[i])
        error = (f"event time {t} is more than {self._params.allowed_lateness_ms} ms behind "
                 f"the watermark (at least {self._live_copy.agg.fired})")
        return DeadLetter(topic=sourced.topic, partition=sourced.partition,
                          offset=int(sourced.offsets[i]), key=sourced.keys[i],
                          value=sourced.values[i], timestamp_ms=int(sourced.timestamps[i]),
                          step=STEP, reason=TOO_LATE, error=error,
                          failed_at_ms=int(time.time() * 1000))

    # -- durability

    def finish_bundle(self):
        live = self._live_copy
        if live is None:
            return
        if self._pending:
            values = FeatureColumns.concat(self._pending)
            self._pending = []
            self._writer.write(values)
        if self._dlq is not None:
            self._dlq.settle()
        with live.lock:
            live.unwritten -= self._owed
            self._owed = 0
            if self._writer is not None and (self._bounded or self._state.store == "beam"
                                             or self._writer.log_due()):
                self._writer.flush_log()
            if self._state.store == "snapshot":
                self._maybe_snapshot(live)

    def _maybe_snapshot(self, live: _Live) -> None:
        """Start writing a snapshot when one is due and every value emitted so far is
        stored (the snapshot must not stand for values that might be lost)."""
        if (not live.changed or live.unwritten
                or time.monotonic() - live.snapshot_at < self._state.interval_s
                or (live.snapshotting is not None and live.snapshotting.is_alive())):
            return
        live.changed = False
        if self._writer is not None:
            self._writer.flush_log()
        for topic, partition, first, last in live.offsets.settle():
            log.info("features: offsets %s-%s of %s[%s] never reached the aggregation (taken "
                     "as dead-lettered before it)", first, last, topic, partition)
        tables = live.agg.export()
        meta = {"offsets": live.offsets.to_json(), "params": params_fingerprint(self._params),
                "fired": live.agg.fired, "sizes": live.agg.sizes(),
                "written_at_ms": int(time.time() * 1000)}
        live.snapshot_at = time.monotonic()
        directory = self._state.directory
        counters = self._counters

        def write():
            from stores.files.feature_state import SnapshotStore

            started = time.monotonic()
            SnapshotStore(directory).write(tables, meta)
            counters.inc("snapshots")
            log.info("features: snapshot of %s written in %.1fs", meta["sizes"],
                     time.monotonic() - started)

        live.snapshotting = threading.Thread(target=write, name="features-snapshot",
                                             daemon=True)
        live.snapshotting.start()


class FeatureOutputs(NamedTuple):
    """The outputs of ``AggregateEngagementFeatures``."""

    features: PCollection  # PCollection[FeatureValue]; empty when a writer stores them
    dead_letters: PCollection  # PCollection[DeadLetter]; empty when written to the DLQ inline


class AggregateEngagementFeatures(beam.PTransform):
    """Engagement and post event batches -> feature values (``docs/pipelines/features.md``).

    Args:
      params: windows, lateness, dedup horizon, decay and weights (``FeatureParams``).
      state: where the state survives a restart (``StateConfig``; default: nowhere).
      writer: the stores the values go to, written by the aggregation itself before it
        makes its state durable (``FeatureWriterConfig``); None: they are the
        ``features`` output instead.
      dead_letters: a producer config to write too-late events to their ``.dlq`` topics
        inline; None: they are the ``dead_letters`` output.
      timer_granularity_ms: how far apart timers are (default the slide: values appear as
        soon as the watermark passes their window end). Every change point is still
        computed at its own time, in order. A bounded re-run passes
        ``BOUNDED_TIMER_GRANULARITY_MS`` (a century): the timer fires once, when the
        input is read, and every window is worked through then.
      bounded: the input is bounded (the log is written at the end of every bundle).
      catch_up: fire timers hourly while the aggregation is more than an hour behind the
        wall clock (six-hourly past a day), so a backlog drains in fewer runner round
        trips (see ``_AggregateFn._arm``).

    Takes a ``PCollection[EventBatch]`` of ``engagement-events`` and
    ``post-events`` (events other than engagements and created posts are
    counted and ignored). Returns ``FeatureOutputs``.
    """

    def __init__(self, params: FeatureParams | None = None, state: StateConfig | None = None,
                 writer: FeatureWriterConfig | None = None, dead_letters: dict | None = None,
                 timer_granularity_ms: int | None = None, bounded: bool = False,
                 catch_up: bool = False):
        super().__init__()
        self._social = (writer.config if writer is not None and "social" in writer.sinks
                        else None)
        self._params = params or FeatureParams()
        self._state = state or StateConfig()
        self._writer = writer
        self._dead_letters = dead_letters
        self._granularity = timer_granularity_ms or self._params.slide_ms
        if self._granularity < 1:
            raise ValueError("timer_granularity_ms must be at least 1")
        if self._state.store == "snapshot" and (writer is None or dead_letters is None):
            # A snapshot stands for every value and dead letter before it: the aggregation
            # must store them itself first.
            raise ValueError("a snapshot state store needs a writer and a dead-letter producer")
        self._bounded = bounded
        self._catch_up = catch_up

    def expand(self, batches) -> FeatureOutputs:
        keyed = Tuple[int, SourcedItems]
        items = (batches
                 | "ToItems" >> beam.ParDo(_ToItemsFn()).with_output_types(keyed))
        if self._social is not None:
            _ = items | "WriteSocialFacts" >> beam.ParDo(_SocialFactsFn(self._social))
        # One element at start-up, so the aggregation restores its state and arms its
        # timer even when no input arrives.
        kick = (batches.pipeline
                | "Start" >> beam.Impulse()
                | "Kick" >> beam.Map(lambda _: (_KEY, KICK)).with_output_types(keyed))
        out = ((items, kick)
               | "WithKick" >> beam.Flatten().with_output_types(keyed)
               | "Aggregate" >> beam.ParDo(_AggregateFn(
                   self._params, self._state, self._writer, self._dead_letters,
                   self._granularity, self._bounded, self._catch_up))
               .with_output_types(FeatureValue, **{_DEAD_LETTERS: DeadLetter})
               .with_outputs(_DEAD_LETTERS, main="features"))
        return FeatureOutputs(out.features, out[_DEAD_LETTERS])


# --------------------------------------------------------------------------- wiring


def _resume_from_snapshot(state: StateConfig, bootstrap: str, group: str,
                          topics: Sequence[str]) -> None:
    """Point ``group`` at the latest snapshot's restart offsets, so the source re-reads
    exactly the input since it (nothing to do without a snapshot)."""
    from stores.kafka.lag import commit_offsets, end_offsets

    restart = snapshot_restart(state.directory)
    if not restart:
        return
    ends = end_offsets(bootstrap, topics)
    beyond = {tp: (offset, ends.get(tp)) for tp, offset in restart.items()
              if tp[0] in topics and offset > ends.get(tp, -1)}
    if beyond:
        raise ValueError(
            f"the features snapshot in {state.directory} holds offsets beyond the topics' "
            f"ends {sorted(beyond.items())}: the topics were recreated or the directory "
            "belongs to other topics; remove it or point --feature_state_dir elsewhere")
    commit_offsets(bootstrap, group, {tp: o for tp, o in restart.items() if tp[0] in topics})
    log.info("features: resuming %s from the snapshot in %s: %s", group, state.directory,
             sorted(restart.items()))


def build(pipeline: beam.Pipeline, options: PipelineOptions,
          ranges: Ranges | None = None) -> FeatureOutputs:
    """Wire the features job into ``pipeline``: read, aggregate, write to ``--sinks``.

    Without ``ranges`` (nor ``--replay_ranges``) it follows ``engagement-events``
    and ``post-events`` from the consumer group's offsets; with a snapshot state
    store and a snapshot, from the snapshot's offsets (committed to the group
    here, before the job starts), else rewinding by the state horizon
    (``--rewind_s``, default the affinity TTL). With ranges it reads exactly
    those offsets once (a bounded re-run, its state in memory).
    """
    kafka = options.view_as(KafkaReadOptions)
    opts = options.view_as(FeaturesOptions)
    params = opts.params()
    if ranges is None:
        ranges = options.view_as(ReplayOptions).ranges()
    group = kafka.consumer_group or DEFAULT_GROUP
    state = opts.state_config(str(options.view_as(StandardOptions).runner or ""), group,
                              bounded=bool(ranges))
    prefix = kafka.topic_prefix
    topics = [prefix + EngagementEvent.TOPIC, prefix + PostEvent.TOPIC]
    if state.store == "snapshot":
        _resume_from_snapshot(state, kafka.kafka_bootstrap, group, topics)
    config = kafka.source_config(default_group=DEFAULT_GROUP,
                                 default_rewind_s=params.affinity_ttl_ms / 1000)
    read = ReadEventBatches(config, topics, ranges=ranges, topic_prefix=prefix)
    batches = pipeline | "ReadEngagementAndPostEvents" >> read
    writer = opts.writer_config(options.view_as(StoreOptions).config())
    return batches | "AggregateEngagementFeatures" >> AggregateEngagementFeatures(
        params, state, writer, producer_config_of(config),
        timer_granularity_ms=BOUNDED_TIMER_GRANULARITY_MS if ranges else None,
        bounded=bool(ranges), catch_up=not ranges)


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
