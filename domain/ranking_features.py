"""The ranker's feature vector, defined once for training and for scoring.

``FEATURE_NAMES`` is the column order of every model. ``feature_matrix`` builds
it from feature columns, which ``feedbeam train`` gathers from the
point-in-time join over the offline feature log (``jobs.training_set``) and the
ranking pipeline from one online hydrate per user (``online_columns``), so a
model never sees a feature computed one way in training and another in
serving. The columns and their values when missing: docs/training.md.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES

FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"post_{n}" for n in POST_FEATURES)
    + tuple(f"author_{n}" for n in AUTHOR_FEATURES)
    + ("viewer_author_affinity", "viewer_media_affinity", "viewer_media_share", "post_age_min")
    + tuple(f"media_{m}" for m in MEDIA_TYPES))

_MINUTE_MS = 60_000.0


def feature_matrix(post: Mapping[str, np.ndarray], author: Mapping[str, np.ndarray],
                   author_affinity: np.ndarray, media_affinity: Mapping[str, np.ndarray],
                   media_type: np.ndarray, age_ms: np.ndarray) -> np.ndarray:
    """The ``(rows, len(FEATURE_NAMES))`` float32 matrix of ``rows`` candidates.

    ``post`` / ``author``: one float array per name of ``POST_FEATURES`` /
    ``AUTHOR_FEATURES`` (NaN where missing; a name absent from the mapping is
    all NaN); ``author_affinity``: the viewer's affinity to each row's author
    (NaN counts as 0); ``media_affinity``: per media type, the viewer's
    affinity to it on each row (absent or NaN counts as 0); ``media_type``:
    each row's media type (strings); ``age_ms``: time since the post's
    creation at ranking time.
    """
    n = len(media_type)
    out = np.full((n, len(FEATURE_NAMES)), np.nan, dtype=np.float32)
    col = 0
    for names, source in ((POST_FEATURES, post), (AUTHOR_FEATURES, author)):
        for name in names:
            values = source.get(name)
            if values is not None:
                out[:, col] = values
            col += 1
    media_type = np.asarray(media_type, dtype=object)
    is_media = {m: media_type == m for m in MEDIA_TYPES}  # once: object compares are slow
    zeros = np.zeros(n)
    per_media = {m: np.nan_to_num(np.asarray(media_affinity.get(m, zeros), dtype=np.float64))
                 for m in MEDIA_TYPES}
    mine = np.zeros(n)
    total = np.zeros(n)
    for m, values in per_media.items():
        is_m = is_media[m]
        mine[is_m] = values[is_m]
        total += values
    out[:, col] = np.nan_to_num(np.asarray(author_affinity, dtype=np.float64))
    out[:, col + 1] = mine
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, col + 2] = np.where(total > 0, mine / total, np.nan)
    out[:, col + 3] = np.asarray(age_ms, dtype=np.float64) / _MINUTE_MS
    col += 4
    for m in MEDIA_TYPES:
        out[:, col] = is_media[m]
        col += 1
    return out


def online_columns(post_features: Sequence[Mapping[str, float]],
                   author_features: Sequence[Mapping[str, float]]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Post and author feature dicts (one per row, as the online store returns them)
    as the columns ``feature_matrix`` takes (missing -> NaN)."""
    def columns(rows, names):
        return {name: np.fromiter((r.get(name, np.nan) for r in rows), dtype=np.float64,
                                  count=len(rows)) for name in names}

    return columns(post_features, POST_FEATURES), columns(author_features, AUTHOR_FEATURES)
