"""Benchmark: the fan-out on Prism beside its limits measured in the same run.

    .venv/bin/python bench/bench_fanout.py [--quick] [--users 100000] [--avg-followers 200]
        [--celebrities 3] [--posts 1000] [--runs 3] [--rates 5,10,25,50,100,250,500,1000]
        [--step-s 20] [--partitions 2] [--follows 200000] [--split-steps] [--job-args=A,B]
        [--skip naive,plain,follows,demo,freshness,memory,diagnostic]

On a ``jobs.workload`` graph (``--users`` users following ``--avg-followers``
accounts on average, ``--celebrities`` above the push threshold) loaded straight
into Redis, per run (medians of ``--runs``), each figure beside its limit:

* (a) posts: ``--posts`` CREATED events produced to fresh topics, then
  ``python -m pipelines.fanout`` (streaming, LOOPBACK, fresh consumer groups,
  the durable log on). Readable rate = feed inserts / first post hash written
  to the last post readable in its last target's feed, beside ``redis-benchmark
  -P 64`` ZADD to random keys; durable rate = the same inserts until both the
  Redis step's group committed the posts and the durable step's group the
  durable log (Cassandra written), beside the plain loop: the same feed
  entries written by this process to Redis (pipelined ZADD + trim) and
  Cassandra (``execute_concurrent``, the same table, rows and statement);
* (b) naive: one redis-py pipeline per post, Redis only (history);
* (c) follows: ``--follows`` FOLLOW events of a ``--users`` graph applied to
  empty stores, events/s until both groups committed (and until the Redis
  step's did), beside a plain loop writing their graph rows to Redis and
  Cassandra; and the demo's follow graph (``jobs.demo.DemoWorkload``), its
  time to durable;
* (d) freshness: one job, posts at each of ``--rates`` for ``--step-s`` (event
  time = produce time), per post the time until readable in its last target's
  feed; p50/p99 per rate and the highest rate with p99 <= 1 s;
* (e) memory: ``MEMORY USAGE`` of feeds up to the ``feed_cap``.

Topics, keyspace and Redis keys are unique per run and removed at the end.
Results: a summary block and ``bench/results/fanout.json``.
"""
from __future__ import annotations

import argparse
import importlib
import bisect
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import redis  # noqa: E402

from infra.settings import StackSettings  # noqa: E402
from bench.ladder import latency_summary, summarize_ladder  # noqa: E402
from domain.fanout import FanoutPolicy  # noqa: E402
from schemas.events import FollowEvent, MediaType, PostEvent, PostEventKind, dlq_topic  # noqa: E402
from schemas.keys import KeyLayout  # noqa: E402
from pipelines.common import DURABLE_GROUP_SUFFIX, DURABLE_LOG_TOPIC  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "fanout.json"
POLL_S = 0.02
OVERLOAD_S = 3.0
TARGET_RATIO = 0.50          # readable inserts/s vs redis-benchmark; durable vs the plain loop
TARGET_RATE = 250            # posts/s with freshness p99 <= 1 s
TARGET_FOLLOWS = 10_000      # follow events/s, durable
TARGET_DEMO_S = 10.0         # the demo's follow graph, durable
FRESHNESS_P99_MS = 1000.0
#: The quick preset's posts per run: 1,500 (about 300,000 feed inserts, applied in about a
#: second); 300 were applied in 0.2-0.3 s, too short a window for a steady rate.
QUICK = dict(users=20_000, avg_followers=200, celebrities=2, posts=1500, runs=3,
             rates="5,10,25,50,100,250,500", step_s=8.0, follows=50_000)
FULL = dict(users=100_000, avg_followers=200, celebrities=3, posts=1000, runs=3,
            rates="5,10,25,50,100,250,500,1000", step_s=20.0, follows=200_000)


# ------------------------------------------------------------------ graph


class Graph:
    """Follower lists of a generated workload, as the pipeline will see them in Redis."""

    def __init__(self, users: int, avg_followers: float, celebrities: int,
                 policy: FanoutPolicy, seed: int = 42):
        from jobs.workload import Workload, WorkloadConfig

        self.policy = policy
        self.t0 = 1_714_557_600_000 - 3_600_000  # follows an hour before the posts
        w = Workload(WorkloadConfig(start_ms=1_714_557_600_000, seed=seed, users=users,
                                    avg_following=avg_followers, celebrities=celebrities,
                                    push_threshold=policy.push_threshold))
        self.workload = w
        self.users = users
        self.edges = w.edge_count
        self.celebrities = w.celebrities
        # followers(u) is sorted by follower id: the score t0 + rank keeps that
        # order as "oldest follow first" in Redis.
        self.followers = {u: w.followers(u) for u in range(1, users + 1)}
        self.counts = np.array([len(self.followers[u]) for u in range(1, users + 1)])

    def targets(self, author: int) -> np.ndarray:
        """Who the pipeline pushes a post of ``author`` to (all users are active)."""
        fs = self.followers[author]
        if len(fs) < self.policy.push_threshold:
            return fs
        return fs[:self.policy.celebrity_top_n]

    def load(self, client: redis.Redis, keys: KeyLayout, batch: int = 200_000,
             following: bool = False) -> float:
        """ZADD every followers set in big pipelines; returns seconds.

        ``following``: also every user's following set (what the serving API reads
        to find the celebrities to pull), scored by follow time like the followers.
        """
        sets = [(keys.followers(u), fs) for u, fs in self.followers.items()]
        if following:
            sets += [(keys.following(u), self.workload.following(u))
                     for u in range(1, self.users + 1)]
        t = time.perf_counter()
        pipe, pending = client.pipeline(transaction=False), 0
        for key, members in sets:
            if not len(members):
                continue
            args = np.empty(2 * len(members), dtype=np.int64)
            args[0::2] = self.t0 + np.arange(len(members))
            args[1::2] = members
            pipe.execute_command("ZADD", key, *args.tolist())
            pending += len(members)
            if pending >= batch:
                pipe.execute()
                pipe, pending = client.pipeline(transaction=False), 0
        for u in self.celebrities:  # the flag the fan-out keeps beside the followers
            pipe.set(keys.celebrity(u), "1")
        pipe.execute()
        return time.perf_counter() - t


def check_layout(client: redis.Redis, graph: Graph, keys: KeyLayout, scratch: str) -> None:
    """The loaded followers sets equal what ``RedisFeedStore.apply_edges`` writes."""
    from stores.redis.feeds import RedisFeedStore
    from schemas.events import FollowKind

    store = RedisFeedStore(client, KeyLayout(scratch))
    author = next(u for u, fs in graph.followers.items() if 3 <= len(fs) <= 500)
    fs = graph.followers[author].tolist()
    store.apply_edges([FollowEvent(f"chk-{i}", graph.t0 + i, FollowKind.FOLLOW, f, author)
                       for i, f in enumerate(fs)])
    got = client.zrange(KeyLayout(scratch).followers(author), 0, -1, withscores=True)
    want = client.zrange(keys.followers(author), 0, -1, withscores=True)
    assert got == want, "loaded followers differ from apply_edges"
    assert store.followers(author) == fs


# ------------------------------------------------------------------ posts and markers


class Post:
    __slots__ = ("event", "inserts", "marker", "partition", "offset", "done_s")

    def __init__(self, event: PostEvent, inserts: int, marker: tuple[str, str]):
        self.event, self.inserts, self.marker = event, inserts, marker
        self.partition = self.offset = None
        self.done_s: float | None = None


def make_posts(graph: Graph, keys: KeyLayout, rng: np.random.Generator, n: int,
               first_id: int, event_time_ms: int | None = None) -> list[Post]:
    """``n`` posts by uniformly drawn authors; marker = (key, member) readable when done."""
    out = []
    for i, author in enumerate(rng.integers(1, graph.users + 1, n).tolist()):
        pid = first_id + i
        t = event_time_ms if event_time_ms is not None else 1_714_557_600_000 + i
        event = PostEvent(f"bench-{pid}", t, PostEventKind.CREATED, pid, author, t,
                          MediaType.PHOTO, 80, ("travel",))
        targets = graph.targets(author)
        if len(targets):
            marker = (keys.home_feed(int(targets[-1])), str(pid))
        else:  # nobody to push to: the timeline write is the last Redis write
            marker = (keys.author_timeline(author), str(pid))
        out.append(Post(event, len(targets), marker))
    return out


class Producer:
    """Produces posts and records their partition and offset from delivery reports."""

    def __init__(self, bootstrap: str, topic: str, linger_ms: int = 5):
        from confluent_kafka import Producer as KafkaProducer

        from schemas.codec import WireCodec

        self.topic = topic
        self.codec = WireCodec()
        self.producer = KafkaProducer({"bootstrap.servers": bootstrap,
                                       "linger.ms": linger_ms, "acks": "all"})
        self.on_delivered = None

    def send(self, post: Post) -> None:
        def delivered(err, msg, post=post):
            if err is not None:
                raise RuntimeError(f"delivery failed: {err}")
            post.partition, post.offset = msg.partition(), msg.offset()
            if self.on_delivered is not None:
                self.on_delivered(post)

        self.send_event(self.topic, post.event, on_delivery=delivered)

    def send_event(self, topic: str, event, on_delivery=None) -> None:
        """Produce any typed event to ``topic`` (record timestamp = its event time)."""
        value = self.codec.encode(event, topic)
        while True:
            try:
                self.producer.produce(topic, value, event.key, timestamp=event.event_time,
                                      on_delivery=on_delivery)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self) -> None:
        if self.producer.flush(120):
            raise RuntimeError("posts were not all delivered")


class Tracker:
    """Follows each partition in offset order and stamps when each post became readable.

    The job applies one partition's events in order, so per partition only the
    next few pending posts need a ZSCORE per poll.
    """

    def __init__(self, client: redis.Redis, keys: KeyLayout, window: int = 64):
        self.client, self.keys, self.window = client, keys, window
        self.lock = threading.Lock()
        self.parts: dict[int, list[tuple[int, Post]]] = {}
        self.next: dict[int, int] = {}
        self.pending = 0
        self.first_write_s: float | None = None
        self._watch_first: list[Post] = []

    def add(self, post: Post) -> None:
        with self.lock:
            lst = self.parts.setdefault(post.partition, [])
            bisect.insort(lst, (post.offset, post), key=lambda e: e[0])
            self.next.setdefault(post.partition, 0)
            self.pending += 1
            if len(self._watch_first) < 8 and self.first_write_s is None:
                self._watch_first.append(post)

    def poll(self) -> int:
        """One round; returns posts still pending."""
        now = time.time()
        if self.first_write_s is None and self._watch_first:
            pipe = self.client.pipeline(transaction=False)
            for p in self._watch_first:
                pipe.exists(self.keys.post(p.event.post_id))
            if any(pipe.execute()):
                self.first_write_s = now
        with self.lock:
            for part, lst in self.parts.items():
                while True:
                    i = self.next[part]
                    window = [p for _, p in lst[i:i + self.window]]
                    if not window:
                        break
                    pipe = self.client.pipeline(transaction=False)
                    for p in window:
                        pipe.zscore(*p.marker)
                    seen = pipe.execute()
                    for p, score in zip(window, seen):
                        if score is not None and p.done_s is None:
                            p.done_s = now
                            self.pending -= 1
                    while self.next[part] < len(lst) and lst[self.next[part]][1].done_s is not None:
                        self.next[part] += 1
                    if self.next[part] < i + len(window):
                        break
            return self.pending

    def wait(self, timeout_s: float, job=None) -> None:
        deadline = time.monotonic() + timeout_s
        while self.poll():
            if job is not None and job.poll() is not None:
                raise RuntimeError(f"the fan-out job exited ({job.returncode}); see its log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.pending} posts still not in their feeds after "
                                   f"{timeout_s:.0f}s")
            time.sleep(POLL_S)


# ------------------------------------------------------------------ the job


class Job:
    """``python -m <module>`` (default the fan-out) in its own process group (at OS
    niceness ``nice`` when not 0): on a private Prism at ``prism``, or with the runner
    options ``runner`` (e.g. ``jobs.submit.runner_args("flink", ...)``), against the
    Redis and Cassandra of ``settings``' topology."""

    def __init__(self, settings: StackSettings, prism: str | None, topic_prefix: str,
                 key_prefix: str, keyspace: str, log_path: Path, extra: list[str] = (),
                 module: str = "pipelines.fanout", group: str | None = None, nice: int = 0,
                 runner: list[str] | None = None):
        self.group = group or f"bench-fanout-{uuid.uuid4().hex[:8]}"
        self.durable_group = self.group + DURABLE_GROUP_SUFFIX
        if runner is None:
            runner = ["--runner=PrismRunner", f"--prism_location={prism}",
                      "--environment_type=LOOPBACK"]
        args = [
            *runner, "--streaming",
            f"--kafka_bootstrap={settings.kafka_bootstrap}", f"--consumer_group={self.group}",
            f"--topic_prefix={topic_prefix}", "--fallback_start=earliest",
            f"--redis_url={settings.redis_url}", f"--redis_key_prefix={key_prefix}",
            f"--cassandra_host={settings.cassandra_host}",
            f"--cassandra_port={settings.cassandra_port}",
            f"--cassandra_keyspace={keyspace}", *extra]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if nice:
            from infra.processes import lower_priority

            lower_priority(self.proc.pid, nice)

    def poll(self):
        return self.proc.poll()

    @property
    def returncode(self):
        return self.proc.returncode

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.log.close()


class FanoutJob:
    """The job under test (the fan-out, or ``module``): one job running both steps
    or, with ``--split-steps``, its Redis step and its durable step as two jobs (two
    worker processes) of one consumer group, the durable one at OS niceness
    ``durable_nice``. Stopped, polled and named like a ``Job``."""

    def __init__(self, ctx, topic_prefix: str, key_prefix: str, log_name: str,
                 extra: list[str] = (), keyspace: str | None = None,
                 module: str = "pipelines.fanout", group: str | None = None,
                 durable_nice: int = 0):
        group = group or f"bench-fanout-{uuid.uuid4().hex[:8]}"
        parts = (("-redis", ["--parts=redis"], 0),
                 ("-durable", ["--parts=durable"], durable_nice)) \
            if ctx.args.split_steps else (("", [], 0),)
        job_args = [a for a in ctx.args.job_args.split(",") if a]
        self.jobs = [Job(ctx.settings, ctx.prism, topic_prefix, key_prefix,
                         keyspace or ctx.keyspace,
                         ctx.log_dir / f"{log_name}{suffix}.log", [*extra, *job_args, *flags],
                         module=module, group=group, nice=nice)
                     for suffix, flags, nice in parts]
        self.group, self.durable_group = group, group + DURABLE_GROUP_SUFFIX
        self.log = self.jobs[0].log

    def poll(self):
        """None while every job runs, else the first exit code."""
        return next((code for code in (j.poll() for j in self.jobs) if code is not None), None)

    @property
    def returncode(self):
        return self.poll()

    def stop(self) -> None:
        for job in self.jobs:
            job.stop()


# ------------------------------------------------------------------ measures


def redis_benchmark(host: str, port: int, key_prefix: str, n: int,
                    cluster: bool = False) -> dict[str, float]:
    """Pipelined ZADD rates: to random feed-like keys (the limit) and to one key; with
    ``cluster``, to the Redis Cluster that ``host:port`` belongs to (``--cluster``:
    the random keys spread over its masters)."""
    # redis-benchmark --cluster puts a hash tag of each master's slots for '{tag}'
    # (one key per master for "one key"); keys without it meet MOVED errors.
    tag = ":{tag}" if cluster else ""
    out = {}
    for name, cmd in (("random_keys", [f"{key_prefix}:rb{tag}:__rand_int__", "__rand_int__",
                                       "__rand_int__"]),
                      ("one_key", [f"{key_prefix}:rb1{tag}", "__rand_int__", "__rand_int__"])):
        res = subprocess.run(["redis-benchmark", "-h", host, "-p", str(port), "-q", "-n", str(n),
                              *(["--cluster"] if cluster else []),
                              "-P", "64", "-r", "100000", "ZADD", *cmd],
                             capture_output=True, text=True, check=True, timeout=300)
        rates = re.findall(r"([\d.]+) requests per second", res.stdout)
        if not rates:
            raise RuntimeError(f"cannot parse redis-benchmark output: {res.stdout[-300:]}")
        out[name] = float(rates[-1])
    return out


def run_pipeline_once(ctx, run: int, posts: list[Post]) -> dict:
    """Produce ``posts`` to fresh topics, run the job, time first write to last insertion
    (readable) and to both groups' commits (durable)."""
    prefix = f"{ctx.prefix}r{run}."
    create_topics(ctx, prefix)
    producer = Producer(ctx.settings.kafka_bootstrap, prefix + PostEvent.TOPIC, linger_ms=20)
    for p in posts:
        producer.send(p)
    producer.flush()
    tracker = Tracker(ctx.client, ctx.keys)
    for p in posts:
        tracker.add(p)
    t_submit = time.time()
    job = FanoutJob(ctx, prefix, ctx.key_prefix, f"fanout-run{run}")
    try:
        tracker.wait(ctx.args.timeout_s, job)
        _, durable_s = wait_committed(ctx, prefix, [prefix + PostEvent.TOPIC], job)
    finally:
        job.stop()
    last = max(p.done_s for p in posts)
    start = tracker.first_write_s or t_submit
    inserts = sum(p.inserts for p in posts)
    return {"posts": len(posts), "inserts": inserts, "seconds": last - start,
            "inserts_per_s": inserts / (last - start), "posts_per_s": len(posts) / (last - start),
            "startup_s": start - t_submit, "durable_seconds": durable_s - start,
            "durable_inserts_per_s": inserts / (durable_s - start)}


def wait_committed(ctx, prefix: str, topics: list[str], job: FanoutJob,
                   poll_s: float = 0.05) -> tuple[float, float]:
    """When the job's Redis step committed the end of ``topics``, and when its durable
    step then committed the end of the durable log (epoch s). A bundle's offsets are
    committed after its writes, so the first is when every event is applied to Redis
    (its durable log records delivered), the second when Cassandra has them too."""
    from stores.kafka.lag import GroupLag, caught_up, end_offsets

    bootstrap = ctx.settings.kafka_bootstrap
    ends = end_offsets(bootstrap, topics)
    log = prefix + DURABLE_LOG_TOPIC
    deadline = time.monotonic() + ctx.args.timeout_s
    hot_s = log_ends = None
    with GroupLag(bootstrap, job.group, topics) as hot, \
            GroupLag(bootstrap, job.durable_group, [log]) as durable:
        while True:
            if hot_s is None and caught_up(hot.committed(), ends):
                hot_s = time.time()
                log_ends = end_offsets(bootstrap, [log])
            if hot_s is not None and caught_up(durable.committed(), log_ends):
                return hot_s, time.time()
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job did not commit the end of {topics} and {log}: "
                                   f"{hot.committed()}, {durable.committed()} of {ends}, "
                                   f"{log_ends}")
            time.sleep(poll_s)


def verify_sample(ctx, posts: list[Post], rng: np.random.Generator, k: int = 30) -> int:
    """Every target of ``k`` sampled posts has the post in its feed; returns feeds checked."""
    checked = 0
    for i in rng.choice(len(posts), size=min(k, len(posts)), replace=False).tolist():
        p = posts[i]
        targets = ctx.graph.targets(p.event.author_id).tolist()
        pipe = ctx.client.pipeline(transaction=False)
        for u in targets:
            pipe.zscore(ctx.keys.home_feed(u), str(p.event.post_id))
        missing = [u for u, s in zip(targets, pipe.execute()) if s is None]
        assert not missing, f"post {p.event.post_id} missing from {len(missing)} feeds"
        checked += len(targets)
    return checked


def naive_loop(ctx, posts: list[Post]) -> dict:
    """Per post: read the followers, one pipeline of ZADD + trim per follower."""
    keys = KeyLayout(ctx.key_prefix + "n")
    client = ctx.client
    stop = -(ctx.policy.feed_cap + 1)
    inserts = 0
    t = time.perf_counter()
    for p in posts:
        e = p.event
        followers = client.zrange(ctx.keys.followers(e.author_id), 0, -1)
        pipe = client.pipeline(transaction=False)
        member = {str(e.post_id): e.created_at}
        for f in followers:
            key = keys.home_feed(int(f))
            pipe.zadd(key, member)
            pipe.zremrangebyrank(key, 0, stop)
        pipe.execute()
        inserts += len(followers)
    seconds = time.perf_counter() - t
    return {"posts": len(posts), "inserts": inserts, "seconds": seconds,
            "inserts_per_s": inserts / seconds}


def plain_loop(ctx, posts: list[Post], chunk: int = 50) -> dict:
    """The durable limit: the feed entries of ``posts`` written by a plain loop, no Beam,
    no Kafka, no reads (targets from the graph in memory): per ``chunk`` posts one
    Redis pipeline (ZADD + trim per entry) and one ``execute_concurrent`` of the
    statement the store writes feed rows with (one per post and 200 users), same
    table and rows."""
    from cassandra.concurrent import execute_concurrent_with_args

    from schemas.cassandra import HOME_FEED_BY_USER, event_timestamp_us, time_bucket

    keys = KeyLayout(ctx.key_prefix + "p")
    client = ctx.client
    stop = -(ctx.policy.feed_cap + 1)
    session = ctx.session
    stmt = session.prepare(
        f"UPDATE {ctx.keyspace}.{HOME_FEED_BY_USER} USING TIMESTAMP ? SET author_id = ? "
        "WHERE user_id IN ? AND bucket = ? AND created_at = ? AND post_id = ?")
    inserts = 0
    t = time.perf_counter()
    for lo in range(0, len(posts), chunk):
        pipe = client.pipeline(transaction=False)
        rows = []
        for p in posts[lo:lo + chunk]:
            e = p.event
            targets = ctx.graph.targets(e.author_id).tolist()
            member = {str(e.post_id): e.created_at}
            for u in targets:
                key = keys.home_feed(u)
                pipe.zadd(key, member)
                pipe.zremrangebyrank(key, 0, stop)
            ts, bucket = event_timestamp_us(e.created_at), time_bucket(e.created_at)
            rows += [(ts, e.author_id, targets[i:i + 200], bucket, e.created_at, e.post_id)
                     for i in range(0, len(targets), 200)]
            inserts += len(targets)
        pipe.execute()
        for ok, result in execute_concurrent_with_args(session, stmt, rows, concurrency=64,
                                                       raise_on_first_error=False):
            if not ok:
                raise result
    seconds = time.perf_counter() - t
    delete_prefix(client, ctx.key_prefix + "p")
    return {"posts": len(posts), "inserts": inserts, "seconds": seconds,
            "inserts_per_s": inserts / seconds}


def in_process(ctx, posts: list[Post], with_cassandra: bool) -> dict:
    """``FeedFanout.apply`` on the posts without Beam/Kafka (diagnostic), with its durable
    copy written in the same batch or without one."""
    from stores.fanout import FeedFanout
    from stores.cassandra.feeds import CassandraFeedStore
    from stores.redis.feeds import RedisFeedStore

    r = RedisFeedStore.from_url(ctx.settings.redis_url, key_prefix=ctx.key_prefix)
    c = (CassandraFeedStore.connect(ctx.settings.host, ctx.settings.cassandra_port, ctx.keyspace)
         if with_cassandra else None)
    try:
        fanout = FeedFanout(r, c, ctx.policy)
        t = time.perf_counter()
        for i in range(0, len(posts), 500):
            fanout.apply([p.event for p in posts[i:i + 500]])
        seconds = time.perf_counter() - t
    finally:
        r.close()
        if c is not None:
            c.close()
    inserts = sum(p.inserts for p in posts)
    return {"posts": len(posts), "inserts": inserts, "seconds": seconds,
            "inserts_per_s": inserts / seconds}


def follow_events(workload, n: int) -> list[FollowEvent]:
    """The first ``n`` FOLLOW events of ``workload``'s graph (its edges in random order)."""
    out = []
    for _, _, event in workload.events():
        if not isinstance(event, FollowEvent) or len(out) >= n:
            break
        out.append(event)
    return out


def apply_follows(ctx, label: str, events: list[FollowEvent], push_threshold: int) -> dict:
    """Produce ``events`` to fresh topics and run the fan-out alone on empty stores (own
    key prefix and keyspace): follow events/s from its first edge written until its
    Redis step's group committed them (readable) and until its durable step's group
    committed the durable log (durable).

    Empty means both: a fresh Redis prefix beside a keyspace holding earlier runs'
    rows is a Redis that lost its data, which the job first restores from Cassandra
    (``stores.restore``), and that restore, not the follows, was most of what runs
    after the first one timed."""
    from stores.cassandra.session import migrate

    prefix = f"{ctx.prefix}{label}."
    key_prefix = f"{ctx.key_prefix}{label}"
    keyspace = f"{ctx.keyspace}_{label}"
    migrate(ctx.session, keyspace)
    create_topics(ctx, prefix)
    topic = prefix + FollowEvent.TOPIC
    producer = Producer(ctx.settings.kafka_bootstrap, topic, linger_ms=20)
    for e in events:
        producer.send_event(topic, e)
    producer.flush()
    keys = KeyLayout(key_prefix)
    watch = [keys.follower_edges(e.followee_id) for e in events[:8]]
    t_submit = time.time()
    job = FanoutJob(ctx, prefix, key_prefix, f"fanout-{label}",
                    extra=[f"--push_threshold={push_threshold}"], keyspace=keyspace)
    try:
        first = None
        deadline = time.monotonic() + ctx.args.timeout_s
        while first is None:
            if ctx.client.exists(*watch):
                first = time.time()
            elif job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fan-out job wrote no edge; see {job.log.name}")
            else:
                time.sleep(POLL_S)
        hot_s, durable_s = wait_committed(ctx, prefix, [topic], job)
    finally:
        job.stop()
        delete_prefix(ctx.client, key_prefix)
        ctx.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    n = len(events)
    return {"events": n, "startup_s": first - t_submit, "redis_seconds": hot_s - first,
            "durable_seconds": durable_s - first, "redis_per_s": n / (hot_s - first),
            "durable_per_s": n / (durable_s - first)}


def plain_follows(ctx, events: list[FollowEvent], chunk: int = 1000) -> dict:
    """The limit of the follows figure: the graph rows of ``events`` written by a plain
    loop, no Beam, no Kafka, no reads: per ``chunk`` events one Redis pipeline (the
    followers and following sets) and one ``execute_concurrent`` of unlogged batches
    of the stores' default size (both directions of each edge, the followee's
    count), the tables and statements the store writes, each table's rows in
    partition order and packed (``pack_batches``) as the store sends them."""
    from cassandra.concurrent import execute_concurrent

    from stores.cassandra.feeds import pack_batches
    from stores.config import DEFAULT_CASSANDRA_BATCH_ROWS
    from schemas.cassandra import (FOLLOWER_COUNTS, FOLLOWERS_BY_USER, FOLLOWING_BY_USER,
                                   event_timestamp_us)

    keys = KeyLayout(ctx.key_prefix + "q")
    ks, session = ctx.keyspace, ctx.session
    follow_in = session.prepare(f"INSERT INTO {ks}.{FOLLOWERS_BY_USER} (user_id, follower_id, "
                                "since) VALUES (?, ?, ?) USING TIMESTAMP ?")
    follow_out = session.prepare(f"INSERT INTO {ks}.{FOLLOWING_BY_USER} (user_id, followee_id, "
                                 "since) VALUES (?, ?, ?) USING TIMESTAMP ?")
    count = session.prepare(f"UPDATE {ks}.{FOLLOWER_COUNTS} USING TIMESTAMP ? SET followers = ? "
                            "WHERE user_id = ?")
    t = time.perf_counter()
    for lo in range(0, len(events), chunk):
        pipe = ctx.client.pipeline(transaction=False)
        counts: dict[int, int] = {}
        into, out = [], []
        for e in events[lo:lo + chunk]:
            ts = event_timestamp_us(e.event_time)
            pipe.zadd(keys.followers(e.followee_id), {str(e.follower_id): e.event_time})
            pipe.zadd(keys.following(e.follower_id), {str(e.followee_id): e.event_time})
            into.append((e.followee_id, e.follower_id, e.event_time, ts))
            out.append((e.follower_id, e.followee_id, e.event_time, ts))
            counts[e.followee_id] = e.event_time
        pipe.execute()
        rows = [(follow_in, row) for row in sorted(into)] + [(follow_out, row) for row in sorted(out)]
        rows += [(count, (event_timestamp_us(at), 1, user)) for user, at in counts.items()]
        work = pack_batches(rows, DEFAULT_CASSANDRA_BATCH_ROWS)
        for ok, result in execute_concurrent(session, work, concurrency=64,
                                             raise_on_first_error=False):
            if not ok:
                raise result
    seconds = time.perf_counter() - t
    delete_prefix(ctx.client, ctx.key_prefix + "q")
    return {"events": len(events), "seconds": seconds, "per_s": len(events) / seconds}


def follow_runs(ctx, label: str, name: str, events: list[FollowEvent],
                push_threshold: int) -> dict:
    """``apply_follows`` once per run; the runs and their medians."""
    runs = []
    for run in range(ctx.args.runs):
        res = apply_follows(ctx, f"{label}{run}", events, push_threshold)
        if "plain" not in ctx.skip:
            res["plain_per_s"] = plain_follows(ctx, events)["per_s"]
        runs.append(res)
        print(f"{name} run {run + 1}: {res['events']:,} follow events durable in "
              f"{res['durable_seconds']:.1f}s ({res['durable_per_s']:,.0f}/s; Redis "
              f"{res['redis_per_s']:,.0f}/s), start-up {res['startup_s']:.1f}s"
              + (f"; plain loop {res['plain_per_s']:,.0f}/s" if "plain_per_s" in res else ""),
              flush=True)
    figures = ("durable_per_s", "redis_per_s", "durable_seconds", "redis_seconds", "plain_per_s")
    return {"runs": runs, "events": len(events),
            **{k: statistics.median(r[k] for r in runs) for k in figures if k in runs[0]}}


def demo_graph():
    """The demo's workload (``jobs.demo.DemoWorkload``) and its follow graph events."""
    from jobs.demo import DemoWorkload
    from jobs.workload import Workload, WorkloadConfig

    d = DemoWorkload()
    w = Workload(WorkloadConfig(start_ms=1_714_557_600_000, seed=d.seed, users=d.users,
                                avg_following=d.avg_following, celebrities=d.celebrities,
                                push_threshold=d.push_threshold))
    return d, follow_events(w, w.edge_count)


def produce_step(producer: Producer, posts: list[Post], rate: float, timeout_s: float,
                 alive=None, on_send=None, stop: threading.Event | None = None) -> dict:
    """Produce ``posts`` at ``rate`` (event time = send time), wait until each is readable.

    Returns the step's freshness (event time -> readable in its last target's
    feed) and ``overloaded``: the backlog passed ``OVERLOAD_S`` and the step
    stopped producing early (``posts`` is cut to what was sent). ``alive()``
    raises if the job under test died; ``on_send(post)`` runs after each post
    is sent (a mixed workload sends its other events there); ``stop`` set ends
    the producing early (not counted as overloaded).
    """
    t0 = time.time()
    overloaded, oldest, sent = False, 0, len(posts)
    for i, p in enumerate(posts):
        if stop is not None and stop.is_set():
            sent = i
            break
        due = t0 + i / rate
        while True:
            now = time.time()
            if now >= due:
                break
            producer.producer.poll(min(due - now, 0.01))
        now_ms = int(time.time() * 1000)
        p.event = PostEvent(p.event.event_id, now_ms, PostEventKind.CREATED,
                            p.event.post_id, p.event.author_id, now_ms,
                            MediaType.PHOTO, 80, ("travel",))
        producer.send(p)
        if on_send is not None:
            on_send(p)
        if i % 25 == 0 and time.time() - t0 > OVERLOAD_S:
            while oldest < i and posts[oldest].done_s is not None:
                oldest += 1
            if time.time() - posts[oldest].event.event_time / 1000 > OVERLOAD_S:
                overloaded, sent = True, i + 1
                break
    del posts[sent:]
    producer.flush()
    produced_s = time.time() - t0
    deadline = time.monotonic() + timeout_s
    while any(p.done_s is None for p in posts):
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise RuntimeError("freshness step did not drain")
        time.sleep(0.1)
    step = {"rate": rate, "posts": len(posts), "achieved_rate": len(posts) / produced_s,
            "overloaded": overloaded, "produced_s": produced_s}
    step.update(latency_summary(p.done_s * 1000 - p.event.event_time for p in posts))
    return step


def freshness(ctx, rates: list[int], step_s: float, runs: int) -> dict:
    """One job; per run, a ladder of produce rates; per step, freshness of every post."""
    prefix = f"{ctx.prefix}f."
    create_topics(ctx, prefix)
    tracker = Tracker(ctx.client, ctx.keys)
    producer = Producer(ctx.settings.kafka_bootstrap, prefix + PostEvent.TOPIC, linger_ms=0)
    producer.on_delivered = tracker.add
    job = FanoutJob(ctx, prefix, ctx.key_prefix, "fanout-freshness", extra=["--freshness_log_s=5"])
    rng = np.random.default_rng(7)
    next_id = ctx.next_post_id(10_000_000)
    stop_poller = threading.Event()

    def alive():
        if job.poll() is not None:
            raise RuntimeError("the fan-out job exited; see its log")

    steps: dict[int, list[dict]] = {r: [] for r in rates}
    try:
        # Warm-up: the job is up and applying before the first step starts.
        warm = make_posts(ctx.graph, ctx.keys, rng, 5, next_id, int(time.time() * 1000))
        next_id += 5
        for p in warm:
            producer.send(p)
        producer.flush()
        tracker.wait(ctx.args.timeout_s, job)
        start_poller(tracker, stop_poller)
        for run in range(runs):
            for rate in rates:
                n = int(rate * step_s)
                posts = make_posts(ctx.graph, ctx.keys, rng, n, next_id)
                next_id += n
                step = produce_step(producer, posts, rate, ctx.args.timeout_s, alive)
                steps[rate].append(step)
                print(f"  freshness run {run + 1} {rate:>5}/s: {len(posts)} posts, "
                      f"p50 {step['p50_ms']:.0f} ms, p99 {step['p99_ms']:.0f} ms"
                      + ("  OVERLOADED (stopped early)" if step["overloaded"] else ""),
                      flush=True)
                if step["overloaded"]:
                    break
                time.sleep(1.0)
    finally:
        stop_poller.set()
        job.stop()
    ladder = summarize_ladder(steps, runs, FRESHNESS_P99_MS)
    return {"step_s": step_s, "poll_s": POLL_S, "rates": ladder["rates"],
            "highest_rate_p99_le_1s": ladder["headline_rate"]}


def start_poller(tracker: Tracker, stop: threading.Event) -> threading.Thread:
    """A daemon thread polling ``tracker`` every ``POLL_S`` until ``stop`` is set."""
    def poll():
        while not stop.is_set():
            tracker.poll()
            time.sleep(POLL_S)

    thread = threading.Thread(target=poll, daemon=True, name="freshness-poller")
    thread.start()
    return thread


def memory(ctx, cap: int, sample: int = 200) -> dict:
    """Bytes per feed: the run's feeds, and synthetic feeds at sizes up to the cap."""
    client = ctx.client
    feeds = [k for k in client.scan_iter(match=f"{ctx.key_prefix}:feed:*", count=5000)]
    rng = np.random.default_rng(3)
    out: dict = {"feeds_after_run": len(feeds)}
    if feeds:
        pick = [feeds[i] for i in rng.choice(len(feeds), size=min(sample, len(feeds)),
                                             replace=False)]
        pipe = client.pipeline(transaction=False)
        for k in pick:
            pipe.memory_usage(k, samples=0)
            pipe.zcard(k)
        res = pipe.execute()
        mem, size = res[0::2], res[1::2]
        out["run_feeds"] = {"sampled": len(pick), "mean_entries": float(np.mean(size)),
                            "mean_bytes": float(np.mean(mem)),
                            "bytes_per_entry": float(np.sum(mem) / max(np.sum(size), 1))}
    # Synthetic feeds: generator-style post ids (~2**58) and ms scores.
    base_id = 0x2A5A5A << 36
    synthetic = {}
    for size, n in ((20, 500), (100, 500), (200, 300), (cap, 200)):
        key_prefix = f"{ctx.key_prefix}m{size}"
        keys = KeyLayout(key_prefix)
        before = client.info("memory")["used_memory"]
        pipe = client.pipeline(transaction=False)
        for u in range(n):
            ids = base_id + rng.integers(0, 1 << 30, size)
            scores = 1_714_557_600_000 + rng.integers(0, 7 * 86_400_000, size)
            pipe.zadd(keys.home_feed(u), dict(zip(map(str, ids.tolist()), scores.tolist())))
            if u % 50 == 49:
                pipe.execute()
        pipe.execute()
        after = client.info("memory")["used_memory"]
        pipe = client.pipeline(transaction=False)
        for u in range(min(n, 50)):
            pipe.memory_usage(keys.home_feed(u), samples=0)
            pipe.object("encoding", keys.home_feed(u))
        res = pipe.execute()
        mem = res[0::2]
        synthetic[size] = {"feeds": n, "memory_usage_bytes": float(np.mean(mem)),
                           "info_delta_bytes_per_feed": (after - before) / n,
                           "encoding": res[1].decode() if isinstance(res[1], bytes) else res[1]}
        delete_prefix(client, key_prefix)
    out["synthetic"] = synthetic
    out["users_total_at_cap_gb"] = synthetic[cap]["info_delta_bytes_per_feed"] * ctx.graph.users / 1e9
    return out


# ------------------------------------------------------------------ plumbing


def create_topics(ctx, prefix: str) -> None:
    """The fan-out's topics under ``prefix``, its durable log included (the job would
    create that one itself; made here so the run's cleanup deletes it)."""
    from jobs.topics import create_topics as create

    names = []
    for t in (PostEvent.TOPIC, FollowEvent.TOPIC, DURABLE_LOG_TOPIC):
        names += [prefix + t, dlq_topic(prefix + t)]
    create(ctx.settings.kafka_bootstrap, names, partitions=ctx.args.partitions)
    ctx.topics += names


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    from jobs.clean import unlink_keys

    return unlink_keys(client, f"{prefix}:*", batch=5000)


def delete_benchmark_keys(client: redis.Redis, key_prefix: str) -> None:
    """What ``redis_benchmark`` wrote: ``<key_prefix>:rb:*`` and ``<key_prefix>:rb1*``."""
    from jobs.clean import unlink_keys

    delete_prefix(client, key_prefix + ":rb")
    unlink_keys(client, f"{key_prefix}:rb1*", batch=5000)


class Ctx:
    def __init__(self, args, settings, prism, graph, policy, client):
        self.args, self.settings, self.prism, self.graph, self.policy = (
            args, settings, prism, graph, policy)
        self.client = client
        self.session = None  # Cassandra, for the plain loops
        self.skip: set[str] = set()
        tag = uuid.uuid4().hex[:8]
        self.prefix = f"bench.fo{tag}."
        self.key_prefix = f"benchfo{tag}"
        self.keyspace = f"bench_fo_{tag}"
        self.keys = KeyLayout(self.key_prefix)
        self.topics: list[str] = []
        self.log_dir = Path(settings.state_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._post_base = (int(tag[:5], 16) >> 1) << 36

    def next_post_id(self, offset: int) -> int:
        return self._post_base + offset


def graph_arguments(parser: argparse.ArgumentParser, quick: dict) -> None:
    """``--quick`` and the follower graph's size (``None`` unless given: see ``apply_preset``)."""
    parser.add_argument("--quick", action="store_true",
                        help=f"small preset for a few minutes: {quick}")
    parser.add_argument("--users", type=int)
    parser.add_argument("--avg-followers", type=float)
    parser.add_argument("--celebrities", type=int)


def apply_preset(args: argparse.Namespace, quick: dict, full: dict) -> None:
    """Fill every option left ``None`` from the quick or the full preset."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    graph_arguments(parser, QUICK)
    parser.add_argument("--posts", type=int, help="posts per pipeline run")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--rates", help="comma-separated produce rates (posts/s) for freshness")
    parser.add_argument("--step-s", type=float, help="seconds per freshness rate step")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--benchmark-requests", type=int, default=2_000_000)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--follows", type=int, help="follow events per follow run")
    parser.add_argument("--split-steps", action="store_true",
                        help="run the fan-out's Redis step and durable step as two jobs "
                             "(--parts), each in a worker process of its own")
    parser.add_argument("--job-args", default="",
                        help="comma-separated flags for every fan-out job, e.g. "
                             "--max_records_per_bundle=20000")
    parser.add_argument("--skip", default="", help="comma-separated: naive, plain, follows, demo, "
                                                   "freshness, memory, diagnostic")
    args = parser.parse_args(argv)
    apply_preset(args, QUICK, FULL)
    skip = {s for s in args.skip.split(",") if s}
    rates = [int(r) for r in args.rates.split(",")]

    importlib.import_module("cassandra.cluster")  # fail early if the driver is missing
    from confluent_kafka.admin import AdminClient

    from infra.install import prism_binary
    from stores.cassandra.session import migrate, new_cluster

    settings = StackSettings.from_env()
    prism = str(prism_binary(settings))
    policy = FanoutPolicy()
    t = time.perf_counter()
    graph = Graph(args.users, args.avg_followers, args.celebrities, policy)
    print(f"graph: {args.users:,} users, {graph.edges:,} follow edges "
          f"(mean {graph.counts.mean():.0f} followers, max {graph.counts.max():,}, "
          f"{len(graph.celebrities)} celebrities >= {policy.push_threshold:,}) "
          f"built in {time.perf_counter() - t:.1f}s", flush=True)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=60)
    ctx = Ctx(args, settings, prism, graph, policy, client)
    ctx.skip = skip
    cluster = new_cluster(settings.host, settings.cassandra_port)
    session = ctx.session = cluster.connect()
    results: dict = {"preset": "quick" if args.quick else "full",
                     "config": {k: getattr(args, k) for k in
                                ("users", "avg_followers", "celebrities", "posts", "runs",
                                 "rates", "step_s", "partitions", "follows", "split_steps",
                                 "job_args")},
                     "policy": {"push_threshold": policy.push_threshold,
                                "celebrity_top_n": policy.celebrity_top_n,
                                "feed_cap": policy.feed_cap}}
    try:
        migrate(session, ctx.keyspace)
        load_s = graph.load(client, ctx.keys)
        check_layout(client, graph, ctx.keys, ctx.key_prefix + "chk")
        delete_prefix(client, ctx.key_prefix + "chk")
        print(f"loaded {graph.edges:,} followers entries into Redis in {load_s:.1f}s "
              f"({graph.edges / load_s:,.0f}/s); keyspace {ctx.keyspace} migrated", flush=True)
        results["graph"] = {"users": graph.users, "edges": graph.edges,
                            "mean_followers": float(graph.counts.mean()),
                            "max_followers": int(graph.counts.max()),
                            "celebrities": list(graph.celebrities), "load_s": load_s,
                            "loaded": "followers zsets straight into Redis (score = follow "
                                      "time, oldest first), checked equal to apply_edges"}

        rng = np.random.default_rng(11)
        bench, pipeline, naive, plain = [], [], [], []
        for run in range(args.runs):
            posts = make_posts(graph, ctx.keys, rng, args.posts, ctx.next_post_id(run * 1_000_000))
            rb = redis_benchmark(settings.host, settings.redis_port, ctx.key_prefix,
                                 args.benchmark_requests)
            delete_benchmark_keys(client, ctx.key_prefix)
            bench.append(rb)
            res = run_pipeline_once(ctx, run, posts)
            res["verified_feeds"] = verify_sample(ctx, posts, rng)
            pipeline.append(res)
            line = (f"run {run + 1}: redis-benchmark ZADD -P64 {rb['random_keys']:,.0f}/s "
                    f"(one key {rb['one_key']:,.0f}/s)  pipeline readable "
                    f"{res['inserts_per_s']:,.0f} inserts/s ({res['posts_per_s']:,.1f} posts/s, "
                    f"{res['inserts']:,} inserts in {res['seconds']:.1f}s, start-up "
                    f"{res['startup_s']:.1f}s), durable {res['durable_inserts_per_s']:,.0f}/s")
            if "plain" not in skip:
                pl = plain_loop(ctx, make_posts(graph, ctx.keys, rng, args.posts,
                                                ctx.next_post_id(run * 1_000_000 + 500_000)))
                plain.append(pl)
                line += f"  plain loop {pl['inserts_per_s']:,.0f}/s"
            if "naive" not in skip:
                nv = naive_loop(ctx, posts)
                naive.append(nv)
                line += f"  naive {nv['inserts_per_s']:,.0f} inserts/s"
            print(line, flush=True)
        results["redis_benchmark"] = bench
        results["pipeline"] = pipeline
        results["naive"] = naive
        results["plain_loop"] = plain
        limit = statistics.median(b["random_keys"] for b in bench)
        rate = statistics.median(p["inserts_per_s"] for p in pipeline)
        durable = statistics.median(p["durable_inserts_per_s"] for p in pipeline)
        results["summary"] = {"limit_zadd_per_s": limit, "pipeline_inserts_per_s": rate,
                              "ratio": rate / limit, "pipeline_durable_inserts_per_s": durable}
        if plain:
            plain_rate = statistics.median(p["inserts_per_s"] for p in plain)
            results["summary"].update(plain_loop_inserts_per_s=plain_rate,
                                      durable_ratio=durable / plain_rate)
        if naive:
            results["summary"]["naive_inserts_per_s"] = statistics.median(
                n["inserts_per_s"] for n in naive)

        if "follows" not in skip:
            events = follow_events(graph.workload, args.follows)
            results["follows"] = follow_runs(ctx, "f", "follows", events, policy.push_threshold)
        if "demo" not in skip:
            demo, events = demo_graph()
            results["demo_graph"] = {"users": demo.users, **follow_runs(
                ctx, "d", "demo graph", events, demo.push_threshold)}

        if "diagnostic" not in skip:
            diag = {}
            n = min(args.posts, 300)
            for label, with_c in (("redis_and_cassandra_inline", True), ("redis_only", False)):
                posts = make_posts(graph, ctx.keys, rng, n, ctx.next_post_id(
                    (50 + len(diag)) * 1_000_000))
                diag[label] = in_process(ctx, posts, with_c)
                print(f"diagnostic FeedFanout in-process, {label}: "
                      f"{diag[label]['inserts_per_s']:,.0f} inserts/s", flush=True)
            results["diagnostic_in_process"] = diag

        if "freshness" not in skip:
            results["freshness"] = freshness(ctx, rates, args.step_s, args.runs)
        if "memory" not in skip:
            results["memory"] = memory(ctx, policy.feed_cap)
    finally:
        if ctx.topics:
            admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
            for f in admin.delete_topics(ctx.topics, operation_timeout=30).values():
                try:
                    f.result(timeout=60)
                except Exception as exc:  # keep cleaning the rest
                    print(f"topic cleanup: {exc}")
        session.execute(f"DROP KEYSPACE IF EXISTS {ctx.keyspace}", timeout=120)
        cluster.shutdown()
        for p in (ctx.key_prefix, ctx.key_prefix + "n", ctx.key_prefix + "p",
                  ctx.key_prefix + "q", ctx.key_prefix + "chk"):
            delete_prefix(client, p)
        delete_benchmark_keys(client, ctx.key_prefix)

    print_summary(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


def _verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_summary(r: dict) -> None:
    s, g, c = r["summary"], r["graph"], r["config"]
    print(f"\n==== fan-out benchmark ({r['preset']} preset; median of {c['runs']} runs; "
          f"{'steps as two jobs' if c['split_steps'] else 'one job'}) ====")
    print(f"graph: {g['users']:,} users, {g['edges']:,} edges, mean {g['mean_followers']:.0f} "
          f"followers, max {g['max_followers']:,}, celebrities {g['celebrities']}")
    print(f"  loaded: {g['loaded']}")
    print(f"(a) posts readable in Redis {s['pipeline_inserts_per_s']:>10,.0f} feed inserts/s  "
          f"({c['posts']:,} posts/run)")
    print(f"    redis-benchmark ZADD    {s['limit_zadd_per_s']:>10,.0f} /s (-P 64, random keys)")
    print(f"    ratio                   {s['ratio']:>10.2%}   (target >= {TARGET_RATIO:.0%}: "
          f"{_verdict(s['ratio'] >= TARGET_RATIO)})")
    print(f"    durable (both groups committed) {s['pipeline_durable_inserts_per_s']:,.0f} "
          f"feed inserts/s")
    if "plain_loop_inserts_per_s" in s:
        print(f"    plain loop, Redis + Cassandra {s['plain_loop_inserts_per_s']:,.0f} /s "
              f"(same entries, no Beam/Kafka)")
        print(f"    durable ratio           {s['durable_ratio']:>10.2%}   (target >= "
              f"{TARGET_RATIO:.0%}: {_verdict(s['durable_ratio'] >= TARGET_RATIO)})")
    if "naive_inserts_per_s" in s:
        print(f"(b) naive per-post loop   {s['naive_inserts_per_s']:>12,.0f} feed inserts/s "
              f"(Redis only)  pipeline/naive {s['pipeline_inserts_per_s'] / s['naive_inserts_per_s']:.2f}x")
    d = r.get("diagnostic_in_process")
    if d:
        print(f"    FeedFanout in-process: Redis + Cassandra inline "
              f"{d['redis_and_cassandra_inline']['inserts_per_s']:,.0f}/s, Redis only "
              f"{d['redis_only']['inserts_per_s']:,.0f}/s (no Beam/Kafka, one run)")
    fo = r.get("follows")
    if fo:
        print(f"(c) follows, {c['follows']:,} events of the graph on empty stores: durable "
              f"{fo['durable_per_s']:,.0f}/s (target >= {TARGET_FOLLOWS:,}: "
              f"{_verdict(fo['durable_per_s'] >= TARGET_FOLLOWS)}), Redis "
              f"{fo['redis_per_s']:,.0f}/s")
        if "plain_per_s" in fo:
            print(f"    plain loop of their graph rows, Redis + Cassandra {fo['plain_per_s']:,.0f}/s"
                  f" (durable = {fo['durable_per_s'] / fo['plain_per_s']:.0%} of it)")
    dg = r.get("demo_graph")
    if dg:
        print(f"    the demo's follow graph ({dg['users']:,} users, {dg['events']:,} events): "
              f"durable in {dg['durable_seconds']:.1f}s (target <= {TARGET_DEMO_S:.0f}s: "
              f"{_verdict(dg['durable_seconds'] <= TARGET_DEMO_S)}), Redis "
              f"{dg['redis_seconds']:.1f}s")
    f = r.get("freshness")
    if f:
        print(f"(d) freshness (event time -> readable in the last target's feed; poll "
              f"{f['poll_s'] * 1000:.0f} ms, {f['step_s']:.0f}s per rate)")
        for st in f["rates"]:
            ok = st["p99_ms"] <= FRESHNESS_P99_MS and not st["overloaded_runs"]
            print(f"    {st['rate']:>5} posts/s: p50 {st['p50_ms']:>7.0f} ms  p99 "
                  f"{st['p99_ms']:>7.0f} ms  {'ok' if ok else 'FAIL'}"
                  + (f"  overloaded in {st['overloaded_runs']}/{st['runs']} runs"
                     if st["overloaded_runs"] else ""))
        best = f["highest_rate_p99_le_1s"]
        print(f"    highest rate with p99 <= 1 s: {best if best is not None else 'none'} posts/s "
              f"(target >= {TARGET_RATE}: "
              f"{'MET' if best is not None and best >= TARGET_RATE else 'NOT MET'})")
    m = r.get("memory")
    if m:
        print("(e) Redis memory per user feed")
        if "run_feeds" in m:
            rf = m["run_feeds"]
            print(f"    benchmark feeds: mean {rf['mean_entries']:.1f} entries, "
                  f"{rf['mean_bytes']:,.0f} B/feed ({rf['bytes_per_entry']:.0f} B/entry)")
        for size, v in m["synthetic"].items():
            print(f"    {int(size):>5} entries ({v['encoding']}): MEMORY USAGE "
                  f"{v['memory_usage_bytes']:>9,.0f} B, INFO delta "
                  f"{v['info_delta_bytes_per_feed']:>9,.0f} B/feed")
        print(f"    all {g['users']:,} users at the cap: ~{m['users_total_at_cap_gb']:.2f} GB")


if __name__ == "__main__":
    sys.exit(main())
