"""Snapshots of the features aggregation: Parquet tables written atomically (no servers)."""
from __future__ import annotations

import numpy as np
import pytest

from stores.files.feature_state import LATEST, SnapshotStore


def _tables(k: int) -> dict:
    return {"cells": {"counts": np.arange(6 * k, dtype=np.int64).reshape(k, 6),
                      "alive": np.arange(k) % 2 == 0,
                      "score": np.linspace(0, 1, k)},
            "seen": {"id": np.array([f"e{i}".encode() for i in range(k)], dtype=object)}}


def test_a_snapshot_reads_back_the_same_columns_and_meta(tmp_path):
    store = SnapshotStore(tmp_path)
    assert store.read() is None and store.read_meta() is None
    store.write(_tables(5), {"offsets": [["t", 0, [[0, 9]]]], "fired": 7})
    tables, meta = store.read()
    assert meta["offsets"] == [["t", 0, [[0, 9]]]] and meta["fired"] == 7
    for table, columns in _tables(5).items():
        for name, column in columns.items():
            assert tables[table][name].shape == column.shape
            assert tables[table][name].tolist() == column.tolist(), (table, name)


def test_the_latest_is_named_only_when_whole_and_older_ones_go(tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)
    first = store.write(_tables(3), {"n": 1})
    second = store.write(_tables(4), {"n": 2})
    third = store.write(_tables(5), {"n": 3})
    assert (tmp_path / LATEST).read_text() == third.name
    assert not first.exists() and second.exists()  # one older kept for a reader

    import pyarrow.parquet as pq

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(OSError):
        store.write(_tables(6), {"n": 4})
    assert store.read_meta()["n"] == 3  # a failed write leaves the latest as it was
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_crash_before_the_snapshot_is_renamed_into_place_leaves_the_previous(
        tmp_path, monkeypatch):
    import stores.files.feature_state as module

    store = SnapshotStore(tmp_path)
    store.write(_tables(3), {"n": 1})
    real = module.os.replace

    def crash_once(src, dst):
        monkeypatch.setattr(module.os, "replace", real)
        raise OSError("killed")

    monkeypatch.setattr(module.os, "replace", crash_once)
    with pytest.raises(OSError):
        store.write(_tables(4), {"n": 2})
    tables, meta = store.read()
    assert meta["n"] == 1 and len(tables["seen"]["id"]) == 3
