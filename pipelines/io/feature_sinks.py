"""Beam sinks of the features pipeline: Redis (online), Cassandra (durable), Parquet (log),
and the top-followers upkeep for the fan-out's celebrity push.

::

    features | 'WriteOnline' >> WriteOnlineFeatures(config)
    features | 'WriteDurable' >> WriteDurableFeatures(config)
    features | 'WriteLog' >> WriteFeatureLog("out/feature_log")
    features | 'TopFollowers' >> UpdateTopFollowers(config)

Each takes a ``PCollection[FeatureValue]`` and returns nothing of use (an
empty ``PCollection``). Store sinks keep only ``FeatureSinkConfig`` when
pickled, build their client in ``setup()``, buffer a bundle's values and write
them every ``max_batch`` values and in ``finish_bundle()`` (before the bundle
commits), close in ``teardown()``. A batch that fails with a transient error
(connection lost, timeout, Cassandra unavailable) is retried whole with
exponential backoff (every write is idempotent: newer-wins by write stamp);
after ``attempts`` the error fails the bundle and the runner retries it.
Counters in namespace ``feedbeam.features``: ``<sink>_written``,
``<sink>_skipped`` (older than what the store holds), ``<sink>_retries``,
``<sink>_failures``.

The log sink groups values per ``log_shards`` shard in the global window and
writes one content-addressed Parquet file per shard and hour every
``flush_s`` seconds of processing time (and at the end of a bounded run):
a bounded number of files, and nothing is ever dropped as late (see
``stores.files.feature_log`` for why rewrites and replays are idempotent).
"""
from __future__ import annotations

import dataclasses
import logging
import time
import zlib

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window

from domain.features import follower_scores
from schemas.features import DEFAULT_HALF_LIFE_MS, VIEWER_AUTHOR, FeatureTTLs, FeatureValue

log = logging.getLogger(__name__)

NAMESPACE = "feedbeam.features"


@dataclasses.dataclass(frozen=True)
class FeatureSinkConfig:
    """Where the stores are and how features are kept; pickled instead of clients."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "fb"
    cassandra_host: str = "127.0.0.1"
    cassandra_port: int = 9042
    cassandra_keyspace: str = "feedbeam"
    ttls: FeatureTTLs = FeatureTTLs()
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    top_followers_keep: int = 10_000


def _transient_errors() -> tuple[type[BaseException], ...]:
    import redis
    from cassandra import OperationTimedOut, ReadTimeout, Unavailable, WriteTimeout
    from cassandra.cluster import NoHostAvailable

    return (redis.ConnectionError, redis.TimeoutError, OperationTimedOut, ReadTimeout,
            WriteTimeout, Unavailable, NoHostAvailable)


class _BatchedSinkFn(beam.DoFn):
    """Buffers values, writes them with ``_write(batch) -> written`` (see module doc)."""

    sink = "sink"

    def __init__(self, config: FeatureSinkConfig, max_batch: int = 2000, attempts: int = 4,
                 backoff_s: float = 0.5):
        self._config = config
        self._max_batch = max_batch
        self._attempts = attempts
        self._backoff_s = backoff_s

    def _open(self):
        raise NotImplementedError

    def _write(self, batch: list[FeatureValue]) -> int:
        raise NotImplementedError

    def setup(self):
        self._store = self._open()
        self._transient = _transient_errors()
        self._written = Metrics.counter(NAMESPACE, f"{self.sink}_written")
        self._skipped = Metrics.counter(NAMESPACE, f"{self.sink}_skipped")
        self._retries = Metrics.counter(NAMESPACE, f"{self.sink}_retries")
        self._failures = Metrics.counter(NAMESPACE, f"{self.sink}_failures")

    def start_bundle(self):
        self._buffer: list[FeatureValue] = []

    def process(self, value: FeatureValue):
        self._buffer.append(value)
        if len(self._buffer) >= self._max_batch:
            self._flush()

    def finish_bundle(self):
        self._flush()

    def teardown(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()

    def _flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        delay = self._backoff_s
        for attempt in range(1, self._attempts + 1):
            try:
                written = self._write(batch)
                break
            except self._transient as exc:
                if attempt == self._attempts:
                    self._failures.inc()
                    raise
                self._retries.inc()
                log.warning("features %s: transient error (attempt %d/%d), retrying %d values "
                            "in %.1fs: %s", self.sink, attempt, self._attempts, len(batch),
                            delay, exc)
                time.sleep(delay)
                delay *= 2
        self._written.inc(written)
        self._skipped.inc(len(batch) - written)


class _OnlineFn(_BatchedSinkFn):
    sink = "redis"

    def _open(self):
        from stores.redis.features import OnlineFeatureStore

        c = self._config
        return OnlineFeatureStore.from_url(c.redis_url, key_prefix=c.redis_key_prefix,
                                           ttls=c.ttls, half_life_ms=c.half_life_ms)

    def _write(self, batch):
        return self._store.write(batch)


class _DurableFn(_BatchedSinkFn):
    sink = "cassandra"

    def _open(self):
        from stores.cassandra.features import CassandraFeatureStore

        c = self._config
        return CassandraFeatureStore.connect(c.cassandra_host, c.cassandra_port,
                                             c.cassandra_keyspace)

    def _write(self, batch):
        return self._store.write(batch)


class _TopFollowersFn(_BatchedSinkFn):
    sink = "top_followers"

    def _open(self):
        from stores.redis.feeds import RedisFeedStore

        c = self._config
        return RedisFeedStore.from_url(c.redis_url, key_prefix=c.redis_key_prefix)

    def process(self, value: FeatureValue):
        if value.entity_type == VIEWER_AUTHOR:
            super().process(value)

    def _write(self, batch):
        c = self._config
        return self._store.apply_follower_engagement(follower_scores(batch, c.half_life_ms),
                                                     keep=c.top_followers_keep)


class _StoreSink(beam.PTransform):
    """``PCollection[FeatureValue]`` -> one store, through a ``_BatchedSinkFn``."""

    _fn_class: type = _BatchedSinkFn

    def __init__(self, config: FeatureSinkConfig, max_batch: int = 2000):
        super().__init__()
        self._fn = self._fn_class(config, max_batch)

    def expand(self, values):
        return values | f"Write_{self._fn.sink}" >> beam.ParDo(self._fn)


class WriteOnlineFeatures(_StoreSink):
    """``PCollection[FeatureValue]`` -> the Redis online store (``OnlineFeatureStore``)."""

    _fn_class = _OnlineFn


class WriteDurableFeatures(_StoreSink):
    """``PCollection[FeatureValue]`` -> Cassandra (``CassandraFeatureStore``)."""

    _fn_class = _DurableFn


class UpdateTopFollowers(_StoreSink):
    """Viewer-author affinities -> ``RedisFeedStore.apply_follower_engagement``: each
    author's ``top_followers`` ranks viewers by ``engagement_rank`` of their affinity,
    newer-wins per viewer by the affinity's write stamp."""

    _fn_class = _TopFollowersFn


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
           "UpdateTopFollowers", "WriteFeatureLog", "follower_scores", "log_shard", "NAMESPACE"]
