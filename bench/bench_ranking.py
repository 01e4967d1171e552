"""Benchmark: ranking — training cost, scoring, hydrate + score vs the scoring limit, latency.

    .venv/bin/python bench/bench_ranking.py [--quick] [--impressions 1000000] [--runs 5]
        [--users 5000] [--rates 2,5,8] [--step-s 40] [--skip training,hydrate,latency]
        [--model-dir DIR]

In one run:

* (a) training: a generated workload with planted preferences sized to about
  ``--impressions`` impressions (``jobs.workload``, no celebrities) is written
  as Parquet (engagements, posts) and its feature log computed with the
  features pipeline's logic (``jobs.synthetic.replay_features``; timed apart:
  it is the features pipeline's work, not training's). Then ``feedbeam train``
  runs in a child process over those files: wall time and peak RSS (the
  child's ``ru_maxrss``) of the whole job, plus its held-out figures.
  ``--skip training --model-dir DIR`` uses a promoted model instead (and
  skips (b)).
* (b) scoring: the model from (a) scores feature rows of its training data,
  tiled to ``--score-rows``, with XGBoost on 1 thread and on all cores,
  medians of ``--runs`` interleaved runs: batched (one ``inplace_predict``
  per ``--batch-users`` x 200 candidates), per user (one call per 200) and
  the limit, one call over all rows.
* (c) hydrate + score, on the latency world below (Redis, real features): for
  batches of ``--batch-users`` users, the refresh's own steps timed apart
  (``FeedRanker``): candidates read, features hydrated into rows
  (``feature_rows``: one batched read), scoring (one ``inplace_predict``).
  Beside them, on the very same rows and model, interleaved: the batched
  scoring limit (one ``inplace_predict`` per batch, nothing else), the old
  per-user hydrate (one feature read and row assembly per user: the design
  this replaced, its floor) and a whole refresh (candidates to the written
  feed, Redis and Cassandra). Bar: candidates hydrated + scored per second
  >= 50 % of the batched scoring limit.
* (d) latency: ``python -m pipelines.ranking`` on Prism (own process, fresh
  topics, keyspace and Redis prefix) over a graph of ``--users`` users (each
  follows 60) with home feeds of ~150 posts and online features for every
  post, author and affinity, the model promoted. Post CREATED events are
  produced at each of ``--rates`` posts/s for ``--step-s`` (each post makes
  its author's ~60 followers stale), event_time = produce time; for each
  post, 3 of its author's followers' ranked feeds are polled (ZSCORE every
  20 ms): event_time -> ranked, p50/p99 per rate, and the refreshes/s the job
  actually did (its queue's ``refreshed`` counter over the step). Bar:
  p99 <= 2 s at >= 300 refreshes/s. Stops after a rate it did not keep up
  with (a post not ranked ``DRAIN_S`` after the step).

Results: a summary block and ``bench/results/ranking.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from stores.ranked import STAMP_BYTES, generated_at_of, parse_value  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "ranking.json"
TARGET_SCORED_PER_S = 1_000_000
CANDIDATES = 200
DRAIN_S = 30.0
HYDRATE_BAR = 0.5        # hydrated + scored / batched scoring limit
LATENCY_BAR_MS = 2000.0  # p99 change -> ranked feed ...
RATE_BAR = 300.0         # ... at this many refreshes/s
QUICK = dict(impressions=200_000, runs=3, users=2000, rates="2,5", step_s=20.0)
FULL = dict(impressions=1_000_000, runs=5, users=5000, rates="2,5,8", step_s=40.0)


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


# ------------------------------------------------------------------ the world of (c) and (d)


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
            f"--model_dir={model_dir}", "--latency_log_s=10",
            # No fan-out runs here, so no post is ever stored: each would be remembered
            # for its audience (a cost that, with a fan-out keeping up, is rare).
            "--carry_unstored_s=0", *extra]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.ranking", *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)


def load_world(client: redis.Redis, keys: KeyLayout, users: int, rng) -> dict[int, list[int]]:
    """Graph (each user follows ~60 others), ~150 recent pushed posts per home feed, and
    online features: every post's and author's, each user's affinity to 20 of its
    followees and to each media type. Returns followers by author."""
    from schemas.features import AUTHOR_FEATURES, MEDIA_TYPES, POST_FEATURES, FeatureValue
    from stores.redis.features import OnlineFeatureStore
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
    for i in range(0, len(posts), 5000):
        store.put_posts(posts[i:i + 5000])
    entries = [(f, p.post_id, p.created_at) for p in posts for f in followers.get(p.author_id, ())]
    for i in range(0, len(entries), 50_000):
        store.push_many(entries[i:i + 50_000], cap=1000)
    at = now - 60_000
    values = [FeatureValue("post", str(p.post_id), n, float(rng.random() * 20), at)
              for p in posts for n in POST_FEATURES]
    values += [FeatureValue("author", str(a), n, float(rng.random()), at)
               for a in range(1, users + 1) for n in AUTHOR_FEATURES]
    values += [FeatureValue("viewer_author", f"{u}:{int(a)}", "affinity", float(rng.random()), at)
               for u, fs in following.items() for a in fs[:20]]
    values += [FeatureValue("viewer_media", f"{u}:{m}", "affinity", float(rng.random()), at)
               for u in range(1, users + 1) for m in MEDIA_TYPES]
    features = OnlineFeatureStore(client, keys)
    for i in range(0, len(values), 50_000):
        features.write(values[i:i + 50_000])
    return followers


# ------------------------------------------------------------------ (c) hydrate + score


def old_feature_rows(ranker, cols, now_ms: int) -> np.ndarray:
    """The design batching replaced: post and author features in one read for the batch,
    then one read per user of its affinities, rows assembled per user from dicts."""
    from domain.ranking_features import feature_matrix, online_columns

    features = ranker.features
    posts = list(dict.fromkeys(cols.post_id.tolist()))
    authors = list(dict.fromkeys(cols.author_id.tolist()))
    shared = features.hydrate(None, posts, authors, now_ms)
    post_features, author_features = dict(zip(posts, shared.posts)), dict(zip(authors,
                                                                              shared.authors))
    blocks = []
    for i, user in enumerate(cols.users):
        cands = cols.of(i)
        mine = list(dict.fromkeys(c.author_id for c in cands))
        viewer = features.hydrate(user, (), mine, now_ms, author_features=False)
        affinity = dict(zip(mine, viewer.author_affinity))
        post_cols, author_cols = online_columns([post_features[c.post_id] for c in cands],
                                                [author_features[c.author_id] for c in cands])
        n = len(cands)
        blocks.append(feature_matrix(
            post_cols, author_cols, np.array([affinity[c.author_id] for c in cands]),
            {m: np.full(n, v) for m, v in viewer.content_affinity.items()},
            np.array([c.media_type for c in cands], dtype=object),
            now_ms - np.fromiter((c.created_at for c in cands), np.int64, count=n)))
    return np.concatenate(blocks)


def hydrate_and_score(ctx, runs: int, batch_users: int, batches: int) -> dict:
    """(c): per-batch seconds of each step, medians over ``runs`` interleaved rounds."""
    from domain.ranking import RankingPolicy
    from schemas.ranking import RefreshRequest
    from stores.config import StoreConfig
    from stores.ranker import RankingConfig

    config = RankingConfig(StoreConfig(ctx.settings.redis_url, ctx.key_prefix, ctx.settings.host,
                                       ctx.settings.cassandra_port, ctx.keyspace),
                           model_dir=ctx.model_dir, model_poll_s=3600)
    ranker = config.open(RankingPolicy())
    # The same without reusing parsed post and author features (--feature_cache_s 0).
    uncached = dataclasses.replace(config, feature_cache_s=0).open(RankingPolicy())
    model = ranker.models.current()
    if model is None:
        raise RuntimeError(f"no promoted model in {ctx.model_dir}")
    users = np.array(sorted(ctx.followers_of_user))
    samples: dict[str, list[float]] = {}
    per_user: dict[str, list[float]] = {}  # ms per user refreshed
    try:
        for _ in range(runs):
            totals: dict[str, float] = {}
            rows_total = 0
            for _ in range(batches):
                now = int(time.time() * 1000)
                batch = ctx.rng.choice(users, size=batch_users, replace=False)
                requests = [RefreshRequest(int(u), now) for u in batch]
                clock = time.perf_counter
                t0 = clock()
                cols = ranker.candidates.columns(requests, now, ranker.policy)
                t1 = clock()
                rows = ranker.feature_rows(cols, now)
                t2 = clock()
                model.predict(rows)
                t3 = clock()
                model.predict(rows)  # the limit: scoring alone, the same rows again
                t4 = clock()
                old = old_feature_rows(ranker, cols, now)
                model.predict(old)
                t5 = clock()
                ranking = ranker.rank(requests, now)
                t6a = clock()
                ranker.ranked.write_many(ranking.feeds)  # Cassandra rows, then Redis swaps
                t6 = clock()
                uncached.feature_rows(cols, now)
                t7 = clock()
                for name, dt in (("candidates", t1 - t0), ("hydrate", t2 - t1),
                                 ("score", t3 - t2), ("limit", t4 - t3),
                                 ("old_hydrate_and_score", t5 - t4), ("refresh", t6 - t5),
                                 ("refresh_rank", t6a - t5), ("refresh_write", t6 - t6a),
                                 ("hydrate_uncached", t7 - t6)):
                    totals[name] = totals.get(name, 0.0) + dt
                rows_total += len(rows)
            per_s = {name: rows_total / dt for name, dt in totals.items()}
            per_s["hydrate_and_score"] = rows_total / (totals["hydrate"] + totals["score"])
            per_s["uncached_hydrate_and_score"] = rows_total / (totals["hydrate_uncached"]
                                                                + totals["score"])
            per_s["refresh_users"] = batches * batch_users / totals["refresh"]
            for part in ("refresh_rank", "refresh_write"):
                per_user.setdefault(part, []).append(totals[part] * 1000 / (batches * batch_users))
            for name, value in per_s.items():
                samples.setdefault(name, []).append(value)
    finally:
        ranker.close()
        uncached.close()
    out = {f"{name}_per_s": statistics.median(v) for name, v in samples.items()}
    out.update({f"{name}_ms_per_user": statistics.median(v) for name, v in per_user.items()})
    out["ratio"] = out["hydrate_and_score_per_s"] / out["limit_per_s"]
    out["old_ratio"] = out["old_hydrate_and_score_per_s"] / out["limit_per_s"]
    out["uncached_ratio"] = out["uncached_hydrate_and_score_per_s"] / out["limit_per_s"]
    out.update(batch_users=batch_users, batches=batches, runs=runs,
               candidates_per_user=rows_total / (batches * batch_users))
    return out


# ------------------------------------------------------------------ (d) latency


class Watch:
    """(user, post) pairs awaited in ranked feeds; ``poll()`` records event time -> seen.

    A poll reads the head of each awaited user's ranked feed (its generation
    time) and the whole value only of those ranked again since the last poll,
    after one of their posts: a few bytes per user, not the feed."""

    def __init__(self, client: redis.Redis, keys: KeyLayout):
        self.client, self.keys = client, keys
        self.pending: dict[tuple[int, int], int] = {}
        self.seen: list[float] = []
        self._checked: dict[int, bytes] = {}  # user -> generation time last read whole

    def add(self, users, post: PostEvent) -> None:
        for u in users:
            self.pending[(u, post.post_id)] = post.event_time

    def poll(self) -> None:
        if not self.pending:
            return
        since: dict[int, int] = {}
        for (u, _), t in self.pending.items():
            since[u] = min(t, since.get(u, t))
        users = list(since)
        pipe = self.client.pipeline(transaction=False)
        for u in users:
            pipe.getrange(self.keys.ranked_feed(u), 0, STAMP_BYTES - 1)
        stamps = pipe.execute()
        changed = [u for u, stamp in zip(users, stamps)
                   if stamp and generated_at_of(stamp) >= since[u]
                   and stamp != self._checked.get(u)]
        if not changed:
            return
        pipe = self.client.pipeline(transaction=False)
        for u in changed:
            pipe.get(self.keys.ranked_feed(u))
        now = time.time() * 1000
        ranked: dict[int, set[int]] = {}
        for u, value in zip(changed, pipe.execute()):
            feed = parse_value(u, value)
            if feed is not None:
                self._checked[u] = value[:STAMP_BYTES]
                ranked[u] = {e.post_id for e in feed.entries}
        for (u, p), t in list(self.pending.items()):
            if p in ranked.get(u, ()):
                del self.pending[(u, p)]
                self.seen.append(now - t)


def latency(ctx, extra: list[str], label: str, rates: list[float], step_s: float) -> list[dict]:
    """One job; for each rate: posts for ``step_s``, then up to ``DRAIN_S`` to see them all.

    Stops after a rate the job could not keep up with (not every post ranked
    within the drain)."""
    from confluent_kafka import Producer

    from schemas.codec import WireCodec
    from stores.ranker import QueueConfig

    codec = WireCodec()
    producer = Producer({"bootstrap.servers": ctx.settings.kafka_bootstrap, "linger.ms": 1})
    topic = ctx.prefix + PostEvent.TOPIC
    authors = [a for a, fs in ctx.followers.items() if len(fs) >= 3]
    fanout = float(np.mean([len(ctx.followers[a]) for a in authors]))
    post_id = [20_000_000 + int(uuid.uuid4().int % 1_000_000) * 1000]
    queue = QueueConfig().open(ctx.client, ctx.keys)

    def send_post() -> PostEvent:
        author = authors[int(ctx.rng.integers(len(authors)))]
        t = int(time.time() * 1000)
        post_id[0] += 1
        p = PostEvent(f"lp{post_id[0]}", t, PostEventKind.CREATED, post_id[0], author, t,
                      MediaType.VIDEO)
        producer.produce(topic, codec.encode(p, topic), p.key, timestamp=t)
        producer.poll(0)
        return p

    job = Job(ctx.settings, ctx.prism, ctx.prefix, ctx.key_prefix, ctx.keyspace, ctx.model_dir,
              ctx.log_dir / f"bench-ranking-{label}.log", extra)
    out = []
    try:
        # Warm up: the job runs once a post reaches its followers' ranked feeds (re-sent
        # every 5 s: the job starts at the topics' ends, maybe after the first one).
        deadline = time.time() + 300
        warm = Watch(ctx.client, ctx.keys)
        while not warm.seen:
            if job.proc.poll() is not None:
                raise RuntimeError(f"the ranking job exited ({job.proc.returncode})")
            if time.time() > deadline:
                raise RuntimeError("the ranking job did not refresh a feed within 300 s")
            if not warm.pending or time.time() * 1000 - max(warm.pending.values()) > 5000:
                p = send_post()
                producer.flush(10)
                warm.add(ctx.followers[p.author_id][:1], p)
            time.sleep(0.2)
            warm.poll()
        for rate in rates:
            time.sleep(6)  # earlier refreshes end
            watch = Watch(ctx.client, ctx.keys)
            refreshed = queue.stats().get("refreshed", 0)
            start, sent = time.time(), 0
            while time.time() - start < step_s:
                if time.time() >= start + sent / rate:
                    p = send_post()
                    sent += 1
                    watch.add(ctx.followers[p.author_id][:3], p)
                watch.poll()
                time.sleep(0.02)
            done = queue.stats().get("refreshed", 0) - refreshed
            elapsed = time.time() - start
            drain_until = time.time() + DRAIN_S
            while watch.pending and time.time() < drain_until:
                watch.poll()
                time.sleep(0.02)
            values = sorted(watch.seen)
            r = {"label": label, "args": extra, "rate_posts_per_s": rate,
                 "offered_refreshes_per_s": rate * fanout, "refreshes_per_s": done / elapsed,
                 "posts": sent, "observed": len(values), "missing": len(watch.pending)}
            if values:
                r.update(p50_ms=percentile_of(values, 0.5), p99_ms=percentile_of(values, 0.99),
                         max_ms=values[-1])
            print(f"(d) {r}", flush=True)
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
    parser.add_argument("--users", type=int, help="users of the hydrate and latency world")
    parser.add_argument("--rates", help="comma-separated posts/s of the latency steps")
    parser.add_argument("--step-s", type=float)
    parser.add_argument("--batch-users", type=int, default=256)
    parser.add_argument("--hydrate-batches", type=int, default=4,
                        help="batches of --batch-users per (c) round")
    parser.add_argument("--score-rows", type=int, default=2_000_000)
    parser.add_argument("--skip", default="",
                        help="comma-separated: training (also skips (b), needs --model-dir), "
                             "hydrate, latency")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --skip training: the model directory (c) and (d) use")
    parser.add_argument("--job-args", default="",
                        help="extra options of the latency job, comma-separated")
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
        if not {"hydrate", "latency"} <= skip:
            results.update(run_world(args, skip, settings, str(model_dir)))
        results["load_average"] = os.getloadavg()
    print_summary(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {RESULTS}")
    return 0


def run_world(args, skip: set[str], settings, model_dir: str) -> dict:
    """(c) and (d) over one loaded world; everything it made is removed at the end."""
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
        print("note: the trained model was not promoted; the job ranks by recency", flush=True)
    topics = [ctx.prefix + t for t in (PostEvent.TOPIC, EngagementEvent.TOPIC, FollowEvent.TOPIC)]
    cluster = new_cluster(settings.host, settings.cassandra_port)
    session = cluster.connect()
    out: dict = {}
    try:
        create_topics(settings.kafka_bootstrap, topics, partitions=2)
        migrate(session, ctx.keyspace)
        t = time.perf_counter()
        ctx.followers = load_world(ctx.client, ctx.keys, args.users, ctx.rng)
        ctx.followers_of_user = {u for fs in ctx.followers.values() for u in fs}
        out["world"] = {"users": args.users, "load_s": time.perf_counter() - t}
        print(f"loaded {args.users:,} users' graph, feeds and features in "
              f"{out['world']['load_s']:.0f}s", flush=True)
        if "hydrate" not in skip:
            out["hydrate"] = h = hydrate_and_score(ctx, args.runs, args.batch_users,
                                                   args.hydrate_batches)
            print(f"(c) hydrated + scored {h['hydrate_and_score_per_s']:,.0f} candidates/s vs "
                  f"batched scoring limit {h['limit_per_s']:,.0f}/s: ratio {h['ratio']:.2f}",
                  flush=True)
        if "latency" not in skip:
            rates = [float(r) for r in args.rates.split(",")]
            extra = [a for a in args.job_args.split(",") if a]
            out["latency"] = latency(ctx, extra, "default", rates, args.step_s)
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
              f"dicts {sc['assembly_and_scoring_threads_1']:,.0f}/s")
    h = r.get("hydrate")
    if h:
        print(f"hydrate + score ({r['world']['users']:,} users' world, {h['batch_users']} users "
              f"x {h['candidates_per_user']:.0f} candidates per batch, medians of {h['runs']} "
              f"rounds of {h['batches']} batches):")
        print(f"  candidates hydrated + scored {h['hydrate_and_score_per_s']:,.0f}/s vs batched "
              f"scoring limit {h['limit_per_s']:,.0f}/s: ratio {h['ratio']:.2f} (bar "
              f"{HYDRATE_BAR:.2f}: {'met' if h['ratio'] >= HYDRATE_BAR else 'NOT met'})")
        print(f"  steps: candidates read {h['candidates_per_s']:,.0f}/s, hydrate "
              f"{h['hydrate_per_s']:,.0f}/s, scoring {h['score_per_s']:,.0f}/s; whole refresh "
              f"(read to written feed) {h['refresh_per_s']:,.0f} candidates/s = "
              f"{h['refresh_users_per_s']:,.0f} users/s (ranking "
              f"{h['refresh_rank_ms_per_user']:.2f} ms, writing "
              f"{h['refresh_write_ms_per_user']:.2f} ms per user)")
        print(f"  without reusing parsed post and author features (--feature_cache_s 0): "
              f"{h['uncached_hydrate_and_score_per_s']:,.0f}/s (ratio {h['uncached_ratio']:.2f})")
        print(f"  the per-user hydrate it replaced: {h['old_hydrate_and_score_per_s']:,.0f}/s "
              f"(ratio {h['old_ratio']:.2f})")
    for lt in r.get("latency", []):
        head = (f"change -> ranked feed ({lt['rate_posts_per_s']:g} posts/s: "
                f"{lt['refreshes_per_s']:.0f} refreshes/s done, ~"
                f"{lt['offered_refreshes_per_s']:.0f} offered; {lt['observed']} follower feeds)")
        if "p50_ms" in lt:
            met = lt["p99_ms"] <= LATENCY_BAR_MS and lt["refreshes_per_s"] >= RATE_BAR
            print(f"{head}: p50 {lt['p50_ms']:.0f} ms, p99 {lt['p99_ms']:.0f} ms, max "
                  f"{lt['max_ms']:.0f} ms; bar p99 <= {LATENCY_BAR_MS:.0f} ms at >= "
                  f"{RATE_BAR:.0f} refreshes/s: {'met' if met else 'not met'}"
                  + (f"; NOT KEPT UP: {lt['missing']} not ranked {DRAIN_S:.0f}s after"
                     if lt["missing"] else ""))
        else:
            print(f"{head}: nothing observed")


if __name__ == "__main__":
    sys.exit(main())
