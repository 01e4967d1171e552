"""The features pipeline's store sinks on the batching sink, with fake stores (no servers)."""
from __future__ import annotations

from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline

from pipelines import features_sinks
from pipelines.features_sinks import (
    NAMESPACE,
    FeatureSinkConfig,
    UpdateTopFollowers,
    WriteOnlineFeatures,
)
from schemas.features import AFFINITY, POST, VIEWER_AUTHOR, FeatureValue

#: What the fake stores saw, by sink: the batches written, and whether they were closed.
SEEN: dict[str, list] = {}


class _FakeStore:
    def __init__(self, sink: str, skip: int):
        self.sink = sink
        self.skip = skip

    def write(self, batch) -> int:
        SEEN.setdefault(self.sink, []).append(list(batch))
        return len(batch) - min(self.skip, len(batch))

    def close(self) -> None:
        SEEN.setdefault(f"{self.sink}_closed", []).append(True)


@pytest.fixture
def fake_stores(monkeypatch):
    """Every sink opens a ``_FakeStore`` that reports one value per batch as skipped."""
    SEEN.clear()

    def opener(sink):
        def open_(config):
            store = _FakeStore(sink, skip=1)
            return store, store.write
        return open_

    monkeypatch.setattr(features_sinks, "_OPENERS",
                        {name: opener(name) for name in features_sinks._OPENERS})
    yield SEEN
    SEEN.clear()


def _values() -> list[FeatureValue]:
    posts = [FeatureValue(POST, str(p), "like_1h", 1.0, 1_000 + p, 1) for p in range(7)]
    pairs = [FeatureValue(VIEWER_AUTHOR, f"{v}:3", AFFINITY, 0.5, 2_000 + v, 1)
             for v in range(5)]
    return posts + pairs


def _counters(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        out[r.key.metric.name] = out.get(r.key.metric.name, 0) + r.committed
    return out


def test_online_sink_writes_every_value_in_batches_and_counts_what_it_skipped(fake_stores):
    values = _values()
    pipeline = BeamTestPipeline()
    _ = (pipeline | beam.Create(values)
         | "Write" >> WriteOnlineFeatures(FeatureSinkConfig(), max_batch=5))
    result = pipeline.run()
    result.wait_until_finish()
    batches = fake_stores["redis"]
    assert Counter(v for b in batches for v in b) == Counter(values)
    assert all(len(b) <= 5 for b in batches)
    assert fake_stores["redis_closed"]
    counters = _counters(result)
    assert counters["redis_written"] == len(values) - len(batches)
    assert counters["redis_skipped"] == len(batches)
    assert counters["elements"] == len(values)


def test_top_followers_sink_takes_viewer_author_values_only(fake_stores):
    values = _values()
    pipeline = BeamTestPipeline()
    _ = (pipeline | beam.Create(values)
         | "Update" >> UpdateTopFollowers(FeatureSinkConfig(), max_batch=1000))
    result = pipeline.run()
    result.wait_until_finish()
    written = [v for b in fake_stores["top_followers"] for v in b]
    assert Counter(written) == Counter(v for v in values if v.entity_type == VIEWER_AUTHOR)
    assert "redis" not in fake_stores and "cassandra" not in fake_stores
    assert _counters(result)["elements"] == len(written)



def test_the_inline_writer_sends_each_store_the_newest_values_and_logs_them_all(
        fake_stores, tmp_path):
    from schemas.features import FeatureColumns
    from pipelines.features_sinks import FeatureWriterConfig
    from stores.files.feature_log import read_feature_log

    older = FeatureValue(POST, "1", "like_1h", 1.0, 1_000, 1)
    values = [older] + _values()  # post 1's like_1h twice: at 1_000 and 1_001
    writer = FeatureWriterConfig(FeatureSinkConfig(), max_batch=4,
                                 log_dir=str(tmp_path / "log")).open()
    writer.write(FeatureColumns.of(values))
    newest = Counter(v for v in values if v is not older)
    assert Counter(v for b in fake_stores["redis"] for v in b) == newest
    assert Counter(v for b in fake_stores["cassandra"] for v in b) == newest
    assert all(len(b) <= 4 for b in fake_stores["redis"])
    assert Counter(v for b in fake_stores["top_followers"] for v in b) == \
        Counter(v for v in values if v.entity_type == VIEWER_AUTHOR)
    assert not (tmp_path / "log").exists()  # the log waits for flush_log
    writer.flush_log()
    assert read_feature_log(tmp_path / "log").num_rows == len(values)  # every value logged
    writer.close()
    assert fake_stores["redis_closed"] and fake_stores["cassandra_closed"]


def test_the_inline_writer_retries_a_transient_failure_whole(fake_stores, tmp_path):
    import redis

    from schemas.features import FeatureColumns
    from pipelines.features_sinks import FeatureWriterConfig
    from stores.retry import RetryPolicy

    calls = []
    original = _FakeStore.write

    def flaky(self, batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise redis.ConnectionError("down for a moment")
        return original(self, batch)

    _FakeStore.write = flaky
    try:
        writer = FeatureWriterConfig(FeatureSinkConfig(), sinks=("redis",),
                                     retry=RetryPolicy(3, 0.0, 0.0)).open()
        writer.write(FeatureColumns.of(_values()))
    finally:
        _FakeStore.write = original
    assert calls == [len(_values())] * 2
    assert Counter(v for b in fake_stores["redis"] for v in b) == Counter(_values())


class _FakeHealer:
    """``_Healer`` stand-in: records each check where the fake stores record their writes."""

    def __init__(self, seen: list):
        self.seen = seen
        self.closed = False

    def check(self) -> None:
        self.seen.append("check")

    def close(self) -> None:
        self.closed = True


def test_the_inline_writer_checks_redis_once_per_write_then_writes_cassandra_first(
        fake_stores, monkeypatch):
    from schemas.features import FeatureColumns
    from pipelines.features_sinks import FeatureWriterConfig

    order: list = []
    healers: list = []
    opened = features_sinks._OPENERS

    def recording(sink):
        def open_(config):
            store, write = opened[sink](config)
            return store, lambda batch: order.append(sink) or write(batch)
        return open_

    monkeypatch.setattr(features_sinks, "_OPENERS", {n: recording(n) for n in opened})
    monkeypatch.setattr(features_sinks, "_open_healer",
                        lambda config: healers.append(_FakeHealer(order)) or healers[-1]
                        if config.heal else None)
    writer = FeatureWriterConfig(FeatureSinkConfig(heal=True), max_batch=4).open()
    writer.write(FeatureColumns.of(_values()))
    writer.write(FeatureColumns.of(_values()[:2]))
    writer.close()
    # One healer (the writer's; the stores it opened do not check again), one check per
    # write before any store; Cassandra written before Redis, so whatever reached Redis
    # is in Cassandra when a restore reads it.
    assert len(healers) == 1 and healers[0].closed
    first, second = order[:order.index("check", 1)], order[order.index("check", 1):]
    assert first[0] == "check" and "check" not in first[1:]
    assert first[1:].index("redis") > max(i for i, s in enumerate(first[1:]) if s == "cassandra")
    assert second == ["check", "cassandra", "redis"]


def test_a_store_sink_with_heal_checks_redis_before_each_batch(fake_stores, monkeypatch):
    seen: list = []
    monkeypatch.setattr(features_sinks, "_open_healer",
                        lambda config: _FakeHealer(seen) if config.heal else None)
    applier = features_sinks._StoreWrites("redis", FeatureSinkConfig(heal=True)).open()
    applier.apply(_values()[:3])
    applier.apply(_values()[3:])
    assert seen == ["check", "check"] and len(fake_stores["redis"]) == 2
    durable = features_sinks._StoreWrites("cassandra", FeatureSinkConfig(heal=True)).open()
    durable.apply(_values())
    assert seen == ["check", "check"]  # Cassandra needs no check


def test_the_features_job_heals_redis_with_its_own_settings():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.features import FeaturesOptions
    from stores.config import StoreConfig

    opts = PipelineOptions(["--top_followers_keep=77"]).view_as(FeaturesOptions)
    config = opts.sink_config(StoreConfig())
    settings = config.restore_settings()
    assert config.heal
    assert (settings.feature_ttls, settings.half_life_ms, settings.top_followers_keep) == (
        config.ttls, config.half_life_ms, 77)
