"""Offline ranking metrics against brute-force definitions."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.ranking_metrics import auc, headroom_share, log_loss, ndcg_at, roc_curve


def brute_auc(y, s):
    pos = [b for a, b in zip(y, s) if a]
    neg = [b for a, b in zip(y, s) if not a]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_ndcg(y, s, g, k):
    values = []
    for group in sorted(set(g)):
        rows = [i for i in range(len(y)) if g[i] == group]
        labels = [y[i] for i in rows]
        if not 0 < sum(labels) < len(labels):
            continue
        ranked = sorted(rows, key=lambda i: (-s[i], i))
        dcg = sum(y[i] / math.log2(p + 2) for p, i in enumerate(ranked[:k]))
        ideal = sorted(labels, reverse=True)
        idcg = sum(v / math.log2(p + 2) for p, v in enumerate(ideal[:k]))
        values.append(dcg / idcg)
    return sum(values) / len(values) if values else float("nan")


data = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.integers(0, 5).map(float), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(data)
def test_auc_matches_pairwise_definition(d):
    y, s, _ = d
    if 0 < sum(y) < len(y):
        assert auc(np.array(y), np.array(s)) == pytest.approx(brute_auc(y, s))
    else:
        assert math.isnan(auc(np.array(y), np.array(s)))


@settings(max_examples=200, deadline=None)
@given(data, st.integers(1, 6))
def test_ndcg_matches_brute_force(d, k):
    y, s, g = d
    got = ndcg_at(np.array(y), np.array(s), np.array(g), ks=(k,))[k]
    want = brute_ndcg(y, s, g, k)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_perfect_and_reversed_rankings():
    y = np.array([1, 0, 0, 1, 0, 0])
    g = np.array([0, 0, 0, 1, 1, 1])
    assert ndcg_at(y, y.astype(float), g, ks=(20,))[20] == pytest.approx(1.0)
    worst = ndcg_at(y, -y.astype(float), g, ks=(1, 20))
    assert worst[1] == 0.0 and worst[20] == pytest.approx(1 / math.log2(4))
    assert auc(y, y) == 1.0 and auc(y, -y) == 0.0


def test_log_loss_and_roc():
    y = np.array([1, 0])
    assert log_loss(y, np.array([0.5, 0.5])) == pytest.approx(math.log(2))
    assert log_loss(y, np.array([1.0, 0.0])) < 1e-12  # clipped, finite
    fpr, tpr = roc_curve(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
    assert list(fpr) == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert list(tpr) == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_headroom_share_is_the_share_of_the_baseline_to_oracle_gap():
    assert headroom_share(0.6, 0.4, 0.8) == pytest.approx(0.5)
    assert headroom_share(0.8, 0.4, 0.8) == pytest.approx(1.0)
    assert headroom_share(0.3, 0.4, 0.8) == pytest.approx(-0.25)  # worse than the baseline
    assert math.isnan(headroom_share(0.5, 0.4, 0.4))              # no gap to share
