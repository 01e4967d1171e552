"""The ranker's training set: impressions, labels, and features as of each impression.

    ts = build_training_set(engagements, posts, "out/features", TrainingSetConfig())
    ts.features  # float32 (rows, len(FEATURE_NAMES)), columns as the pipeline builds them
    ts.labels    # 1 = engaged within the label window after the impression

    ts = with_social_features(ts, engagements, posts, follows)  # + SOCIAL_FEATURES columns

Inputs are Arrow tables with the Avro field names (what ``feedbeam replay``
writes, or ``events_table`` builds from event records). Impressions, labels,
the point-in-time features and the columns needed: docs/training.md; the
social features, the split's censoring and the query groups: docs/ranking.md.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domain.social_features import SOCIAL_FEATURES, SocialParams, SocialState, label_propagation
from stores.files.feature_log import point_in_time_join
from domain.ranking_features import (
    AUTHOR_FEATURES,
    FEATURE_NAMES,
    MEDIA_TYPES,
    POST_FEATURES,
    feature_matrix,
)
from schemas.events import (
    EngagementEvent,
    EngagementKind,
    FollowEvent,
    FollowKind,
    PostEvent,
    PostEventKind,
)
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
FOLLOW_COLUMNS = ("event_id", "event_time", "kind", "follower_id", "followee_id")
_COLUMNS = {EngagementEvent: ENGAGEMENT_COLUMNS, PostEvent: POST_COLUMNS,
            FollowEvent: FOLLOW_COLUMNS}


@dataclasses.dataclass(frozen=True)
class TrainingSetConfig:
    """How impressions are labelled and features read (must match the online store's)."""

    label_window_ms: int = HOUR_MS
    half_life_ms: int = DEFAULT_HALF_LIFE_MS
    ttls: FeatureTTLs = FeatureTTLs()


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """One row per impression, sorted by impression time.

    ``features`` in ``feature_names`` order (``ranking_features.FEATURE_NAMES``
    unless extra columns were appended); ``labels`` 0/1; ``ts_ms`` impression
    time; ``viewer_id`` / ``post_id`` / ``author_id`` / ``created_at`` of the
    post seen (``created_at`` is the creation-time recency baseline's score);
    ``p_true`` the workload's true engagement probability of the impression
    (NaN when the input does not carry it: only generated workloads do).
    ``dropped``: impressions without post metadata; ``end_ms``: the time of the
    last engagement event of the input, the end of what labels can see.
    """

    features: np.ndarray
    labels: np.ndarray
    ts_ms: np.ndarray
    viewer_id: np.ndarray
    post_id: np.ndarray
    author_id: np.ndarray
    created_at: np.ndarray
    p_true: np.ndarray | None = None
    dropped: int = 0
    end_ms: int | None = None
    feature_names: tuple[str, ...] = FEATURE_NAMES
    #: The communities the social features were computed with (``with_social_features``).
    community: Mapping[int, int] | None = None

    def __post_init__(self):
        if self.p_true is None:
            object.__setattr__(self, "p_true", np.full(len(self.labels), np.nan))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, mask: np.ndarray) -> "TrainingSet":
        """The rows where ``mask`` is true (order kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[mask] for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)})

    def with_columns(self, names: Sequence[str], columns: np.ndarray) -> "TrainingSet":
        """The same rows with ``columns`` (rows x len(names)) appended to the features."""
        x = np.hstack([self.features, np.asarray(columns, dtype=np.float32)])
        return dataclasses.replace(self, features=x,
                                   feature_names=self.feature_names + tuple(names))

    def with_truth(self, viewer: np.ndarray, post: np.ndarray, p: np.ndarray
                   ) -> "TrainingSet":
        """``p_true`` filled from ``(viewer[i], post[i]) -> p[i]`` (other rows: NaN)."""
        out = _by_pair(self.viewer_id, self.post_id, np.asarray(viewer), np.asarray(post),
                       np.asarray(p, dtype=np.float64)[:, None])
        return dataclasses.replace(self, p_true=out[:, 0])


def _by_pair(viewer: np.ndarray, post: np.ndarray, known_viewer: np.ndarray,
             known_post: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The row of ``values`` whose (known_viewer, known_post) is each (viewer, post);
    NaN rows where none is."""
    index = {pair: i for i, pair in enumerate(zip(known_viewer.tolist(), known_post.tolist()))}
    at = np.array([index.get(pair, -1) for pair in zip(viewer.tolist(), post.tolist())],
                  dtype=np.int64)
    out = np.full((len(at), values.shape[1]), np.nan)
    hit = at >= 0
    out[hit] = values[at[hit]]
    return out


# --------------------------------------------------------------------------- inputs


def events_table(events: Iterable[object], kind: type) -> pa.Table:
    """Events of type ``kind`` (EngagementEvent, PostEvent or FollowEvent) as a table of
    its Avro fields (the others are skipped)."""
    columns = _COLUMNS[kind]
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
        author_id=author.to_numpy(), created_at=created_at, dropped=dropped,
        end_ms=_last_time(engagements))


def _last_time(engagements: pa.Table) -> int | None:
    if engagements.num_rows == 0:
        return None
    return int(pc.max(engagements.column("event_time")).as_py())


# --------------------------------------------------------------------------- social features


def communities(follows: pa.Table, before_ms: int, seed: int = 0) -> dict[int, int]:
    """``{user: community}`` of the follow graph as of ``before_ms`` (the edges followed
    and not unfollowed by then), by ``label_propagation``: a model of the graph trained
    offline, so training and serving read the same communities."""
    f = _dedup(follows.select(list(FOLLOW_COLUMNS)))
    f = f.filter(pc.less(f.column("event_time"), before_ms)).sort_by("event_time")
    edges: dict[tuple[int, int], bool] = {}
    for kind, a, b in zip(f.column("kind").to_pylist(), f.column("follower_id").to_pylist(),
                          f.column("followee_id").to_pylist()):
        edges[(a, b)] = kind == FollowKind.FOLLOW.value
    live = np.array([e for e, on in edges.items() if on], dtype=np.int64).reshape(-1, 2)
    return label_propagation(live[:, 0], live[:, 1], seed=seed)


def social_feature_columns(data: TrainingSet, engagements: pa.Table, posts: pa.Table,
                           follows: pa.Table, community: dict[int, int],
                           params: SocialParams = SocialParams()) -> np.ndarray:
    """``SOCIAL_FEATURES`` of every row of ``data``, as of its impression.

    Replays follows, post creations and engagements in event-time order
    through ``SocialState`` (ties: follows, then posts, then engagements in
    input order) and reads each impression's features just before its VIEW is
    applied, so no event at or after the impression counts.
    """
    e = _dedup(engagements.select(list(ENGAGEMENT_COLUMNS)))
    p = _dedup(posts.select(list(POST_COLUMNS)))
    p = p.filter(pc.equal(p.column("kind"), PostEventKind.CREATED.value))
    f = _dedup(follows.select(list(FOLLOW_COLUMNS)))
    e = e.filter(pc.is_valid(e.column("post_id")))
    kinds = e.column("kind").to_numpy(zero_copy_only=False)
    is_view = kinds == EngagementKind.VIEW.value
    engaging = np.isin(kinds, [k.value for k in ENGAGING_KINDS])
    # One stream: (time, source order, code, a, b, c).
    parts = [
        (f.column("event_time").to_numpy(), 0,
         np.where(f.column("kind").to_numpy(zero_copy_only=False)
                  == FollowKind.FOLLOW.value, 0, 1),
         f.column("follower_id").to_numpy(), f.column("followee_id").to_numpy(),
         np.zeros(f.num_rows, np.int64)),
        (p.column("event_time").to_numpy(), 1, np.full(p.num_rows, 2),
         p.column("post_id").to_numpy(), p.column("author_id").to_numpy(),
         np.zeros(p.num_rows, np.int64)),
        (e.column("event_time").to_numpy(), 2, np.where(is_view, 3, np.where(engaging, 4, 5)),
         e.column("viewer_id").to_numpy(), e.column("post_id").to_numpy(),
         e.column("author_id").to_numpy()),
    ]
    t = np.concatenate([x[0] for x in parts])
    source = np.concatenate([np.full(len(x[0]), x[1]) for x in parts])
    code, a, b, c = (np.concatenate([x[i] for x in parts]) for i in (2, 3, 4, 5))
    order = np.lexsort((np.arange(t.size), source, t))
    state = SocialState(params, community)
    wanted = set(zip(data.viewer_id.tolist(), data.post_id.tolist()))
    rows: dict[tuple[int, int], tuple[float, ...]] = {}
    for ti, ci, ai, bi, xi in zip(t[order].tolist(), code[order].tolist(), a[order].tolist(),
                                  b[order].tolist(), c[order].tolist()):
        if ci == 3:
            pair = (ai, bi)
            if pair in wanted and pair not in rows:
                rows[pair] = state.features(ai, bi, xi, ti)
            state.view(ai, bi, xi, ti)
        elif ci == 4:
            state.engage(ai, bi, xi, ti)
        elif ci == 2:
            state.post_created(ai, bi, ti)
        elif ci in (0, 1):
            state.follow(ai, bi, add=ci == 0)
    pairs = np.array(list(rows), dtype=np.int64).reshape(-1, 2)
    values = np.array(list(rows.values()), dtype=np.float64).reshape(-1, len(SOCIAL_FEATURES))
    return _by_pair(data.viewer_id, data.post_id, pairs[:, 0], pairs[:, 1], values)


def with_social_features(data: TrainingSet, engagements: pa.Table, posts: pa.Table,
                         follows: pa.Table, params: SocialParams = SocialParams()
                         ) -> TrainingSet:
    """``data`` with the ``SOCIAL_FEATURES`` columns appended; communities from the
    follow graph as of the first impression."""
    start = int(data.ts_ms.min()) if len(data) else 0
    community = communities(follows, start)
    columns = social_feature_columns(data, engagements, posts, follows, community, params)
    return dataclasses.replace(data.with_columns(SOCIAL_FEATURES, columns), community=community)


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


def label_window_closed(ts_ms: np.ndarray, label_window_ms: int, cutoff_ms: int
                        ) -> np.ndarray:
    """Rows whose whole label window ``[ts, ts + label_window]`` lies before ``cutoff_ms``:
    only their labels are known. Training (cutoff: the held-out period) and evaluation
    (cutoff: just after the data's last event) drop the other, censored, rows alike."""
    return ts_ms + label_window_ms < cutoff_ms


def time_split(ts_ms: np.ndarray, split_at_ms: int, label_window_ms: int,
               end_ms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` masks: train on impressions whose whole label window ends
    before ``split_at_ms`` (so training never sees an event of the held-out period),
    evaluate on impressions at or after it whose label window ends by ``end_ms`` (the
    last event of the data; None: keep every held-out row)."""
    train = label_window_closed(ts_ms, label_window_ms, split_at_ms)
    held_out = ts_ms >= split_at_ms
    if end_ms is not None:
        held_out &= label_window_closed(ts_ms, label_window_ms, end_ms + 1)
    return train, held_out


def query_groups(viewer_id: np.ndarray, ts_ms: np.ndarray, group_ms: int,
                 origin_ms: int | None = None, end_ms: int | None = None) -> np.ndarray:
    """NDCG query id of each impression: (viewer, ``group_ms`` period of the impression).

    Periods start at ``origin_ms`` (default: the first impression), so they start with
    the held-out period when given its start; a last period shorter than ``group_ms``
    (up to ``end_ms``, default the last impression) joins the one before it, so no
    group is a sliver weighted like a full period.
    """
    origin = int(ts_ms.min()) if origin_ms is None else int(origin_ms)
    end = int(ts_ms.max()) + 1 if end_ms is None else int(end_ms)
    full = max(1, (end - origin) // group_ms)
    period = np.minimum((ts_ms - origin) // group_ms, full - 1)
    return viewer_id.astype(np.int64) * full + period
