"""``jobs.train.evaluate``: the model beside both recency baselines and the oracle."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jobs.train import evaluate
from jobs.training_set import TrainingSet

HOUR = 3_600_000


def held_out(p_true=None):
    # Two viewers, four impressions each; the engaged post is the oldest by creation
    # time but was seen youngest (age at impression), so the two recencies disagree.
    viewer = np.repeat([1, 2], 4)
    ts = np.tile([10, 20, 30, 40], 2) * HOUR
    created = np.tile([0, 5, 6, 7], 2) * HOUR
    ts[[0, 4]] = created[[0, 4]] + 1  # the oldest post, seen a millisecond after creation
    labels = np.tile([1, 0, 0, 0], 2).astype(np.int8)
    return TrainingSet(
        features=np.zeros((8, 1), np.float32), labels=labels, ts_ms=ts, viewer_id=viewer,
        post_id=np.arange(8), author_id=np.ones(8, np.int64), created_at=created,
        p_true=p_true)


def test_age_baseline_and_oracle_are_reported_with_the_headroom():
    data = held_out(p_true=np.tile([0.9, 0.2, 0.1, 0.3], 2))
    model = np.tile([0.5, 0.6, 0.1, 0.1], 2)  # ranks the engaged post second
    ev = evaluate(model, data, prior=0.25, group_ms=1000 * HOUR)
    assert ev.rankers["recency"].ndcg == pytest.approx(1 / math.log2(5))  # last of four
    assert ev.rankers["age"].ndcg == 1.0 and ev.rankers["oracle"].ndcg == 1.0
    assert ev.best_baseline == "age" and ev.ndcg_gain < 0
    assert ev.ndcg == pytest.approx(1 / math.log2(3))
    r = ev.rankers["recency"].ndcg
    assert ev.headroom("recency") == pytest.approx((ev.ndcg - r) / (1 - r))
    assert math.isnan(ev.headroom("age"))  # the age baseline leaves no headroom
    m = ev.metrics()
    assert m["oracle_ndcg@20"] == 1.0 and m["age_baseline_ndcg@20"] == 1.0
    assert ev.groups == 2


def test_no_oracle_without_the_truth_of_every_row():
    p = np.tile([0.9, 0.2, 0.1, 0.3], 2)
    p[3] = np.nan
    ev = evaluate(np.zeros(8), held_out(p_true=p), prior=0.25, group_ms=1000 * HOUR)
    assert "oracle" not in ev.rankers and math.isnan(ev.headroom("recency"))
    assert "oracle_auc" not in ev.metrics()
