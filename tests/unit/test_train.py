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
from domain.social_features import SOCIAL_FEATURES
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


def test_replay_features_counts_late_events_and_drops_too_late_ones_like_the_pipeline():
    post = PostEvent("p", T0, PostEventKind.CREATED, 100, 9, T0, MediaType.REEL)
    like = EngagementEvent("l", T0 + 2 * MIN, EngagementKind.LIKE, 7, 9, 100, MediaType.REEL)
    view = EngagementEvent("v", T0 + 11 * MIN, EngagementKind.VIEW, 8, 9, 100, MediaType.REEL,
                           5000)
    ancient = EngagementEvent("a", T0 + 3 * MIN, EngagementKind.LIKE, 6, 9, 100,
                              MediaType.REEL)
    far = EngagementEvent("x", T0 + 3 * 60 * MIN, EngagementKind.VIEW, 5, 9, 100,
                          MediaType.REEL, 100)
    def likes(events, **kw):
        return [(v.valid_at_ms, v.value) for v in replay_features(events, **kw)
                if v.entity_id == "100" and v.name == "like_1h"]

    # The like arrives after the view (late, within the allowed hour): it counts, as a
    # correction of the value its window end already had.
    assert likes([post, view, like]) == [(T0 + 5 * MIN, 0.0), (T0 + 5 * MIN, 1.0)]
    # With the source's out-of-orderness the watermark waits: the like is on time.
    assert likes([post, view, like], max_out_of_orderness_ms=15 * MIN) == [(T0 + 5 * MIN, 1.0)]
    # A like three hours behind the newest event is past the allowed lateness: dropped.
    values = list(replay_features([post, view, far, ancient]))
    assert not [v for v in values if v.entity_id == "100" and v.name == "like_1h" and v.value]
    assert not [v for v in values if v.entity_type == "viewer_author" and v.entity_id == "6:9"]


def test_trains_from_replayed_parquet(tmp_path, capsys):
    # The inputs as `feedbeam replay` writes them: hive partitions, extra columns,
    # and `_`-prefixed side files that are not events.
    import argparse

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from jobs.synthetic import synthetic_training_inputs

    args = argparse.Namespace(workload_seed=3, users=300, avg_following=20, days=2.0,
                              posts_per_day=2.0)
    inputs = synthetic_training_inputs(args, tmp_path / "features")
    engagements, posts = inputs.engagements, inputs.posts
    for name, table in (("eng", engagements), ("posts", posts)):
        table = table.append_column("_offset", pc.cast(table.column("event_time"), "int64"))
        half = table.num_rows // 2
        for i, part in enumerate((table.slice(0, half), table.slice(half))):
            path = tmp_path / name / f"date=2026-01-0{i + 1}" / "hour=00" / "part-0.parquet"
            path.parent.mkdir(parents=True)
            pq.write_table(part, path)
        (tmp_path / name / "_replay.json").write_text("{}")
    inputs = ["--feature-log", str(tmp_path / "features"), "--engagements",
              str(tmp_path / "eng"), "--posts", str(tmp_path / "posts")]
    assert cli.main(["train", *inputs, "--features", "social"]) == 2
    assert "--features social needs the follow graph" in capsys.readouterr().err
    code = cli.main(["train", *inputs, "--model-dir", str(tmp_path / "models"), "--no-promote"])
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


def test_trains_from_a_workload_file_building_its_feature_log(tmp_path, capsys):
    # A `generate --out` file with late events, and lines stripped of optional fields.
    path = tmp_path / "w.jsonl"
    assert cli.main(["generate", "--users", "300", "--avg-following", "20", "--duration", "2d",
                     "--posts-per-day", "2", "--celebrities", "0", "--stories-per-day", "0",
                     "--churn-per-day", "0", "--late-fraction", "0.05",
                     "--start", "2026-01-01T00:00Z", "--seed", "3", "--no-kafka",
                     "--out", str(path)]) == 0
    lines = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for optional in ("dwell_ms", "hashtags", "caption_length"):
            row["event"].pop(optional, None)
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = cli.main(["train", "--workload", str(path), "--features", "social",
                     "--model-dir", str(tmp_path / "models")])
    captured = capsys.readouterr()
    assert code == 0, captured.out  # social features: served, so promoted
    assert "building the feature log" in captured.err
    registry = ModelRegistry(tmp_path / "models")
    (version,) = registry.versions()
    meta = registry.metadata(version)
    assert registry.latest() == version
    assert meta.feature_names == FEATURE_NAMES + SOCIAL_FEATURES
    # Saved with the communities it was trained with, which serving groups affinities by.
    loaded = registry.load(version)
    assert len(loaded.community) > 250 and set(loaded.community.values()) == {0}  # planted: one label
    assert meta.rows["train"] > 1000 and meta.rows["censored_held_out"] > 0
    assert meta.metrics["auc"] > 0.6 and "age_baseline_ndcg@20" in meta.metrics


def test_realistic_synthetic_run_reports_the_oracle_and_headroom(tmp_path, capsys):
    code = cli.main(["train", "--synthetic", "--generator", "realistic", "--users", "300",
                     "--communities", "4", "--days", "2", "--avg-following", "20",
                     "--posts-per-day", "1", "--workload-seed", "2", "--no-promote",
                     "--model-dir", str(tmp_path / "models")])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    assert "oracle" in out and "headroom" in out
    registry = ModelRegistry(tmp_path / "models")
    m = registry.metadata(registry.versions()[0]).metrics
    assert m["oracle_auc"] > m["baseline_auc"] and m["oracle_ndcg@20"] > m["age_baseline_ndcg@20"]
    assert m["headroom_share"] == pytest.approx(
        (m["ndcg@20"] - m["baseline_ndcg@20"]) / (m["oracle_ndcg@20"] - m["baseline_ndcg@20"]))
