"""Offline metrics of a ranker: AUC, log loss, NDCG@k, ROC; plain numpy, vectorized.

    auc(labels, scores)                       # P(score of a positive > score of a negative)
    log_loss(labels, probabilities)
    ndcg_at(labels, scores, groups, ks=(20,)) # mean NDCG@k over query groups
    headroom_share(model, baseline, oracle)   # share of the baseline-to-oracle gap closed

NDCG uses binary relevance (engaged or not) and the usual discount
``1 / log2(position + 2)``. Only groups with at least one positive and one
negative are averaged: in the others every order scores the same (0/0 or 1),
so they would only pull both rankers towards a constant. Ties in ``scores``
are broken by ``tiebreak`` (default: row order), the same way for every
ranker, so a ranker gets no credit for ties falling its way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_EPS = 1e-15


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN for one class."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos = int(labels.sum())
    neg = labels.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average ranks (1-based) of tied runs.
    ranks = np.empty(scores.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-15, 1 - 1e-15]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1 - _EPS)
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(false positive rate, true positive rate)`` at every distinct threshold."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    y = labels[order]
    s = scores[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), y.size - 1]
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def _group_positions(groups: np.ndarray, primary: np.ndarray, tiebreak: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Order of rows by (group, primary descending, tiebreak) and each row's 0-based
    position within its group in that order."""
    order = np.lexsort((tiebreak, -primary, groups))
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, g.size])
    position = np.arange(g.size) - np.repeat(starts, sizes)
    return order, position


def ndcg_at(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
            ks: Sequence[int] = (20,), tiebreak: np.ndarray | None = None
            ) -> dict[int, float]:
    """Mean NDCG@k over the groups with a positive and a negative, for each k in ``ks``.

    ``groups``: an integer query id per row (e.g. viewer and day). Returns
    ``{k: mean}`` (NaN when no group qualifies).
    """
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    tb = np.arange(y.size) if tiebreak is None else np.asarray(tiebreak)
    if y.size == 0:
        return {k: float("nan") for k in ks}
    _, gid = np.unique(g, return_inverse=True)
    n_groups = int(gid.max()) + 1
    pos_count = np.bincount(gid, weights=y, minlength=n_groups)
    size = np.bincount(gid, minlength=n_groups)
    keep = (pos_count > 0) & (pos_count < size)
    if not keep.any():
        return {k: float("nan") for k in ks}
    order, position = _group_positions(gid, s, tb)
    ideal_order, ideal_position = _group_positions(gid, y, tb)
    discount = 1.0 / np.log2(position + 2.0)
    ideal_discount = 1.0 / np.log2(ideal_position + 2.0)
    out = {}
    for k in ks:
        dcg = np.bincount(gid[order], weights=y[order] * discount * (position < k),
                          minlength=n_groups)
        idcg = np.bincount(gid[ideal_order],
                           weights=y[ideal_order] * ideal_discount * (ideal_position < k),
                           minlength=n_groups)
        out[k] = float(np.mean(dcg[keep] / idcg[keep]))
    return out


def headroom_share(model: float, baseline: float, oracle: float) -> float:
    """Share of the gap from ``baseline`` to ``oracle`` that ``model`` closes (1.0: as
    good as the oracle, 0.0: no better than the baseline, negative: worse); NaN when
    the oracle does not beat the baseline (no headroom to share)."""
    gap = oracle - baseline
    if not gap > 0:
        return float("nan")
    return (model - baseline) / gap
