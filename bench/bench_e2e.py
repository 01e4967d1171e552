"""End-to-end benchmark: post-to-feed freshness at increasing rates under a mixed workload,
API latency while the pipelines keep consuming, and throughput beside the limits measured in
the same run; writes JSON and PNG plots.

    .venv/bin/python bench/bench_e2e.py [--quick] [--rates 25,50,100,200,400] [--step-s N]
        [--runs N] [--pipelines fanout,features,stories,ranking] [--model-dir DIR]
        [--ranking-args=--debounce_s=10,...] [--job-args=--max_bundle_time_mills=100,...]
        [--mix engagement=4,story=0.5,follow=0.25]
        [--api-rates 500,1000,2000] [--api-s N] [--api-post-rate N] [--serve granian:2] [--no-floor]
        [--job-nice N|fanout=N,...] [--linger-ms 5] [--topology single|cluster]
        [--out bench/results/e2e-<stamp>]

Set-up (all names unique to the run, removed at the end, also on Ctrl-C or SIGTERM):
topics ``bench.e2e<tag>.{post,engagement,story,follow}-events`` (+ ``.dlq``), a freshly
migrated keyspace, a Redis key prefix holding a ``jobs.workload`` follower graph loaded
straight into Redis (``bench_fanout.Graph``). Then, as their own processes on Prism
(streaming, LOOPBACK; ``bench_fanout.Job``): ``pipelines.fanout`` and, unless
``--pipelines`` leaves them out, ``pipelines.features`` (sinks redis, cassandra,
top_followers), ``pipelines.stories`` and ``pipelines.ranking`` (with the promoted model of
``--model-dir``; by default one ``feedbeam train --synthetic`` trains once and later runs
reuse), at OS niceness ``--job-nice`` (0: as the API; the niceness of each job's session
group too, ``infra.processes.lower_priority``); and ``feedbeam serve`` on the same prefix
and keyspace (``bench_serving.Server``). The load generator's producer lingers
``--linger-ms`` (librdkafka's default, 5).

``--topology cluster`` runs the same on ``feedbeam infra up --topology cluster`` (started
beforehand): the Redis Cluster (the graph loaded through a cluster client, the ZADD limit
``redis-benchmark --cluster`` over its masters), both Cassandra nodes (the keyspace at
replication factor 2, writes at LOCAL_QUORUM), and the jobs on the Flink session cluster
through its job server at ``feedbeam submit``'s parallelism (2), checkpointing every
``FLINK_CHECKPOINT_MS`` (the consumed records and lag read their committed offsets); the
API reads the same stores. Kafka is the one broker of both topologies. All of it shares
the same cores, so the figures show what the distributed set-up costs on one machine.

Per run (``--runs``; figures are medians over the runs):

1. freshness ladder: for each of ``--rates`` (posts/s), ``--step-s`` of posts by uniformly
   drawn authors (event time = send time) and, per post, the ``--mix`` of other events
   (engagements on recent posts, story publishes and views, new follows). Per post, the
   time from its event time to readable in its last follower's Redis feed
   (``bench_fanout.Tracker``); per step p50/p99, the fan-out's feed insertions/s and each
   job's records consumed/s (its consumer group's committed offsets) and lag at the
   step's end. A step whose backlog passes 3 s stops early (overloaded) and ends the run's
   ladder. Headline: the highest rate with median p99 <= 1 s, overloaded in no run.
   With the ranking job: per post by an author below the push threshold, the time from
   its event time to present in the ranked feeds of ``RANKED_SAMPLE`` of its followers
   (waited for up to ``RANKED_DRAIN_S`` after the step; the pairs still missing then are
   counted), and the refreshes/s the job completed (its queue's counter). The ranking
   job falling behind does not stop the ladder: every follower of every post is a
   refresh it owes (all users of the workload are active readers), far more than the
   fan-out's own work, so its lag is reported, not judged;
2. limits, while the jobs idle (caught up): ``redis-benchmark -P 64`` ZADD to random keys
   (``bench_fanout.redis_benchmark``, the fan-out's physical limit) and a raw
   confluent-kafka consume + fastavro decode of everything the run produced so far
   (``bench_features.raw_loop``, repeated for at least ``RAW_MIN_S``, records per CPU
   second); with the ranking job, once its refresh queue is empty (up to
   ``RANKED_QUEUE_WAIT_S``);
3. API latency: ``GET /v1/users/{u}/feed`` of users the ladder filled, open loop at each
   of ``--api-rates`` for ``--api-s`` (``bench/loadgen``, latency from the scheduled send
   time), while posts and their mix keep flowing at ``--api-post-rate`` (default: the
   headline rate so far, else the lowest rate; the flow stops early if the pipelines fall
   3 s behind); the freshness of those posts is recorded too. After each rate the HTTP
   floor (``bench/floor_app.py``: a constant feed page, no token check, no Redis; the same
   server and workers; ``--no-floor`` skips it) at the same rate under the same flow: the
   API's limit on this machine while the pipelines run.

Each ladder step and each API rate also reports where the CPU went, in shares of one core
(``bench/cpu.py``, from ``/proc``): the stack's servers, each job's session (its private
Prism included), the API's and the floor's servers, this process (the producer and the
pollers) and ``other`` (the load generator, the kernel, anything else running).

Ratios: the peak (over ladder steps) feed insertions/s against the ZADD limit, and the
peak records/s consumed by all jobs together against the raw consume + decode rate. Below
overload the offered load bounds both, so they say "how far from the limit at the load
reached", not capacity.

Output: ``<out>/e2e.json``, ``<out>/freshness.png``, ``<out>/api_latency.png``,
``<out>/throughput.png``, job and server logs in ``<out>/logs/`` (``bench/results/`` is
git-ignored). The README section "End-to-end benchmark" explains how to read the plots.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import redis  # noqa: E402

from bench.ladder import latency_summary, median_fields, ratio, summarize_ladder  # noqa: E402
from cpu import CpuSplit, format_shares, pids_by_session  # noqa: E402
from bench_fanout import (FRESHNESS_P99_MS, Graph, Job, Producer, Tracker,  # noqa: E402
                          apply_preset, delete_benchmark_keys, delete_prefix, graph_arguments,
                          make_posts, produce_step, redis_benchmark, start_poller)
from infra.settings import CLUSTER_CASSANDRA_NODES, TOPOLOGIES, StackSettings  # noqa: E402
from jobs.submit import PIPELINES as SUBMIT_PIPELINES  # noqa: E402
from domain.fanout import FanoutPolicy  # noqa: E402
from schemas.events import (EngagementEvent, EngagementKind, FollowEvent, FollowKind,  # noqa: E402
                            MediaType, PostEvent, StoryEvent, StoryEventKind, dlq_topic)
from schemas.keys import KeyLayout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
API_P99_MS, API_RATE = 5.0, 2000.0  # SPEC section 8: feed read p99 <= 5 ms at 2,000 req/s
RAW_MIN_S = 2.0
#: Checkpoint interval of the jobs on the cluster topology's Flink: their offsets
#: (what the ladder's records/s and lag read) commit at each checkpoint.
FLINK_CHECKPOINT_MS = 2000
PIPELINES = {  # module, topics read, extra options
    "fanout": ("pipelines.fanout", (PostEvent.TOPIC, FollowEvent.TOPIC), []),
    "features": ("pipelines.features", (EngagementEvent.TOPIC, PostEvent.TOPIC),
                 ["--sinks=redis,cassandra,top_followers"]),
    "stories": ("pipelines.stories", (StoryEvent.TOPIC,), []),
    "ranking": ("pipelines.ranking", (PostEvent.TOPIC, EngagementEvent.TOPIC, FollowEvent.TOPIC),
                ["--latency_log_s=10"]),  # + --model_dir
}
#: The jobs' niceness unless --job-nice says otherwise.
SHARED_NICE = ",".join(f"{name}={spec.shared_nice}" for name, spec in SUBMIT_PIPELINES.items())
RANKED_SAMPLE = 3      # followers per post whose ranked feed is watched
RANKED_DRAIN_S = 10.0  # how long after a step its posts may still reach ranked feeds
RANKED_QUEUE_WAIT_S = 120.0  # how long the limits wait for the ranking job's queue to empty
TRAIN = argparse.Namespace(train_users=1500, train_days=3.0)  # the default model's history
QUICK = dict(users=20_000, avg_followers=100, celebrities=1, rates="10,25,50,100", step_s=10.0,
             runs=1, api_rates="250,500,1000", api_s=6.0,
             benchmark_requests=300_000)
FULL = dict(users=50_000, avg_followers=100, celebrities=2, rates="10,25,50,100,200,400",
            step_s=30.0, runs=3, api_rates="500,1000,2000", api_s=20.0,
            benchmark_requests=1_000_000)


# ------------------------------------------------------------------ the mixed workload


class Mix:
    """The other events sent alongside each post, ``ratios[kind]`` per post on average.

    engagement: a like/view/comment/share/save by a random user on one of the last
    posts; story: a publish (one in three) or a view of a recent story; follow: a new
    follow between random users (the fan-out merges the followee's recent posts).
    """

    KINDS = ("engagement", "story", "follow")

    def __init__(self, producer: Producer, prefix: str, graph: Graph, ratios: dict[str, float],
                 id_base: int, seed: int = 5):
        self.producer, self.prefix, self.graph, self.ratios = producer, prefix, graph, ratios
        self.rng = random.Random(seed)
        self.acc = dict.fromkeys(self.KINDS, 0.0)
        self.sent = collections.Counter()
        self.recent_posts: collections.deque = collections.deque(maxlen=500)
        self.recent_stories: collections.deque = collections.deque(maxlen=200)
        self.next_id = id_base
        self.lock = threading.Lock()  # the API phase sends from a thread of its own

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _user(self) -> int:
        return self.rng.randint(1, self.graph.users)

    def after_post(self, post) -> None:
        with self.lock:
            e = post.event
            self.recent_posts.append((e.post_id, e.author_id))
            self.sent["post"] += 1
            now = e.event_time
            for kind in self.KINDS:
                self.acc[kind] += self.ratios.get(kind, 0.0)
                while self.acc[kind] >= 1.0:
                    self.acc[kind] -= 1.0
                    event = getattr(self, f"_{kind}")(now)
                    self.producer.send_event(self.prefix + event.TOPIC, event)
                    self.sent[kind] += 1

    def _engagement(self, now: int) -> EngagementEvent:
        post_id, author = self.rng.choice(self.recent_posts)
        kind = self.rng.choice((EngagementKind.VIEW,) * 6 + (
            EngagementKind.LIKE, EngagementKind.LIKE, EngagementKind.COMMENT,
            EngagementKind.SHARE, EngagementKind.SAVE))
        dwell = self.rng.randint(500, 8000) if kind is EngagementKind.VIEW else None
        return EngagementEvent(f"e2e-e{self._id()}", now, kind, self._user(), author, post_id,
                               MediaType.PHOTO, dwell)

    def _story(self, now: int) -> StoryEvent:
        if not self.recent_stories or self.rng.random() < 1 / 3:
            story = (self._id(), self._user())
            self.recent_stories.append(story)
            return StoryEvent(f"e2e-s{story[0]}", now, StoryEventKind.PUBLISHED, story[0],
                              story[1], created_at=now, expires_at=now + 86_400_000,
                              media_type=MediaType.PHOTO)
        story_id, author = self.rng.choice(self.recent_stories)
        return StoryEvent(f"e2e-v{self._id()}", now, StoryEventKind.VIEWED, story_id, author,
                          viewer_id=self._user())

    def _follow(self, now: int) -> FollowEvent:
        followee = self._user()
        while followee in self.graph.celebrities:
            followee = self._user()
        return FollowEvent(f"e2e-f{self._id()}", now, FollowKind.FOLLOW, self._user(), followee)


def parse_mix(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, text.split(",")):
        kind, _, value = part.partition("=")
        if kind not in Mix.KINDS:
            raise SystemExit(f"--mix: unknown kind {kind!r} (one of {', '.join(Mix.KINDS)})")
        out[kind] = float(value)
    return out


# ------------------------------------------------------------------ consumer positions


def positions(ctx) -> dict[str, dict[str, int]]:
    """Per job, per topic: records committed by its consumer group; and per topic the end."""
    from stores.kafka.lag import committed_offsets, end_offsets, sum_by_topic

    bootstrap, prefix = ctx.settings.kafka_bootstrap, ctx.prefix
    ends = sum_by_topic(end_offsets(bootstrap, [prefix + t for t in ctx.read_topics]))
    out = {"end": {t: ends[prefix + t] for t in ctx.read_topics}}
    for name, (job, topics) in ctx.jobs.items():
        done = sum_by_topic(committed_offsets(bootstrap, job.group, [prefix + t for t in topics]))
        out[name] = {t: done[prefix + t] for t in topics}
    return out


def consumed(before: dict, after: dict, seconds: float) -> dict:
    """Per job: records/s committed between two ``positions`` and the lag at ``after``."""
    out = {}
    for name in before:
        if name == "end":
            continue
        done = sum(after[name].values()) - sum(before[name].values())
        lag = sum(after["end"][t] - after[name][t] for t in after[name])
        out[name] = {"records_per_s": done / seconds, "lag": lag}
    return out


class RankedFreshness:
    """The ranking job's side of a ladder step: (follower, post) pairs awaited in ranked
    feeds (``bench_ranking.Watch``, polled from a thread) and the refreshes it completed."""

    def __init__(self, client: redis.Redis, keys: KeyLayout):
        from bench_ranking import Watch
        from stores.ranker import QueueConfig

        self._new_watch = lambda: Watch(client, keys)
        self.queue = QueueConfig().open(client, keys)
        self.lock = threading.Lock()
        self.watch = self._new_watch()
        self._refreshed = 0

    def start_step(self, graph: Graph, mix: Mix):
        """A new step; returns the ``on_send`` of its posts (the mix, then the watch)."""
        with self.lock:
            self.watch = self._new_watch()
        self._refreshed = self.queue.stats().get("refreshed", 0)

        def on_send(p) -> None:
            mix.after_post(p)
            followers = graph.followers[p.event.author_id]
            # A celebrity's audience is its most engaged followers, not the first ones.
            if len(followers) < graph.policy.push_threshold:
                with self.lock:
                    self.watch.add(followers[:RANKED_SAMPLE].tolist(), p.event)
        return on_send

    def poll(self) -> None:
        with self.lock:
            self.watch.poll()

    def wait_drained(self, timeout_s: float) -> float | None:
        """Wait until no refresh is due or claimed (the job has worked off its queue);
        seconds waited, or None if ``timeout_s`` passed first."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if not self.queue.waiting():
                return time.monotonic() - t0
            time.sleep(0.5)
        return None

    def end_step(self, produced_s: float) -> dict:
        """The step's figures, once its pairs are all seen or ``RANKED_DRAIN_S`` passed."""
        refreshes_per_s = ((self.queue.stats().get("refreshed", 0) - self._refreshed)
                           / max(produced_s, 1e-9))
        deadline = time.monotonic() + RANKED_DRAIN_S
        while self.watch.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        with self.lock:
            seen, missing = sorted(self.watch.seen), len(self.watch.pending)
        out = {"ranked_pairs": len(seen) + missing, "ranked_missing": missing,
               "refreshes_per_s": refreshes_per_s}
        if seen:
            summary = latency_summary(seen)
            out.update(ranked_p50_ms=summary["p50_ms"], ranked_p99_ms=summary["p99_ms"])
        return out


# ------------------------------------------------------------------ run context


class Ctx:
    def __init__(self, args, settings: StackSettings, out: Path):
        self.args, self.settings, self.out = args, settings, out
        tag = uuid.uuid4().hex[:8]
        self.prefix = f"bench.e2e{tag}."
        self.key_prefix = f"benche2e{tag}"
        self.keyspace = f"bench_e2e_{tag}"
        self.keys = KeyLayout(self.key_prefix)
        self.client = bench_client(settings)
        self.topics: list[str] = []
        self.jobs: dict[str, tuple[Job, tuple[str, ...]]] = {}
        self.server = None
        self.floor = None  # bench/floor_app.py: the HTTP floor under the same flow
        self.keyspace_made = False
        self.read_topics = sorted({t for name in args.pipelines
                                   for t in PIPELINES[name][1]} | {PostEvent.TOPIC})
        self._next_post = (int(tag[:5], 16) >> 1) << 36  # generator-like ids, unique per run
        self.log_dir = out / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ranked: RankedFreshness | None = None
        self.cpu = CpuSplit(self.cpu_groups)

    def cpu_groups(self) -> dict[str, list[int]]:
        """The processes whose CPU a phase reports: the stack's servers, each job's
        session, the API's and the floor's servers and this benchmark (its producer)."""
        from infra import processes

        leaders = {name: processes.running_pid(self.settings, name)
                   for name in ("kafka", "cassandra", "redis", "prism", "flink")}
        leaders.update((name, job.proc.pid) for name, (job, _) in self.jobs.items())
        leaders.update((name, server.proc.pid) for name, server in
                       (("api", self.server), ("floor", self.floor)) if server is not None)
        sessions = pids_by_session()  # one pass over /proc for all of them
        groups = {}
        for name, pid in leaders.items():
            if pid is None:
                continue
            try:
                groups[name] = sessions.get(os.getsid(pid), [])
            except ProcessLookupError:  # gone since: nothing to count
                groups[name] = []
        groups["bench"] = [os.getpid()]
        return groups

    def post_ids(self, n: int) -> int:
        """The first of ``n`` fresh post ids."""
        first, self._next_post = self._next_post, self._next_post + n
        return first

    def alive(self) -> None:
        for name, (job, _) in self.jobs.items():
            if job.poll() is not None:
                raise RuntimeError(f"the {name} job exited ({job.returncode}); see "
                                   f"{self.log_dir / (name + '.log')}")

    def cleanup(self, session) -> None:
        """Everything the run created; each part on its own so one failure skips nothing."""
        from confluent_kafka.admin import AdminClient

        steps = [("server", lambda: self.server and self.server.stop()),
                 ("floor", lambda: self.floor and self.floor.stop())]
        steps += [(f"job {n}", job.stop) for n, (job, _) in self.jobs.items()]
        if self.topics:
            def topics():
                admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
                for f in admin.delete_topics(self.topics, operation_timeout=30).values():
                    f.result(timeout=60)
            steps.append(("topics", topics))
        steps.append(("redis keys", lambda: delete_prefix(self.client, self.key_prefix)))
        if self.keyspace_made:
            steps.append(("keyspace", lambda: session.execute(
                f"DROP KEYSPACE IF EXISTS {self.keyspace}", timeout=120)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # report and go on with the rest of the clean-up
                print(f"clean-up of {what} failed: {exc}", flush=True)


def bench_client(settings: StackSettings):
    """A client of the topology's Redis with room for the graph's big pipelines: a
    ``RedisCluster`` (pipelines split by node, SCAN over every master) on the cluster
    topology."""
    if settings.clustered:
        from redis.cluster import RedisCluster

        return RedisCluster(host=settings.host, port=settings.cluster_redis_port,
                            socket_timeout=60)
    return redis.Redis.from_url(settings.redis_url, socket_timeout=60)


def require_topology(settings: StackSettings, jobs: int, wait_s: float = 60.0) -> None:
    """Stop with what to run when the cluster topology is asked for and not running, or
    when its free task slots stay fewer than ``jobs`` need (a job cancelled just before
    holds its slots a little longer)."""
    if not settings.clustered:
        return
    from infra import cluster
    from infra.services import flink_job_server_ready
    from jobs.submit import CLUSTER_PARALLELISM

    missing = [what for what, ok in (
        ("Redis Cluster", lambda: cluster.redis_cluster_ok(settings)),
        ("Flink job server", lambda: flink_job_server_ready(settings)),
        ("TaskManagers", lambda: len(cluster.registered_taskmanagers(settings))
         == len(cluster.TASKMANAGERS))) if not ok()]
    if missing:
        raise SystemExit(f"--topology cluster: {', '.join(missing)} not ready; start the "
                         "cluster topology with `feedbeam infra up --topology cluster`")
    needed, deadline = jobs * CLUSTER_PARALLELISM, time.monotonic() + wait_s
    while (free := (cluster.flink_rest(settings, "/overview") or {}).get(
            "slots-available", 0)) < needed:
        if time.monotonic() > deadline:
            raise SystemExit(f"--topology cluster: {free} free task slots, {needed} needed "
                             f"({jobs} jobs at parallelism {CLUSTER_PARALLELISM}); see the "
                             f"jobs holding them at http://{cluster.flink_master(settings)}")
        time.sleep(1.0)


def runner_options(ctx) -> tuple[str | None, list[str] | None]:
    """(private Prism binary, None) on the single stack; (None, Flink options) on the
    cluster topology: the session cluster's job server at ``feedbeam submit``'s
    parallelism, checkpoints every ``FLINK_CHECKPOINT_MS`` (offsets commit at each)."""
    if ctx.settings.clustered:
        from jobs.submit import runner_args

        # runner_args leaves out its own interval when the options given carry one.
        checkpoints = [f"--checkpointing_interval={FLINK_CHECKPOINT_MS}"]
        return None, runner_args("flink", ctx.settings, checkpoints) + checkpoints
    from infra.install import prism_binary

    return str(prism_binary(ctx.settings)), None


def start(ctx, graph: Graph, session) -> None:
    """Topics, keyspace, graph, jobs and the API server."""
    from jobs.topics import create_topics
    from stores.cassandra.session import migrate

    names = []
    for t in (PostEvent.TOPIC, EngagementEvent.TOPIC, StoryEvent.TOPIC, FollowEvent.TOPIC):
        names += [ctx.prefix + t, dlq_topic(ctx.prefix + t)]
    ctx.topics = names  # before creating, so an interrupted creation is cleaned up too
    create_topics(ctx.settings.kafka_bootstrap, names, partitions=ctx.args.partitions)
    ctx.keyspace_made = True
    migrate(session, ctx.keyspace,
            replication_factor=CLUSTER_CASSANDRA_NODES if ctx.settings.clustered else 1)
    load_s = graph.load(ctx.client, ctx.keys, following=True)
    print(f"set-up: {graph.edges:,} edges (followers and following sets) loaded in "
          f"{load_s:.1f}s, keyspace "
          f"{ctx.keyspace}, topics {ctx.prefix}*", flush=True)
    prism, runner = runner_options(ctx)
    for name in ctx.args.pipelines:
        module, topics, extra = PIPELINES[name]
        extra = [*extra, *(a for a in ctx.args.job_args.split(",") if a)]
        if name == "ranking":
            extra = [*extra, f"--model_dir={ctx.args.model_dir}",
                     *(a for a in ctx.args.ranking_args.split(",") if a)]
            ctx.ranked = RankedFreshness(ctx.client, ctx.keys)
        job = Job(ctx.settings, prism, ctx.prefix, ctx.key_prefix, ctx.keyspace,
                  ctx.log_dir / f"{name}.log", extra=extra, module=module,
                  nice=ctx.args.job_nice.get(name, 0), runner=runner)
        ctx.jobs[name] = (job, topics)


def start_server(ctx, policy: FanoutPolicy) -> None:
    from bench_serving import Server, free_port

    server, workers = ctx.args.serve.split(":")
    ctx.server = Server(server, int(workers), free_port(), ctx.settings.redis_port,
                        ctx.key_prefix, ctx.keyspace, policy.push_threshold,
                        ctx.log_dir / "serve.log", topology=ctx.settings.topology)
    if not ctx.args.no_floor:
        from bench_serving import FloorServer

        ctx.floor = FloorServer(int(workers), free_port(), ctx.log_dir / "floor.log")


def warm_up(ctx, producer: Producer, mix: Mix, graph: Graph, rng: np.random.Generator) -> None:
    """A few posts with their mix until every job has committed something, then
    ``--warm-s`` at the lowest rate (not recorded): the first bundles of a fresh job
    are slower than its steady state."""
    deadline = time.monotonic() + ctx.args.timeout_s
    while True:
        posts = make_posts(graph, ctx.keys, rng, 5, ctx.post_ids(5), int(time.time() * 1000))
        for p in posts:
            producer.send(p)
            mix.after_post(p)
        producer.flush()
        time.sleep(2.0)
        ctx.alive()
        pos = positions(ctx)
        waiting = [n for n in ctx.jobs if not sum(pos[n].values())]
        if not waiting and all(p.done_s is not None for p in posts):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"jobs not consuming after {ctx.args.timeout_s:.0f}s: {waiting}")
    rate = min(ctx.rates)
    n = int(rate * ctx.args.warm_s)
    if n:
        produce_step(producer, make_posts(graph, ctx.keys, rng, n, ctx.post_ids(n)), rate,
                     ctx.args.timeout_s, ctx.alive, on_send=mix.after_post)


# ------------------------------------------------------------------ phases


def ladder_run(ctx, run: int, producer, mix: Mix, graph: Graph, rng, steps: dict) -> list:
    """One pass over the rates; returns the posts produced (for the API's target users)."""
    produced = []
    for rate in ctx.rates:
        n = int(rate * ctx.args.step_s)
        posts = make_posts(graph, ctx.keys, rng, n, ctx.post_ids(n))
        before, t0, cpu0 = positions(ctx), time.time(), ctx.cpu.snapshot()
        on_send = mix.after_post if ctx.ranked is None else ctx.ranked.start_step(graph, mix)
        step = produce_step(producer, posts, rate, ctx.args.timeout_s, ctx.alive,
                            on_send=on_send)
        if ctx.ranked is not None:
            step.update(ctx.ranked.end_step(step["produced_s"]))
        last = max(p.done_s for p in posts)
        step["feed_inserts_per_s"] = sum(p.inserts for p in posts) / (last - t0)
        after = positions(ctx)
        step["pipelines"] = consumed(before, after, time.time() - t0)
        step["records_per_s"] = sum(v["records_per_s"] for v in step["pipelines"].values())
        step["load1"] = os.getloadavg()[0]
        step["cpu"] = ctx.cpu.shares(cpu0, ctx.cpu.snapshot())
        steps[rate].append(step)
        produced += posts
        print(f"  run {run + 1} {rate:>6g} posts/s: p50 {step['p50_ms']:6.0f} ms  p99 "
              f"{step['p99_ms']:6.0f} ms  achieved {step['achieved_rate']:6.1f}/s  feed inserts "
              f"{step['feed_inserts_per_s']:8,.0f}/s  consumed "
              + ", ".join(f"{n} {v['records_per_s']:,.0f}/s (lag {v['lag']})"
                          for n, v in step["pipelines"].items())
              + (f"  ranked p50 {step.get('ranked_p50_ms', float('nan')):,.0f} ms p99 "
                 f"{step.get('ranked_p99_ms', float('nan')):,.0f} ms, missing "
                 f"{step['ranked_missing']}/{step['ranked_pairs']}, refreshes "
                 f"{step['refreshes_per_s']:,.0f}/s" if "ranked_pairs" in step else "")
              + ("  OVERLOADED (stopped early)" if step["overloaded"] else "")
              + f"\n      CPU (share of one core): {format_shares(step['cpu'])}", flush=True)
        if step["overloaded"]:
            break
        time.sleep(1.0)
    return produced


def measure_limits(ctx) -> dict:
    from bench_features import raw_loop
    from stores.kafka import offsets as kafka_offsets

    drained_s = None
    if ctx.ranked is not None:  # its refreshes outlast the ladder; the limits need the CPU
        drained_s = ctx.ranked.wait_drained(RANKED_QUEUE_WAIT_S)
        print("  limits: the ranking job's refresh queue "
              + (f"empty after {drained_s:.0f}s" if drained_s is not None
                 else f"not empty after {RANKED_QUEUE_WAIT_S:g}s: measuring beside it"),
              flush=True)

    st = ctx.settings
    rb = redis_benchmark(st.host, st.cluster_redis_port if st.clustered else st.redis_port,
                         ctx.key_prefix, ctx.args.benchmark_requests, cluster=st.clustered)
    delete_benchmark_keys(ctx.client, ctx.key_prefix)
    conf = {"bootstrap.servers": ctx.settings.kafka_bootstrap}
    ranges = {ctx.prefix + t: kafka_offsets.resolve_offset_range(conf, ctx.prefix + t, None, None)
              for t in (PostEvent.TOPIC, EngagementEvent.TOPIC, StoryEvent.TOPIC,
                        FollowEvent.TOPIC)}
    # Repeated for at least RAW_MIN_S, per CPU second of this process (the loop and
    # librdkafka's threads): the run's topics are small (about 18,000 records in
    # --quick), so a pass's wall time is mostly fetch round trips between its
    # partitions (10.4-10.8k records/s first record to last, against 77k/s on 98k
    # records), not what consuming and decoding cost.
    n, cpu_s, started = 0, 0.0, time.monotonic()
    while time.monotonic() - started < RAW_MIN_S:
        cpu = time.process_time()
        n += raw_loop(ctx.settings.kafka_bootstrap, ranges)
        cpu_s += time.process_time() - cpu
    seconds = max(cpu_s, 1e-9)
    out = {"zadd_per_s": rb["random_keys"], "zadd_one_key_per_s": rb["one_key"],
           "raw_records_per_s": n / seconds, "raw_records": n}
    if drained_s is not None:
        out["ranking_queue_drained_s"] = drained_s
    return out


def api_phase(ctx, producer, mix: Mix, graph: Graph, rng, targets: Path, rate: float) -> dict:
    """Loadgen at each API rate while posts (and their mix) flow at ``rate``, and after
    each the HTTP floor (``bench/floor_app.py``, the same server and workers) at the same
    rate; the flow stops early if the pipelines fall 3 s behind (reported as
    overloaded)."""
    from bench_serving import loadgen, write_targets

    floor_targets = targets.with_name(targets.stem + "-floor.tsv")
    if ctx.floor is not None:
        write_targets(floor_targets, ctx.floor.base, range(1, 1001))

    total_s = len(ctx.api_rates) * (ctx.args.api_s + 2) + ctx.args.api_warmup_s + 10
    n = int(rate * total_s)
    posts = make_posts(graph, ctx.keys, rng, n, ctx.post_ids(n))
    stop, box = threading.Event(), {}

    def background():
        try:
            box["step"] = produce_step(producer, posts, rate, ctx.args.timeout_s, ctx.alive,
                                       on_send=mix.after_post, stop=stop)
        except Exception as exc:  # re-raised by the main thread below
            box["error"] = exc

    thread = threading.Thread(target=background, daemon=True, name="api-background")
    thread.start()
    out = []
    try:
        time.sleep(2.0)
        loadgen(ctx.loadgen, targets, min(ctx.api_rates), ctx.args.api_warmup_s)
        if ctx.floor is not None:
            loadgen(ctx.loadgen, floor_targets, min(ctx.api_rates), ctx.args.api_warmup_s)
        for api_rate in ctx.api_rates:
            cpu0 = ctx.cpu.snapshot()
            ping = start_redis_ping(ctx, ctx.args.api_s)
            res = loadgen(ctx.loadgen, targets, api_rate, ctx.args.api_s)
            res["cpu"] = ctx.cpu.shares(cpu0, ctx.cpu.snapshot())
            res["redis_ping"] = redis_ping_result(ping)
            res["offered_rps"] = api_rate
            non200 = sum(n for s, n in res["statuses"].items() if s != "200")
            line = (f"  API {api_rate:>6,.0f} req/s: p50 {res['p50_ms']:6.2f} ms  p99 "
                    f"{res['p99_ms']:7.2f} ms  achieved {res['achieved_rps']:7,.0f} req/s  "
                    f"(non-200 {non200}, errors {res['errors']})")
            if ctx.floor is not None:
                # The floor at the same rate right after, the same posts still flowing:
                # what any Python ASGI app gets from this machine under this load.
                cpu0 = ctx.cpu.snapshot()
                floor = loadgen(ctx.loadgen, floor_targets, api_rate, ctx.args.api_s)
                res["floor_cpu"] = ctx.cpu.shares(cpu0, ctx.cpu.snapshot())
                res["floor_p50_ms"], res["floor_p99_ms"] = floor["p50_ms"], floor["p99_ms"]
                line += f"  floor p50 {floor['p50_ms']:.2f} ms p99 {floor['p99_ms']:.2f} ms"
            out.append(res)
            pong = res["redis_ping"]
            if pong:
                line += (f"\n      Redis PING meanwhile (every 5 ms, a process of its own): "
                         f"p50 {pong['p50_ms']:.2f} ms p99 {pong['p99_ms']:.2f} ms "
                         f"max {pong['max_ms']:.1f} ms")
            print(line + f"\n      CPU during the API's run (share of one core): "
                  f"{format_shares(res['cpu'])}"
                  + (f"\n      CPU during the floor's run: {format_shares(res['floor_cpu'])}"
                     if "floor_cpu" in res else ""), flush=True)
    finally:
        stop.set()
        thread.join()
    if "error" in box:
        raise box["error"]
    step = box["step"]
    print(f"  freshness during the API load ({rate:g} posts/s + mix): p50 {step['p50_ms']:.0f} "
          f"ms  p99 {step['p99_ms']:.0f} ms over {step['posts']} posts"
          + ("  OVERLOADED (posts stopped early)" if step["overloaded"] else ""), flush=True)
    return {"api": out, "freshness": step, "post_rate": rate}


def start_redis_ping(ctx, seconds: float) -> subprocess.Popen:
    """``bench/redis_ping.py`` against the Redis the API reads (a cluster: its first
    master) for ``seconds``: what a command waits before Redis gets to it."""
    st = ctx.settings
    port = st.cluster_redis_port if st.clustered else st.redis_port
    return subprocess.Popen([sys.executable, str(REPO / "bench" / "redis_ping.py"),
                             "--host", st.host, "--port", str(port), "--seconds", str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def redis_ping_result(proc: subprocess.Popen) -> dict:
    """The probe's summary; empty (and a line saying why) if it failed."""
    out, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        print(f"  the Redis PING probe failed (exit {proc.returncode}): {err.strip()[-300:]}",
              flush=True)
        return {}
    return json.loads(out)


def api_targets(ctx, posts: list, graph: Graph, path: Path, limit: int = 2000) -> int:
    """Users whose feeds the ladder filled, one ``URL<TAB>token`` line each."""
    from bench_serving import write_targets

    users: set[int] = set()
    for p in posts:
        users.update(graph.targets(p.event.author_id).tolist())
        if len(users) >= limit:
            break
    if not users:  # nothing pushed yet (overloaded at once): any users, their feeds are empty
        users = set(range(1, min(limit, graph.users) + 1))
    write_targets(path, ctx.server.base, sorted(users)[:limit])
    return min(len(users), limit)


# ------------------------------------------------------------------ main


def parse_nice(parser, text: str) -> dict[str, int]:
    """``--job-nice``: one niceness for every job, or ``name=N`` pairs (others 0)."""
    try:
        if "=" not in text:
            return {name: int(text) for name in PIPELINES}
        pairs = dict(item.split("=", 1) for item in text.split(",") if item)
        out = {name: int(n) for name, n in pairs.items()}
    except ValueError:
        parser.error(f"--job-nice takes N or name=N,..., not {text!r}")
    if set(out) - set(PIPELINES) or not all(0 <= n <= 19 for n in out.values()):
        parser.error(f"--job-nice: jobs are {', '.join(PIPELINES)}, nicenesses 0-19")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    graph_arguments(parser, QUICK)
    parser.add_argument("--rates", help="comma-separated post rates (posts/s) of the ladder")
    parser.add_argument("--step-s", type=float, help="seconds per ladder step")
    parser.add_argument("--runs", type=int, help="runs of ladder + limits + API; medians")
    parser.add_argument("--pipelines", default="fanout,features,stories,ranking",
                        help="jobs to run (fanout always): comma-separated of "
                             + ", ".join(PIPELINES))
    parser.add_argument("--model-dir", type=Path,
                        help="the ranking job's model registry (default: one trained once by "
                             "feedbeam train --synthetic under the state dir, then reused)")
    parser.add_argument("--ranking-args", default="",
                        help="comma-separated extra options of the ranking job, e.g. "
                             "--debounce_s=10")
    parser.add_argument("--job-args", default="",
                        help="comma-separated extra options of every job, e.g. (on Flink) "
                             "--max_bundle_time_mills=100")
    parser.add_argument("--mix", default="engagement=4,story=0.5,follow=0.25",
                        help="other events per post: engagement, story, follow")
    parser.add_argument("--api-rates", help="comma-separated request rates (req/s)")
    parser.add_argument("--api-s", type=float, help="seconds per API rate")
    parser.add_argument("--api-post-rate", type=float,
                        help="posts/s (plus mix) flowing during the API measurements (default: "
                             "the headline rate so far, else the lowest ladder rate)")
    parser.add_argument("--warm-s", type=float, default=8.0,
                        help="seconds at the lowest rate before the ladder (not recorded)")
    parser.add_argument("--api-warmup-s", type=float, default=3.0, help="API warm-up seconds")
    parser.add_argument("--serve", default="granian:2",
                        help="server:workers of feedbeam serve (and of the floor)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the HTTP floor (bench/floor_app.py) beside the API")
    parser.add_argument("--job-nice", default=SHARED_NICE,
                        help="OS niceness of the jobs (their processes and their sessions' "
                             "scheduling groups; the API and the servers keep 0): N for all, "
                             "or per job (default %(default)s: `feedbeam submit`'s advice "
                             "for a machine shared with the API, jobs.submit.PipelineSpec)")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--linger-ms", type=int, default=5,
                        help="linger.ms of the load generator's producer (5: librdkafka's "
                             "default, what an application's producer does unless told "
                             "otherwise; 0 sends each record in a request of its own)")
    parser.add_argument("--benchmark-requests", type=int)
    parser.add_argument("--topology", choices=TOPOLOGIES,
                        help="single: the local stack, jobs on private Prism processes; "
                             "cluster: `feedbeam infra up --topology cluster` (Redis Cluster, "
                             "two Cassandra nodes at replication factor 2, jobs on the Flink "
                             "session cluster at parallelism 2); default FEEDBEAM_TOPOLOGY, "
                             "else single")
    parser.add_argument("--timeout-s", type=float,
                        help="how long jobs may take to start consuming, and a step to "
                             "finish (default 300 s; 900 s on the cluster topology, whose "
                             "job server uploads ~160 MB per job)")
    parser.add_argument("--out", type=Path, help="output directory "
                                                 "(default bench/results/e2e-<stamp>)")
    args = parser.parse_args(argv)
    apply_preset(args, QUICK, FULL)
    args.job_nice = parse_nice(parser, args.job_nice)
    args.pipelines = ["fanout"] + [p for p in args.pipelines.split(",") if p and p != "fanout"]
    if set(args.pipelines) - set(PIPELINES):
        parser.error(f"--pipelines takes {', '.join(PIPELINES)}")
    mix_ratios = parse_mix(args.mix)
    out = args.out or REPO / "bench" / "results" / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    # Ctrl-C (even if the shell started us with SIGINT ignored) and SIGTERM run the clean-up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from bench_serving import build_loadgen
    from stores.cassandra.session import new_cluster

    settings = StackSettings.from_env()
    if args.topology:
        settings = dataclasses.replace(settings, topology=args.topology)
    require_topology(settings, len(args.pipelines))
    args.timeout_s = args.timeout_s or (900.0 if settings.clustered else 300.0)
    if "ranking" in args.pipelines:
        from jobs.demo import ensure_model

        args.model_dir = args.model_dir or settings.state_dir / "bench" / "e2e-models"
        print(f"ranking model in {args.model_dir}:", flush=True)
        ensure_model(TRAIN, settings, args.model_dir)
    ctx = Ctx(args, settings, out)
    ctx.rates = [float(r) for r in args.rates.split(",")]
    ctx.api_rates = [float(r) for r in args.api_rates.split(",")]
    ctx.loadgen = build_loadgen(settings)
    policy = FanoutPolicy()
    results: dict = {
        "preset": "quick" if args.quick else "full",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mix_per_post": mix_ratios, "topology": settings.topology,
        "load_average_start": os.getloadavg(),
        "cpus": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t_start = time.monotonic()
    graph = Graph(args.users, args.avg_followers, args.celebrities, policy)
    print(f"graph: {args.users:,} users, {graph.edges:,} follow edges (mean "
          f"{graph.counts.mean():.0f} followers, {len(graph.celebrities)} celebrities); jobs: "
          f"{', '.join(args.pipelines)}; mix per post: {mix_ratios}", flush=True)
    results["graph"] = {"users": graph.users, "edges": graph.edges,
                        "mean_followers": float(graph.counts.mean()),
                        "celebrities": list(graph.celebrities)}
    cluster = new_cluster(settings.cassandra_host, settings.cassandra_port)
    session = cluster.connect()
    steps: dict[float, list[dict]] = {r: [] for r in ctx.rates}  # of the runs that finished
    limits, api_runs, runs_done = [], [], 0
    stop_poller = threading.Event()
    try:
        start(ctx, graph, session)
        start_server(ctx, policy)
        tracker = Tracker(ctx.client, ctx.keys)
        producer = Producer(settings.kafka_bootstrap, ctx.prefix + PostEvent.TOPIC,
                            linger_ms=args.linger_ms)
        producer.on_delivered = tracker.add
        mix = Mix(producer, ctx.prefix, graph, mix_ratios, id_base=0)
        rng = np.random.default_rng(7)
        start_poller(tracker, stop_poller)
        if ctx.ranked is not None:
            start_poller(ctx.ranked, stop_poller)
        t = time.monotonic()
        warm_up(ctx, producer, mix, graph, rng)
        print(f"jobs consuming after {time.monotonic() - t:.0f}s", flush=True)
        targets = Path(tempfile.mkstemp(prefix="targets-", suffix=".tsv", dir=out)[1])
        try:
            for run in range(args.runs):
                ctx.alive()
                run_steps: dict[float, list[dict]] = {r: [] for r in ctx.rates}
                posts = ladder_run(ctx, run, producer, mix, graph, rng, run_steps)
                so_far = {rate: steps[rate] + got for rate, got in run_steps.items()}
                limits.append(measure_limits(ctx))
                lim = limits[-1]
                print(f"  limits: redis-benchmark ZADD -P64 {lim['zadd_per_s']:,.0f}/s, raw "
                      f"consume+decode {lim['raw_records_per_s']:,.0f} records/s", flush=True)
                n_users = api_targets(ctx, posts, graph, targets)
                post_rate = args.api_post_rate or summarize_ladder(
                    so_far, run + 1, FRESHNESS_P99_MS)["headline_rate"] or min(ctx.rates)
                api_run = api_phase(ctx, producer, mix, graph, rng, targets, post_rate)
                api_run["users"] = n_users
                api_runs.append(api_run)
                steps, runs_done = so_far, runs_done + 1
        except RuntimeError as exc:  # a job died mid-run: keep and report the runs that finished
            results["error"] = f"run {runs_done + 1} of {args.runs} failed: {exc}"
            print(results["error"], flush=True)
            del limits[runs_done:]
        finally:
            targets.unlink(missing_ok=True)
        results["events_sent"] = dict(mix.sent)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop clean-up
        stop_poller.set()
        print("cleaning up ...", flush=True)
        ctx.cleanup(session)
        cluster.shutdown()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if not runs_done:
        raise SystemExit(results.get("error", "no run finished"))
    results["runs_done"] = runs_done
    results.update(summarize(ctx, steps, limits, api_runs, runs_done))
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.monotonic() - t_start
    (out / "e2e.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out)
    print_summary(results)
    print(f"\nwrote {out}/e2e.json, freshness.png, api_latency.png, throughput.png")
    return 0


def summarize(ctx, steps: dict, limits: list[dict], api_runs: list[dict], runs: int) -> dict:
    fresh = summarize_ladder(steps, runs, FRESHNESS_P99_MS)
    lim = median_fields(limits)
    rows = fresh["rates"]
    peak_inserts = max((r["feed_inserts_per_s"] for r in rows), default=None)
    peak_records = max((r["records_per_s"] for r in rows), default=None)
    api = []
    for i, rate in enumerate(ctx.api_rates):
        got = [run["api"][i] for run in api_runs if len(run["api"]) > i]
        row = {"offered_rps": rate, "runs": len(got)}
        row.update(median_fields(got, skip=("offered_rps", "rate")))
        row["non200"] = sum(n for g in got for s, n in g["statuses"].items() if s != "200")
        api.append(row)
    during = [run["freshness"] for run in api_runs]
    return {
        "freshness": fresh,
        "limits": {"runs": limits, **lim},
        "throughput": {
            "peak_feed_inserts_per_s": peak_inserts,
            "zadd_limit_per_s": lim.get("zadd_per_s"),
            "feed_inserts_ratio": ratio(peak_inserts, lim.get("zadd_per_s")),
            "peak_records_per_s": peak_records,
            "raw_limit_records_per_s": lim.get("raw_records_per_s"),
            "records_ratio": ratio(peak_records, lim.get("raw_records_per_s"))},
        "api": {"rows": api, "runs": api_runs, "p99_bar_ms": API_P99_MS,
                "bar_rate_rps": API_RATE,
                "freshness_during": median_fields(during, skip=("rate", "overloaded")),
                "post_rate": statistics.median(run["post_rate"] for run in api_runs)
                if api_runs else None,
                "overloaded_runs": sum(bool(d["overloaded"]) for d in during)},
    }


# ------------------------------------------------------------------ output


def _latency_plot(plt, path: Path, rows: list[dict], x_key: str, bar_ms: float,
                  bar_label: str, xlabel: str, ylabel: str, title: str, mark=None) -> None:
    """p50 and p99 of ``rows`` against ``x_key`` (log y) with the bar as a red line;
    ``mark(ax)`` adds what is particular to the plot."""
    fig, ax = plt.subplots(figsize=(8, 5))
    if rows:
        x = [r[x_key] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o-", label="p50")
        ax.plot(x, [r["p99_ms"] for r in rows], "s-", label="p99")
    ax.axhline(bar_ms, color="red", ls="--", lw=1, label=bar_label)
    if mark is not None:
        mark(ax)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = "load avg {:.1f} / {:.1f} (start / end), {} CPUs".format(
        results["load_average_start"][0], results["load_average_end"][0], results["cpus"])
    during = [s["load1"] for r in results["freshness"]["rates"] for s in r["steps"] if "load1" in s]
    if during:
        load += f", {min(during):.1f}-{max(during):.1f} in the steps"
    config = results["config"]
    fresh = results["freshness"]
    rows = fresh["rates"]

    def freshness_marks(ax):
        over = [r for r in rows if r["overloaded_runs"]]
        if over:
            ax.plot([r["rate"] for r in over], [r["p99_ms"] for r in over], "rx", ms=12, mew=2,
                    label="overloaded (stopped early)")
        best = fresh["headline_rate"]
        if best is not None:
            ax.axvline(best, color="green", ls=":", lw=1.5)
            ax.annotate(f"headline {best:g} posts/s", (best, FRESHNESS_P99_MS),
                        xytext=(5, 8), textcoords="offset points", color="green")
        ax.set_xscale("log")
        offered = [float(r) for r in config["rates"].split(",")]
        ax.set_xticks(offered, [f"{r:g}" for r in offered])
        ax.minorticks_off()
        ax.set_xlim(min(offered) / 1.3, max(offered) * 1.3)

    mix = ", ".join(f"{k} {v:g}" for k, v in results["mix_per_post"].items())
    _latency_plot(plt, out / "freshness.png", rows, "rate", FRESHNESS_P99_MS, "bar: p99 <= 1 s",
                  "offered post rate (posts/s; each post with its mix of other events)",
                  "post -> follower's Redis feed (ms)",
                  f"Freshness, jobs {'+'.join(config['pipelines'])} (median of "
                  f"{results['runs_done']} run(s))\nper post: {mix}\n{load}", freshness_marks)

    api = results["api"]["rows"]

    def api_marks(ax):
        for r in api:
            ax.annotate(f"{r['achieved_rps']:,.0f} done/s", (r["offered_rps"], r["p99_ms"]),
                        xytext=(4, 6), textcoords="offset points", fontsize=8)

    during = results["api"]["freshness_during"]
    _latency_plot(plt, out / "api_latency.png", api, "offered_rps", API_P99_MS,
                  "bar: p99 <= 5 ms at 2,000 req/s", "offered request rate (req/s, open loop)",
                  "GET /v1/users/{u}/feed latency (ms)",
                  f"API latency while the pipelines consume {results['api']['post_rate']:g} posts/s"
                  f" + mix (freshness then p99 {during.get('p99_ms', float('nan')):.0f} ms)"
                  f"\n{load}", api_marks)

    tp = results["throughput"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, title, value, limit, vlabel, llabel, r in (
            (axes[0], "fan-out: feed insertions/s", tp["peak_feed_inserts_per_s"],
             tp["zadd_limit_per_s"], "pipeline\n(peak step)", "redis-benchmark\nZADD -P64",
             tp["feed_inserts_ratio"]),
            (axes[1], "all jobs: records consumed/s", tp["peak_records_per_s"],
             tp["raw_limit_records_per_s"], "pipelines\n(peak step)", "raw consume\n+ decode",
             tp["records_ratio"])):
        vals = [value or 0, limit or 0]
        bars = ax.bar([vlabel, llabel], vals, color=["tab:blue", "tab:gray"])
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals])
        ax.set_yscale("log")
        ax.set_title(f"{title}\nratio {r:.1%}" if r is not None else title, fontsize=10)
    fig.suptitle(f"Throughput beside the limits measured in the same run\n{load}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)


def print_summary(r: dict) -> None:
    c, f, tp, api = r["config"], r["freshness"], r["throughput"], r["api"]
    print(f"\n==== end-to-end benchmark ({r['preset']} preset, median of {r['runs_done']} run(s), "
          f"{r['seconds']:.0f}s; load avg {r['load_average_start'][0]:.2f} at start, "
          f"{r['load_average_end'][0]:.2f} at end, {r['cpus']} CPUs) ====")
    if r.get("error"):
        print(f"NOTE: {r['error']} (figures are of the runs that finished)")
    loads = [s["load1"] for row in f["rates"] for s in row["steps"] if "load1" in s]
    if loads:
        print(f"load average (1 min) at the ends of the ladder steps: {min(loads):.2f} to "
              f"{max(loads):.2f}")
    print(f"workload: {r['graph']['users']:,} users, {r['graph']['edges']:,} edges; per post "
          f"{r['mix_per_post']}; jobs {', '.join(c['pipelines'])}; sent {r.get('events_sent')}")
    niced = {k: v for k, v in c["job_nice"].items() if v and k in c["pipelines"]}
    print(f"jobs' niceness: {niced or 0}; API {c['serve']}; producer linger {c['linger_ms']} ms")
    print(f"freshness (post -> follower's Redis feed), {c['step_s']:g}s per rate:")
    for row in f["rates"]:
        ok = row["p99_ms"] <= FRESHNESS_P99_MS and not row["overloaded_runs"]
        print(f"  {row['rate']:>6g} posts/s: p50 {row['p50_ms']:6.0f} ms  p99 "
              f"{row['p99_ms']:6.0f} ms  feed inserts {row['feed_inserts_per_s']:8,.0f}/s  "
              f"records {row['records_per_s']:8,.0f}/s  {'ok' if ok else 'FAIL'}"
              + (f" (overloaded in {row['overloaded_runs']}/{row['runs']} runs)"
                 if row["overloaded_runs"] else ""))
    best = f["headline_rate"]
    print(f"  HEADLINE: highest rate with p99 <= 1 s: "
          f"{f'{best:g} posts/s' if best is not None else 'none'}")
    ranked = [row for row in f["rates"] if "ranked_pairs" in row]
    if ranked:
        print(f"ranked freshness (post -> {RANKED_SAMPLE} followers' ranked feeds; still missing "
              f"{RANKED_DRAIN_S:g} s after the step: not counted in p50/p99):")
        for row in ranked:
            print(f"  {row['rate']:>6g} posts/s: p50 {row.get('ranked_p50_ms', float('nan')):6.0f}"
                  f" ms  p99 {row.get('ranked_p99_ms', float('nan')):6.0f} ms  missing "
                  f"{row['ranked_missing']:.0f} of {row['ranked_pairs']:.0f}  refreshes "
                  f"{row['refreshes_per_s']:,.0f}/s")
    print("API latency (GET feed) while the pipelines consume "
          f"{api['post_rate']:g} posts/s + mix:")
    for row in api["rows"]:
        floor = row.get("floor_p99_ms")
        print(f"  {row['offered_rps']:>6,.0f} req/s: p50 {row.get('p50_ms', float('nan')):6.2f} "
              f"ms  p99 {row.get('p99_ms', float('nan')):7.2f} ms  achieved "
              f"{row.get('achieved_rps', 0):7,.0f} req/s  non-200 {row['non200']}"
              + ("" if floor is None else
                 f"  | floor (bench/floor_app.py) p50 {row['floor_p50_ms']:.2f} ms p99 "
                 f"{floor:.2f} ms, API/floor p99 {row['p99_ms'] / floor:.1f}x"))
    d = api["freshness_during"]
    if d:
        print(f"  freshness meanwhile: p50 {d['p50_ms']:.0f} ms  p99 {d['p99_ms']:.0f} ms"
              + (f"  (posts stopped early, overloaded, in {api['overloaded_runs']} run(s))"
                 if api["overloaded_runs"] else ""))
    at_bar = [row for row in api["rows"] if row["offered_rps"] == API_RATE]
    if at_bar:
        verdict = "meets" if at_bar[0]["p99_ms"] <= API_P99_MS else "misses"
        print(f"  at {API_RATE:,.0f} req/s: {verdict} the bar (p99 <= {API_P99_MS:g} ms)")
        floor = at_bar[0].get("floor_p99_ms")
        if floor is not None and floor > API_P99_MS:
            print(f"  the floor itself misses it under this load (p99 {floor:.0f} ms): no "
                  "Python ASGI app on this machine meets the bar while the pipelines run")

    def fmt(v, spec=",.0f"):
        return "n/a" if v is None else format(v, spec)

    print("throughput vs limits measured in this run (peak ladder step; bounded by the offered "
          "load unless overloaded):")
    print(f"  fan-out feed inserts {fmt(tp['peak_feed_inserts_per_s']):>10}/s  vs redis-benchmark "
          f"ZADD -P64 {fmt(tp['zadd_limit_per_s']):>10}/s  ratio "
          f"{fmt(tp['feed_inserts_ratio'], '.2%')}")
    print(f"  records consumed     {fmt(tp['peak_records_per_s']):>10}/s  vs raw consume+decode "
          f"{fmt(tp['raw_limit_records_per_s']):>10}/s  ratio {fmt(tp['records_ratio'], '.2%')}")


if __name__ == "__main__":
    sys.exit(main())
