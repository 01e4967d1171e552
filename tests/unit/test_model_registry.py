"""The model directory: versions, the ``latest`` pointer, and hot swaps in ``ModelWatcher``."""
from __future__ import annotations

import numpy as np
import pytest
import xgboost as xgb

from stores.files.models import (
    LATEST,
    ModelMetadata,
    ModelRegistry,
    ModelRegistryError,
    ModelWatcher,
    version_name,
)

FEATURES = ("a", "b")
T0 = 1_780_000_000_000


def booster(sign: float, rounds: int = 3) -> xgb.Booster:
    """A tiny model whose score rises (sign 1) or falls (sign -1) with feature a."""
    rng = np.random.default_rng(7)
    x = rng.random((200, 2)).astype(np.float32)
    y = (sign * (x[:, 0] - 0.5) > 0).astype(np.float32)
    return xgb.train({"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
                     xgb.DMatrix(x, y, feature_names=list(FEATURES)), rounds)


def meta(passed=True, features=FEATURES):
    def build(version):
        return ModelMetadata(version=version, created_at_ms=T0, objective="binary:logistic",
                             feature_names=tuple(features), train_range_ms=(0, 1),
                             eval_range_ms=(1, 2), metrics={"auc": 0.9}, passed=passed,
                             library={"xgboost": xgb.__version__}, gate="test")
    return build


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_save_promote_load_roundtrip(tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    assert reg.latest() is None and reg.versions() == []
    m = reg.save(booster(1), meta(), now_ms=T0)
    assert m.version.startswith("20260528T") and reg.versions() == [m.version]
    assert reg.latest() is None  # saving does not promote
    reg.promote(m.version)
    assert reg.latest() == m.version
    loaded = reg.load(m.version)
    assert loaded.metadata == m and loaded.metadata.feature_names == FEATURES
    x = np.array([[0.9, 0.5], [0.1, 0.5]], dtype=np.float32)
    scores = loaded.predict(x)
    assert scores[0] > scores[1]
    assert loaded.predict(np.zeros((0, 2), np.float32)).shape == (0,)
    # Nothing but the version and the pointer: no temporary files left behind.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [LATEST, "versions"]
    # The same model saved again in the same second is the same version.
    assert reg.save(booster(1), meta(), now_ms=T0).version == m.version
    assert len(reg.versions()) == 1


def test_a_model_that_failed_evaluation_is_never_promoted(tmp_path):
    reg = ModelRegistry(tmp_path)
    good = reg.save(booster(1), meta(), now_ms=T0)
    reg.promote(good.version)
    bad = reg.save(booster(-1), meta(passed=False), now_ms=T0 + 1000)
    with pytest.raises(ModelRegistryError, match="did not pass"):
        reg.promote(bad.version)
    assert reg.latest() == good.version and reg.versions() == [good.version, bad.version]


def test_version_names_sort_by_time():
    a = version_name(b"x", T0)
    b = version_name(b"a", T0 + 1000)
    assert a < b and a != version_name(b"y", T0)


def test_watcher_swaps_to_a_new_version_without_restart(tmp_path):
    reg = ModelRegistry(tmp_path)
    clock = Clock()
    watcher = ModelWatcher(reg, FEATURES, poll_s=10, clock=clock)
    assert watcher.current() is None  # nothing promoted: recency ranking
    first = reg.save(booster(1), meta(), now_ms=T0)
    reg.promote(first.version)
    assert watcher.current() is None  # not polled again yet
    clock.now = 10
    assert watcher.current().version == first.version
    x = np.array([[0.9, 0.5], [0.1, 0.5]], dtype=np.float32)
    assert np.argmax(watcher.current().predict(x)) == 0

    second = reg.save(booster(-1), meta(), now_ms=T0 + 1000)
    reg.promote(second.version)
    clock.now = 15
    assert watcher.current().version == first.version  # within the poll period
    clock.now = 20
    assert watcher.current().version == second.version
    assert np.argmax(watcher.current().predict(x)) == 1  # the new model's scores
    assert watcher.swaps == 2


def test_watcher_keeps_the_current_model_when_the_new_one_is_unusable(tmp_path):
    reg = ModelRegistry(tmp_path)
    clock = Clock()
    watcher = ModelWatcher(reg, FEATURES, poll_s=1, clock=clock)
    good = reg.save(booster(1), meta(), now_ms=T0)
    reg.promote(good.version)
    assert watcher.current().version == good.version

    other = reg.save(booster(-1), meta(features=("b", "a")), now_ms=T0 + 1000)
    reg.promote(other.version)
    clock.now = 1
    assert watcher.current().version == good.version and watcher.refusals == 1
    clock.now = 2
    assert watcher.current().version == good.version and watcher.refusals == 1  # refused once

    broken = reg.save(booster(1, rounds=4), meta(), now_ms=T0 + 2000)
    (reg.version_dir(broken.version) / "model.ubj").write_bytes(b"not a model")
    reg.promote(broken.version)
    clock.now = 3
    assert watcher.current().version == good.version and watcher.refusals == 2

    (tmp_path / LATEST).write_text("garbage\n")
    clock.now = 4
    assert watcher.current().version == good.version


def test_a_social_model_is_served_only_with_its_communities(tmp_path):
    reg = ModelRegistry(tmp_path)
    clock = Clock()
    watcher = ModelWatcher(reg, ("a",), poll_s=1, clock=clock, social=("b",))
    social = reg.save(booster(1), meta(), now_ms=T0, community={7: 1, 8: 0})
    reg.promote(social.version)
    loaded = watcher.current()
    assert loaded.version == social.version and loaded.community == {7: 1, 8: 0}

    # The social columns without communities, or communities on the base columns: refused.
    bare = reg.save(booster(-1), meta(), now_ms=T0 + 1000)
    reg.promote(bare.version)
    clock.now = 1
    assert watcher.current().version == social.version and watcher.refusals == 1
    odd = reg.save(booster(1, rounds=2), meta(features=("a",)), now_ms=T0 + 2000,
                   community={7: 1})
    reg.promote(odd.version)
    clock.now = 2
    assert watcher.current().version == social.version and watcher.refusals == 2

    # A watcher that builds no social columns refuses the social model.
    plain = ModelWatcher(ModelRegistry(tmp_path), FEATURES, poll_s=1, clock=Clock())
    reg.promote(social.version)
    assert plain.current() is None and plain.refusals == 1
