"""The offline feature log: deterministic files, dedup at read, and point-in-time joins."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stores.files.feature_log import (
    LOG_SCHEMA,
    asof_indices,
    point_in_time_join,
    read_feature_log,
    write_feature_log,
)
from schemas.features import AFFINITY, POST, VIEWER_AUTHOR, FeatureValue

T0 = 1_700_000_000_000
HOUR = 3_600_000


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_files_are_hive_partitioned_by_valid_at_and_named_by_content(tmp_path):
    values = [FeatureValue(POST, "1", "like_1h", 2.0, T0),
              FeatureValue(POST, "1", "like_1h", 3.0, T0 + HOUR)]
    first = write_feature_log(tmp_path / "a", values)
    again = write_feature_log(tmp_path / "b", list(reversed(values)))
    assert [p.relative_to(tmp_path / "a") for p in first] == \
        [p.relative_to(tmp_path / "b") for p in again]
    names = _files(tmp_path / "a")
    assert [n.split("/")[:2] for n in names] == [["date=2023-11-14", "hour=22"],
                                                ["date=2023-11-14", "hour=23"]]
    for a, b in zip(first, again):
        assert a.read_bytes() == b.read_bytes()
    table = pq.read_table(first[0])
    assert table.schema.names == LOG_SCHEMA.names
    assert table.column("value").to_pylist() == [2.0]


def test_a_rewritten_batch_replaces_its_own_file(tmp_path):
    values = [FeatureValue(POST, str(i), "view_1h", float(i), T0) for i in range(5)]
    write_feature_log(tmp_path, values)
    write_feature_log(tmp_path, values)
    assert len(_files(tmp_path)) == 1
    assert read_feature_log(tmp_path).num_rows == 5


def test_read_keeps_one_row_per_value_highest_version_wins(tmp_path):
    # A replay that batched differently: overlapping files.
    a = FeatureValue(POST, "1", "like_1h", 2.0, T0, version=0)
    late = FeatureValue(POST, "1", "like_1h", 3.0, T0, version=1)
    write_feature_log(tmp_path, [a, late])
    write_feature_log(tmp_path, [late])
    write_feature_log(tmp_path, [a])
    table = read_feature_log(tmp_path)
    assert table.to_pylist() == [{"entity_type": POST, "entity_id": "1", "name": "like_1h",
                                  "value": 3.0, "valid_at_ms": T0, "version": 1}]


def test_join_takes_the_newest_value_at_or_before_ts_and_keeps_row_order(tmp_path):
    write_feature_log(tmp_path, [
        FeatureValue(POST, "1", "like_1h", 1.0, T0),
        FeatureValue(POST, "1", "like_1h", 5.0, T0 + HOUR),
        FeatureValue(POST, "2", "like_1h", 7.0, T0 + 10),
        FeatureValue(POST, "1", "view_1h", 9.0, T0 + 2 * HOUR),
    ])
    requests = pa.table({"entity_id": ["1", "1", "1", "2", "3", "2"],
                         "ts_ms": [T0 + HOUR, T0 + HOUR - 1, T0 - 1, T0 + 10, T0, T0 + 9],
                         "label": [1, 0, 1, 0, 1, 0]})
    out = point_in_time_join(tmp_path, requests, POST, names=["like_1h", "view_1h"])
    assert out.column("label").to_pylist() == [1, 0, 1, 0, 1, 0]
    assert out.column("like_1h").to_pylist() == [5.0, 1.0, None, 7.0, None, None]
    assert out.column("view_1h").to_pylist() == [None] * 6


def test_join_options_mirror_the_online_read(tmp_path):
    write_feature_log(tmp_path, [FeatureValue(VIEWER_AUTHOR, "7:45", AFFINITY, 8.0, T0)])
    requests = pa.table({"entity_id": ["7:45", "7:45"], "ts_ms": [T0 + 2 * HOUR, T0 + 10 * HOUR]})
    out = point_in_time_join(tmp_path, requests, VIEWER_AUTHOR, half_life_ms=2 * HOUR,
                             ttl_ms=5 * HOUR)
    assert out.column(AFFINITY).to_pylist() == [4.0, None]


def test_join_rejects_bad_requests(tmp_path):
    write_feature_log(tmp_path, [FeatureValue(POST, "1", "like_1h", 1.0, T0)])
    with pytest.raises(ValueError, match="ts_ms"):
        point_in_time_join(tmp_path, pa.table({"entity_id": ["1"]}), POST)
    with pytest.raises(ValueError, match="like_1h"):
        point_in_time_join(tmp_path, pa.table({"entity_id": ["1"], "ts_ms": [T0],
                                               "like_1h": [0.0]}), POST)
    with pytest.raises(FileNotFoundError):
        point_in_time_join(tmp_path / "missing", pa.table({"entity_id": ["1"], "ts_ms": [T0]}),
                           POST)


def test_join_on_an_empty_log_gives_nulls(tmp_path):
    out = point_in_time_join(tmp_path, pa.table({"entity_id": ["1"], "ts_ms": [T0]}), POST,
                             names=["like_1h"])
    assert out.column("like_1h").to_pylist() == [None]


def test_asof_indices_respects_codes():
    codes = np.array([0, 0, 1, 1])
    times = np.array([10, 20, 5, 30])
    idx = asof_indices(codes, times, np.array([0, 0, 1, 1, 2]), np.array([15, 5, 29, 30, 100]))
    assert idx.tolist() == [0, -1, 2, 3, -1]


# -- property: never a future value -----------------------------------------------------

_ENTITIES = ["1", "2", "3"]
_log_rows = st.lists(
    st.tuples(st.sampled_from(_ENTITIES), st.sampled_from(["like_1h", "view_1h"]),
              st.integers(0, 3 * HOUR), st.integers(0, 2)),
    max_size=40)
_requests = st.lists(st.tuples(st.sampled_from(_ENTITIES + ["9"]), st.integers(-10, 3 * HOUR + 10)),
                     min_size=1, max_size=20)
_batching = st.integers(1, 5)


@settings(max_examples=150, deadline=None)
@given(rows=_log_rows, requests=_requests, batch=_batching)
def test_join_never_returns_a_value_valid_after_the_request(rows, requests, batch):
    # Each value encodes the row it came from, so the answer can be traced back.
    values = [FeatureValue(POST, e, n, float(i), T0 + t, version=v)
              for i, (e, n, t, v) in enumerate(rows)]
    root = Path(tempfile.mkdtemp())
    try:
        for start in range(0, len(values), batch):  # several files, overlapping hours
            write_feature_log(root, values[start:start + batch])
        write_feature_log(root, values[::2])  # a replay writing some rows again
        table = pa.table({"entity_id": [e for e, _ in requests],
                          "ts_ms": [T0 + t for _, t in requests]})
        out = point_in_time_join(root, table, POST, names=["like_1h", "view_1h"])
    finally:
        shutil.rmtree(root)
    for name in ("like_1h", "view_1h"):
        for (entity, t), got in zip(requests, out.column(name).to_pylist()):
            ts = T0 + t
            candidates = [v for v in values
                          if v.entity_id == entity and v.name == name and v.valid_at_ms <= ts]
            if not candidates:
                assert got is None
                continue
            assert got is not None
            chosen = values[int(got)]
            assert chosen.valid_at_ms <= ts, "a value valid after the request leaked"
            best = max(candidates, key=lambda v: (v.valid_at_ms, v.version, v.value))
            assert chosen == best


def _mixed_values() -> list[FeatureValue]:
    return [FeatureValue(POST, "12", "like_1h", 2.0, T0, 3),
            FeatureValue("author", "7", "posts_7d", 1.0, T0 + HOUR, 1),
            FeatureValue(VIEWER_AUTHOR, "5:7", AFFINITY, 0.25, T0 + 2 * HOUR, 4),
            FeatureValue("viewer_media", "5:VIDEO", AFFINITY, 1.5, T0, 2),
            FeatureValue(POST, "3", "engagement_rate_24h", 0.5, T0 + HOUR, 0)]


def test_columns_are_logged_as_the_same_rows_and_files_as_values(tmp_path):
    from schemas.features import FeatureColumns
    from stores.files.feature_log import columns_table, feature_table, write_feature_columns

    values = _mixed_values()
    columns = FeatureColumns.of(values)
    assert columns_table(columns).equals(feature_table(values))
    by_values = write_feature_log(tmp_path / "a", values)
    by_columns = write_feature_columns(tmp_path / "b", columns)
    assert [p.relative_to(tmp_path / "a") for p in by_values] == \
        [p.relative_to(tmp_path / "b") for p in by_columns]
    for a, b in zip(by_values, by_columns):
        assert a.read_bytes() == b.read_bytes()
