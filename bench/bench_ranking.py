"""Benchmark: ranking — training cost, candidates scored/s, change-to-refresh latency.

    .venv/bin/python bench/bench_ranking.py [--quick] [--impressions 1000000] [--runs 5]
        [--rates 0.25,0.5,1] [--step-s 30] [--skip latency]

In one run:

* (a) training: a generated workload with planted preferences sized to about
  ``--impressions`` impressions (``jobs.workload``, no celebrities) is written
  as Parquet (engagements, posts) and its feature log computed with the
  features pipeline's logic (``jobs.synthetic.replay_features``; timed apart:
  it is the features pipeline's work, not training's). Then ``feedbeam train``
  runs in a child process over those files: wall time and peak RSS (the
  child's ``ru_maxrss``) of the whole job (read, point-in-time join, fit,
  evaluate, plot, save), plus its held-out figures.
* (b) scoring: the model from (a) scores feature rows of its training data,
  tiled to ``--score-rows``, with XGBoost on 1 thread and on all cores,
  medians of ``--runs`` interleaved runs: candidates/s batched (one
  ``inplace_predict`` per ``--batch-users`` x 200 candidates, the pipeline's
  batch), per user (one call per 200 candidates: what batching saves), with
  the feature matrix built from online-store-shaped dicts as the pipeline
  does (assembly + scoring), and the limit: one call over all rows, XGBoost's
  own throughput on this machine in the same run. Target: >= 1M candidates/s
  batched.
* (c) latency: ``python -m pipelines.ranking`` on Prism (own process, fresh
  topics, keyspace and Redis prefix) over a graph of ``--users`` users (each
  follows 60) loaded into Redis with home feeds of ~150 posts each (so a
  refresh ranks ~200 candidates), model (a) promoted. Post CREATED events are
  produced at each of ``--rates`` posts/s for ``--step-s`` (each post makes
  its author's ~60 followers stale: refreshes/s = rate x 60), event_time =
  produce time; for each post, 3 of its author's followers' ranked feeds are
  polled (ZSCORE every 20 ms): event_time -> ranked, p50/p99 per rate, until
  a rate the job does not keep up with (a post not ranked ``DRAIN_S`` after
  the step). Configurations: the defaults (event-time debounce, settle
  0.5 s, interval 5 s, watermark idle skew 2 s) and a low-latency one
  (processing-time debounce, settle 0.1 s) at the first rate.

Results: a summary block and ``bench/results/ranking.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import redis  # noqa: E402

from bench_fanout import Job as FanoutBenchJob  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from domain.fanout import percentile_of  # noqa: E402
from schemas.events import (  # noqa: E402
    EngagementEvent,
    FollowEvent,
    FollowKind,
    MediaType,
    PostEvent,
    PostEventKind,
)
from schemas.keys import KeyLayout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "ranking.json"
TARGET_SCORED_PER_S = 1_000_000
CANDIDATES = 200
DRAIN_S = 30.0
QUICK = dict(impressions=200_000, runs=3, users=1000, rates="0.25,0.5,1", step_s=20.0)
FULL = dict(impressions=1_000_000, runs=5, users=2000, rates="0.25,0.5,1,2", step_s=40.0)


# ------------------------------------------------------------------ (a) training


def workload_for(impressions: int):
    """A planted-preference workload of about ``impressions`` VIEW impressions.

    Each post is seen by ~0.25 of its author's followers plus ~2 explorers:
    with 60 followees on average, ~17 views per post; 2 posts per user-day.
    """
    from jobs.synthetic import SYNTHETIC_START_MS
    from jobs.workload import DAY_MS, WorkloadConfig

    days = 4
    views_per_post = 17.0
    users = max(500, int(impressions / (days * 2 * views_per_post)))
    return WorkloadConfig(start_ms=SYNTHETIC_START_MS, users=users, avg_following=60,
                          celebrities=0, duration_ms=days * DAY_MS, posts_per_user_day=2.0,
                          stories_per_user_day=0.0, churn_per_user_day=0.0, graph_lead_ms=0)


def training(scratch: Path, impressions: int, settings: StackSettings) -> dict:
    import pyarrow.parquet as pq

    from jobs.synthetic import replay_features
    from jobs.training_set import events_table
    from jobs.workload import Workload
    from stores.files.feature_log import write_feature_log

    config = workload_for(impressions)
    t = time.perf_counter()
    events = [e for _, _, e in Workload(config).events()
              if type(e) in (EngagementEvent, PostEvent)]
    generate_s = time.perf_counter() - t
    (scratch / "eng").mkdir()
    (scratch / "posts").mkdir()
    pq.write_table(events_table(events, EngagementEvent), scratch / "eng" / "part-0.parquet")
    pq.write_table(events_table(events, PostEvent), scratch / "posts" / "part-0.parquet")
    t = time.perf_counter()
    values, batch = 0, []
    for v in replay_features(events):
        batch.append(v)
        if len(batch) >= 500_000:
            write_feature_log(scratch / "features", batch)
            values += len(batch)
            batch = []
    write_feature_log(scratch / "features", batch)
    values += len(batch)
    features_s = time.perf_counter() - t
    n_events = len(events)
    del events
    print(f"(a) workload: {config.users:,} users, {n_events:,} events in {generate_s:.0f}s; "
          f"feature log: {values:,} values in {features_s:.0f}s (features pipeline logic)",
          flush=True)

    models = scratch / "models"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--feature-log", str(scratch / "features"),
           "--engagements", str(scratch / "eng"), "--posts", str(scratch / "posts"),
           "--model-dir", str(models)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "FEEDBEAM_STATE_DIR": str(settings.state_dir)})
    wall = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"feedbeam train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(proc.stdout, flush=True)
    from stores.files.models import ModelRegistry

    registry = ModelRegistry(models)
    (version,) = registry.versions()
    meta = registry.metadata(version)
    impressions_done = meta.rows["train"] + meta.rows["held_out"]
    return {"users": config.users, "events": n_events, "feature_values": values,
            "generate_s": generate_s, "feature_log_s": features_s,
            "train_wall_s": wall, "train_peak_rss_mb": peak_kb / 1024,
            "impressions": impressions_done, "rows": meta.rows, "metrics": meta.metrics,
            "trees": meta.params.get("rounds_kept"), "promoted": registry.latest() == version,
            "model_dir": str(models), "version": version}


# ------------------------------------------------------------------ (b) scoring


def feature_rows(scratch: Path, limit: int = 200_000) -> np.ndarray:
    """Feature rows of the training data (the first ``limit``), as the model saw them."""
    import pyarrow.dataset as ds

    from jobs.training_set import ENGAGEMENT_COLUMNS, POST_COLUMNS, build_training_set

    eng = ds.dataset(scratch / "eng").to_table(columns=list(ENGAGEMENT_COLUMNS)).slice(0, limit)
    posts = ds.dataset(scratch / "posts").to_table(columns=list(POST_COLUMNS))
    return build_training_set(eng, posts, str(scratch / "features")).features


def scoring(model, pool: np.ndarray, runs: int, batch_users: int, total: int) -> dict:
    """Candidates/s of the scoring variants (see the module docstring), interleaved run by
    run so that load from elsewhere on the machine hits them alike; medians."""
    from domain.ranking_features import (
        AUTHOR_FEATURES,
        FEATURE_NAMES,
        MEDIA_TYPES,
        POST_FEATURES,
        feature_matrix,
        online_columns,
    )

    rows = np.resize(pool, (total, pool.shape[1])).astype(np.float32)
    per_call = batch_users * CANDIDATES

    def batched():
        for i in range(0, total, per_call):
            model.inplace_predict(rows[i:i + per_call], validate_features=False)
        return total

    def per_user():
        n = total // 20
        for i in range(0, n, CANDIDATES):
            model.inplace_predict(rows[i:i + CANDIDATES], validate_features=False)
        return n

    def one_call():
        model.inplace_predict(rows, validate_features=False)
        return total

    # One user's candidates as the online store returns them (a dict per post and
    # author), assembled into rows as the pipeline does, batch_users at a time.
    col = {n: i for i, n in enumerate(FEATURE_NAMES)}
    user = rows[:CANDIDATES]
    posts = [{n: float(r[col[f"post_{n}"]]) for n in POST_FEATURES} for r in user]
    authors = [{n: float(r[col[f"author_{n}"]]) for n in AUTHOR_FEATURES} for r in user]
    affinity = user[:, col["viewer_author_affinity"]].astype(np.float64)
    media = np.array([MEDIA_TYPES[i % 4] for i in range(CANDIDATES)], dtype=object)
    content = {m: np.full(CANDIDATES, 0.5) for m in MEDIA_TYPES}
    age = user[:, col["post_age_min"]].astype(np.float64) * 60_000

    def assembled():
        blocks = []
        for _ in range(batch_users):
            p, a = online_columns(posts, authors)
            blocks.append(feature_matrix(p, a, affinity, content, media, age))
        model.inplace_predict(np.concatenate(blocks), validate_features=False)
        return per_call

    variants = {f"{name}_threads_{nt or 'all'}": (nt, fn)
                for nt in (1, 0) for name, fn in (("batched", batched), ("per_user", per_user),
                                                  ("one_call", one_call))}
    variants["assembly_and_scoring_threads_1"] = (1, assembled)
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for name, (nthread, fn) in variants.items():
            model.set_param({"nthread": nthread or os.cpu_count()})
            t = time.perf_counter()
            n = fn()
            samples[name].append(n / (time.perf_counter() - t))
    out = {name: statistics.median(v) for name, v in samples.items()}
    best = max(("threads_1", "threads_all"), key=lambda k: out[f"batched_{k}"])
    out.update(rows=total, batch_users=batch_users, best_threads=best,
               batched_per_s=out[f"batched_{best}"],
               limit_one_call_per_s=max(out["one_call_threads_1"], out["one_call_threads_all"]))
    out["ratio_batched_to_limit"] = out["batched_per_s"] / out["limit_one_call_per_s"]
    return out


# ------------------------------------------------------------------ (c) latency


class Job(FanoutBenchJob):
    """``python -m pipelines.ranking`` on Prism in its own process group (stopped like
    the fan-out benchmark's job)."""

    def __init__(self, settings, prism: str, prefix: str, key_prefix: str, keyspace: str,
                 model_dir: str, log_path: Path, extra: list[str]):
        self.group = f"bench-ranking-{uuid.uuid4().hex[:8]}"
        args = [
            "--runner=PrismRunner", f"--prism_location={prism}", "--environment_type=LOOPBACK",
            "--streaming", f"--kafka_bootstrap={settings.kafka_bootstrap}",
            f"--consumer_group={self.group}", f"--topic_prefix={prefix}",
            "--fallback_start=latest", f"--redis_url={settings.redis_url}",
            f"--redis_key_prefix={key_prefix}", f"--cassandra_host={settings.host}",
            f"--cassandra_port={settings.cassandra_port}", f"--cassandra_keyspace={keyspace}",
            f"--model_dir={model_dir}", "--latency_log_s=10", *extra]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.ranking", *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)


def load_world(client: redis.Redis, keys: KeyLayout, users: int, rng) -> dict[int, list[int]]:
    """Graph (each user follows ~60 others) and ~150 recent pushed posts per home feed.

    Returns followers by author."""
    from stores.redis.feeds import RedisFeedStore

    store = RedisFeedStore(client, keys)
    now = int(time.time() * 1000)
    following = {u: rng.choice(np.arange(1, users + 1), size=60, replace=False)
                 for u in range(1, users + 1)}
    edges = [FollowEvent(f"f{u}-{a}", now - 7_200_000, FollowKind.FOLLOW, u, int(a))
             for u, fs in following.items() for a in fs if a != u]
    for i in range(0, len(edges), 5000):
        store.apply_edges(edges[i:i + 5000])
    followers: dict[int, list[int]] = {}
    for e in edges:
        followers.setdefault(e.followee_id, []).append(e.follower_id)
    posts = []
    for i in range(users * 3):  # ~3 posts per author in the last 6 h
        author = int(rng.integers(1, users + 1))
        t = now - int(rng.integers(60_000, 6 * 3_600_000))
        posts.append(PostEvent(f"bp{i}", t, PostEventKind.CREATED, 10_000_000 + i, author, t,
                               MediaType.PHOTO))
    for p in posts:
        store.put_post(p)
    entries = [(f, p.post_id, p.created_at) for p in posts for f in followers.get(p.author_id, ())]
    store.push_many(entries, cap=1000)
    return followers


class Watch:
    """(user, post) pairs awaited in ranked feeds; ``poll()`` records event time -> seen."""

    def __init__(self, client: redis.Redis, keys: KeyLayout):
        self.client, self.keys = client, keys
        self.pending: dict[tuple[int, int], int] = {}
        self.seen: list[float] = []

    def add(self, users, post: PostEvent) -> None:
        for u in users:
            self.pending[(u, post.post_id)] = post.event_time

    def poll(self) -> None:
        if not self.pending:
            return
        items = list(self.pending.items())
        pipe = self.client.pipeline(transaction=False)
        for (u, p), _ in items:
            pipe.zscore(self.keys.ranked_feed(u), str(p))
        now = time.time() * 1000
        for (pair, t), score in zip(items, pipe.execute()):
            if score is not None:
                del self.pending[pair]
                self.seen.append(now - t)


def latency(ctx, extra: list[str], label: str, rates: list[float], step_s: float) -> list[dict]:
    """One job; for each rate: posts for ``step_s``, then up to ``DRAIN_S`` to see them all.

    Stops after a rate the job could not keep up with (not every post ranked
    within the drain)."""
    from confluent_kafka import Producer

    from schemas.codec import WireCodec

    codec = WireCodec()
    producer = Producer({"bootstrap.servers": ctx.settings.kafka_bootstrap, "linger.ms": 1})
    topic = ctx.prefix + PostEvent.TOPIC
    authors = [a for a, fs in ctx.followers.items() if len(fs) >= 3]
    fanout = float(np.mean([len(ctx.followers[a]) for a in authors]))
    post_id = [20_000_000 + int(uuid.uuid4().int % 1_000_000) * 1000]

    def send_post() -> PostEvent:
        author = authors[int(ctx.rng.integers(len(authors)))]
        t = int(time.time() * 1000)
        post_id[0] += 1
        p = PostEvent(f"lp{post_id[0]}", t, PostEventKind.CREATED, post_id[0], author, t,
                      MediaType.VIDEO)
        producer.produce(topic, codec.encode(p, topic), p.key, timestamp=t)
        producer.flush(10)
        return p

    job = Job(ctx.settings, ctx.prism, ctx.prefix, ctx.key_prefix, ctx.keyspace, ctx.model_dir,
              ctx.log_dir / f"bench-ranking-{label}.log", extra)
    out = []
    try:
        # Warm up: the job runs once a post reaches its followers' ranked feeds (re-sent
        # every 5 s: the job starts at the topics' ends, maybe after the first one).
        deadline = time.time() + 240
        warm = Watch(ctx.client, ctx.keys)
        while not warm.seen:
            if job.proc.poll() is not None:
                raise RuntimeError(f"the ranking job exited ({job.proc.returncode})")
            if time.time() > deadline:
                raise RuntimeError("the ranking job did not refresh a feed within 240 s")
            if not warm.pending or time.time() * 1000 - max(warm.pending.values()) > 5000:
                p = send_post()
                warm.add(ctx.followers[p.author_id][:1], p)
            time.sleep(0.2)
            warm.poll()
        for rate in rates:
            time.sleep(6)  # earlier cooldowns end
            watch = Watch(ctx.client, ctx.keys)
            start, sent = time.time(), 0
            while time.time() - start < step_s:
                if time.time() >= start + sent / rate:
                    p = send_post()
                    sent += 1
                    watch.add(ctx.followers[p.author_id][:3], p)
                watch.poll()
                time.sleep(0.02)
            drain_until = time.time() + DRAIN_S
            while watch.pending and time.time() < drain_until:
                watch.poll()
                time.sleep(0.02)
            values = sorted(watch.seen)
            r = {"label": label, "args": extra, "rate_posts_per_s": rate,
                 "refreshes_per_s": rate * fanout, "posts": sent, "observed": len(values),
                 "missing": len(watch.pending)}
            if values:
                r.update(p50_ms=percentile_of(values, 0.5), p99_ms=percentile_of(values, 0.99),
                         max_ms=values[-1])
            print(f"(c) {r}", flush=True)
            out.append(r)
            if watch.pending:
                break
    finally:
        job.stop()
    return out


# ------------------------------------------------------------------ main


class Ctx:
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    parser.add_argument("--impressions", type=int)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--users", type=int, help="users of the latency graph")
    parser.add_argument("--rates", help="comma-separated posts/s of the latency steps")
    parser.add_argument("--step-s", type=float)
    parser.add_argument("--batch-users", type=int, default=256)
    parser.add_argument("--score-rows", type=int, default=2_000_000)
    parser.add_argument("--skip", default="",
                        help="comma-separated: latency; training (also skips scoring, needs "
                             "--model-dir)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --skip training: the model directory the latency job uses")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    skip = {s for s in args.skip.split(",") if s}
    settings = StackSettings.from_env()
    results: dict = {"preset": "quick" if args.quick else "full", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-ranking-") as tmp:
        scratch = Path(tmp)
        model_dir = args.model_dir
        if "training" in skip:
            if model_dir is None:
                parser.error("--skip training needs --model-dir (a promoted model)")
        else:
            results["training"] = tr = training(scratch, args.impressions, settings)
            print(f"(a) training: {tr['impressions']:,} impressions, feedbeam train "
                  f"{tr['train_wall_s']:.1f}s wall, peak RSS {tr['train_peak_rss_mb']:,.0f} MB",
                  flush=True)
            import xgboost as xgb

            from stores.files.models import ModelRegistry

            model_dir = tr["model_dir"]
            model = ModelRegistry(model_dir).load(tr["version"]).booster
            results["scoring"] = sc = scoring(model, feature_rows(scratch), args.runs,
                                              args.batch_users, args.score_rows)
            sc["trees"] = tr["trees"]
            sc["xgboost"] = xgb.__version__
            print(f"(b) scoring: {sc['batched_per_s']:,.0f} candidates/s batched vs limit "
                  f"{sc['limit_one_call_per_s']:,.0f}/s", flush=True)
        if "latency" not in skip:
            results["latency"] = run_latency(args, settings, str(model_dir))
        results["load_average"] = os.getloadavg()
    print_summary(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {RESULTS}")
    return 0


def run_latency(args, settings, model_dir: str) -> list[dict]:
    from confluent_kafka.admin import AdminClient

    from jobs.topics import create_topics
    from infra.install import prism_binary
    from stores.files.models import ModelRegistry
    from stores.cassandra.session import migrate, new_cluster

    ctx = Ctx()
    tag = uuid.uuid4().hex[:8]
    ctx.settings, ctx.prism = settings, str(prism_binary(settings))
    ctx.prefix, ctx.key_prefix, ctx.keyspace = f"bench.rk{tag}.", f"benchrk{tag}", f"bench_rk_{tag}"
    ctx.keys = KeyLayout(ctx.key_prefix)
    ctx.client = redis.Redis.from_url(settings.redis_url, socket_timeout=60)
    ctx.rng = np.random.default_rng(5)
    ctx.log_dir = Path(settings.state_dir) / "logs"
    ctx.log_dir.mkdir(parents=True, exist_ok=True)
    ctx.model_dir = model_dir
    if ModelRegistry(model_dir).latest() is None:
        print("(c) note: the trained model was not promoted; the job ranks by recency",
              flush=True)
    topics = [ctx.prefix + t for t in (PostEvent.TOPIC, EngagementEvent.TOPIC, FollowEvent.TOPIC)]
    cluster = new_cluster(settings.host, settings.cassandra_port)
    session = cluster.connect()
    out = []
    try:
        create_topics(settings.kafka_bootstrap, topics, partitions=2)
        migrate(session, ctx.keyspace)
        t = time.perf_counter()
        ctx.followers = load_world(ctx.client, ctx.keys, args.users, ctx.rng)
        print(f"(c) loaded {args.users:,} users' graph and feeds in "
              f"{time.perf_counter() - t:.0f}s", flush=True)
        rates = [float(r) for r in args.rates.split(",")]
        out += latency(ctx, [], "default", rates, args.step_s)
        out += latency(ctx, ["--settle_s=0.1", "--debounce_clock=processing"], "low-latency",
                       rates[:1], args.step_s)
    finally:
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).delete_topics(topics)
        session.execute(f"DROP KEYSPACE IF EXISTS {ctx.keyspace}", timeout=120)
        cluster.shutdown()
        keys = list(ctx.client.scan_iter(match=f"{ctx.key_prefix}:*", count=5000))
        for i in range(0, len(keys), 5000):
            ctx.client.unlink(*keys[i:i + 5000])
    return out


def print_summary(r: dict) -> None:
    print("\n== ranking benchmark ==")
    la = r.get("load_average")
    print(f"machine: {r['cpus']} cores" + (f", load average {la[0]:.1f} / {la[1]:.1f} / "
                                            f"{la[2]:.1f} at the end (shared)" if la else ""))
    if "training" in r:
        tr, sc = r["training"], r["scoring"]
        m = tr["metrics"]
        print(f"training: {tr['impressions']:,} impressions ({tr['users']:,} users, "
              f"{tr['events']:,} events): feedbeam train {tr['train_wall_s']:.1f}s wall, "
              f"peak RSS {tr['train_peak_rss_mb']:,.0f} MB; {tr['trees']} trees; held out "
              f"AUC {m['auc']:.3f} (recency {m['baseline_auc']:.3f}), NDCG@20 "
              f"{m['ndcg@20']:.3f} (recency {m['baseline_ndcg@20']:.3f})")
        print(f"  (feature log for it, features pipeline logic: {tr['feature_log_s']:.0f}s; "
              f"workload generation {tr['generate_s']:.0f}s)")
        print(f"scoring ({sc['trees']} trees, {sc['batch_users']} users x {CANDIDATES} per "
              f"call, medians of interleaved runs):")
        for threads in ("threads_1", "threads_all"):
            print(f"  {threads.replace('_', ' ')}: batched {sc['batched_' + threads]:,.0f}/s | "
                  f"per-user calls {sc['per_user_' + threads]:,.0f}/s | one call over all "
                  f"{sc['rows']:,} rows {sc['one_call_' + threads]:,.0f}/s")
        print(f"  batched {sc['batched_per_s']:,.0f}/s ({sc['best_threads'].replace('_', ' ')}) "
              f"vs limit (one call) {sc['limit_one_call_per_s']:,.0f}/s: ratio "
              f"{sc['ratio_batched_to_limit']:.2f}; with feature assembly from online-store "
              f"dicts {sc['assembly_and_scoring_threads_1']:,.0f}/s; target "
              f"{TARGET_SCORED_PER_S:,}/s "
              f"{'met' if sc['batched_per_s'] >= TARGET_SCORED_PER_S else 'NOT met'}")
    for lt in r.get("latency", []):
        head = (f"change -> ranked feed ({lt['label']}, {lt['rate_posts_per_s']:g} posts/s = "
                f"~{lt['refreshes_per_s']:.0f} refreshes/s, {lt['observed']} follower feeds)")
        if "p50_ms" in lt:
            print(f"{head}: p50 {lt['p50_ms']:.0f} ms, p99 {lt['p99_ms']:.0f} ms, max "
                  f"{lt['max_ms']:.0f} ms" + (f", NOT KEPT UP: {lt['missing']} not ranked "
                                              f"{DRAIN_S:.0f}s after" if lt["missing"] else ""))
        else:
            print(f"{head}: nothing observed")


if __name__ == "__main__":
    sys.exit(main())
