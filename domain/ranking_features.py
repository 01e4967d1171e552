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
    creation at ranking time. The columns as blocks: ``feature_block``.
    """
    n = len(media_type)
    missing = np.full(n, np.nan)
    zeros = np.zeros(n)
    return feature_block(
        np.column_stack([post.get(name, missing) for name in POST_FEATURES]),
        np.column_stack([author.get(name, missing) for name in AUTHOR_FEATURES]),
        author_affinity,
        np.column_stack([media_affinity.get(m, zeros) for m in MEDIA_TYPES]),
        np.arange(n), media_codes(media_type), age_ms)


_MEDIA_CODE = {m: i for i, m in enumerate(MEDIA_TYPES)}
#: Row ``code`` of a media type's one-hot columns; the last row (code -1) is unknown.
_ONE_HOT = np.vstack([np.eye(len(MEDIA_TYPES), dtype=np.float32),
                      np.zeros((1, len(MEDIA_TYPES)), np.float32)])


def media_codes(media_type: Sequence[str]) -> np.ndarray:
    """Each media type's index in ``MEDIA_TYPES`` (-1: not one of them)."""
    code = _MEDIA_CODE.get
    return np.fromiter((code(m, -1) for m in media_type), np.int64, count=len(media_type))


def feature_block(post: np.ndarray, author: np.ndarray, author_affinity: np.ndarray,
                  media_affinity: np.ndarray, row_viewer: np.ndarray, media_code: np.ndarray,
                  age_ms: np.ndarray) -> np.ndarray:
    """``feature_matrix`` from blocks, the ranking's hot path: ``post`` ``(rows,
    len(POST_FEATURES))`` and ``author`` ``(rows, len(AUTHOR_FEATURES))`` (NaN:
    missing); ``media_affinity`` ``(viewers, len(MEDIA_TYPES))`` (NaN counts as
    0), ``row_viewer`` each row's index in it; ``media_code`` per row
    (``media_codes``). Whole blocks are copied and the media columns gathered
    by index, so the work per row is NumPy's. In two halves, for a caller that
    has the candidates' features before the viewers': ``candidate_columns``,
    then ``viewer_columns``, into ``empty_rows``."""
    out = empty_rows(len(media_code))
    candidate_columns(out, post, author, media_code, age_ms)
    viewer_columns(out, author_affinity, media_affinity, row_viewer, media_code)
    return out


def empty_rows(n: int) -> np.ndarray:
    """``n`` rows of ``FEATURE_NAMES`` to fill (uninitialized)."""
    return np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)


_AUTHOR_AT = len(POST_FEATURES)
_VIEWER_AT = _AUTHOR_AT + len(AUTHOR_FEATURES)  # then the 4 viewer/age columns, then media


def candidate_columns(out: np.ndarray, post: np.ndarray, author: np.ndarray,
                      media_code: np.ndarray, age_ms: np.ndarray, rows=slice(None)) -> None:
    """Fill ``out[rows]``'s columns of the candidate alone: its post's and author's
    features, its age and media type (``feature_block``'s arguments, for those rows)."""
    out[rows, :_AUTHOR_AT] = post
    out[rows, _AUTHOR_AT:_VIEWER_AT] = author
    out[rows, _VIEWER_AT + 3] = np.asarray(age_ms, dtype=np.float64) / _MINUTE_MS
    out[rows, _VIEWER_AT + 4:] = _ONE_HOT[media_code]


def viewer_columns(out: np.ndarray, author_affinity: np.ndarray, media_affinity: np.ndarray,
                   row_viewer: np.ndarray, media_code: np.ndarray) -> None:
    """Fill ``out``'s columns of the viewer's affinities (``feature_block``'s
    arguments)."""
    col, types = _VIEWER_AT, len(MEDIA_TYPES)
    # Per viewer and media type (a last column of 0.0 for an unknown type): the
    # affinity and its share, worked out once per viewer, then gathered per row.
    per_media = np.zeros((len(media_affinity), types + 1))
    per_media[:, :types] = np.nan_to_num(np.asarray(media_affinity, dtype=np.float64))
    total = np.zeros(len(per_media))
    for j in range(types):  # in order, as a sum over the types
        total += per_media[:, j]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total[:, None] > 0, per_media / total[:, None], np.nan)
    cell = np.asarray(row_viewer) * (types + 1) + np.where(media_code >= 0, media_code, types)
    block = np.empty((len(cell), 3))  # the three columns side by side: one write into out
    block[:, 0] = np.nan_to_num(np.asarray(author_affinity, dtype=np.float64))
    block[:, 1] = per_media.ravel()[cell]
    block[:, 2] = share.ravel()[cell]
    out[:, col:col + 3] = block


def online_columns(post_features: Sequence[Mapping[str, float]],
                   author_features: Sequence[Mapping[str, float]]
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Post and author feature dicts (one per row, as the online store returns them)
    as the columns ``feature_matrix`` takes (missing -> NaN)."""
    def columns(rows, names):
        return {name: np.fromiter((r.get(name, np.nan) for r in rows), dtype=np.float64,
                                  count=len(rows)) for name in names}

    return columns(post_features, POST_FEATURES), columns(author_features, AUTHOR_FEATURES)
