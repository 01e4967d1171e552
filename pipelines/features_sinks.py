"""Where the features pipeline writes its values: Redis, Cassandra, the Parquet log, and
each author's top-followers ranking (the fan-out's celebrity push reads it).

    writer = FeatureWriterConfig(config, ("redis", "cassandra", "log")).open()
    writer.write(columns); writer.flush_log(); writer.close()    # inside the aggregation

    features | "WriteOnlineFeatures" >> WriteOnlineFeatures(config, max_batch=2000)
    features | "WriteFeatureLog" >> WriteFeatureLog("out/feature_log")

The aggregation writes its values itself with a ``FeatureWriter``, before it
makes its state durable (docs/pipelines/features.md, "Restarts"). The
transforms take a ``PCollection[FeatureValue]`` (of ``AggregateEngagementFeatures``
run without a writer) and return an empty ``PCollection``; the store sinks
write through ``pipelines.io.sink.ApplyInBatches``. Both use the same store
appliers, retried whole with ``RetryPolicy``; how writes stay idempotent is in
``docs/pipelines/features.md``. With ``FeatureSinkConfig.heal`` (the pipeline
sets it) Redis' generation marker is read before each write (one GET): a Redis
that lost its data is restored from Cassandra first (``stores.restore``).
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from typing import Callable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from domain.features import follower_scores
from pipelines.common import Counters
from pipelines.io.sink import ApplyInBatches
from schemas.features import (DEFAULT_HALF_LIFE_MS, ENTITY_TYPES, VIEWER_AUTHOR,
                              FeatureColumns, FeatureTTLs, FeatureValue)
from stores.config import StoreConfig
from stores.restore import RedisHealer, RestoreSettings, open_healer
from stores.retry import RetryPolicy

NAMESPACE = "feedbeam.features"
DEFAULT_SINK_BATCH = 2000


@dataclasses.dataclass(frozen=True)
class FeatureSinkConfig:
    """Where the stores are and how features are kept in them; pickled instead of clients.

    ``heal``: check Redis' generation marker before each write to Redis and restore
    a Redis that lost its data from Cassandra first (``stores.restore.RedisHealer``).
    """

    stores: StoreConfig = StoreConfig()
    ttls: FeatureTTLs = FeatureTTLs()
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    top_followers_keep: int = 10_000
    heal: bool = False

    def restore_settings(self) -> RestoreSettings:
        """What a restore this job runs must agree with: its TTLs, decay, top followers."""
        return RestoreSettings(feature_ttls=self.ttls, half_life_ms=self.half_life_ms,
                               top_followers_keep=self.top_followers_keep)


class _Healer:
    """A ``RedisHealer`` on a client of its own (closed with it), and its restores counted."""

    def __init__(self, config: FeatureSinkConfig):
        from stores.redis.client import new_client

        self._client = new_client(config.stores.redis_url)
        self.healer: RedisHealer = open_healer(config.stores, config.restore_settings(),
                                               self._client)
        self._counters = Counters(NAMESPACE)

    def check(self) -> None:
        restores = self.healer.restores
        self.healer.check()
        self._counters.inc("redis_restores", self.healer.restores - restores)

    def close(self) -> None:
        self._client.close()


def _open_healer(config: FeatureSinkConfig) -> _Healer | None:
    return _Healer(config) if config.heal else None


# --------------------------------------------------------------------------- store sinks


class _CountedWrites:
    """An applier: ``write(batch) -> values written``, counted as ``<sink>_written``; the
    rest, older than what the store or the batch holds, as ``<sink>_skipped``. With a
    ``healer``, Redis is checked (restored if lost) before each batch."""

    def __init__(self, sink: str, store, write: Callable[[Sequence[FeatureValue]], int],
                 healer: _Healer | None = None):
        self._sink = sink
        self._store = store
        self._write = write
        self._healer = healer
        self._counters = Counters(NAMESPACE)

    def apply(self, batch: list[FeatureValue]) -> None:
        if self._healer is not None:
            self._healer.check()
        written = self._write(batch)
        self._counters.inc(f"{self._sink}_written", written)
        self._counters.inc(f"{self._sink}_skipped", len(batch) - written)

    def close(self) -> None:
        try:
            self._store.close()
        finally:
            if self._healer is not None:
                self._healer.close()


def _open_online(c: FeatureSinkConfig):
    from stores.redis.features import OnlineFeatureStore

    store = OnlineFeatureStore.from_url(c.stores.redis_url, key_prefix=c.stores.redis_key_prefix,
                                        ttls=c.ttls, half_life_ms=c.half_life_ms)
    return store, store.write


def _open_durable(c: FeatureSinkConfig):
    from stores.cassandra.features import CassandraFeatureStore

    store = CassandraFeatureStore.connect(c.stores.cassandra_host, c.stores.cassandra_port,
                                          c.stores.cassandra_keyspace, **c.stores.cassandra_options)
    return store, store.write


def _open_top_followers(c: FeatureSinkConfig):
    from stores.redis.feeds import RedisFeedStore

    store = RedisFeedStore.from_url(c.stores.redis_url, key_prefix=c.stores.redis_key_prefix)

    def write(batch: Sequence[FeatureValue]) -> int:
        return store.apply_follower_engagement(follower_scores(batch, c.half_life_ms),
                                               keep=c.top_followers_keep)

    return store, write


_OPENERS = {"redis": _open_online, "cassandra": _open_durable,
            "top_followers": _open_top_followers}


@dataclasses.dataclass(frozen=True)
class _StoreWrites:
    """What a store sink pickles: which sink, and the config its applier opens with."""

    sink: str
    config: FeatureSinkConfig

    def open(self) -> _CountedWrites:
        store, write = _OPENERS[self.sink](self.config)
        healer = _open_healer(self.config) if self.sink in REDIS_SINKS else None
        return _CountedWrites(self.sink, store, write, healer)


class _StoreSink(beam.PTransform):
    """``PCollection[FeatureValue]`` -> the store ``sink`` names, ``max_batch`` values a write."""

    sink = ""

    def __init__(self, config: FeatureSinkConfig, max_batch: int = DEFAULT_SINK_BATCH):
        super().__init__()
        self._apply = ApplyInBatches(_StoreWrites(self.sink, config), NAMESPACE, max_batch,
                                     dead_letters="from_options")

    def expand(self, values):
        return values | f"Write_{self.sink}" >> self._apply


class WriteOnlineFeatures(_StoreSink):
    """``PCollection[FeatureValue]`` -> the Redis online store (``OnlineFeatureStore``),
    newer-wins per field."""

    sink = "redis"


class WriteDurableFeatures(_StoreSink):
    """``PCollection[FeatureValue]`` -> Cassandra (``CassandraFeatureStore``), newer-wins
    per cell."""

    sink = "cassandra"


def _is_viewer_author(value: FeatureValue) -> bool:
    return value.entity_type == VIEWER_AUTHOR


class UpdateTopFollowers(_StoreSink):
    """The viewer-author affinities of ``PCollection[FeatureValue]`` ->
    ``RedisFeedStore.apply_follower_engagement``: each author's ``top_followers`` ranks
    viewers by ``engagement_rank`` of their affinity, newer-wins per viewer by the
    affinity's write stamp. Other values are passed over (``max_batch`` counts
    affinities)."""

    sink = "top_followers"

    def expand(self, values):
        affinities = (values | "ViewerAuthorOnly" >> beam.Filter(_is_viewer_author)
                      .with_output_types(FeatureValue))
        return super().expand(affinities)


# --------------------------------------------------------------------------- inline writer

#: In the order a write goes to them: Cassandra before Redis, so whatever reached Redis
#: is in Cassandra when a restore after a loss of Redis reads it.
STORE_SINKS = ("cassandra", "redis", "top_followers")
REDIS_SINKS = ("redis", "top_followers")
_VIEWER_AUTHOR = ENTITY_TYPES.index(VIEWER_AUTHOR)


@dataclasses.dataclass(frozen=True)
class FeatureWriterConfig:
    """What the aggregation pickles for its writer: the stores and how values go there.

    ``sinks``: a subset of ``("redis", "cassandra", "top_followers", "log")`` (the
    pipeline's "social" facts are written by ``pipelines.features`` itself);
    ``max_batch``: values per store write (one round trip, or one concurrent
    execution in Cassandra); ``log_flush_s``: how long log rows may wait in
    memory before a file is written (a flush also comes before every snapshot).
    """

    config: FeatureSinkConfig = FeatureSinkConfig()
    sinks: tuple[str, ...] = STORE_SINKS + ("log",)
    log_dir: str = "out/feature_log"
    log_flush_s: float = 60.0
    max_batch: int = DEFAULT_SINK_BATCH
    retry: RetryPolicy = RetryPolicy()

    def open(self) -> "FeatureWriter":
        return FeatureWriter(self)


class FeatureWriter:
    """Writes ``FeatureColumns`` to the stores of its config (see ``FeatureWriterConfig``).

    ``write`` sends each store only the newest value of each (entity, name)
    among what it is given (``FeatureColumns.newest``: what the store would
    keep), ``max_batch`` values a write, each write retried whole on a
    transient error; Cassandra first, then Redis (``STORE_SINKS``), and with
    ``heal`` Redis' generation marker is checked once per ``write`` before
    (a Redis that lost its data is restored first). Log rows are kept until
    ``flush_log`` (which the owner calls when ``log_due`` says so, and before
    making its state durable).
    """

    def __init__(self, config: FeatureWriterConfig):
        self.config = config
        # One check per write for every store (below), not one per store.
        unchecked = dataclasses.replace(config.config, heal=False)
        self._stores = {sink: _StoreWrites(sink, unchecked).open()
                        for sink in STORE_SINKS if sink in config.sinks}
        uses_redis = any(sink in REDIS_SINKS for sink in self._stores)
        self._healer = _open_healer(config.config) if uses_redis else None
        self._log: list[FeatureColumns] = []
        self._log_since = time.monotonic()
        self._counters = Counters(NAMESPACE)

    def write(self, values: FeatureColumns) -> None:
        if not len(values):
            return
        if "log" in self.config.sinks:
            self._log.append(values)
        if not self._stores:
            return
        if self._healer is not None:
            self.config.retry.call(self._healer.check, what=f"{NAMESPACE}: Redis generation",
                                   on_retry=lambda _: self._counters.inc("batch_retries"))
        newest = values.newest()
        for sink, applier in self._stores.items():
            rows = newest
            if sink == "top_followers":
                rows = newest.select(newest.entity_type == _VIEWER_AUTHOR)
            step = self.config.max_batch
            for start in range(0, len(rows), step):
                batch = rows.select(slice(start, start + step)).values()
                self.config.retry.call(
                    lambda: applier.apply(batch), what=f"{NAMESPACE} {sink}: {len(batch)} values",
                    on_retry=lambda _: self._counters.inc("batch_retries"))
                self._counters.inc("batches")

    def log_due(self) -> bool:
        return bool(self._log) and (time.monotonic() - self._log_since
                                    >= self.config.log_flush_s)

    def flush_log(self) -> None:
        """Write the log rows held so far (one content-addressed file per hour they span)."""
        from stores.files.feature_log import write_feature_columns

        self._log_since = time.monotonic()
        if not self._log:
            return
        columns = FeatureColumns.concat(self._log)
        files = write_feature_columns(self.config.log_dir, columns)
        self._log = []
        self._counters.inc("log_rows", len(columns))
        self._counters.inc("log_files", len(files))

    def close(self) -> None:
        for applier in self._stores.values():
            applier.close()
        self._stores = {}
        if self._healer is not None:
            self._healer.close()
            self._healer = None


# --------------------------------------------------------------------------- feature log


def log_shard(value: FeatureValue, shards: int) -> int:
    """Stable shard of a value's entity (crc32, so every worker and run agrees)."""
    return zlib.crc32(f"{value.entity_type}/{value.entity_id}".encode()) % shards


class _WriteLogFn(beam.DoFn):
    def __init__(self, log_dir: str):
        self._log_dir = log_dir

    def setup(self):
        self._rows = Metrics.counter(NAMESPACE, "log_rows")
        self._files = Metrics.counter(NAMESPACE, "log_files")

    def process(self, element):
        from stores.files.feature_log import write_feature_log

        _, values = element
        values = list(values)
        files = write_feature_log(self._log_dir, values)
        self._rows.inc(len(values))
        self._files.inc(len(files))


class WriteFeatureLog(beam.PTransform):
    """``PCollection[FeatureValue]`` -> the Parquet feature log under ``log_dir``.

    ``shards`` files per hour of ``valid_at`` per ``flush_s`` of processing
    time (the panes of a repeated processing-time trigger in the global
    window, so no value is ever late); ``bounded=True`` (a bounded re-run)
    writes once per shard at the end instead.
    """

    def __init__(self, log_dir: str, shards: int = 4, flush_s: float = 60.0,
                 bounded: bool = False):
        super().__init__()
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self._log_dir = log_dir
        self._shards = shards
        self._flush_s = flush_s
        self._bounded = bounded

    def expand(self, values):
        shards = self._shards
        keyed = values | "KeyByShard" >> beam.Map(lambda v: (log_shard(v, shards), v))
        if not self._bounded:
            # A bounded run has one pane per shard at its end (the default trigger).
            keyed = keyed | "Panes" >> beam.WindowInto(
                window.GlobalWindows(),
                trigger=trigger.Repeatedly(trigger.AfterProcessingTime(
                    max(1, round(self._flush_s)))),
                accumulation_mode=trigger.AccumulationMode.DISCARDING)
        return (keyed
                | "GroupPerShard" >> beam.GroupByKey()
                | "WriteParquet" >> beam.ParDo(_WriteLogFn(self._log_dir)))


__all__ = ["FeatureSinkConfig", "FeatureWriterConfig", "FeatureWriter", "WriteOnlineFeatures",
           "WriteDurableFeatures", "UpdateTopFollowers", "WriteFeatureLog", "log_shard",
           "NAMESPACE", "STORE_SINKS"]
