"""``feedbeam train`` end to end on a generated workload with planted preferences.

The workload (``jobs.workload``) makes engagement depend on the viewer's
affinity to the author, their content-type preference and the post's quality,
and not at all on the post's age; its feature log is what the features
pipeline's logic emits for it. So a model trained on the first days must rank
the held-out last day clearly better than reverse-chronological order. No
servers needed (a few tens of seconds).
"""
from __future__ import annotations

import json

import pytest

from jobs import cli
from jobs.synthetic import replay_features
from stores.files.models import ModelRegistry
from domain.ranking_features import FEATURE_NAMES
from schemas.events import EngagementEvent, EngagementKind, MediaType, PostEvent, PostEventKind

T0 = 1_767_225_600_000
MIN = 60_000


def test_trained_model_beats_recency_and_is_promoted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEEDBEAM_STATE_DIR", str(tmp_path / "state"))
    models = tmp_path / "models"
    code = cli.main(["train", "--synthetic", "--users", "800", "--days", "3",
                     "--avg-following", "30", "--feature-log", str(tmp_path / "features"),
                     "--model-dir", str(models), "--min-ndcg-gain", "0.05"])
    out = capsys.readouterr().out
    assert code == 0, out
    registry = ModelRegistry(models)
    version = registry.latest()
    assert version is not None and f"latest -> {version}" in out
    meta = registry.metadata(version)
    m = meta.metrics
    # The margin: planted preferences are learnable, recency is blind to them.
    assert m["ndcg@20"] - m["baseline_ndcg@20"] >= 0.05, m
    assert m["auc"] >= 0.65 and abs(m["baseline_auc"] - 0.5) < 0.05, m
    assert m["log_loss"] < m["prior_log_loss"], m
    assert meta.passed and meta.feature_names == FEATURE_NAMES
    assert meta.train_range_ms[1] <= meta.eval_range_ms[0]  # trained on earlier days only
    assert meta.library["xgboost"] and meta.rows["train"] > 10_000
    saved = json.loads((registry.version_dir(version) / "metadata.json").read_text())
    assert saved["version"] == version
    png = registry.version_dir(version) / "evaluation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_model_that_does_not_beat_the_baseline_is_not_promoted(tmp_path, capsys):
    code = cli.main(["train", "--synthetic", "--users", "300", "--days", "2",
                     "--avg-following", "20", "--model-dir", str(tmp_path / "models"),
                     "--min-ndcg-gain", "0.9"])
    out = capsys.readouterr().out
    assert code == 1 and "NOT promoted" in out
    registry = ModelRegistry(tmp_path / "models")
    assert registry.latest() is None and len(registry.versions()) == 1


def test_replay_features_emits_what_the_pipeline_would():
    post = PostEvent("p", T0, PostEventKind.CREATED, 100, 9, T0, MediaType.REEL)
    like = EngagementEvent("l", T0 + 2 * MIN, EngagementKind.LIKE, 7, 9, 100, MediaType.REEL)
    view = EngagementEvent("v", T0 + 11 * MIN, EngagementKind.VIEW, 8, 9, 100, MediaType.REEL,
                           5000)
    values = list(replay_features([post, like, like, view]))  # the repeated like counts once
    likes = [(v.valid_at_ms, v.value) for v in values
             if v.entity_id == "100" and v.name == "like_1h"]
    assert likes == [(T0 + 5 * MIN, 1.0)]  # at the first window end after it, then unchanged
    affinity = [v for v in values if v.entity_type == "viewer_author" and v.entity_id == "7:9"]
    assert affinity and affinity[0].valid_at_ms == T0 + 2 * MIN  # as of the like itself
    assert all(v.valid_at_ms <= T0 + 11 * MIN for v in values)  # nothing after the data
    with pytest.raises(ValueError):
        list(replay_features([view, like]))


def test_trains_from_replayed_parquet(tmp_path, capsys):
    # The inputs as `feedbeam replay` writes them: hive partitions, extra columns,
    # and `_`-prefixed side files that are not events.
    import argparse

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.synthetic import synthetic_training_inputs

    args = argparse.Namespace(workload_seed=3, users=300, avg_following=20, days=2.0,
                              posts_per_day=2.0)
    engagements, posts = synthetic_training_inputs(args, tmp_path / "features")
    for name, table in (("eng", engagements), ("posts", posts)):
        table = table.append_column("_offset", pc.cast(table.column("event_time"), "int64"))
        half = table.num_rows // 2
        for i, part in enumerate((table.slice(0, half), table.slice(half))):
            path = tmp_path / name / f"date=2026-01-0{i + 1}" / "hour=00" / "part-0.parquet"
            path.parent.mkdir(parents=True)
            pq.write_table(part, path)
        (tmp_path / name / "_replay.json").write_text("{}")
    code = cli.main(["train", "--feature-log", str(tmp_path / "features"),
                     "--engagements", str(tmp_path / "eng"), "--posts", str(tmp_path / "posts"),
                     "--model-dir", str(tmp_path / "models"), "--no-promote"])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    registry = ModelRegistry(tmp_path / "models")
    (version,) = registry.versions()
    rows = registry.metadata(version).rows
    assert rows["train"] + rows["held_out"] > 1000 and registry.latest() is None


def test_missing_inputs_are_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--feature-log", str(tmp_path), "--model-dir",
                     str(tmp_path / "m")]) == 2
    assert "--engagements and --posts" in capsys.readouterr().err
    assert cli.main(["train", "--feature-log", str(tmp_path / "nope"), "--engagements",
                     str(tmp_path / "e"), "--posts", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err
