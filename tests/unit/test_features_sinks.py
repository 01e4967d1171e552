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

