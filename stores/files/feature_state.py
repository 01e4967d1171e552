"""Snapshots of the features pipeline's aggregation state: Parquet tables, written atomically.

    store = SnapshotStore("out/feature_state/feedbeam-features")
    store.write(tables, meta={"offsets": {...}, "params": "..."})   # a new snapshot
    tables, meta = store.read()                                     # the latest, or None

A snapshot is a directory ``snapshot-<seq>`` holding one Parquet file per
table (columns as ``FeatureAggregator.export()`` gives them: 1-D NumPy
arrays, 2-D ones as fixed-size lists, ``bytes`` objects as binary) and
``meta.json``. It is written under a hidden name, synced, renamed into place,
and only then named by ``LATEST`` (replaced atomically), so a reader sees a
whole snapshot or the previous one, whatever moment a crash hits. Older
snapshots are removed after a new one is named. Design:
docs/pipelines/features.md, "Restarts".
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

LATEST = "LATEST"
_PREFIX = "snapshot-"
_META = "meta.json"
#: Snapshots kept besides the latest (a reader may still be reading one).
KEEP = 1


def _column(values: np.ndarray) -> pa.Array:
    if values.dtype == object:
        return pa.array(list(values), pa.binary())
    if values.ndim == 2:
        flat = pa.array(np.ascontiguousarray(values).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    return pa.array(values)


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    if pa.types.is_binary(column.type):
        out = np.empty(len(column), dtype=object)
        out[:] = column.to_pylist()
        return out
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    return column.to_numpy(zero_copy_only=False)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """The snapshots under ``root`` (see the module doc)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def latest_name(self) -> str | None:
        try:
            name = (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def write(self, tables: Mapping[str, Mapping[str, np.ndarray]],
              meta: Mapping[str, Any]) -> Path:
        """Write a new snapshot of ``tables`` with ``meta`` (JSON-able) and make it the
        latest; returns its directory."""
        self.root.mkdir(parents=True, exist_ok=True)
        latest = self.latest_name()
        seq = int(latest.removeprefix(_PREFIX)) + 1 if latest else 1
        name = f"{_PREFIX}{seq:012d}"
        tmp = self.root / f".{name}.{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for table, columns in tables.items():
                path = tmp / f"{table}.parquet"
                pq.write_table(pa.table({c: _column(np.asarray(v)) for c, v in columns.items()}),
                               path, compression="lz4")
                _fsync(path)
            meta_path = tmp / _META
            meta_path.write_text(json.dumps({**meta, "tables": sorted(tables)}, sort_keys=True))
            _fsync(meta_path)
            _fsync(tmp)
            final = self.root / name
            os.replace(tmp, final)
            pointer = self.root / f".{LATEST}.{uuid.uuid4().hex}"
            pointer.write_text(name)
            _fsync(pointer)
            os.replace(pointer, self.root / LATEST)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._remove_older(seq)
        return final

    def _remove_older(self, seq: int) -> None:
        for path in self.root.iterdir():
            if path.name.startswith(_PREFIX):
                if int(path.name.removeprefix(_PREFIX)) < seq - KEEP:
                    shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith((f".{_PREFIX}", f".{LATEST}.")):  # a crash's leftovers
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def read_meta(self) -> dict | None:
        """The latest snapshot's meta (None when there is no snapshot)."""
        name = self.latest_name()
        if name is None:
            return None
        return json.loads((self.root / name / _META).read_text())

    def read(self) -> tuple[dict[str, dict[str, np.ndarray]], dict] | None:
        """The latest snapshot's tables and meta (None when there is no snapshot)."""
        name = self.latest_name()
        if name is None:
            return None
        directory = self.root / name
        meta = json.loads((directory / _META).read_text())
        tables = {}
        for table in meta["tables"]:
            data = pq.read_table(directory / f"{table}.parquet")
            tables[table] = {c: _numpy(data.column(c)) for c in data.column_names}
        return tables, meta


__all__ = ["SnapshotStore", "LATEST"]
