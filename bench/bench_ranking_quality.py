"""Ranking quality on the realistic workload: model vs recency vs oracle, several seeds.

    .venv/bin/python bench/bench_ranking_quality.py [--seeds 1,2,3] [--users 2000] [--days 4]
        [--out bench/results/ranking_quality] [--plot]

For each seed: generate the realistic workload (``jobs.realistic``), build its
feature log with the features pipeline's logic (``jobs.synthetic``), build
the training set once, then train and evaluate twice, on the base features
(what the ranking pipeline builds) and with the social features added
(``--features social``), exactly as ``feedbeam train --synthetic --generator
realistic`` does. Prints a Markdown table (docs/ranking.md holds the latest)
and writes ``results.json`` (and, with ``--plot``, ``ranking_quality.png``)
under ``--out``, which is git-ignored.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.realistic import RealisticConfig, RealisticWorkload  # noqa: E402
from jobs.synthetic import SYNTHETIC_START_MS, feature_log_from_events, training_inputs  # noqa: E402
from jobs.train import train_and_register  # noqa: E402
from jobs.training_set import build_training_set, with_social_features  # noqa: E402
from stores.files.models import ModelRegistry  # noqa: E402

K = 20


def run_seed(seed: int, args: argparse.Namespace, scratch: Path) -> list[dict]:
    started = time.perf_counter()
    workload = RealisticWorkload(RealisticConfig(
        start_ms=SYNTHETIC_START_MS, seed=seed, users=args.users, days=args.days,
        communities=args.communities, avg_following=args.avg_following,
        posts_per_user_day=args.posts_per_day))
    events = [e for _, _, e in workload.events()]
    log = scratch / f"features-{seed}"
    feature_log_from_events(events, log)
    inputs = training_inputs(events, workload.truth)
    base = build_training_set(inputs.engagements, inputs.posts, str(log))
    base = base.with_truth(*workload.truth)
    social = with_social_features(base, inputs.engagements, inputs.posts, inputs.follows)
    prepared = time.perf_counter() - started
    rows = []
    for name, data in (("base", base), ("social", social)):
        registry = ModelRegistry(scratch / f"models-{seed}-{name}")
        result = train_and_register(data, registry, k=K, promote=False, plot=False)
        ev = result.evaluation
        booster = registry.load(result.metadata.version).booster
        gain = booster.get_score(importance_type="total_gain")
        total = sum(gain.values()) or 1.0
        top = sorted(gain.items(), key=lambda kv: -kv[1])[:4]
        rows.append({
            "seed": seed, "features": name, "columns": len(data.feature_names),
            "train_rows": result.train_rows, "held_out_rows": ev.rows,
            "censored": ev.censored, "groups": ev.groups,
            "auc": ev.auc, "ndcg": ev.ndcg,
            "recency_auc": ev.rankers["recency"].auc, "recency_ndcg": ev.rankers["recency"].ndcg,
            "age_auc": ev.rankers["age"].auc, "age_ndcg": ev.rankers["age"].ndcg,
            "oracle_auc": ev.rankers["oracle"].auc, "oracle_ndcg": ev.rankers["oracle"].ndcg,
            "headroom_recency": ev.headroom("recency"), "headroom_age": ev.headroom("age"),
            "prepare_s": prepared, "train_s": result.seconds,
            "top_gain": [(feature, g / total) for feature, g in top],
        })
        print(f"seed {seed} {name}: AUC {ev.auc:.3f}, NDCG@{K} {ev.ndcg:.3f}, headroom "
              f"{ev.headroom('recency'):.1%} / {ev.headroom('age'):.1%}", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    head = (f"| seed | features | AUC | NDCG@{K} | recency (created) NDCG | recency (age) NDCG "
            f"| oracle AUC | oracle NDCG | headroom vs created | headroom vs age | held out |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['features']} | {r['auc']:.3f} | {r['ndcg']:.3f} "
            f"| {r['recency_ndcg']:.3f} | {r['age_ndcg']:.3f} | {r['oracle_auc']:.3f} "
            f"| {r['oracle_ndcg']:.3f} | {r['headroom_recency']:.0%} | {r['headroom_age']:.0%} "
            f"| {r['held_out_rows']:,} |")
    lines.append("")
    lines.append("Split gain, the four largest shares:")
    for r in rows:
        shares = ", ".join(f"`{f}` {g:.0%}" for f, g in r["top_gain"])
        lines.append(f"* seed {r['seed']}, {r['features']}: {shares}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.16
    series = [("recency (created)", "recency_ndcg", "base"), ("recency (age)", "age_ndcg", "base"),
              ("model, base features", "ndcg", "base"),
              ("model, + social features", "ndcg", "social"), ("oracle", "oracle_ndcg", "base")]
    for i, (label, key, features) in enumerate(series):
        values = [next(r[key] for r in rows if r["seed"] == s and r["features"] == features)
                  for s in seeds]
        ax.bar([x + (i - 2) * width for x in range(len(seeds))], values, width, label=label)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
    ax.set(ylabel=f"NDCG@{K}, held-out day", ylim=(0, 1),
           title="Realistic workload: rankers on the held-out day")
    ax.legend(fontsize="small", loc="upper left", ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--days", type=float, default=4.0)
    p.add_argument("--communities", type=int, default=10)
    p.add_argument("--avg-following", type=float, default=50.0)
    p.add_argument("--posts-per-day", type=float, default=1.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/ranking_quality"))
    p.add_argument("--plot", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ranking-quality-") as scratch:
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows += run_seed(seed, args, Path(scratch))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.out / "ranking_quality.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
