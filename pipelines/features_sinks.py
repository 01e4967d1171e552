"""Where the features pipeline writes its values: Redis, Cassandra, the Parquet log, and
each author's top-followers ranking (the fan-out's celebrity push reads it).

    features | "WriteOnlineFeatures" >> WriteOnlineFeatures(config, max_batch=2000)
    features | "WriteDurableFeatures" >> WriteDurableFeatures(config)
    features | "UpdateTopFollowers" >> UpdateTopFollowers(config)
    features | "WriteFeatureLog" >> WriteFeatureLog("out/feature_log")

Each takes a ``PCollection[FeatureValue]`` and returns an empty ``PCollection``.
The store sinks write through ``pipelines.io.sink.ApplyInBatches``; how writes
stay idempotent is in ``docs/pipelines/features.md``.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Callable, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from domain.features import follower_scores
from pipelines.common import Counters
from pipelines.io.sink import ApplyInBatches
from schemas.features import DEFAULT_HALF_LIFE_MS, VIEWER_AUTHOR, FeatureTTLs, FeatureValue
from stores.config import StoreConfig

NAMESPACE = "feedbeam.features"
DEFAULT_SINK_BATCH = 2000


@dataclasses.dataclass(frozen=True)
class FeatureSinkConfig:
    """Where the stores are and how features are kept in them; pickled instead of clients."""

    stores: StoreConfig = StoreConfig()
    ttls: FeatureTTLs = FeatureTTLs()
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    top_followers_keep: int = 10_000


# --------------------------------------------------------------------------- store sinks


class _CountedWrites:
    """An applier: ``write(batch) -> values written``, counted as ``<sink>_written``; the
    rest, older than what the store or the batch holds, as ``<sink>_skipped``."""

    def __init__(self, sink: str, store, write: Callable[[Sequence[FeatureValue]], int]):
        self._sink = sink
        self._store = store
        self._write = write
        self._counters = Counters(NAMESPACE)

    def apply(self, batch: list[FeatureValue]) -> None:
        written = self._write(batch)
        self._counters.inc(f"{self._sink}_written", written)
        self._counters.inc(f"{self._sink}_skipped", len(batch) - written)

    def close(self) -> None:
        self._store.close()


def _open_online(c: FeatureSinkConfig):
    from stores.redis.features import OnlineFeatureStore

    store = OnlineFeatureStore.from_url(c.stores.redis_url, key_prefix=c.stores.redis_key_prefix,
                                        ttls=c.ttls, half_life_ms=c.half_life_ms)
    return store, store.write


def _open_durable(c: FeatureSinkConfig):
    from stores.cassandra.features import CassandraFeatureStore

    store = CassandraFeatureStore.connect(c.stores.cassandra_host, c.stores.cassandra_port,
                                          c.stores.cassandra_keyspace)
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
        return _CountedWrites(self.sink, store, write)


class _StoreSink(beam.PTransform):
    """``PCollection[FeatureValue]`` -> the store ``sink`` names, ``max_batch`` values a write."""

    sink = ""

    def __init__(self, config: FeatureSinkConfig, max_batch: int = DEFAULT_SINK_BATCH):
        super().__init__()
        self._apply = ApplyInBatches(_StoreWrites(self.sink, config), NAMESPACE, max_batch)

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


__all__ = ["FeatureSinkConfig", "WriteOnlineFeatures", "WriteDurableFeatures",
           "UpdateTopFollowers", "WriteFeatureLog", "log_shard", "NAMESPACE"]
