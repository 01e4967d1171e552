"""``feedbeam train``: train the feed ranker, evaluate it against recency, save a version.

    feedbeam train --feature-log out/features --engagements out/eng --posts out/posts
    feedbeam train --workload workload.jsonl --model-dir models/   # builds the feature log
    feedbeam train --synthetic --users 3000 --days 4 --feature-log /tmp/fl   # self-contained
    feedbeam train --synthetic --generator realistic --features social --workload-seed 1

Builds the training set (``jobs.training_set``), splits it by time, trains
XGBoost ``binary:logistic``, reports AUC, log loss and NDCG@k beside two
recency baselines (creation time, age at impression) and, for a generated
workload that knows it, the oracle ranking by the true engagement
probability (and a PNG), saves a version in the model directory
(``stores.files.models``) and promotes it if it beat the better baseline.
Exit status 0 promoted, 1 saved but not promoted, 2 bad input. The steps and
the choice of objective: docs/training.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from infra.settings import StackSettings
from infra.errors import UserFacingError
from jobs.ranking_metrics import auc, headroom_share, log_loss, ndcg_at, roc_curve
from jobs.training_set import (
    DAY_MS,
    HOUR_MS,
    TrainingSet,
    TrainingSetConfig,
    build_training_set,
    default_split,
    query_groups,
    time_split,
    with_social_features,
)
from stores.files.models import ModelMetadata, ModelRegistry
from domain.ranking_features import FEATURE_NAMES
from domain.social_features import SOCIAL_FEATURES

OBJECTIVE = "binary:logistic"
PLOT_FILE = "evaluation.png"


@dataclasses.dataclass(frozen=True)
class BoosterConfig:
    """XGBoost settings (``hist`` trees; early stopping on the latest training rows).

    Shallow trees and a large step by default: scoring cost grows with trees x
    depth, and the pipeline scores every candidate of every refresh. On the
    generated workload, depth 4 / eta 0.3 stops at ~30 trees with the held-out
    AUC and NDCG@20 of depth 6 / eta 0.1 (~45 trees) within 0.001, and scores
    about 4x as many candidates per second.
    """

    rounds: int = 300
    max_depth: int = 4
    eta: float = 0.3
    min_child_weight: float = 5.0
    subsample: float = 0.8
    colsample_bytree: float = 0.9
    early_stopping_rounds: int = 10
    validation_fraction: float = 0.1
    nthread: int = 0
    seed: int = 0

    def params(self) -> dict[str, Any]:
        return {"objective": OBJECTIVE, "eval_metric": "logloss", "tree_method": "hist",
                "max_depth": self.max_depth, "eta": self.eta,
                "min_child_weight": self.min_child_weight, "subsample": self.subsample,
                "colsample_bytree": self.colsample_bytree, "nthread": self.nthread,
                "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class RankerFigures:
    """Held-out figures of one ranker: AUC, NDCG@k, NDCG@1..k and the ROC curve."""

    auc: float
    ndcg: float
    ndcg_curve: tuple[float, ...]
    roc: tuple[np.ndarray, np.ndarray]


#: The rankers an evaluation compares, with their labels in reports and plots.
RANKER_LABELS = {"model": "model", "recency": "recency (creation time)",
                 "age": "recency (age at impression)", "oracle": "oracle (true probability)"}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Held-out figures of the model beside the baselines and, when known, the oracle.

    ``rankers``: ``RankerFigures`` by name: ``model``; ``recency`` (post creation
    time, the feed without ranking); ``age`` (age at the impression, youngest
    first); ``oracle`` (the workload's true engagement probability) only when
    every held-out row carries it. ``censored``: held-out impressions left out
    because their label window ran past the end of the data.
    ``prior_log_loss``: log loss of always predicting the training rate.
    """

    rows: int
    positives: int
    groups: int
    k: int
    log_loss: float
    prior_log_loss: float
    rankers: dict[str, RankerFigures]
    censored: int = 0

    @property
    def auc(self) -> float:
        return self.rankers["model"].auc

    @property
    def ndcg(self) -> float:
        return self.rankers["model"].ndcg

    @property
    def baseline_auc(self) -> float:
        return self.rankers["recency"].auc

    @property
    def baseline_ndcg(self) -> float:
        return self.rankers["recency"].ndcg

    @property
    def best_baseline(self) -> str:
        """The stronger recency baseline by NDCG@k: the one the model must beat."""
        return max(("recency", "age"), key=lambda name: self.rankers[name].ndcg)

    @property
    def ndcg_gain(self) -> float:
        """NDCG@k over the stronger recency baseline."""
        return self.ndcg - self.rankers[self.best_baseline].ndcg

    def headroom(self, baseline: str) -> float:
        """Share of ``baseline``'s NDCG@k gap to the oracle the model closes (NaN without
        an oracle)."""
        oracle = self.rankers.get("oracle")
        if oracle is None:
            return float("nan")
        return headroom_share(self.ndcg, self.rankers[baseline].ndcg, oracle.ndcg)

    def metrics(self) -> dict[str, float]:
        k = self.k
        r = self.rankers
        out = {"auc": self.auc, "log_loss": self.log_loss, f"ndcg@{k}": self.ndcg,
               "baseline_auc": r["recency"].auc, f"baseline_ndcg@{k}": r["recency"].ndcg,
               "age_baseline_auc": r["age"].auc, f"age_baseline_ndcg@{k}": r["age"].ndcg,
               "prior_log_loss": self.prior_log_loss, "held_out_rows": self.rows,
               "held_out_positives": self.positives, "ndcg_groups": self.groups,
               "censored_rows": self.censored}
        if "oracle" in r:
            out.update({"oracle_auc": r["oracle"].auc, f"oracle_ndcg@{k}": r["oracle"].ndcg,
                        "headroom_share": self.headroom("recency"),
                        "age_headroom_share": self.headroom("age")})
        return out


# --------------------------------------------------------------------------- model


def _rounds_bar(progress):
    import xgboost as xgb

    class Bar(xgb.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log):
            progress.update(1)
            return False

    return Bar()


def fit(train: TrainingSet, config: BoosterConfig = BoosterConfig(), progress=None):
    """A booster trained on ``train`` (rows in time order), early-stopped on its latest
    ``validation_fraction``; only the trees up to the best round are kept."""
    import xgboost as xgb

    if len(train) < 10 or len(np.unique(train.labels)) < 2:
        raise UserFacingError(
            f"too little training data: {len(train)} impressions with labels "
            f"{sorted(set(train.labels.tolist()))}; generate or replay a longer period")
    cut = int(len(train) * (1 - config.validation_fraction))
    names = list(train.feature_names)
    dtrain = xgb.DMatrix(train.features[:cut], train.labels[:cut], feature_names=names)
    dvalid = xgb.DMatrix(train.features[cut:], train.labels[cut:], feature_names=names)
    callbacks = [_rounds_bar(progress)] if progress is not None else []
    booster = xgb.train(config.params(), dtrain, config.rounds, evals=[(dvalid, "validation")],
                        early_stopping_rounds=config.early_stopping_rounds,
                        verbose_eval=False, callbacks=callbacks)
    best = getattr(booster, "best_iteration", None)
    if best is not None and best + 1 < booster.num_boosted_rounds():
        booster = booster[: best + 1]
    return booster


def evaluate(scores: np.ndarray, held_out: TrainingSet, prior: float, group_ms: int,
             k: int = 20, origin_ms: int | None = None, end_ms: int | None = None,
             censored: int = 0) -> Evaluation:
    """Model ``scores`` of the held-out rows beside the baselines and the oracle.

    NDCG query groups are (viewer, ``group_ms`` period) with periods from
    ``origin_ms`` (the held-out start) to ``end_ms`` (``query_groups``).
    """
    y = held_out.labels
    groups = query_groups(held_out.viewer_id, held_out.ts_ms, group_ms, origin_ms, end_ms)
    ranked = {"model": np.asarray(scores, dtype=np.float64),
              "recency": held_out.created_at.astype(np.float64),
              "age": -(held_out.ts_ms - held_out.created_at).astype(np.float64)}
    if len(y) and np.isfinite(held_out.p_true).all():
        ranked["oracle"] = held_out.p_true
    ks = tuple(range(1, k + 1))
    rankers = {}
    for name, s in ranked.items():
        # Ties (same score) are broken by post id for every ranker alike.
        curve = ndcg_at(y, s, groups, ks, tiebreak=held_out.post_id)
        rankers[name] = RankerFigures(auc(y, s), curve[k], tuple(curve[i] for i in ks),
                                      roc_curve(y, s))
    gid = np.unique(groups, return_inverse=True)[1]
    counts, sizes = np.bincount(gid, weights=y), np.bincount(gid)
    return Evaluation(
        rows=len(y), positives=int(y.sum()),
        groups=int(((counts > 0) & (counts < sizes)).sum()), k=k,
        log_loss=log_loss(y, scores), prior_log_loss=log_loss(y, np.full(len(y), prior)),
        rankers=rankers, censored=censored)


def plot_evaluation(ev: Evaluation, path: Path, title: str = "") -> Path:
    """ROC curves and NDCG@1..k of every ranker evaluated, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (roc_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    ks = np.arange(1, ev.k + 1)
    for name, r in ev.rankers.items():
        label = RANKER_LABELS[name]
        roc_ax.plot(*r.roc, label=f"{label} (AUC {r.auc:.3f})")
        ndcg_ax.plot(ks, r.ndcg_curve, marker="o", markersize=3,
                     label=f"{label} ({r.ndcg:.3f})")
    roc_ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, held out")
    roc_ax.legend(loc="lower right", fontsize="small")
    ndcg_ax.set(xlabel="k (position)", ylabel="NDCG@k", ylim=(0, 1),
                title=f"NDCG by position, {ev.groups} query groups")
    ndcg_ax.legend(loc="lower right", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the job


@dataclasses.dataclass(frozen=True)
class TrainResult:
    metadata: ModelMetadata
    evaluation: Evaluation
    promoted: bool
    plot: Path | None
    train_rows: int
    seconds: float


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


def train_and_register(data: TrainingSet, registry: ModelRegistry, *,
                       split_at_ms: int | None = None, eval_days: float = 1.0,
                       label_window_ms: int = HOUR_MS, group_ms: int = DAY_MS, k: int = 20,
                       min_ndcg_gain: float = 0.01, booster: BoosterConfig = BoosterConfig(),
                       set_config: TrainingSetConfig | None = None, promote: bool = True,
                       plot: bool = True, progress_factory: Callable | None = None
                       ) -> TrainResult:
    """Split, train, evaluate, save a version, and promote it if it passed."""
    started = time.perf_counter()
    if len(data) == 0:
        raise UserFacingError("no impressions (VIEW events of known posts) in the input")
    split = default_split(data.ts_ms, eval_days) if split_at_ms is None else split_at_ms
    train_mask, held_mask = time_split(data.ts_ms, split, label_window_ms, data.end_ms)
    censored = int((data.ts_ms >= split).sum() - held_mask.sum())
    train, held_out = data.take(train_mask), data.take(held_mask)
    if len(held_out) == 0:
        raise UserFacingError(f"nothing to evaluate on: no impression at or after {_iso(split)}")
    bar = progress_factory(total=booster.rounds, desc="train", unit="round") \
        if progress_factory else None
    try:
        model = fit(train, booster, bar)
    finally:
        if bar is not None:
            bar.close()
    import xgboost as xgb

    scores = model.inplace_predict(held_out.features, validate_features=False)
    end = int(held_out.ts_ms.max()) + 1 if data.end_ms is None else data.end_ms + 1
    ev = evaluate(scores, held_out, float(train.labels.mean()), group_ms, k,
                  origin_ms=split, end_ms=end, censored=censored)
    best = ev.best_baseline
    passed = ev.auc > 0.5 and ev.ndcg_gain >= min_ndcg_gain
    gate = (f"NDCG@{k} {ev.ndcg:.4f} vs {RANKER_LABELS[best]} {ev.rankers[best].ndcg:.4f} "
            f"(gain {ev.ndcg_gain:+.4f}, required {min_ndcg_gain:+.4f}), AUC {ev.auc:.4f} "
            f"(required > 0.5)")
    # The ranking pipeline builds FEATURE_NAMES, and SOCIAL_FEATURES after them for a
    # model saved with its communities: a model on other columns is kept for
    # evaluation but never becomes the one the pipeline loads.
    social = (tuple(data.feature_names) == FEATURE_NAMES + SOCIAL_FEATURES
              and data.community is not None)
    servable = social or tuple(data.feature_names) == FEATURE_NAMES
    cfg = set_config or TrainingSetConfig(label_window_ms=label_window_ms)

    def metadata_for(version: str) -> ModelMetadata:
        return ModelMetadata(
            version=version, created_at_ms=int(time.time() * 1000), objective=OBJECTIVE,
            feature_names=tuple(data.feature_names),
            train_range_ms=(int(train.ts_ms.min()), int(train.ts_ms.max()) + 1),
            eval_range_ms=(int(held_out.ts_ms.min()), int(held_out.ts_ms.max()) + 1),
            metrics=ev.metrics(), passed=passed,
            library={"xgboost": xgb.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
            params={**booster.params(), "rounds_kept": model.num_boosted_rounds(),
                    "label_window_ms": label_window_ms, "ndcg_group_ms": group_ms,
                    "half_life_ms": cfg.half_life_ms,
                    "ttls_ms": dataclasses.asdict(cfg.ttls)},
            rows={"train": len(train), "held_out": len(held_out),
                  "censored_held_out": censored, "dropped_unknown_posts": data.dropped},
            gate=gate)

    metadata = registry.save(model, metadata_for, community=data.community if social else None)
    plot_path = None
    if plot:
        plot_path = plot_evaluation(ev, registry.version_dir(metadata.version) / PLOT_FILE,
                                    f"model {metadata.version}")
    promoted = False
    if promote and passed and servable:
        registry.promote(metadata.version)
        promoted = True
    return TrainResult(metadata, ev, promoted, plot_path, len(train),
                       time.perf_counter() - started)


def _not_promoted_reason(m: ModelMetadata) -> str:
    if not m.passed:
        return "failed: " + m.gate
    if tuple(m.feature_names) not in (FEATURE_NAMES, FEATURE_NAMES + SOCIAL_FEATURES):
        return "passed, but the ranking pipeline does not build its features"
    return "passed, --no-promote"


def report(result: TrainResult) -> str:
    """The summary ``feedbeam train`` prints."""
    m, ev = result.metadata, result.evaluation
    t0, t1 = m.train_range_ms
    e0, e1 = m.eval_range_ms
    k = ev.k
    names = [n for n in ("model", "recency", "age", "oracle") if n in ev.rankers]
    heads = {"model": "model", "recency": "created", "age": "age", "oracle": "oracle"}
    row = lambda label, values: f"{label:10}" + "".join(f"{v:>10}" for v in values)  # noqa: E731
    lines = [
        f"train:    {result.train_rows} impressions {_iso(t0)} .. {_iso(t1)}",
        f"held out: {ev.rows} impressions {_iso(e0)} .. {_iso(e1)}, {ev.positives} engaged, "
        f"{ev.groups} NDCG query groups, {ev.censored} censored (label window past the data)",
        row("", [heads[n] for n in names]) + "   (recency by creation time / by age at "
        "impression; oracle: true probability)",
        row("AUC", [f"{ev.rankers[n].auc:.4f}" for n in names]),
        row(f"NDCG@{k}", [f"{ev.rankers[n].ndcg:.4f}" for n in names])
        + f"   ({ev.ndcg_gain:+.4f} over the better recency)",
        f"{'log loss':10}{ev.log_loss:>10.4f}   (training rate as prediction: "
        f"{ev.prior_log_loss:.4f})",
    ]
    if "oracle" in ev.rankers:
        lines.append(f"headroom: the model closes {ev.headroom('recency'):.1%} of the NDCG@{k} "
                     f"gap from creation-time recency to the oracle, "
                     f"{ev.headroom('age'):.1%} from age-at-impression recency")
    lines += [
        f"model {m.version} ({m.params.get('rounds_kept')} trees, {len(m.feature_names)} "
        f"features) saved" + (f", plot {result.plot}" if result.plot else ""),
        (f"promoted: latest -> {m.version}" if result.promoted
         else f"NOT promoted ({_not_promoted_reason(m)})"),
        f"took {result.seconds:.1f}s",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- inputs and CLI


def _read_dataset(path: Path, columns) -> "Any":
    import pyarrow.dataset as ds

    if not path.exists():
        raise UserFacingError(f"{path} does not exist")
    try:
        return ds.dataset(path, format="parquet", partitioning="hive").to_table(
            columns=list(columns))
    except Exception as exc:  # pyarrow raises many types for a bad dataset
        raise UserFacingError(f"cannot read the Parquet dataset {path}: {exc}") from None


def load_inputs(args: argparse.Namespace, scratch: Path, progress_factory=None
                ) -> tuple[Any, Path]:
    """``(TrainingInputs, feature log)`` from ``--synthetic``, a workload file or replayed
    Parquet. A workload file without ``--feature-log`` gets its log built here, with
    the features pipeline's logic, under ``scratch``."""
    from jobs.synthetic import (
        TrainingInputs,
        feature_log_from_events,
        synthetic_training_inputs,
        training_inputs,
    )
    from jobs.training_set import ENGAGEMENT_COLUMNS, FOLLOW_COLUMNS, POST_COLUMNS

    feature_log = args.feature_log
    if args.synthetic:
        feature_log = feature_log or scratch / "features"
        return synthetic_training_inputs(args, feature_log, progress_factory), feature_log
    if args.workload is not None:
        from jobs.generate import read_workload_file

        try:
            events = [e for _, _, e in read_workload_file(args.workload)]
        except (OSError, ValueError) as exc:
            raise UserFacingError(f"cannot read --workload: {exc}") from None
        if feature_log is None:
            feature_log = scratch / "features"
            print(f"feedbeam train: building the feature log of {args.workload} "
                  f"({len(events)} events)", file=sys.stderr)
            feature_log_from_events(events, feature_log)
        return training_inputs(events), feature_log
    if feature_log is None:
        raise UserFacingError("--feature-log is required (the features pipeline's "
                              "offline log)")
    if args.engagements is None or args.posts is None:
        raise UserFacingError("give --engagements and --posts (replayed Parquet), "
                              "--workload FILE, or --synthetic")
    follows = None if args.follows is None else _read_dataset(args.follows, FOLLOW_COLUMNS)
    return TrainingInputs(_read_dataset(args.engagements, ENGAGEMENT_COLUMNS),
                          _read_dataset(args.posts, POST_COLUMNS), follows), feature_log


def run_train(args: argparse.Namespace, settings: StackSettings) -> int:
    from tqdm import tqdm

    from jobs.generate import parse_duration, parse_start

    model_dir = args.model_dir or settings.state_dir / "models"
    label_window = parse_duration(args.label_window)
    set_config = TrainingSetConfig(label_window_ms=label_window,
                                   half_life_ms=parse_duration(args.half_life))
    bars = lambda **kw: tqdm(dynamic_ncols=True, disable=None, **kw)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="feedbeam-train-") as scratch:
        inputs, feature_log = load_inputs(args, Path(scratch), bars)
        if args.features == "social" and inputs.follows is None:
            raise UserFacingError("--features social needs the follow graph: give --follows "
                                  "(follow-events as Parquet), --workload or --synthetic")
        print(f"feedbeam train: {inputs.engagements.num_rows} engagement and "
              f"{inputs.posts.num_rows} post events, feature log {feature_log}",
              file=sys.stderr)
        started = time.perf_counter()
        try:
            data = build_training_set(inputs.engagements, inputs.posts, str(feature_log),
                                      set_config)
        except FileNotFoundError as exc:
            raise UserFacingError(str(exc)) from None
        if args.features == "social" and len(data):
            data = with_social_features(data, inputs.engagements, inputs.posts, inputs.follows)
        if inputs.truth is not None:
            data = data.with_truth(*inputs.truth)
        print(f"training set: {len(data)} impressions ({int(data.labels.sum())} engaged, "
              f"{data.dropped} of unknown posts dropped), {len(data.feature_names)} features, "
              f"in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        result = train_and_register(
            data, ModelRegistry(model_dir),
            split_at_ms=parse_start(args.split_at) if args.split_at else None,
            eval_days=args.eval_days, label_window_ms=label_window,
            group_ms=parse_duration(args.ndcg_group), k=args.k,
            min_ndcg_gain=args.min_ndcg_gain,
            booster=BoosterConfig(rounds=args.rounds, max_depth=args.max_depth, eta=args.eta,
                                  seed=args.seed),
            set_config=set_config, promote=not args.no_promote,
            progress_factory=bars)
    print(report(result))
    return 0 if result.promoted or (args.no_promote and result.metadata.passed) else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the feed ranker (XGBoost) and save a model version",
        description="Build a training set from the offline feature log and engagement labels "
        "(point in time), train XGBoost, evaluate AUC, log loss and NDCG@k against the "
        "reverse-chronological baseline on a held-out later period, save a versioned model "
        "with a plot, and promote it to 'latest' if it beat the baseline. See jobs/train.py.")
    src = p.add_argument_group("input")
    src.add_argument("--feature-log", type=Path, default=None,
                     help="the features pipeline's offline Parquet log (with --synthetic: "
                     "where to write it; default a temporary directory)")
    src.add_argument("--engagements", type=Path, default=None,
                     help="engagement-events as Parquet (`feedbeam replay engagement-events`)")
    src.add_argument("--posts", type=Path, default=None,
                     help="post-events as Parquet (`feedbeam replay post-events`)")
    src.add_argument("--follows", type=Path, default=None,
                     help="follow-events as Parquet (`feedbeam replay follow-events`), for "
                     "--features social")
    src.add_argument("--workload", type=Path, default=None,
                     help="instead: a workload file of `feedbeam generate --out` (JSON lines; "
                     "without --feature-log, its feature log is built here)")
    src.add_argument("--synthetic", action="store_true",
                     help="instead: generate a workload here and compute its feature log with "
                     "the features pipeline's logic (see the --users ... options)")
    syn = p.add_argument_group("--synthetic workload")
    syn.add_argument("--users", type=int, default=3000)
    syn.add_argument("--days", type=float, default=4.0, help="simulated days")
    syn.add_argument("--avg-following", type=float, default=60.0)
    syn.add_argument("--posts-per-day", type=float, default=2.0)
    syn.add_argument("--workload-seed", type=int, default=42)
    syn.add_argument("--generator", choices=("planted", "realistic"), default="planted",
                     help="planted: jobs/workload.py (observable planted preferences); "
                     "realistic: jobs/realistic.py (communities, hidden post quality, decay; "
                     "the evaluation adds the oracle). Default: %(default)s")
    syn.add_argument("--communities", type=int, default=10,
                     help="latent communities of the realistic generator")
    m = p.add_argument_group("training")
    m.add_argument("--features", choices=("base", "social"), default="base",
                   help="base: the columns the ranking pipeline builds; social: plus social "
                   "proof, velocity, author prior and community affinity (offline only so "
                   "far: saved, never promoted). Default: %(default)s")
    m.add_argument("--model-dir", type=Path, default=None,
                   help="model directory (default: <state dir>/models)")
    m.add_argument("--eval-days", type=float, default=1.0,
                   help="held-out period: the last this many days (default: %(default)g)")
    m.add_argument("--split-at", default=None,
                   help="instead: the held-out period starts here (ISO 8601 or epoch ms)")
    m.add_argument("--label-window", default="1h",
                   help="engaged within this long after the impression (default: %(default)s)")
    m.add_argument("--half-life", default="7d",
                   help="affinity half-life of the features pipeline (default: %(default)s)")
    m.add_argument("--ndcg-group", default="1d",
                   help="NDCG query group: one viewer's impressions in this period "
                   "(default: %(default)s)")
    m.add_argument("--k", type=int, default=20, help="NDCG cut-off (default: %(default)s)")
    m.add_argument("--min-ndcg-gain", type=float, default=0.01,
                   help="NDCG@k the model must gain over recency to be promoted "
                   "(default: %(default)g)")
    m.add_argument("--rounds", type=int, default=BoosterConfig.rounds,
                   help="boosting rounds at most (early stopping usually ends sooner)")
    m.add_argument("--max-depth", type=int, default=BoosterConfig.max_depth,
                   help="tree depth (default: %(default)s; scoring cost grows with it)")
    m.add_argument("--eta", type=float, default=BoosterConfig.eta,
                   help="learning rate (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-promote", action="store_true",
                   help="save the version but leave 'latest' where it is")
    p.set_defaults(handler=run_train)


__all__ = ["register", "run_train", "fit", "evaluate", "train_and_register", "plot_evaluation",
           "BoosterConfig", "Evaluation", "TrainResult", "report", "OBJECTIVE"]
