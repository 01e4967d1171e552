"""Benchmark: fan-out feed insertions/s on Prism beside redis-benchmark's pipelined ZADD.

    .venv/bin/python bench/bench_fanout.py [--quick] [--users 100000] [--avg-followers 200]
        [--celebrities 3] [--posts 1000] [--runs 3] [--rates 5,10,25,50,100,250,500,1000]
        [--step-s 20] [--partitions 2] [--skip naive,freshness,memory]

On a graph from ``jobs.workload`` (``--users`` users following ``--avg-followers``
accounts on average, ``--celebrities`` above the push threshold) it measures,
in one run:

* (a) pipeline: ``--posts`` post CREATED events (authors uniform over all
  users, so ~``--avg-followers`` followers each) are produced to a fresh topic,
  then ``python -m pipelines.fanout`` runs on Prism (streaming, LOOPBACK, own
  process, fresh consumer group, from earliest). Feed insertions/s = feed
  ZADDs the graph implies (followers below the push threshold, the top N
  above it; every user is active) / time from the first post hash written
  (first store write of the job) to the last post readable in its last
  target's feed. A poller follows each partition in offset order with a few
  ZSCOREs every ``POLL_S``. The Cassandra copies of a batch are written after
  its Redis pushes, so the job also waits until the consumer group has
  committed the end of the topic (offsets are committed once a bundle's
  writes, Cassandra's included, are done): the *durable* rate. Beside it,
  every run: ``redis-benchmark -P 64``
  ZADD to random keys/members (the physical limit), run while nothing else of
  ours runs;
* (b) naive: the same posts in this process, one redis-py pipeline per post
  (ZRANGE followers, then ZADD + ZREMRANGEBYRANK per follower), no Cassandra;
* (c) freshness: one job, posts produced at each of ``--rates`` for
  ``--step-s`` with event_time = produce wall time; per post, the time from
  event_time to readable in its last target's feed (the push writes all
  targets in one pipeline per 1000); p50/p99 per rate, the highest rate with
  p99 <= 1 s. A step whose backlog exceeds ``OVERLOAD_S`` of produce stops
  early (overloaded) and ends the ladder;
* (d) memory: ``MEMORY USAGE`` of the run's feeds and of synthetic feeds at
  the ``feed_cap`` and at sizes below the listpack limit, plus the INFO
  used_memory delta of the synthetic ones.

The graph is loaded straight into Redis (followers sorted sets only, score =
follow time, oldest first), the only graph state a post push reads; every
user has no last-read key (counts as active). Cassandra gets a freshly
migrated keyspace (the job writes posts, timelines and durable feeds there).
Topics, keyspace and Redis keys are unique per run and removed at the end.
A diagnostic measures ``FeedFanout`` in-process (no Beam/Kafka) with real
Redis + Cassandra and with Cassandra replaced by a no-op, to split the cost.

Results: a summary block and ``bench/results/fanout.json``.
"""
from __future__ import annotations

import argparse
import contextlib
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

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "fanout.json"
POLL_S = 0.02
OVERLOAD_S = 3.0
TARGET_RATIO = 0.50
TARGET_RATE = 500
FRESHNESS_P99_MS = 1000.0
QUICK = dict(users=20_000, avg_followers=200, celebrities=2, posts=300, runs=3,
             rates="5,10,25,50,100,250,500", step_s=8.0)
FULL = dict(users=100_000, avg_followers=200, celebrities=3, posts=1000, runs=3,
            rates="5,10,25,50,100,250,500,1000", step_s=20.0)


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
    """``python -m <module>`` (default the fan-out) on Prism in its own process group."""

    def __init__(self, settings: StackSettings, prism: str, topic_prefix: str, key_prefix: str,
                 keyspace: str, log_path: Path, extra: list[str] = (),
                 module: str = "pipelines.fanout"):
        self.group = f"bench-fanout-{uuid.uuid4().hex[:8]}"
        args = [
            "--runner=PrismRunner", f"--prism_location={prism}",
            "--environment_type=LOOPBACK", "--streaming",
            f"--kafka_bootstrap={settings.kafka_bootstrap}", f"--consumer_group={self.group}",
            f"--topic_prefix={topic_prefix}", "--fallback_start=earliest",
            f"--redis_url={settings.redis_url}", f"--redis_key_prefix={key_prefix}",
            f"--cassandra_host={settings.host}", f"--cassandra_port={settings.cassandra_port}",
            f"--cassandra_keyspace={keyspace}", *extra]
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                     cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

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


# ------------------------------------------------------------------ measures


def redis_benchmark(host: str, port: int, key_prefix: str, n: int) -> dict[str, float]:
    """Pipelined ZADD rates: to random feed-like keys (the limit) and to one key."""
    out = {}
    for name, cmd in (("random_keys", [f"{key_prefix}:rb:__rand_int__", "__rand_int__",
                                       "__rand_int__"]),
                      ("one_key", [f"{key_prefix}:rb1", "__rand_int__", "__rand_int__"])):
        res = subprocess.run(["redis-benchmark", "-h", host, "-p", str(port), "-q", "-n", str(n),
                              "-P", "64", "-r", "100000", "ZADD", *cmd],
                             capture_output=True, text=True, check=True, timeout=300)
        rates = re.findall(r"([\d.]+) requests per second", res.stdout)
        if not rates:
            raise RuntimeError(f"cannot parse redis-benchmark output: {res.stdout[-300:]}")
        out[name] = float(rates[-1])
    return out


def run_pipeline_once(ctx, run: int, posts: list[Post]) -> dict:
    """Produce ``posts`` to fresh topics, run the job, time first write to last insertion."""
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
    job = Job(ctx.settings, ctx.prism, prefix, ctx.key_prefix, ctx.keyspace,
              ctx.log_dir / f"fanout-run{run}.log")
    try:
        tracker.wait(ctx.args.timeout_s, job)
        committed_s = wait_committed(ctx, prefix + PostEvent.TOPIC, job)
    finally:
        job.stop()
    last = max(p.done_s for p in posts)
    start = tracker.first_write_s or t_submit
    inserts = sum(p.inserts for p in posts)
    return {"posts": len(posts), "inserts": inserts, "seconds": last - start,
            "inserts_per_s": inserts / (last - start), "posts_per_s": len(posts) / (last - start),
            "startup_s": start - t_submit, "durable_seconds": committed_s - start,
            "durable_inserts_per_s": inserts / (committed_s - start)}


def wait_committed(ctx, topic: str, job: Job, poll_s: float = 0.05) -> float:
    """When the job's group committed the end of ``topic`` (epoch s): a bundle's offsets
    are committed after its writes, Cassandra's included, so this is when every post
    is durable, not only readable in Redis."""
    from stores.kafka.lag import GroupLag, caught_up, end_offsets

    ends = end_offsets(ctx.settings.kafka_bootstrap, [topic])
    deadline = time.monotonic() + ctx.args.timeout_s
    with GroupLag(ctx.settings.kafka_bootstrap, job.group, [topic]) as lag:
        while True:
            found = lag.committed()
            if caught_up(found, ends):
                return time.time()
            if job.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the job did not commit the end of {topic}: "
                                   f"{found} of {ends}")
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


def in_process(ctx, posts: list[Post], with_cassandra: bool) -> dict:
    """``FeedFanout.apply`` on the posts without Beam/Kafka (diagnostic)."""
    from stores.fanout import FeedFanout
    from stores.cassandra.feeds import CassandraFeedStore
    from stores.redis.feeds import RedisFeedStore

    class NoCassandra:
        def __getattr__(self, name):
            return lambda *a, **k: None

        def deferred(self):
            return contextlib.nullcontext()

    r = RedisFeedStore.from_url(ctx.settings.redis_url, key_prefix=ctx.key_prefix)
    c = (CassandraFeedStore.connect(ctx.settings.host, ctx.settings.cassandra_port, ctx.keyspace)
         if with_cassandra else NoCassandra())
    try:
        fanout = FeedFanout(r, c, ctx.policy)
        t = time.perf_counter()
        for i in range(0, len(posts), 500):
            fanout.apply([p.event for p in posts[i:i + 500]])
        seconds = time.perf_counter() - t
    finally:
        r.close()
        if with_cassandra:
            c.close()
    inserts = sum(p.inserts for p in posts)
    return {"posts": len(posts), "inserts": inserts, "seconds": seconds,
            "inserts_per_s": inserts / seconds}


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
    job = Job(ctx.settings, ctx.prism, prefix, ctx.key_prefix, ctx.keyspace,
              ctx.log_dir / "fanout-freshness.log", extra=["--freshness_log_s=5"])
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
    from jobs.topics import create_topics as create

    names = []
    for t in (PostEvent.TOPIC, FollowEvent.TOPIC):
        names += [prefix + t, dlq_topic(prefix + t)]
    create(ctx.settings.kafka_bootstrap, names, partitions=ctx.args.partitions)
    ctx.topics += names


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    n, batch = 0, []
    for k in client.scan_iter(match=f"{prefix}:*", count=5000):
        batch.append(k)
        if len(batch) >= 5000:
            n += client.unlink(*batch)
            batch = []
    if batch:
        n += client.unlink(*batch)
    return n


class Ctx:
    def __init__(self, args, settings, prism, graph, policy, client):
        self.args, self.settings, self.prism, self.graph, self.policy = (
            args, settings, prism, graph, policy)
        self.client = client
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
    parser.add_argument("--skip", default="", help="comma-separated: naive, freshness, memory, "
                                                   "diagnostic")
    args = parser.parse_args(argv)
    apply_preset(args, QUICK, FULL)
    skip = {s for s in args.skip.split(",") if s}
    rates = [int(r) for r in args.rates.split(",")]

    import cassandra.cluster  # noqa: F401  (fail early if the driver is missing)
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
    cluster = new_cluster(settings.host, settings.cassandra_port)
    session = cluster.connect()
    results: dict = {"preset": "quick" if args.quick else "full",
                     "config": {k: getattr(args, k) for k in
                                ("users", "avg_followers", "celebrities", "posts", "runs",
                                 "rates", "step_s", "partitions")},
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
        bench, pipeline, naive = [], [], []
        for run in range(args.runs):
            posts = make_posts(graph, ctx.keys, rng, args.posts, ctx.next_post_id(run * 1_000_000))
            rb = redis_benchmark(settings.host, settings.redis_port, ctx.key_prefix,
                                 args.benchmark_requests)
            delete_prefix(client, ctx.key_prefix + ":rb")
            client.delete(f"{ctx.key_prefix}:rb1")
            bench.append(rb)
            res = run_pipeline_once(ctx, run, posts)
            res["verified_feeds"] = verify_sample(ctx, posts, rng)
            pipeline.append(res)
            line = (f"run {run + 1}: redis-benchmark ZADD -P64 {rb['random_keys']:,.0f}/s "
                    f"(one key {rb['one_key']:,.0f}/s)  pipeline {res['inserts_per_s']:,.0f} "
                    f"inserts/s ({res['posts_per_s']:,.1f} posts/s, {res['inserts']:,} inserts "
                    f"in {res['seconds']:.1f}s, start-up {res['startup_s']:.1f}s)")
            if "naive" not in skip:
                nv = naive_loop(ctx, posts)
                naive.append(nv)
                line += f"  naive {nv['inserts_per_s']:,.0f} inserts/s"
            print(line, flush=True)
        results["redis_benchmark"] = bench
        results["pipeline"] = pipeline
        results["naive"] = naive
        limit = statistics.median(b["random_keys"] for b in bench)
        rate = statistics.median(p["inserts_per_s"] for p in pipeline)
        durable = statistics.median(p["durable_inserts_per_s"] for p in pipeline)
        results["summary"] = {"limit_zadd_per_s": limit, "pipeline_inserts_per_s": rate,
                              "ratio": rate / limit, "pipeline_durable_inserts_per_s": durable,
                              "durable_ratio": durable / limit}
        if naive:
            results["summary"]["naive_inserts_per_s"] = statistics.median(
                n["inserts_per_s"] for n in naive)

        if "diagnostic" not in skip:
            diag = {}
            n = min(args.posts, 300)
            for label, with_c in (("redis_and_cassandra", True), ("redis_only", False)):
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
        for p in (ctx.key_prefix, ctx.key_prefix + "n", ctx.key_prefix + "chk"):
            delete_prefix(client, p)
        client.delete(f"{ctx.key_prefix}:rb1")

    print_summary(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0


def print_summary(r: dict) -> None:
    s, g, c = r["summary"], r["graph"], r["config"]
    print(f"\n==== fan-out benchmark ({r['preset']} preset; median of {c['runs']} runs) ====")
    print(f"graph: {g['users']:,} users, {g['edges']:,} edges, mean {g['mean_followers']:.0f} "
          f"followers, max {g['max_followers']:,}, celebrities {g['celebrities']}")
    print(f"  loaded: {g['loaded']}")
    print(f"(a) pipeline on Prism     {s['pipeline_inserts_per_s']:>12,.0f} feed inserts/s  "
          f"({c['posts']:,} posts/run)")
    print(f"    redis-benchmark ZADD  {s['limit_zadd_per_s']:>12,.0f} /s (-P 64, random keys)")
    print(f"    ratio                 {s['ratio']:>12.2%}   (target >= {TARGET_RATIO:.0%}: "
          f"{'MET' if s['ratio'] >= TARGET_RATIO else 'NOT MET'})")
    print(f"    durable (offsets committed, Cassandra done) {s['pipeline_durable_inserts_per_s']:,.0f} "
          f"feed inserts/s = {s['durable_ratio']:.2%} of the ZADD limit")
    if "naive_inserts_per_s" in s:
        print(f"(b) naive per-post loop   {s['naive_inserts_per_s']:>12,.0f} feed inserts/s "
              f"(Redis only)  pipeline/naive {s['pipeline_inserts_per_s'] / s['naive_inserts_per_s']:.2f}x")
    d = r.get("diagnostic_in_process")
    if d:
        print(f"    FeedFanout in-process: Redis+Cassandra "
              f"{d['redis_and_cassandra']['inserts_per_s']:,.0f}/s, Redis only "
              f"{d['redis_only']['inserts_per_s']:,.0f}/s (no Beam/Kafka, one run)")
    f = r.get("freshness")
    if f:
        print(f"(c) freshness (event time -> readable in the last target's feed; poll "
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
        print("(d) Redis memory per user feed")
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
