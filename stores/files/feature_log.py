"""The offline feature log: every emitted feature value in Parquet, and point-in-time joins.

A pyarrow dataset under ``log_dir``, hive-partitioned by the value's
``valid_at_ms`` (``date=YYYY-MM-DD/hour=HH/part-<digest>.parquet``, UTC), with
the columns of ``LOG_SCHEMA``. Files are content-addressed and renamed into
place, and readers treat rows as a set, so a retried or replayed write changes
nothing (docs/architecture.md, "Stores"). ``point_in_time_join`` gives each
request row ``(entity_id, ts_ms)`` the newest value valid at ``ts_ms``.

    write_feature_log("out/features", values)         # FeatureValues
    write_feature_columns("out/features", columns)    # FeatureColumns (the pipeline's)
    point_in_time_join("out/features", pa.table({"entity_id": ["101"], "ts_ms": [t]}), "post")
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from stores.files.parquet import hive_dir, hour_of, write_table
from schemas.features import (ENTITY_TYPES, FEATURE_NAMES, FEATURES_BY_ENTITY, MEDIA_TYPES,
                              VIEWER_AUTHOR, VIEWER_MEDIA, FeatureColumns, FeatureValue)

LOG_SCHEMA = pa.schema([
    pa.field("entity_type", pa.string(), nullable=False),
    pa.field("entity_id", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("value", pa.float64(), nullable=False),
    pa.field("valid_at_ms", pa.int64(), nullable=False),
    pa.field("version", pa.int64(), nullable=False),
])
_PARTITIONING = ds.partitioning(
    pa.schema([("date", pa.string()), ("hour", pa.string())]), flavor="hive")
_SORT_KEYS = [("entity_type", "ascending"), ("entity_id", "ascending"), ("name", "ascending"),
              ("valid_at_ms", "ascending"), ("version", "ascending"), ("value", "ascending")]


# -- writing -------------------------------------------------------------------------


def feature_table(values: Sequence[FeatureValue]) -> pa.Table:
    """``values`` as a ``LOG_SCHEMA`` table (in the given order)."""
    return pa.table({
        "entity_type": pa.array([v.entity_type for v in values], pa.string()),
        "entity_id": pa.array([v.entity_id for v in values], pa.string()),
        "name": pa.array([v.name for v in values], pa.string()),
        "value": pa.array([float(v.value) for v in values], pa.float64()),
        "valid_at_ms": pa.array([v.valid_at_ms for v in values], pa.int64()),
        "version": pa.array([v.version for v in values], pa.int64()),
    }, schema=LOG_SCHEMA)


def _labels(codes: np.ndarray, labels: Sequence[str]) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)),
                                          pa.array(labels, pa.string())).cast(pa.string())


def columns_table(columns: FeatureColumns) -> pa.Table:
    """``columns`` as a ``LOG_SCHEMA`` table (in the given order), built column-wise."""
    entity = pc.cast(pa.array(columns.entity), pa.string())
    pair = np.isin(columns.entity_type, [ENTITY_TYPES.index(VIEWER_AUTHOR),
                                         ENTITY_TYPES.index(VIEWER_MEDIA)])
    if pair.any():
        media = columns.entity_type == ENTITY_TYPES.index(VIEWER_MEDIA)
        other = pc.if_else(pa.array(media),
                           _labels(np.where(media, columns.other, 0), MEDIA_TYPES),
                           pc.cast(pa.array(columns.other), pa.string()))
        entity = pc.if_else(pa.array(pair), pc.binary_join_element_wise(entity, other, ":"),
                            entity)
    return pa.table({
        "entity_type": _labels(columns.entity_type, ENTITY_TYPES),
        "entity_id": entity,
        "name": _labels(columns.name, FEATURE_NAMES),
        "value": pa.array(columns.value, pa.float64()),
        "valid_at_ms": pa.array(columns.valid_at_ms, pa.int64()),
        "version": pa.array(columns.version, pa.int64()),
    }, schema=LOG_SCHEMA)


def _digest(table: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]


def write_feature_log(log_dir: str | os.PathLike, values: Sequence[FeatureValue]) -> list[Path]:
    """Append ``values`` to the log: one file per hour of ``valid_at_ms`` they span.

    Returns the files written (their names depend only on their rows, so the
    same values give the same files).
    """
    if not values:
        return []
    return _write_hours(log_dir, feature_table(values))


def write_feature_columns(log_dir: str | os.PathLike, columns: FeatureColumns) -> list[Path]:
    """``write_feature_log`` for values as columns (the same files for the same rows)."""
    if not len(columns):
        return []
    return _write_hours(log_dir, columns_table(columns))


def _write_hours(log_dir: str | os.PathLike, table: pa.Table) -> list[Path]:
    root = Path(log_dir)
    hours = table.column("valid_at_ms").to_numpy() // (3600 * 1000)
    written: list[Path] = []
    for hour in np.unique(hours):
        part = table.filter(pa.array(hours == hour)).sort_by(_SORT_KEYS)
        path = root / hive_dir(int(hour)) / f"part-{_digest(part)}.parquet"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        write_table(part, tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


# -- reading -------------------------------------------------------------------------


def _dataset(log_dir: str | os.PathLike) -> ds.Dataset:
    root = Path(log_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"feature log directory {root} does not exist")
    return ds.dataset(root, format="parquet", partitioning=_PARTITIONING, schema=None)


def read_feature_log(log_dir: str | os.PathLike, entity_type: str | None = None,
                     names: Sequence[str] | None = None,
                     entity_ids: Sequence[str] | pa.Array | None = None,
                     max_valid_at_ms: int | None = None) -> pa.Table:
    """The log's rows (``LOG_SCHEMA`` columns), filtered, duplicates removed, sorted by
    entity_type, entity_id, name, valid_at_ms.

    Of the rows of one (entity, name, valid_at_ms) only the winner is kept:
    the highest version, then the greater value.
    """
    dataset = _dataset(log_dir)
    if not dataset.files:
        return LOG_SCHEMA.empty_table()
    cond = None

    def both(a, b):
        return b if a is None else a & b

    if entity_type is not None:
        cond = both(cond, ds.field("entity_type") == entity_type)
    if names is not None:
        cond = both(cond, ds.field("name").isin(list(names)))
    if entity_ids is not None:
        cond = both(cond, ds.field("entity_id").isin(pa.array(entity_ids, pa.string())))
    if max_valid_at_ms is not None:
        # The partition bound prunes whole directories; the row bound is exact.
        last_dir = hive_dir(hour_of(max_valid_at_ms))
        last_date = last_dir.split("/")[0].removeprefix("date=")
        cond = both(cond, (ds.field("date") <= last_date)
                    & (ds.field("valid_at_ms") <= max_valid_at_ms))
    table = dataset.to_table(columns=LOG_SCHEMA.names, filter=cond)
    table = table.cast(LOG_SCHEMA).sort_by(_SORT_KEYS)
    return table.filter(pa.array(_last_of_groups(table)))


def _last_of_groups(table: pa.Table) -> np.ndarray:
    """Mask of the last row of each (entity_type, entity_id, name, valid_at_ms) run of a
    sorted table."""
    n = table.num_rows
    last = np.ones(n, dtype=bool)
    if n < 2:
        return last
    same = np.ones(n - 1, dtype=bool)
    for column in ("entity_type", "entity_id", "name", "valid_at_ms"):
        col = table.column(column)
        same &= pc.equal(col.slice(0, n - 1), col.slice(1)).to_numpy(zero_copy_only=False)
    last[:-1] = ~same
    return last


def asof_indices(log_codes: np.ndarray, log_times: np.ndarray, req_codes: np.ndarray,
                 req_times: np.ndarray) -> np.ndarray:
    """For each request ``(code, time)``, the index of the last log row with the same code
    and ``log_time <= time`` (-1 when none).

    The log must be sorted by (code, time) (ties in any order: the last of them is
    taken). Times are ranked together so ``code * ranks + rank`` is one int64 key
    that sorts like the pair.
    """
    if len(log_codes) == 0 or len(req_codes) == 0:
        return np.full(len(req_codes), -1, dtype=np.int64)
    all_times = np.concatenate([log_times, req_times])
    ranks = np.unique(all_times, return_inverse=True)[1].astype(np.int64)
    width = np.int64(ranks.max() + 1)
    log_key = log_codes.astype(np.int64) * width + ranks[:len(log_times)]
    req_key = req_codes.astype(np.int64) * width + ranks[len(log_times):]
    idx = np.searchsorted(log_key, req_key, side="right") - 1
    found = idx >= 0
    found[found] &= log_codes[idx[found]] == req_codes[found]
    return np.where(found, idx, -1)


def point_in_time_join(log_dir: str | os.PathLike, requests: pa.Table, entity_type: str,
                       names: Sequence[str] | None = None, *,
                       half_life_ms: int | None = None,
                       ttl_ms: int | None = None) -> pa.Table:
    """``requests`` (same rows, same order) plus one float64 column per feature name: the
    newest value of that feature for the row's ``entity_id`` with ``valid_at_ms <=
    ts_ms``, null when there is none. Never a value valid after ``ts_ms``.

    ``requests`` needs ``entity_id`` (string) and ``ts_ms`` (int64, no nulls); other
    columns pass through. ``names`` defaults to every feature of ``entity_type``.
    Optional, to mirror what the online store would have answered at ``ts_ms``:
    ``ttl_ms`` nulls values older than that, ``half_life_ms`` decays values
    (affinities) from their ``valid_at_ms`` to ``ts_ms``.
    """
    if entity_type not in FEATURES_BY_ENTITY:
        raise ValueError(f"unknown entity type {entity_type!r}")
    names = list(FEATURES_BY_ENTITY[entity_type] if names is None else names)
    for column in ("entity_id", "ts_ms"):
        if column not in requests.column_names:
            raise ValueError(f"requests need a {column!r} column")
    clash = sorted(set(names) & set(requests.column_names))
    if clash:
        raise ValueError(f"requests already have columns named like features: {clash}")
    ts = requests.column("ts_ms").cast(pa.int64())
    if ts.null_count:
        raise ValueError("ts_ms must not be null")
    req_ids = requests.column("entity_id").cast(pa.string())
    req_times = ts.to_numpy()
    uniq = pc.unique(req_ids)
    req_codes = pc.index_in(req_ids, value_set=uniq).to_numpy(zero_copy_only=False)
    out = requests
    log = (read_feature_log(log_dir, entity_type, names, entity_ids=uniq,
                            max_valid_at_ms=int(req_times.max()))
           if requests.num_rows else LOG_SCHEMA.empty_table())
    for name in names:
        rows = log.filter(pc.equal(log.column("name"), name))
        # Sorted by entity_id then valid_at_ms (read_feature_log); re-sort by code.
        codes = pc.index_in(rows.column("entity_id"), value_set=uniq).to_numpy(
            zero_copy_only=False).astype(np.int64)
        times = rows.column("valid_at_ms").to_numpy()
        order = np.lexsort((times, codes))
        codes, times = codes[order], times[order]
        values = rows.column("value").to_numpy()[order]
        idx = asof_indices(codes, times, req_codes.astype(np.int64), req_times)
        hit = idx >= 0
        safe = np.maximum(idx, 0)
        picked = np.where(hit, values[safe], 0.0) if len(values) else np.zeros(len(idx))
        if hit.any() and (ttl_ms is not None or half_life_ms is not None):
            age = req_times - np.where(hit, times[safe], req_times)
            if ttl_ms is not None:
                hit &= age <= ttl_ms
            if half_life_ms is not None:
                picked = picked * np.exp2(-age / half_life_ms)
        out = out.append_column(pa.field(name, pa.float64()),
                                pa.array(picked, pa.float64(), mask=~hit))
    return out


__all__ = ["LOG_SCHEMA", "feature_table", "columns_table", "write_feature_log",
           "write_feature_columns", "read_feature_log",
           "point_in_time_join", "asof_indices"]
