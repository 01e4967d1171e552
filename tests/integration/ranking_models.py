"""Tiny ranking models for tests: a booster that prefers one feature, promoted in a registry."""
from __future__ import annotations

import numpy as np

from stores.files.models import ModelMetadata, ModelRegistry
from domain.ranking_features import FEATURE_NAMES
from domain.social_features import SOCIAL_FEATURES


def promote_toy_model(registry: ModelRegistry, feature: str, sign: float = 1.0,
                      at_ms: int = 1_780_000_000_000, rounds: int = 8,
                      community: dict[int, int] | None = None) -> str:
    """Train a booster whose score rises (sign 1) or falls (sign -1) with ``feature``
    (values in [0, 1]), save it under ``registry`` as passed, promote it; returns the version.
    With ``community`` the model is trained on the social features too and saved with it."""
    import xgboost as xgb

    names = FEATURE_NAMES + (SOCIAL_FEATURES if community is not None else ())
    rng = np.random.default_rng(int(at_ms % 1000) + 1)
    x = rng.random((2000, len(names))).astype(np.float32)
    column = x[:, names.index(feature)]
    y = (sign * (column - 0.5) > 0).astype(np.float32)
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
                        xgb.DMatrix(x, y, feature_names=list(names)), rounds)

    def meta(version: str) -> ModelMetadata:
        return ModelMetadata(version=version, created_at_ms=at_ms, objective="binary:logistic",
                             feature_names=names, train_range_ms=(0, 1),
                             eval_range_ms=(1, 2), metrics={}, passed=True,
                             library={"xgboost": xgb.__version__}, gate="toy")

    version = registry.save(booster, meta, now_ms=at_ms, community=community).version
    registry.promote(version)
    return version
