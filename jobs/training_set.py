"""The ranker's training set: impressions, labels, and features as of each impression.

    ts = build_training_set(engagements, posts, "out/features", TrainingSetConfig())
    ts.features  # float32 (rows, len(FEATURE_NAMES)), columns as the pipeline builds them
    ts.labels    # 1 = engaged within the label window after the impression

Inputs are Arrow tables with the Avro field names (what ``feedbeam replay``
writes, or ``events_table`` builds from event records). Impressions, labels,
the point-in-time features and the columns needed: docs/training.md.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stores.files.feature_log import point_in_time_join
from domain.ranking_features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES, feature_matrix
from schemas.events import EngagementEvent, EngagementKind, PostEvent, PostEventKind
from schemas.features import (
    AFFINITY,
    AUTHOR,
    DEFAULT_HALF_LIFE_MS,
    ENGAGING_KINDS,
    POST,
    VIEWER_AUTHOR,
    VIEWER_MEDIA,
    FeatureTTLs,
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

ENGAGEMENT_COLUMNS = ("event_id", "event_time", "kind", "viewer_id", "author_id", "post_id",
                      "media_type")
POST_COLUMNS = ("event_id", "event_time", "kind", "post_id", "author_id", "created_at",
                "media_type")


@dataclasses.dataclass(frozen=True)
class TrainingSetConfig:
    """How impressions are labelled and features read (must match the online store's)."""

    label_window_ms: int = HOUR_MS
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    ttls: FeatureTTLs = FeatureTTLs()


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """One row per impression, sorted by impression time.

    ``features`` in ``ranking_features.FEATURE_NAMES`` order; ``labels`` 0/1;
    ``ts_ms`` impression time; ``viewer_id`` / ``post_id`` / ``author_id`` /
    ``created_at`` of the post seen (``created_at`` is the recency
    baseline's score). ``dropped``: impressions without post metadata.
    """

    features: np.ndarray
    labels: np.ndarray
    ts_ms: np.ndarray
    viewer_id: np.ndarray
    post_id: np.ndarray
    author_id: np.ndarray
    created_at: np.ndarray
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, mask: np.ndarray) -> "TrainingSet":
        """The rows where ``mask`` is true (order kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[mask] for f in dataclasses.fields(self)
            if f.name != "dropped"})


# --------------------------------------------------------------------------- inputs


def events_table(events: Iterable[EngagementEvent | PostEvent], kind: type) -> pa.Table:
    """Events of type ``kind`` (EngagementEvent or PostEvent) as a table of its Avro fields."""
    columns = ENGAGEMENT_COLUMNS if kind is EngagementEvent else POST_COLUMNS
    rows = [e.to_avro() for e in events if isinstance(e, kind)]
    types = {"event_id": pa.string(), "kind": pa.string(), "media_type": pa.string()}
    return pa.table({c: pa.array([r[c] for r in rows], types.get(c, pa.int64()))
                     for c in columns})


def _dedup(table: pa.Table) -> pa.Table:
    """One row per ``event_id`` (the first)."""
    rows = pa.array(np.arange(table.num_rows))
    first = (table.select(["event_id"]).append_column("__row", rows)
             .group_by("event_id", use_threads=False).aggregate([("__row", "min")]))
    keep = np.sort(first.column("__row_min").to_numpy())
    return table.take(pa.array(keep))


def impressions_and_labels(engagements: pa.Table, label_window_ms: int) -> pa.Table:
    """Impressions (first VIEW per viewer and post) with their 0/1 ``label``.

    Columns: ``viewer_id, post_id, author_id, media_type, ts_ms, label``,
    sorted by (ts_ms, viewer_id, post_id).
    """
    e = _dedup(engagements.select(list(ENGAGEMENT_COLUMNS)))
    kind = e.column("kind")
    views = e.filter(pc.and_(pc.equal(kind, EngagementKind.VIEW.value),
                             pc.is_valid(e.column("post_id"))))
    viewer = views.column("viewer_id").to_numpy()
    post = views.column("post_id").to_numpy()
    ts = views.column("event_time").to_numpy()
    order = np.lexsort((ts, post, viewer))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (viewer[order][1:] != viewer[order][:-1]) | (post[order][1:] != post[order][:-1])
    picked = order[first]
    imp = pa.table({
        "viewer_id": pa.array(viewer[picked]), "post_id": pa.array(post[picked]),
        "author_id": views.column("author_id").take(pa.array(picked)).combine_chunks(),
        "media_type": views.column("media_type").take(pa.array(picked)).combine_chunks(),
        "ts_ms": pa.array(ts[picked]), "__row": pa.array(np.arange(len(picked))),
    })
    engaged = e.filter(pc.is_in(kind, value_set=pa.array([k.value for k in ENGAGING_KINDS])))
    engaged = engaged.select(["viewer_id", "post_id", "event_time"])
    hits = imp.select(["viewer_id", "post_id", "ts_ms", "__row"]).join(
        engaged, keys=["viewer_id", "post_id"], join_type="inner")
    lag = pc.subtract(hits.column("event_time"), hits.column("ts_ms"))
    within = pc.and_(pc.greater_equal(lag, 0), pc.less_equal(lag, label_window_ms))
    positive = np.unique(hits.filter(within).column("__row").to_numpy())
    label = np.zeros(imp.num_rows, dtype=np.int8)
    label[positive] = 1
    imp = imp.drop_columns(["__row"]).append_column("label", pa.array(label))
    return imp.sort_by([("ts_ms", "ascending"), ("viewer_id", "ascending"),
                        ("post_id", "ascending")])


def post_creations(posts: pa.Table) -> pa.Table:
    """``post_id, created_at, post_author, post_media`` of each created post (first CREATED)."""
    created = _dedup(posts.select(list(POST_COLUMNS)))
    created = created.filter(pc.equal(created.column("kind"), PostEventKind.CREATED.value))
    first = (created.append_column("__row", pa.array(np.arange(created.num_rows)))
             .group_by("post_id", use_threads=False).aggregate([("__row", "min")]))
    created = created.take(first.column("__row_min"))
    return pa.table({"post_id": created.column("post_id"),
                     "created_at": created.column("created_at"),
                     "post_author": created.column("author_id"),
                     "post_media": created.column("media_type")})


# --------------------------------------------------------------------------- features


def _ids(*parts: pa.Array) -> pa.Array:
    strings = [p if pa.types.is_string(p.type) else pc.cast(p, pa.string()) for p in parts]
    if len(strings) == 1:
        return strings[0]
    return pc.binary_join_element_wise(*strings, ":")


def _columns(joined: pa.Table, names: Sequence[str]) -> dict[str, np.ndarray]:
    return {n: joined.column(n).to_numpy(zero_copy_only=False).astype(np.float64)
            for n in names}


def build_training_set(engagements: pa.Table, posts: pa.Table, feature_log: str,
                       config: TrainingSetConfig = TrainingSetConfig()) -> TrainingSet:
    """Impressions with labels and point-in-time features (see the module docstring)."""
    imp = impressions_and_labels(engagements, config.label_window_ms)
    n_all = imp.num_rows
    imp = imp.join(post_creations(posts), keys="post_id", join_type="inner")
    imp = imp.sort_by([("ts_ms", "ascending"), ("viewer_id", "ascending"),
                       ("post_id", "ascending")])
    dropped = n_all - imp.num_rows
    # The post's own record is the truth about its author and media type.
    author = imp.column("post_author").combine_chunks()
    media = pc.coalesce(imp.column("post_media"), imp.column("media_type")).combine_chunks()
    viewer = imp.column("viewer_id").combine_chunks()
    asof = pc.subtract(imp.column("ts_ms"), 1).combine_chunks()
    ttl, hl = config.ttls, config.half_life_ms

    def join(entity_type, ids, names, ts=asof, **decay):
        return point_in_time_join(feature_log, pa.table({"entity_id": ids, "ts_ms": ts}),
                                  entity_type, names, **decay)

    post_cols = _columns(join(POST, _ids(imp.column("post_id").combine_chunks()),
                              POST_FEATURES, ttl_ms=ttl.post_ms), POST_FEATURES)
    author_cols = _columns(join(AUTHOR, _ids(author), AUTHOR_FEATURES, ttl_ms=ttl.author_ms),
                           AUTHOR_FEATURES)
    affinity = join(VIEWER_AUTHOR, _ids(viewer, author), [AFFINITY],
                    ttl_ms=ttl.viewer_author_ms, half_life_ms=hl).column(AFFINITY)
    n = imp.num_rows
    media_ids = pa.concat_arrays([_ids(viewer, pa.array([m] * n, pa.string()))
                                  for m in MEDIA_TYPES])
    media_aff = join(VIEWER_MEDIA, media_ids, [AFFINITY], ts=pa.concat_arrays([asof] * 4),
                     ttl_ms=ttl.viewer_media_ms, half_life_ms=hl).column(AFFINITY)
    media_aff = media_aff.to_numpy(zero_copy_only=False).astype(np.float64)
    per_media = {m: media_aff[i * n:(i + 1) * n] for i, m in enumerate(MEDIA_TYPES)}
    ts = imp.column("ts_ms").to_numpy()
    created_at = imp.column("created_at").to_numpy()
    x = feature_matrix(post_cols, author_cols,
                       affinity.to_numpy(zero_copy_only=False).astype(np.float64), per_media,
                       media.to_numpy(zero_copy_only=False), ts - created_at)
    return TrainingSet(
        features=x, labels=imp.column("label").to_numpy().astype(np.int8), ts_ms=ts,
        viewer_id=viewer.to_numpy(), post_id=imp.column("post_id").to_numpy(),
        author_id=author.to_numpy(), created_at=created_at, dropped=dropped)


# --------------------------------------------------------------------------- split


def default_split(ts_ms: np.ndarray, eval_days: float) -> int:
    """Start of the held-out period: ``eval_days`` before the last impression (rounded
    down to the hour), or the 75 % quantile of impression times when the data covers
    less than twice that."""
    if len(ts_ms) == 0:
        raise ValueError("no impressions")
    lo, hi = int(ts_ms.min()), int(ts_ms.max()) + 1
    span = int(eval_days * DAY_MS)
    if hi - lo >= 2 * span:
        return (hi - span) // HOUR_MS * HOUR_MS
    return int(np.quantile(ts_ms, 0.75))


def time_split(ts_ms: np.ndarray, split_at_ms: int, label_window_ms: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` masks: train on impressions whose whole label window ends
    before ``split_at_ms`` (so training never sees an event of the held-out period),
    evaluate on impressions at or after it."""
    return ts_ms + label_window_ms < split_at_ms, ts_ms >= split_at_ms


def query_groups(viewer_id: np.ndarray, ts_ms: np.ndarray, group_ms: int) -> np.ndarray:
    """NDCG query id of each impression: (viewer, ``group_ms`` period of the impression)."""
    period = ts_ms // group_ms
    return viewer_id.astype(np.int64) * (int(period.max() - period.min()) + 1) + (
        period - period.min())
