"""``feedbeam demo``: the whole system, as far as it exists, on the local stack.

Brings the local servers up, creates the topics, applies the Cassandra schema,
trains the feed ranker once (a synthetic history; the model is kept and reused
by later runs), produces a synthetic workload to Kafka, runs the four
pipelines (fan-out, stories, features, ranking) on Prism until each has
applied that workload, starts the serving API and prints what came out:
events and dead letters per topic, home feeds in Redis and rows in Cassandra,
the freshness of a few posts produced live once the jobs caught up (sent ->
in every follower's Redis home feed), one user's home feed hydrated from post
metadata, a celebrity's timeline, and that user's ranked feed and story tray
as the API returns them, with a token and a curl command to ask it yourself.
It then keeps the pipelines and the API running until Ctrl-C (``--exit``
stops right after the summary). Every step is the same code path as the
matching subcommand or ``python -m pipelines.<name>``, so the demo shows
exactly what a data engineer would get running them one by one.

Re-running ``feedbeam demo`` keeps topics, migrations and what earlier runs
stored, and the jobs apply only the new run's workload; ``docs/operations.md``
explains how.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime as dt
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from infra import stack
from infra.errors import UserFacingError
from infra.processes import lower_priority
from infra.settings import REPO_ROOT, StackSettings
from schemas.events import TOPICS, FollowEvent, PostEvent, dlq_topic

DEMO_GROUP = "feedbeam-demo-fanout"


@dataclasses.dataclass(frozen=True)
class DemoWorkload:
    """The demo's ``feedbeam generate`` options.

    Sized for a two-core machine, where the follow graph dominates the run
    time (each FOLLOW reads the followee's timeline to merge recent posts;
    ``docs/operations.md`` has the figures). Two celebrities sit above the
    push threshold (pulled at read time, their top followers still pushed),
    and posts are frequent enough that a feed has tens of entries.
    """

    seed: int = 7
    users: int = 2000
    avg_following: float = 15.0
    celebrities: int = 2
    push_threshold: int = 1000
    duration: str = "2h"
    posts_per_day: float = 12.0
    stories_per_day: float = 1.0

    def generate_args(self, start_ms: int, topic_prefix: str = "") -> list[str]:
        """``feedbeam generate`` arguments for a window starting at ``start_ms``."""
        return [
            "--seed", str(self.seed), "--users", str(self.users),
            "--avg-following", f"{self.avg_following:g}", "--celebrities", str(self.celebrities),
            "--push-threshold", str(self.push_threshold), "--duration", self.duration,
            "--posts-per-day", f"{self.posts_per_day:g}",
            "--stories-per-day", f"{self.stories_per_day:g}",
            "--start", str(start_ms), "--topic-prefix", topic_prefix,
        ]


def register(subparsers) -> None:
    d = DemoWorkload()
    p = subparsers.add_parser(
        "demo", help="set up the local stack, produce a workload, run every pipeline and "
        "the API, show the feeds", description=__doc__.split("\n\n")[1])
    p.add_argument("--partitions", type=int, default=3,
                   help="partitions per topic when the topics are created (default 3)")
    p.add_argument("--samples", type=int, default=0,
                   help="decoded events to show per topic (default 0: the summary fits a "
                   "screen; 2 shows what the records look like)")
    p.add_argument("--skip-generate", action="store_true",
                   help="do not produce a new workload; run the job over what the demo group "
                   "has not applied yet")
    p.add_argument("--exit", action="store_true",
                   help="stop the jobs and the API after the summary instead of serving "
                   "until Ctrl-C")
    p.add_argument("--api-port", type=int, default=8080,
                   help="port of the API the demo starts (0: none; default %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="give up if the job has not caught up after S seconds (default 900)")
    p.add_argument("--seed", type=int, default=d.seed, help="workload seed (default %(default)s)")
    p.add_argument("--users", type=int, default=d.users,
                   help="users in the workload (default %(default)s)")
    # Knobs for tests and experiments (a tiny workload, isolated names).
    hidden = argparse.SUPPRESS
    p.add_argument("--avg-following", type=float, default=d.avg_following, help=hidden)
    p.add_argument("--celebrities", type=int, default=d.celebrities, help=hidden)
    p.add_argument("--push-threshold", type=int, default=d.push_threshold, help=hidden)
    p.add_argument("--posts-per-day", type=float, default=d.posts_per_day, help=hidden)
    p.add_argument("--topic-prefix", default="", help=hidden)
    p.add_argument("--redis-key-prefix", default="fb", help=hidden)
    p.add_argument("--keyspace", default=None, help=hidden)
    p.add_argument("--group", default=DEMO_GROUP, help=hidden)
    p.add_argument("--train-users", type=int, default=1200, help=hidden)
    p.add_argument("--train-days", type=float, default=3.0, help=hidden)
    p.add_argument("--model-dir", type=Path, default=None, help=hidden)
    p.set_defaults(handler=run_demo)


def workload_of(args: argparse.Namespace) -> DemoWorkload:
    return dataclasses.replace(
        DemoWorkload(), seed=args.seed, users=args.users, avg_following=args.avg_following,
        celebrities=args.celebrities, push_threshold=args.push_threshold,
        posts_per_day=args.posts_per_day)


#: How the summary says ``create_topics``' states of a topic.
_STATE_WORDS = {"created": "created", "exists": "already there"}


def run_demo(args: argparse.Namespace, settings: StackSettings) -> int:
    from jobs import generate, topics
    from schemas.cassandra import DEFAULT_KEYSPACE
    from stores.cassandra.session import migrate, new_cluster

    started = time.monotonic()
    keyspace = args.keyspace or DEFAULT_KEYSPACE
    prefix = args.topic_prefix
    workload = workload_of(args)
    read_topics = [prefix + PostEvent.TOPIC, prefix + FollowEvent.TOPIC]

    _step("1/7 local stack: Kafka, Cassandra, Redis, Prism (installs on first run)")
    services = stack.up(settings)
    print("   " + ", ".join(f"{s.name} :{s.port}" + (f" {s.rss_mb:.0f} MiB" if s.rss_mb else "")
                            for s in services) + ": ready")

    _step("2/7 topics and their dead-letter twins")
    created = topics.create_topics(
        settings.kafka_bootstrap, topics.feed_topics(prefix), partitions=args.partitions)
    print(f"   {len(created)} topics (the four event topics, their .dlq twins, the jobs' "
          "own dead letters): "
          + ", ".join(f"{n} {_STATE_WORDS.get(state, state)}"
                      for state, n in collections.Counter(created.values()).items()))

    _step(f"3/7 Cassandra schema (keyspace {keyspace})")
    cluster = new_cluster(settings.host, settings.cassandra_port)
    try:
        results = migrate(cluster.connect(), keyspace)
        by_status: dict[str, list[str]] = {}
        for r in results:
            by_status.setdefault(r.status.replace("_", " "), []).append(
                f"{r.version:04d} {r.name}")
        print("   " + "; ".join(f"{status}: {', '.join(names)}"
                                for status, names in by_status.items()))
    finally:
        cluster.shutdown()

    model_dir = args.model_dir or settings.state_dir / "demo" / "models"
    _step(f"4/7 feed ranker (XGBoost) in {model_dir}")
    ensure_model(args, settings, model_dir)

    if args.skip_generate:
        _step("5/7 synthetic workload: skipped (--skip-generate)")
    else:
        _step("5/7 synthetic workload -> Kafka")
        from jobs.cli import build_parser
        from stores.kafka.lag import commit_offsets, end_offsets

        # Where this run's events begin: the job starts there (docs/operations.md).
        mark = end_offsets(settings.kafka_bootstrap, read_topics)
        commit_offsets(settings.kafka_bootstrap, args.group, mark)
        duration_ms = generate.parse_duration(workload.duration)
        start_ms = int(time.time() * 1000) - duration_ms
        print(f"   --start {start_ms}: a new window (new event and post ids), the same graph",
              flush=True)
        gen_args = build_parser().parse_args(
            ["generate", *workload.generate_args(start_ms, prefix)])
        generate.run_generate(gen_args, settings)

    from jobs.submit import PIPELINES

    names = available_pipelines()
    _step(f"6/7 pipelines on Prism: {', '.join(names)}")
    jobs: list[FanoutJob] = []
    api = None
    # A SIGTERM or SIGHUP (a closed terminal, `timeout`, a service manager) stops what
    # the demo started, as Ctrl-C does, instead of leaving the jobs running unowned.
    previous = _interrupt_on(STOP_SIGNALS)
    try:
        for name in names:
            group = group_of(args.group, name)
            log_path = settings.state_dir / "logs" / f"{group}.log"
            jobs.append(FanoutJob.start(settings, log_path, [
                f"--consumer_group={group}", "--fallback_start=earliest",
                f"--topic_prefix={prefix}", f"--redis_key_prefix={args.redis_key_prefix}",
                f"--cassandra_keyspace={keyspace}",
                *pipeline_extras(name, workload, settings, model_dir),
            ], pipeline=name, nice=PIPELINES[name].shared_nice))
        print("   started " + ", ".join(f"{job.name} (pid {job.process.pid})" for job in jobs),
              flush=True)
        print("   at OS niceness " + "/".join(str(PIPELINES[job.name].shared_nice) for job in jobs)
              + f" (the API first); logs {jobs[0].log_path.parent}/{args.group}*.log",
              flush=True)
        for job in jobs:
            topics_of = demo_topics(job.name, prefix)
            caught_up_in, applied = wait_until_applied(
                settings.kafka_bootstrap, group_of(args.group, job.name), topics_of, job,
                args.timeout)
            done = (f"{applied:,} events applied" if applied
                    else "at lag 0 by its first check")
            print(f"   {job.name} caught up in {caught_up_in:.0f}s ({done})", flush=True)
        probe_freshness(settings, prefix, args.redis_key_prefix, workload)
        if "ranking" in names:
            wait_until_ranked(settings, args.redis_key_prefix, workload,
                              next(job for job in jobs if job.name == "ranking"), args.timeout)
        api = start_api(settings, args, keyspace, workload)

        _step("7/7 what came out")
        _print_topics(settings, prefix)
        _print_stores(settings, args.redis_key_prefix, keyspace, workload)
        _print_samples(settings, args.samples, prefix)
        if api is not None:
            api.print_samples(settings, args.redis_key_prefix, workload)
        if not args.exit:
            print("\nthe pipelines keep applying new events and the API keeps serving; "
                  "Ctrl-C stops what the demo started.", flush=True)
            try:
                while True:
                    for job in jobs:
                        if job.process.poll() is not None:
                            raise UserFacingError(
                                f"the {job.name} job exited (code {job.process.returncode}); "
                                f"see {job.log_path}")
                    if api is not None and api.process.poll() is not None:
                        raise UserFacingError(f"the API exited; see {api.log_path}")
                    time.sleep(1.0)
            except KeyboardInterrupt:
                print("\nstopping the jobs and the API")
    finally:
        _interrupt_on(STOP_SIGNALS, signal.SIG_IGN)  # a second signal must not cut this short
        if api is not None:
            api.stop()
        for job in jobs:
            job.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s. The servers keep "
          "running; `.venv/bin/feedbeam infra down` stops them.")
    return 0


def ensure_model(args: argparse.Namespace, settings: StackSettings, model_dir: Path) -> None:
    """Train and promote a ranker in ``model_dir`` unless one is promoted there already.

    ``feedbeam train --synthetic``: a simulated history with planted preferences
    through the features pipeline's logic, then XGBoost; it prints the model's
    AUC and NDCG beside reverse-chronological order."""
    from jobs import train
    from jobs.cli import build_parser
    from stores.files.models import ModelRegistry

    version = ModelRegistry(model_dir).latest()
    if version is not None:
        print(f"   reusing model {version} (delete {model_dir} to train a new one)")
        return
    feature_log = model_dir.parent / "train-feature-log"
    # The demo's own scratch from a model trained before (whose directory was deleted
    # to train anew, as the line above advises): a synthetic run writes a new log.
    shutil.rmtree(feature_log, ignore_errors=True)
    argv = ["train", "--synthetic", "--users", str(args.train_users), "--days",
            f"{args.train_days:g}", "--model-dir", str(model_dir),
            "--feature-log", str(feature_log)]
    print(f"   feedbeam {' '.join(argv)}", flush=True)
    # Its report in short: the held-out scores beside recency, and the promotion.
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        status = train.run_train(build_parser().parse_args(argv), settings)
    for line in report.getvalue().splitlines():
        if status or line.lstrip().startswith(_TRAIN_SUMMARY):  # all of it on a failure
            print("   " + line)
    if ModelRegistry(model_dir).latest() is None:
        print(f"   the model was not promoted (exit {status}); the ranking pipeline ranks by "
              "recency until one is")


#: The lines of ``feedbeam train``'s report the demo shows (the rest is in its model
#: directory: ``evaluation.png`` and the metrics beside it).
_TRAIN_SUMMARY = ("model   created", "AUC", "NDCG@20", "promoted:")

#: Signals that stop the demo like Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _interrupt_on(signals, handler=_raise_interrupt) -> dict:
    """Handle ``signals`` with ``handler`` (from the main thread only); returns the
    handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in signals}


def _step(text: str) -> None:
    print(f"== {text}", flush=True)


# ---------------------------------------------------------------- the job


#: The pipelines the demo runs, in start order, when this build has them.
DEMO_PIPELINES = ("fanout", "stories", "features", "ranking")


def available_pipelines() -> list[str]:
    import importlib.util

    from jobs.submit import PIPELINES

    return [name for name in DEMO_PIPELINES
            if importlib.util.find_spec(PIPELINES[name].module) is not None]


@dataclasses.dataclass
class FanoutJob:
    """A pipeline (``python -m pipelines.<name>``) on Prism in its own process group."""

    process: subprocess.Popen
    log_path: Path
    name: str = "fanout"

    @classmethod
    def start(cls, settings: StackSettings, log_path: Path,
              extra: list[str], pipeline: str = "fanout", nice: int = 0) -> "FanoutJob":
        from jobs.submit import build_command

        argv = build_command(pipeline, "prism", settings, extra)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n--- feedbeam demo {dt.datetime.now().isoformat()}: "
                      f"{' '.join(argv[1:])}\n".encode())
            log.flush()
            # Its own session: stop() signals the job and its workers together.
            process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        if nice:
            lower_priority(process.pid, nice)
        return cls(process, log_path, pipeline)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the process group, SIGKILL if it is still there after ``grace_s``."""
        if self.process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("     " + line for line in text[-lines:])


def group_of(base: str, pipeline: str) -> str:
    """The demo's consumer group of ``pipeline`` (the fan-out keeps ``base`` itself)."""
    return base if pipeline == "fanout" else f"{base}-{pipeline}"


def demo_topics(pipeline: str, prefix: str) -> list[str]:
    from jobs.submit import PIPELINES

    return [prefix + t for t in PIPELINES[pipeline].topics]


def pipeline_extras(name: str, workload: "DemoWorkload", settings: StackSettings,
                    model_dir: Path) -> list[str]:
    """Options of one pipeline beyond the shared ones (names, stores)."""
    if name == "fanout":
        return [f"--push_threshold={workload.push_threshold}", "--freshness_log_s=5"]
    if name == "features":
        return [f"--feature_log_dir={settings.state_dir / 'demo' / 'feature-log'}"]
    if name == "ranking":
        return [f"--push_threshold={workload.push_threshold}",
                f"--model_dir={model_dir}"]
    return []


@dataclasses.dataclass
class ApiServer:
    """``feedbeam serve`` in the background, with the key its tokens are signed with."""

    process: subprocess.Popen
    log_path: Path
    port: int
    jwt_key: str

    def stop(self) -> None:
        FanoutJob(self.process, self.log_path, "api").stop(grace_s=10.0)

    def token(self, user: int) -> str:
        from serving.auth import issue_token

        return issue_token(self.jwt_key, user, ttl_s=3600)

    def get(self, path: str, user: int) -> tuple[int, dict]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Authorization": f"Bearer {self.token(user)}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def print_samples(self, settings: StackSettings, key_prefix: str,
                      workload: "DemoWorkload") -> None:
        user = sample_user(settings, key_prefix, workload)
        print(f"\n   the API on http://127.0.0.1:{self.port} (log {self.log_path})")
        for label, path in (("ranked feed", f"/v1/users/{user}/feed?limit=5"),
                            ("story tray", f"/v1/users/{user}/stories/tray?limit=5")):
            status, body = self.get(path, user)
            print(f"\n   {label} of user {user} (GET {path} -> {status}):")
            print("     " + json.dumps(body, separators=(",", ":"))[:900])
        print(f"\n   try it (token valid for an hour):\n"
              f"     TOKEN={self.token(user)}\n"
              f"     curl -s -H \"Authorization: Bearer $TOKEN\" "
              f"'http://127.0.0.1:{self.port}/v1/users/{user}/feed?limit=10'")


def sample_user(settings: StackSettings, key_prefix: str, workload: "DemoWorkload") -> int:
    """The user the demo shows: the one with the fullest home feed (lowest id on ties)."""
    from stores.redis.feeds import RedisFeedStore

    redis = RedisFeedStore.from_url(settings.redis_url, key_prefix=key_prefix)
    try:
        users = range(1, workload.users + 1)
        pipe = redis.client.pipeline(transaction=False)
        for u in users:
            pipe.zcard(redis.keys.home_feed(u))
        sizes = dict(zip(users, pipe.execute()))
    finally:
        redis.close()
    return max(users, key=lambda u: (sizes[u], -u))


#: The live freshness probe: this many posts, at this rate, each awaited this long.
PROBE_POSTS, PROBE_RATE, PROBE_WAIT_S = 20, 10.0, 30.0


def probe_freshness(settings: StackSettings, prefix: str, key_prefix: str,
                    workload: "DemoWorkload") -> list[float]:
    """Produce ``PROBE_POSTS`` posts now, by authors below the push threshold with
    followers, and print how long each took from its send to being in every one of
    its author's followers' home feeds in Redis (the workload's own event times lie
    in the past, so only live posts say what the pipeline's latency is). Returns the
    latencies (ms) of the posts that got there within ``PROBE_WAIT_S``."""
    from confluent_kafka import Producer

    from schemas.codec import WireCodec
    from schemas.events import MediaType, PostEventKind
    from stores.redis.client import new_client
    from schemas.keys import KeyLayout

    keys, client = KeyLayout(key_prefix), new_client(settings.redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for u in range(1, workload.users + 1):
            pipe.zrange(keys.followers(u), 0, -1)
        followers = {u: [int(f) for f in fs]
                     for u, fs in zip(range(1, workload.users + 1), pipe.execute())
                     if 0 < len(fs) < workload.push_threshold}
        authors = sorted(followers)[::max(1, len(followers) // PROBE_POSTS)][:PROBE_POSTS]
        if not authors:
            print("   freshness probe: no author with followers below the push threshold")
            return []
        codec, topic = WireCodec(), prefix + PostEvent.TOPIC
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
        first_id = 9_000_000_000_000_000 + (int(time.time() * 1000) % 10**12) * 100
        waiting: dict[int, tuple[int, float]] = {}  # post -> (author, sent at)
        latencies: list[float] = []
        started = time.monotonic()
        deadline = started + len(authors) / PROBE_RATE + PROBE_WAIT_S
        sent = 0
        # Send each post when due and look at the feeds in between (every ~20 ms).
        while (sent < len(authors) or waiting) and time.monotonic() < deadline:
            while sent < len(authors) and time.monotonic() >= started + sent / PROBE_RATE:
                now = int(time.time() * 1000)
                post_id = first_id + sent
                post = PostEvent(f"demo-probe-{post_id}", now, PostEventKind.CREATED, post_id,
                                 authors[sent], now, MediaType.PHOTO, 0, ())
                producer.produce(topic, codec.encode(post, topic), post.key, timestamp=now)
                producer.flush(10)
                waiting[post_id] = (authors[sent], time.monotonic())
                sent += 1
            pending = list(waiting.items())
            pipe = client.pipeline(transaction=False)
            for post_id, (author, _) in pending:
                for f in followers[author]:
                    pipe.zscore(keys.home_feed(f), str(post_id))
            scores, at, i = pipe.execute(), time.monotonic(), 0
            for post_id, (author, at_sent) in pending:
                n = len(followers[author])
                if all(score is not None for score in scores[i:i + n]):
                    latencies.append((at - at_sent) * 1000)
                    del waiting[post_id]
                i += n
            time.sleep(0.02)
    finally:
        client.close()
    done = sorted(latencies)
    fans = sum(len(followers[a]) for a in authors) / len(authors)
    line = (f"   freshness probe: {len(authors)} posts produced now at {PROBE_RATE:g}/s, "
            f"sent -> in all followers' feeds (avg {fans:.0f})")
    if sent < len(authors):
        line += f"; only {sent} sent"
    if done:
        line += f": p50 {done[len(done) // 2]:,.0f} ms, max {done[-1]:,.0f} ms"
    if waiting:
        line += f"; {len(waiting)} not everywhere after {PROBE_WAIT_S:g} s"
    print(line)
    return latencies


def wait_until_ranked(settings: StackSettings, key_prefix: str, workload: "DemoWorkload",
                      job: "FanoutJob", timeout_s: float) -> None:
    """Wait until the sample user's ranked feed is written.

    The ranking job's offsets are committed once its triggers are in runner
    state; the refresh itself follows after the debounce and after the
    fan-out's graph holds the user's follows, so "caught up" comes first.
    """
    from stores.redis.client import new_client
    from schemas.keys import KeyLayout

    user = sample_user(settings, key_prefix, workload)
    key = KeyLayout(key_prefix).ranked_feed(user)
    client = new_client(settings.redis_url)
    started = time.monotonic()
    try:
        while not client.exists(key):
            if job.process.poll() is not None:
                raise UserFacingError(
                    f"the ranking job exited (code {job.process.returncode}); its log is "
                    f"{job.log_path}:\n{job.log_tail()}")
            if time.monotonic() - started > timeout_s:
                raise UserFacingError(
                    f"no ranked feed for user {user} after {timeout_s:.0f}s; the ranking job's "
                    f"log is {job.log_path}")
            time.sleep(0.5)
    finally:
        client.close()
    print(f"   ranking: user {user}'s ranked feed written "
          f"{time.monotonic() - started:.0f}s after the jobs caught up")


def start_api(settings: StackSettings, args: argparse.Namespace, keyspace: str,
              workload: "DemoWorkload") -> "ApiServer | None":
    """Start the serving API on ``--api-port`` (0: skip) and wait until it answers."""
    import importlib.util
    import secrets
    import urllib.request

    from jobs.serve import KEY_ENV

    if args.api_port == 0 or importlib.util.find_spec("serving.app") is None:
        return None
    key = secrets.token_urlsafe(32)
    log_path = settings.state_dir / "logs" / "feedbeam-demo-api.log"
    argv = [sys.executable, "-m", "jobs.cli", "serve", "--port", str(args.api_port),
            "--key-prefix", args.redis_key_prefix, "--keyspace", keyspace,
            "--push-threshold", str(workload.push_threshold)]
    # The key goes by environment: one in 64 URL-safe keys starts with "-", which
    # argparse reads as an option after --jwt-key (the API then exits with a usage error).
    env = {**os.environ, KEY_ENV: key}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    api = ApiServer(process, log_path, args.api_port, key)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserFacingError(f"the API exited at start (code {process.returncode}); "
                                  f"see {log_path}; it ends:\n"
                                  + FanoutJob(process, log_path, "api").log_tail())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.api_port}/healthz",
                                        timeout=2) as response:
                if response.status == 200:
                    return api
        except OSError:
            pass
        time.sleep(0.5)
    api.stop()
    raise UserFacingError(f"the API did not answer on port {args.api_port} within 60s; "
                          f"see {log_path}")


# ---------------------------------------------------------------- consumer lag


def wait_until_applied(bootstrap: str, group: str, topics: list[str], job: FanoutJob,
                       timeout_s: float) -> tuple[float, int]:
    """Wait until ``group`` has no lag on ``topics``; returns the seconds it took and
    the events applied meanwhile.

    The source commits a bundle's offsets only after its writes are done, so
    zero lag means every event in the topics is in the stores. Prints the lag
    as it goes down (a line rewritten in place on a terminal, else one each
    10 s), and clears it at the end for the caller's line; raises
    ``UserFacingError`` (pointing at the job's log) if the job exits or
    ``timeout_s`` passes first.
    """
    from stores.kafka.lag import GroupLag

    tty = sys.stdout.isatty()
    lag_of = GroupLag(bootstrap, group, topics)
    started = time.monotonic()
    last_print = started  # piped: a line each 10 s, none for a catch-up within 10 s
    first = None
    try:
        while True:
            lag = dict.fromkeys(topics, 0)
            for partition in lag_of.read():
                lag[partition.topic] += partition.remaining
            total = sum(lag.values())
            first = total if first is None else max(first, total)
            now = time.monotonic()
            elapsed = now - started
            line = ("   lag " + ", ".join(f"{t} {n:,}" for t, n in lag.items())
                    + f"   applied {first - total:,} of {first:,}"
                    + (f" ({(first - total) / elapsed:,.0f} ev/s)" if elapsed >= 1 else "")
                    + f", {elapsed:.0f}s")
            if total == 0:
                if tty:
                    print("\r\x1b[K", end="", flush=True)
                return elapsed, first
            if tty:  # one line, rewritten in place
                print("\r" + line + "\x1b[K", end="", flush=True)
            elif now - last_print >= 10:
                print(line, flush=True)
                last_print = now
            if job.process.poll() is not None:
                raise UserFacingError(
                    f"the fan-out job exited (code {job.process.returncode}) with "
                    f"{total:,} events not applied; its log is {job.log_path}:\n"
                    + job.log_tail())
            if elapsed > timeout_s:
                raise UserFacingError(
                    f"the fan-out job did not catch up within {timeout_s:.0f}s ({total:,} "
                    f"events left; --timeout raises the limit); its log is {job.log_path}")
            time.sleep(1.0)
    except BaseException:
        if tty:
            print(flush=True)  # end the progress line before the error
        raise
    finally:
        lag_of.close()


# ---------------------------------------------------------------- summary


def _print_topics(settings: StackSettings, prefix: str = "") -> None:
    from jobs.topics import describe_topics

    described = {name: (parts, total) for name, parts, total in
                 describe_topics(settings.kafka_bootstrap, prefix)}
    missing = [prefix + t for t in TOPICS if prefix + t not in described]
    if missing:
        raise UserFacingError(f"topics missing after creation: {missing}")
    print(f"   {'topic':<20} {'partitions':>10} {'events':>10} {'dead letters':>13}")
    for topic in TOPICS:
        parts, total = described[prefix + topic]
        dead = described.get(dlq_topic(prefix + topic), (0, 0))[1]
        print(f"   {topic:<20} {parts:>10} {total:>10} {dead:>13}")


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(
        timespec="seconds").replace("+00:00", "Z")


#: Entries of the sample home feed and celebrity timeline the summary prints.
SAMPLE_ENTRIES = 3


def _print_stores(settings: StackSettings, key_prefix: str, keyspace: str,
                  workload: DemoWorkload) -> None:
    from stores.redis.feeds import RedisFeedStore

    redis = RedisFeedStore.from_url(settings.redis_url, key_prefix=key_prefix)
    try:
        users = range(1, workload.users + 1)
        pipe = redis.client.pipeline(transaction=False)
        for u in users:
            pipe.zcard(redis.keys.home_feed(u))
            pipe.zcard(redis.keys.followers(u))
        counts = pipe.execute()
        feed_sizes = dict(zip(users, counts[0::2]))
        follower_counts = dict(zip(users, counts[1::2]))
        materialized = sum(1 for n in feed_sizes.values() if n)
        entries = sum(feed_sizes.values())
        print(f"\n   home feeds in Redis: {materialized:,} of {workload.users:,} users "
              f"({entries:,} entries, {entries / max(materialized, 1):.1f} per feed)")
        print(f"   Cassandra {keyspace}: " + ", ".join(
            f"{table}: " + (f"{rows:,} rows" if rows is not None else "not counted (timed out)")
            for table, rows in _cassandra_counts(settings, keyspace).items()))
        celebrities = sorted((u for u, n in follower_counts.items()
                              if n >= workload.push_threshold),
                             key=lambda u: (-follower_counts[u], u))
        # The sample: the user with the largest feed who is no celebrity.
        user = max((u for u in users if u not in celebrities),
                   key=lambda u: (feed_sizes[u], -u), default=None)
        if user is not None and feed_sizes[user]:
            following = set(redis.following(user))
            followed_celebs = [c for c in celebrities if c in following]
            print(f"\n   home feed of user {user} (follows {len(following)} accounts"
                  + (f"; celebrit{'ies' if len(followed_celebs) > 1 else 'y'} "
                     f"{', '.join(map(str, followed_celebs))} pulled at read"
                     if followed_celebs else "")
                  + f"), newest {SAMPLE_ENTRIES} of {feed_sizes[user]}:")
            _print_entries(redis, redis.feed(user, SAMPLE_ENTRIES))
        else:
            print("\n   no home feed materialized yet")
        for celeb in celebrities[:1]:
            timeline = redis.timeline(celeb, SAMPLE_ENTRIES)
            print(f"\n   timeline of celebrity {celeb} ({follower_counts[celeb]:,} followers, over "
                  f"the push threshold {workload.push_threshold:,}), newest {len(timeline)}:")
            _print_entries(redis, timeline)
    finally:
        redis.close()


def _print_entries(redis, entries: list[tuple[int, int]]) -> None:
    metas = redis.posts([p for p, _ in entries])
    for (post_id, score), meta in zip(entries, metas):
        if meta is None:
            print(f"     {_iso(score)}  post {post_id}  (deleted or unknown)")
        else:
            print(f"     {_iso(meta['created_at'])}  post {post_id}  by user "
                  f"{meta['author_id']:<6} {meta['media_type'] or '?'}")


def _cassandra_counts(settings: StackSettings, keyspace: str) -> dict[str, int | None]:
    """Row counts of the fan-out tables (full scans: fine at demo scale, bounded by a timeout)."""
    from stores.cassandra.session import new_cluster

    import logging

    cluster = new_cluster(settings.host, settings.cassandra_port)
    out: dict[str, int | None] = {}
    # Cassandra warns about an aggregation without a partition key: that is the point here.
    logging.getLogger("cassandra.protocol").setLevel(logging.ERROR)
    try:
        session = cluster.connect()
        for table in ("home_feed_by_user", "author_timeline", "posts"):
            try:
                out[table] = session.execute(f"SELECT COUNT(*) FROM {keyspace}.{table}",
                                             timeout=60).one()[0]
            except Exception:  # a count is decoration: report it missing, keep the demo going
                out[table] = None
    finally:
        cluster.shutdown()
    return out


def _print_samples(settings: StackSettings, per_topic: int, prefix: str = "") -> None:
    """Decode the first ``per_topic`` records of partition 0 of each topic."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from schemas.codec import WireCodec

    if per_topic <= 0:
        return
    codec = WireCodec()
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": "feedbeam-demo-sample",
        "enable.auto.commit": False,
    })
    try:
        for topic in TOPICS:
            consumer.assign([TopicPartition(prefix + topic, 0, OFFSET_BEGINNING)])
            messages = consumer.consume(num_messages=per_topic, timeout=5.0)
            print(f"\n   {topic} (partition 0, first {len(messages)}):")
            for message in messages:
                if message.error():
                    print(f"     error: {message.error()}")
                    continue
                event = codec.decode(message.value())
                print(f"     offset {message.offset()}: "
                      + json.dumps(event.to_avro(), separators=(",", ":")))
    finally:
        consumer.close()
