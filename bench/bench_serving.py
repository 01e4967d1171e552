"""Benchmark: the serving API at a fixed rate beside its floor, heavy users, Redis clients.

    python bench/bench_serving.py [--quick] [--users 2000] [--rate 2000] [--duration-s 20]
        [--runs 3] [--configs granian:2] [--heavy-users 4] [--heavy-rate 1000]
        [--clients hand-written,redis.asyncio,coredis,valkey-glide] [--profile] [--skip-http]

Data: ``--users`` users, each following 30 authors plus ``--celebrities``
accounts everyone follows (above the push threshold, so their posts are pulled
at read time); every home feed holds ``--feed-len`` pushed posts, half the
users have a ranked feed, half the authors a live story. ``--heavy-users``
more each follow ``--heavy-follows`` accounts (100,000), ``--heavy-celebrities``
of them (2,000) above the push threshold with posts and stories. Written
through the pipelines' store modules under a fresh Redis prefix and keyspace,
removed at the end: the follow lists through the fan-out's edge writes, told
which followees are celebrities, so every user's followed-celebrities set (what
a feed page reads to find the timelines to pull) is what the fan-out keeps; the
celebrities' follower padding as raw ZADDs of the same keys.

Steps, each printed beside the limit measured in the same run, medians of
``--runs``:

* in-process, no HTTP server: CPU per request of the floor app and the API's
  feed and tray reads, ordinary and heavy users (``--profile``: cProfile's top
  functions by CPU time of the feed requests);
* Redis clients: the hand-written ``stores.redis.aio`` client, ``redis.asyncio``,
  ``coredis`` and ``valkey-glide`` (setup.py's ``bench`` extra) on the feed read's
  two pipelines, ``--client-concurrency`` at once in one uvloop process:
  mixes/s, CPU per mix, p50/p99;
* the bar: per run, the floor (``bench/floor_app.py`` under granian with
  ``--floor-workers``: a constant page-sized body, no token check, no Redis),
  ``redis-benchmark`` ZREVRANGEBYSCORE on the same feed keys, then the API
  (each of ``--configs``) at ``--rate`` with ``bench/loadgen`` (Go, open loop,
  latency from the scheduled send, one token per user). Printed: 200s as a
  share of offered (>= 95 %) and the API's p99 over the floor's (<= 2x);
* heavy users: ordinary and heavy users' feeds and trays in one open-loop run
  at ``--heavy-rate``, ``--heavy-share`` of it the heavy users'; printed:
  heavy p99 over ordinary p99 per endpoint (<= 2x);
* ``--ladder``: the best configuration once at each lower rate;
* the outage: a private Redis with the outage users' data killed under load,
  the Cassandra fallback at ``--outage-rate``.

Redis: by default a private ``redis-server`` of this run (``--redis
private``), so what other work does to the shared Redis does not skew the
figures. Results: a summary block and ``bench/results/serving.json``.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infra.settings import StackSettings  # noqa: E402
from stores.cassandra.feeds import CassandraFeedStore  # noqa: E402
from stores.ranked import RankedFeedStore  # noqa: E402
from stores.redis.feeds import RedisFeedStore  # noqa: E402
from stores.redis.generation import RedisGeneration  # noqa: E402
from stores.redis.stories import RedisStoryStore  # noqa: E402
from stores.cassandra.session import migrate, new_cluster  # noqa: E402
from schemas.events import (  # noqa: E402
    FollowEvent,
    FollowKind,
    MediaType,
    PostEvent,
    PostEventKind,
    StoryEvent,
    StoryEventKind,
)
from schemas.ranked import RankedEntry  # noqa: E402
from serving.auth import issue_token  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "serving.json"
JWT_KEY = "bench-key-" + "0123456789" * 4
FOLLOWS = 30
PAGE = 20
#: Followers from which an author is pulled: above any ordinary user's (about
#: FOLLOWS each), below the padded celebrities'.
PUSH_THRESHOLD = 100


# -- data ----------------------------------------------------------------------------------


class Dataset:
    def __init__(self, users: int, feed_len: int, celebrities: int, heavy_users: int = 0,
                 heavy_follows: int = 100_000, heavy_celebrities: int = 2_000, seed: int = 7):
        rng = random.Random(seed)
        now = int(time.time() * 1000)
        self.users = list(range(1, users + 1))
        self.celebrities = list(range(10_000_001, 10_000_001 + celebrities))
        self.push_threshold = PUSH_THRESHOLD
        # Heavy users: each follows heavy_follows accounts, heavy_celebrities of
        # them above the push threshold, in an order mixing both.
        self.heavy_users = list(range(30_000_001, 30_000_001 + heavy_users))
        self.heavy_celebrities = list(range(20_000_001, 20_000_001 + heavy_celebrities))
        fillers = range(21_000_001, 21_000_001 + max(0, heavy_follows - heavy_celebrities - users))
        self.heavy_following = self.heavy_celebrities + self.users[:heavy_follows] + list(fillers)
        rng.shuffle(self.heavy_following)
        n_posts = max(feed_len * 4, users * 5)
        self.posts = [PostEvent(f"bp{p}", t, PostEventKind.CREATED, p, rng.choice(self.users), t,
                                rng.choice(list(MediaType)), rng.randrange(200), ("tag",))
                      for p, t in ((100_000 + i, now - rng.randrange(6 * 86_400_000))
                                   for i in range(n_posts))]
        self.celebrity_posts = [PostEvent(f"bc{p}", t, PostEventKind.CREATED, p, c, t, MediaType.REEL)
                                for c in self.celebrities
                                for p, t in ((c * 1000 + i, now - i * 600_000) for i in range(200))]
        self.celebrity_posts += [
            PostEvent(f"bc{p}", t, PostEventKind.CREATED, p, c, t, MediaType.REEL)
            for c in self.heavy_celebrities
            for p, t in ((c * 100 + i, now - rng.randrange(86_400_000)) for i in range(5))]
        # Half the ordinary users and every heavy celebrity have a live story.
        self.stories = [StoryEvent(f"bs{a}", now - 60_000, StoryEventKind.PUBLISHED, 900_000_000 + a,
                                   a, created_at=now - 60_000 - a % 1000,
                                   expires_at=now + 6 * 3_600_000)
                        for a in self.users[::2] + self.heavy_celebrities]
        self.following = {u: rng.sample([a for a in self.users if a != u], FOLLOWS)
                          for u in self.users}
        self.feeds = {u: rng.sample(self.posts, feed_len) for u in self.users}
        for h in self.heavy_users:  # an ordinary feed: only the follow list differs
            self.feeds[h] = self.feeds[self.users[h % len(self.users)]]
        self.ranked = {u: [RankedEntry(p.post_id, p.author_id, 1.0 - i / feed_len)
                           for i, p in enumerate(self.feeds[u][:100])]
                       for u in self.users[::2] + self.heavy_users[::2]}
        self.now = now

    def edges(self, users) -> list[FollowEvent]:
        out = []
        for u in users:
            for a in self.following[u] + self.celebrities:
                out.append(FollowEvent(f"bf{u}-{a}", self.now - 86_400_000, FollowKind.FOLLOW, u, a))
        return out


def load_redis(ds: Dataset, store: RedisFeedStore, users, heavy: bool = True) -> None:
    users = list(users)
    # Celebrities need their follower count above the threshold even for a user
    # subset: padding followers, raw ZADDs of the fan-out's keys.
    keys, since = store.keys, ds.now - 86_400_000
    pad = {str(f): since for f in range(50_000_000, 50_000_000 + ds.push_threshold)}
    pipe = store.client.pipeline(transaction=False)
    for c in ds.celebrities + (ds.heavy_celebrities if heavy else []):
        pipe.zadd(keys.followers(c), pad)
    pipe.execute()
    # The follow lists as the fan-out writes them (stores.fanout.FeedFanout): the
    # followee side, then the follower side with whether each followee is a
    # celebrity, which keeps the follower's followed-celebrities set.
    celebrities = set(ds.celebrities) | set(ds.heavy_celebrities if heavy else [])
    edges = ds.edges(users)
    for i in range(0, len(edges), 5000):
        chunk = edges[i:i + 5000]
        store.apply_followee_edges(chunk, [(0, 0)] * len(chunk), ds.push_threshold)
        store.apply_follower_edges(chunk, [e.followee_id in celebrities for e in chunk])
    for h in ds.heavy_users if heavy else []:
        # The follower side only: no request measured here reads the followers
        # of a heavy user's 100,000 followees.
        follows = [FollowEvent(f"bh{h}-{a}", since + j, FollowKind.FOLLOW, h, a)
                   for j, a in enumerate(ds.heavy_following)]
        for i in range(0, len(follows), 5000):
            chunk = follows[i:i + 5000]
            store.apply_follower_edges(chunk, [e.followee_id in celebrities for e in chunk])
        kept = store.followed_celebrities([h])[h]
        if sorted(kept) != sorted(ds.heavy_celebrities):
            raise RuntimeError(f"heavy user {h}: {len(kept)} followed celebrities kept, "
                               f"{len(ds.heavy_celebrities)} expected")
    if heavy and ds.heavy_users:
        users = users + ds.heavy_users
        store.client.mset({keys.last_read(h): ds.now for h in ds.heavy_users})
    RedisStoryStore(store.client, keys).publish(ds.stories, ds.now)
    wanted = {p.post_id for u in users for p in ds.feeds[u]}
    posts = [p for p in ds.posts if p.post_id in wanted] + ds.celebrity_posts
    for i in range(0, len(posts), 5000):
        store.put_posts(posts[i:i + 5000])
    store.push_many([(u, p.post_id, p.created_at) for u in users for p in ds.feeds[u]], cap=1000)
    store.add_to_timelines([(p.author_id, p.post_id, p.created_at) for p in ds.celebrity_posts],
                           cap=1000)
    ranked = RankedFeedStore(store.client, store.keys)
    for u in users:
        if u in ds.ranked:
            ranked.write(u, ds.ranked[u], "bench-1", ds.now)
    # Loaded views are a whole Redis, as after `feedbeam rebuild`: mark its generation,
    # or the API takes Redis for one that lost its data and reads Cassandra.
    RedisGeneration(store.client, store.keys).mark()


def load_cassandra(ds: Dataset, store: CassandraFeedStore, users) -> None:
    users = list(users)
    edges = ds.edges(users)
    store.apply_edges(edges)
    for c in ds.celebrities:
        store.set_follower_count(c, ds.push_threshold * 2, ds.now)
        # The fan-out's durable followed-celebrities rows: the fallback's pulls.
        store.set_followed_celebrity([(e.follower_id, e.event_time) for e in edges
                                      if e.followee_id == c], c, ds.now)
    for a in {a for u in users for a in ds.following[u]}:
        store.set_follower_count(a, 1, ds.now)
    wanted = {p.post_id: p for u in users for p in ds.feeds[u]}
    for p in list(wanted.values()) + ds.celebrity_posts:
        store.put_post(p)
    for p in ds.celebrity_posts:
        store.add_to_timeline(p.author_id, p.post_id, p.created_at, p.media_type)
    by_post: dict[int, list[int]] = {}
    for u in users:
        for p in ds.feeds[u]:
            by_post.setdefault(p.post_id, []).append(u)
    for pid, readers in by_post.items():
        p = wanted[pid]
        store.push(readers, pid, p.author_id, p.created_at)
    ranked = RankedFeedStore(None, None, store)
    for u in users:
        if u in ds.ranked:
            ranked.write(u, ds.ranked[u], "bench-1", ds.now)


# -- tools --------------------------------------------------------------------------------


def build_loadgen(settings: StackSettings) -> Path:
    out = settings.cache_dir / "bin" / "feedbeam-loadgen"
    out.parent.mkdir(parents=True, exist_ok=True)
    src = REPO / "bench" / "loadgen" / "main.go"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["go", "build", "-o", str(out), str(src)], check=True,
                       env={**os.environ, "GOTOOLCHAIN": "local"})
    return out


def write_targets(path: Path, base: str, users) -> None:
    """Feed reads of ``users``, each with the user's own token (group ``feed``)."""
    users = list(users)
    random.Random(1).shuffle(users)
    with path.open("w") as f:
        for u in users:
            f.write(f"{base}/v1/users/{u}/feed?limit={PAGE}\t{issue_token(JWT_KEY, u, 7200)}\tfeed\n")


def write_mixed_targets(path: Path, base: str, users, heavy_users, heavy_share: float) -> None:
    """Feed and tray reads of ordinary and heavy users, ``heavy_share`` of the lines
    the heavy users', groups ``feed``, ``tray``, ``heavy_feed``, ``heavy_tray``."""
    rng = random.Random(2)
    users, heavy = list(users), list(heavy_users)
    n_heavy = max(1, round(len(users) * heavy_share / (1 - heavy_share)))
    lines = []
    for group, who in (("", users), ("heavy_", [heavy[i % len(heavy)] for i in range(n_heavy)])):
        for u in who:
            token = issue_token(JWT_KEY, u, 7200)
            lines.append(f"{base}/v1/users/{u}/feed?limit={PAGE}\t{token}\t{group}feed\n")
            lines.append(f"{base}/v1/users/{u}/stories/tray?limit={PAGE}\t{token}\t{group}tray\n")
    rng.shuffle(lines)
    path.write_text("".join(lines))


def loadgen(binary: Path, targets: Path, rate: float, duration_s: float) -> dict:
    res = subprocess.run([str(binary), "-targets", str(targets), "-rate", str(rate),
                          "-duration", f"{duration_s}s", "-conns", "64"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "GOMAXPROCS": "1"})
    out = json.loads(res.stdout)
    out["completed_share"] = out["statuses"].get("200", 0) / out["sent"] if out["sent"] else 0.0
    return out


def redis_benchmark(host: str, port: int, keys: list[str], n: int) -> dict:
    """ZREVRANGEBYSCORE of a page on each key in turn (closed loop, 50 clients)."""
    runs = []
    per_key = max(1000, n // len(keys))
    for key in keys:
        res = subprocess.run(["redis-benchmark", "-h", host, "-p", str(port), "-n", str(per_key),
                              "-c", "50", "--csv", "ZREVRANGEBYSCORE", key, "+inf", "-inf",
                              "WITHSCORES", "LIMIT", "0", str(PAGE + 4)],
                             capture_output=True, text=True, check=True)
        header, row = [line for line in res.stdout.splitlines() if line.strip()][-2:]
        cols = dict(zip(json.loads(f"[{header}]"), json.loads(f"[{row}]")))
        runs.append({k: float(v) for k, v in cols.items() if k != "test"})
    return {"rps": statistics.median(r["rps"] for r in runs),
            "p50_ms": statistics.median(r["p50_latency_ms"] for r in runs),
            "p99_ms": statistics.median(r["p99_latency_ms"] for r in runs)}


class Server:
    """``feedbeam serve`` in its own process group."""

    def __init__(self, server: str, workers: int, port: int, redis_port: int, prefix: str,
                 keyspace: str, push_threshold: int, log: Path, topology: str = "single"):
        env = {**os.environ, "FEEDBEAM_REDIS_PORT": str(redis_port),
               "FEEDBEAM_TOPOLOGY": topology}
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "serve", "--server", server, "--workers",
             str(workers), "--port", str(port), "--jwt-key", JWT_KEY, "--key-prefix", prefix,
             "--keyspace", keyspace, "--push-threshold", str(push_threshold)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                    if json.loads(r.read())["cassandra"] == "ready":
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()  # nobody else holds this object to stop it
                raise RuntimeError(f"server did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class FloorServer:
    """``bench/floor_app.py`` (granian, ``workers``) in its own process group."""

    def __init__(self, workers: int, port: int, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "floor_app.py"), str(port), str(workers)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.base + "/", timeout=2).close()
                break
            except urllib.error.HTTPError:  # 401 without a token: it answers
                break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"floor server did not start; see {log}")
            time.sleep(0.2)

    stop = Server.stop


class PrivateRedis:
    """A throwaway ``redis-server`` (Debian's binary) on a free port, no persistence."""

    def __init__(self):
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="fb-bench-redis-")
        self.proc = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        client = RedisFeedStore.from_url(self.url).client
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)
        client.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- steps -----------------------------------------------------------------------------------


def measure_ladder(spec: str, ctx: dict, args, rates: list[float]) -> list[dict]:
    """One run of ``spec`` at each of ``rates``: where the API stands below the target."""
    server_name, workers = spec.split(":")
    ds = ctx["ds"]
    server = Server(server_name, int(workers), free_port(), ctx["redis_port"], ctx["prefix"],
                    ctx["keyspace"], ds.push_threshold, ctx["tmp"] / "serve-ladder.log")
    out = []
    try:
        targets = ctx["tmp"] / "targets-ladder.tsv"
        write_targets(targets, server.base, ds.users)
        loadgen(ctx["loadgen"], targets, min(rates), args.warmup_s)
        for rate in rates:
            api = loadgen(ctx["loadgen"], targets, rate, args.duration_s)
            out.append({"rate": rate, "api": api})
            print(f"  ladder {spec} at {rate:,.0f} req/s: p50 {api['p50_ms']:.2f} ms p99 "
                  f"{api['p99_ms']:.2f} ms achieved {api['achieved_rps']:,.0f} req/s "
                  f"(non-200 {_non200(api)}, errors {api['errors']})", flush=True)
    finally:
        server.stop()
    return out


def measure_config(spec: str, ctx: dict, args) -> dict:
    server_name, workers = spec.split(":")
    ds, settings = ctx["ds"], ctx["settings"]
    server = Server(server_name, int(workers), free_port(), ctx["redis_port"], ctx["prefix"],
                    ctx["keyspace"], ds.push_threshold, ctx["tmp"] / f"serve-{server_name}-{workers}.log")
    try:
        targets = ctx["tmp"] / "targets.tsv"
        write_targets(targets, server.base, ds.users)
        loadgen(ctx["loadgen"], targets, min(args.rate, 1000), args.warmup_s)  # graph caches, JIT-free warm
        keys = [ctx["layout"].home_feed(u) for u in ds.users[:8]]
        runs = []
        for run in range(args.runs):
            # The floor in the same run, just before: the limit the API is read against.
            floor = _floor_run(ctx, args, run) if ctx.get("floor_targets") else None
            rb = redis_benchmark(settings.host, ctx["redis_port"], keys, args.redis_benchmark_n)
            before = server_events(server.base)
            api = loadgen(ctx["loadgen"], targets, args.rate, args.duration_s)
            after = server_events(server.base)
            api["server_events"] = {k: v - before.get(k, 0) for k, v in after.items()
                                    if v != before.get(k, 0)}
            runs.append({"api": api, "redis_benchmark": rb, "floor": floor})
            print(f"  {spec} run {run + 1}: API p50 {api['p50_ms']:.2f} ms p99 {api['p99_ms']:.2f} ms "
                  f"{api['achieved_rps']:,.0f} req/s, 200s {api['completed_share']:.1%} of offered "
                  f"(non-200 {_non200(api)}, errors {api['errors']}); "
                  f"redis-benchmark ZREVRANGEBYSCORE {rb['rps']:,.0f} req/s p50 {rb['p50_ms']:.3f} "
                  f"p99 {rb['p99_ms']:.3f} ms; server events {api['server_events'] or '-'}",
                  flush=True)
    finally:
        server.stop()
    return {"config": spec, "runs": runs,
            "p50_ms": statistics.median(r["api"]["p50_ms"] for r in runs),
            "p99_ms": statistics.median(r["api"]["p99_ms"] for r in runs),
            "achieved_rps": statistics.median(r["api"]["achieved_rps"] for r in runs),
            "completed_share": statistics.median(r["api"]["completed_share"] for r in runs),
            "redis_benchmark_rps": statistics.median(r["redis_benchmark"]["rps"] for r in runs),
            "redis_benchmark_p50_ms": statistics.median(r["redis_benchmark"]["p50_ms"] for r in runs),
            "redis_benchmark_p99_ms": statistics.median(r["redis_benchmark"]["p99_ms"] for r in runs),
            "floor": None if runs[0]["floor"] is None else {
                "config": f"floor granian:{args.floor_workers}",
                **{k: statistics.median(r["floor"][k] for r in runs)
                   for k in ("p50_ms", "p99_ms", "achieved_rps", "completed_share")}}}


def measure_heavy(spec: str, ctx: dict, args) -> dict:
    """Ordinary and heavy users' feeds and trays in one open-loop run at
    ``--heavy-rate`` (``--heavy-share`` of it the heavy users'), ``--runs`` times:
    per group p99, medians over the runs."""
    server_name, workers = spec.split(":")
    ds = ctx["ds"]
    server = Server(server_name, int(workers), free_port(), ctx["redis_port"], ctx["prefix"],
                    ctx["keyspace"], ds.push_threshold, ctx["tmp"] / "serve-heavy.log")
    runs = []
    try:
        targets = ctx["tmp"] / "targets-heavy.tsv"
        write_mixed_targets(targets, server.base, ds.users, ds.heavy_users, args.heavy_share)
        loadgen(ctx["loadgen"], targets, min(args.heavy_rate, 1000), args.warmup_s)
        for run in range(args.runs):
            api = loadgen(ctx["loadgen"], targets, args.heavy_rate, args.duration_s)
            runs.append(api["groups"])
            print(f"  heavy users {spec} run {run + 1} at {args.heavy_rate:,.0f} req/s: " + "; ".join(
                f"{g} p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms ({r['completed']} done, "
                f"statuses {r['statuses']})" for g, r in sorted(api["groups"].items())), flush=True)
    finally:
        server.stop()
    groups = sorted({g for r in runs for g in r})
    return {"config": spec, "rate": args.heavy_rate, "share": args.heavy_share, "runs": runs,
            "p99_ms": {g: statistics.median(r[g]["p99_ms"] for r in runs if g in r) for g in groups},
            "p50_ms": {g: statistics.median(r[g]["p50_ms"] for r in runs if g in r) for g in groups}}


# -- Redis clients on the serving's command mix ----------------------------------------------


def feed_mixes(ds: Dataset, layout, users) -> list[tuple[list[tuple], list[tuple]]]:
    """Per user, the two pipelines a first feed page sends: the ranked-page script
    with the chronological reads (home feed, its size, the last read, the
    celebrities' timelines), then the page's post hashes."""
    from stores.ranked import READ_PAGE_SCRIPT, page_args, page_keys
    from stores.redis.feeds import FeedCommands

    cmd = FeedCommands(layout)
    sha = hashlib.sha1(READ_PAGE_SCRIPT.encode()).hexdigest()
    mixes = []
    for u in users:
        keys, argv = page_keys(layout, u), page_args(None, 0, PAGE)
        first = [("EVALSHA", sha, len(keys), *keys, *argv), cmd.feed(u, None, PAGE + 4),
                 cmd.feed_size(u), cmd.last_read(u)]
        first += [cmd.timeline(c, None, PAGE + 4) for c in ds.celebrities]
        mixes.append((first, [cmd.post(p.post_id) for p in ds.feeds[u][:PAGE]]))
    return mixes


def _coredis_queue(pipe, command: tuple) -> None:
    name, key = command[0], command[1]
    if name == "EVALSHA":
        n = command[2]
        pipe.evalsha(key, keys=list(command[3:3 + n]), args=list(command[3 + n:]))
    elif name == "ZREVRANGEBYSCORE":
        top = float("inf") if command[2] == "+inf" else command[2]
        pipe.zrevrangebyscore(key, top, float("-inf"), withscores=True, offset=0, count=command[-1])
    elif name == "ZCARD":
        pipe.zcard(key)
    elif name == "GET":
        pipe.get(key)
    elif name == "HMGET":
        pipe.hmget(key, list(command[2:]))
    else:
        raise ValueError(f"no coredis mapping for {name}")


@contextlib.asynccontextmanager
async def redis_client(name: str, port: int):
    """``run(commands) -> replies``: one pipelined round trip with client ``name``."""
    if name == "hand-written":
        from stores.redis.aio import AioRedis

        client = AioRedis("127.0.0.1", port, timeout_s=5.0)
        yield client.pipeline
        await client.close()
    elif name == "redis.asyncio":
        import redis.asyncio

        client = redis.asyncio.Redis(host="127.0.0.1", port=port, max_connections=64)

        async def run(commands):
            pipe = client.pipeline(transaction=False)
            for c in commands:
                pipe.execute_command(*c)
            return await pipe.execute(raise_on_error=False)

        yield run
        await client.aclose()
    elif name == "coredis":
        import coredis

        async with coredis.Redis(host="127.0.0.1", port=port, max_connections=64) as client:
            async def run(commands):
                async with client.pipeline(transaction=False, raise_on_error=False) as pipe:
                    for c in commands:
                        _coredis_queue(pipe, c)
                return pipe.results

            yield run
    elif name == "valkey-glide":
        from glide import Batch, GlideClient, GlideClientConfiguration, NodeAddress

        client = await GlideClient.create(GlideClientConfiguration(
            [NodeAddress("127.0.0.1", port)], request_timeout=5000))

        async def run(commands):
            batch = Batch(is_atomic=False)
            for c in commands:
                batch.custom_command([str(x) for x in c])
            return await client.exec(batch, raise_on_error=False)

        yield run
        await client.close()
    else:
        raise ValueError(name)


async def _drive_client(name: str, port: int, mixes, total: int, concurrency: int) -> dict:
    async with redis_client(name, port) as run:
        for first, second in mixes[:50]:  # connect, warm
            await run(first)
            await run(second)
        latencies: list[float] = []
        todo = iter(range(total))

        async def worker() -> None:
            for i in todo:
                first, second = mixes[i % len(mixes)]
                t = time.perf_counter()
                await run(first)
                await run(second)
                latencies.append(time.perf_counter() - t)

        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    return {"mixes_per_s": total / wall, "cpu_us_per_mix": cpu / total * 1e6,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000}


def compare_clients(ctx: dict, args) -> dict:
    """Each Redis client on the feed read's command mix, same process, same Redis,
    ``--client-concurrency`` requests at once, ``--runs`` rounds (order rotated)."""
    import uvloop

    from stores.ranked import READ_PAGE_SCRIPT

    ds = ctx["ds"]
    RedisFeedStore.from_url(f"redis://127.0.0.1:{ctx['redis_port']}/0").client.script_load(
        READ_PAGE_SCRIPT)
    mixes = feed_mixes(ds, ctx["layout"], ds.users[:500])
    names = [n for n in args.clients.split(",") if n]
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for run in range(args.runs):
        for name in names[run % len(names):] + names[:run % len(names)]:
            if name in errors:
                continue
            try:
                got = uvloop.run(_drive_client(name, ctx["redis_port"], mixes, args.client_mixes,
                                               args.client_concurrency))
            except ImportError as exc:  # not installed: say so in the table
                errors[name] = f"not installed ({exc.name})"
                continue
            rounds[name].append(got)
            print(f"  client {name} run {run + 1}: {got['mixes_per_s']:,.0f} mixes/s, "
                  f"{got['cpu_us_per_mix']:.0f} us CPU per mix, p50 {got['p50_ms']:.2f} ms "
                  f"p99 {got['p99_ms']:.2f} ms", flush=True)
    table = {}
    for name in names:
        if rounds[name]:
            table[name] = {k: statistics.median(r[k] for r in rounds[name]) for k in rounds[name][0]}
        else:
            table[name] = {"error": errors.get(name, "no run")}
    return {"commands": [len(mixes[0][0]), len(mixes[0][1])], "concurrency": args.client_concurrency,
            "mixes": args.client_mixes, "table": table}


# -- CPU per request in-process -----------------------------------------------------------------


async def _asgi_get(app, path: str, query: bytes, token: bytes) -> int:
    scope = {"type": "http", "method": "GET", "path": path, "query_string": query,
             "headers": [(b"authorization", b"Bearer " + token)]}
    status = 0

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _cpu_per_request(ctx: dict, args) -> dict:
    import cProfile
    import pstats

    from floor_app import app as floor
    from serving.app import FeedApp
    from serving.config import ServingConfig

    ds, settings = ctx["ds"], ctx["settings"]
    app = FeedApp(ServingConfig(jwt_key=JWT_KEY, redis_url=f"redis://127.0.0.1:{ctx['redis_port']}/0",
                                key_prefix=ctx["prefix"], cassandra_host=settings.host,
                                cassandra_port=settings.cassandra_port, keyspace=ctx["keyspace"],
                                push_threshold=ds.push_threshold))
    await app.startup()
    n = args.cpu_requests
    groups = {"floor": (floor, ds.users, "/v1/users/{}/feed"),
              "feed": (app, ds.users, "/v1/users/{}/feed"),
              "tray": (app, ds.users, "/v1/users/{}/stories/tray")}
    if ds.heavy_users:
        groups["heavy_feed"] = (app, ds.heavy_users, "/v1/users/{}/feed")
        groups["heavy_tray"] = (app, ds.heavy_users, "/v1/users/{}/stories/tray")
    tokens = {u: issue_token(JWT_KEY, u, 7200).encode() for u in ds.users + ds.heavy_users}
    out = {}
    try:
        for group, (target, users, path) in groups.items():
            # A warm pass, the measured one, and a profiled one if asked.
            for step in ("warm", "measure", "profile"):
                if step == "profile" and not (args.profile and group != "floor"):
                    break
                statuses: dict[int, int] = {}
                requests = [(users[i % len(users)]) for i in range(n)]
                profile = cProfile.Profile(time.process_time) if step == "profile" else None
                cpu0, t0 = time.process_time(), time.perf_counter()
                if profile:
                    profile.enable()
                for u in requests:
                    status = await _asgi_get(target, path.format(u), f"limit={PAGE}".encode(), tokens[u])
                    statuses[status] = statuses.get(status, 0) + 1
                if profile:
                    profile.disable()
                    print(f"  profile of {n} {group} requests (CPU time, top 25 by own time):")
                    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
                elif step == "measure":
                    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                    out[group] = {"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6,
                                  "statuses": statuses}
    finally:
        await app.shutdown()
    return out


def cpu_per_request(ctx: dict, args) -> dict:
    """CPU and wall time per request, in-process and sequential (no HTTP server):
    the floor app against the API's reads, after one warm pass (caches filled)."""
    import uvloop

    sys.path.insert(0, str(REPO / "bench"))
    out = uvloop.run(_cpu_per_request(ctx, args))
    for group, r in out.items():
        print(f"  in-process {group}: {r['cpu_us']:.0f} us CPU, {r['wall_us']:.0f} us wall per "
              f"request (statuses {r['statuses']})", flush=True)
    return out


def _floor_run(ctx: dict, args, run: int) -> dict:
    floor = loadgen(ctx["loadgen"], ctx["floor_targets"], args.rate, args.duration_s)
    print(f"  floor granian:{args.floor_workers} run {run + 1}: p50 {floor['p50_ms']:.2f} ms "
          f"p99 {floor['p99_ms']:.2f} ms {floor['achieved_rps']:,.0f} req/s "
          f"(non-200 {_non200(floor)}, errors {floor['errors']})", flush=True)
    return floor


def server_events(base: str) -> dict[str, float]:
    """``feedbeam_serving_events_total`` by event, as one worker reports them
    (empty if the server is too busy to answer within 30 s)."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("feedbeam_serving_events_total{"):
            labels, value = line.rsplit(" ", 1)
            event = labels.split('event="', 1)[1].split('"', 1)[0]
            out[event] = out.get(event, 0) + float(value)
    return out


def _non200(api: dict) -> int:
    return sum(n for s, n in api["statuses"].items() if s != "200")


def measure_outage(ctx: dict, args, spec: str) -> dict:
    """Fallback latency: the API on a private Redis that is killed under load."""
    ds = ctx["ds"]
    redis = PrivateRedis()
    server = None
    try:
        store = RedisFeedStore.from_url(redis.url, ctx["prefix"])
        users = ds.users[:args.outage_users]
        load_redis(ds, store, users, heavy=False)
        store.close()
        server_name, workers = spec.split(":")
        server = Server(server_name, int(workers), free_port(), redis.port, ctx["prefix"],
                        ctx["keyspace"], ds.push_threshold, ctx["tmp"] / "serve-outage.log")
        targets = ctx["tmp"] / "targets-outage.tsv"
        write_targets(targets, server.base, users)
        healthy = loadgen(ctx["loadgen"], targets, args.outage_rate, args.warmup_s)
        redis.kill()
        loadgen(ctx["loadgen"], targets, args.outage_rate, 2)  # breaker opens, graph caches refill
        down = loadgen(ctx["loadgen"], targets, args.outage_rate, args.duration_s)
        print(f"  outage ({spec}, {args.outage_rate}/s, {len(users)} users): healthy p99 "
              f"{healthy['p99_ms']:.2f} ms; Redis killed: p50 {down['p50_ms']:.2f} ms p99 "
              f"{down['p99_ms']:.2f} ms {down['achieved_rps']:,.0f} req/s, statuses {down['statuses']}, "
              f"errors {down['errors']}", flush=True)
        return {"config": spec, "rate": args.outage_rate, "users": len(users), "healthy": healthy,
                "redis_down": down}
    finally:
        if server is not None:
            server.stop()
        redis.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data, 1 run, short steps")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--feed-len", type=int, default=300)
    parser.add_argument("--celebrities", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--duration-s", type=float, default=20)
    parser.add_argument("--warmup-s", type=float, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--configs", default="granian:2",
                        help="server:workers to measure, comma-separated (e.g. uvicorn:2,granian:2)")
    parser.add_argument("--redis-benchmark-n", type=int, default=200_000)
    parser.add_argument("--outage-users", type=int, default=200)
    parser.add_argument("--outage-rate", type=float, default=500)
    parser.add_argument("--skip-outage", action="store_true")
    parser.add_argument("--floor-workers", type=int, default=2,
                        help="granian workers of the HTTP floor (bench/floor_app.py); 0 skips it")
    parser.add_argument("--ladder", default="250,500,1000",
                        help="rates (req/s) to run the best configuration at once each, "
                             "comma-separated; empty to skip")
    parser.add_argument("--heavy-users", type=int, default=4,
                        help="users following --heavy-follows accounts; 0 skips the step")
    parser.add_argument("--heavy-follows", type=int, default=100_000)
    parser.add_argument("--heavy-celebrities", type=int, default=2_000,
                        help="of the heavy users' follows, accounts above the push threshold")
    parser.add_argument("--heavy-rate", type=float, default=1000,
                        help="req/s of the ordinary/heavy feed and tray mix")
    parser.add_argument("--heavy-share", type=float, default=0.1,
                        help="share of that mix that is the heavy users'")
    parser.add_argument("--clients", default="hand-written,redis.asyncio,coredis,valkey-glide",
                        help="Redis clients to compare on the feed's command mix; empty skips")
    parser.add_argument("--client-mixes", type=int, default=4000)
    parser.add_argument("--client-concurrency", type=int, default=32)
    parser.add_argument("--cpu-requests", type=int, default=2000,
                        help="requests per group of the in-process CPU step; 0 skips it")
    parser.add_argument("--profile", action="store_true",
                        help="print cProfile's top functions (CPU time) of the in-process "
                             "requests, per group")
    parser.add_argument("--skip-http", action="store_true",
                        help="only the in-process steps (CPU per request, Redis clients)")
    parser.add_argument("--redis", choices=("private", "shared"), default="private",
                        help="private: a redis-server of this run (other work on the shared "
                             "one does not skew the figures); shared: the stack's Redis")
    args = parser.parse_args(argv)
    # Let `kill` (SIGTERM) run the clean-up below like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.users, args.feed_len, args.runs = min(args.users, 400), min(args.feed_len, 200), 1
        args.duration_s, args.warmup_s, args.outage_users = min(args.duration_s, 8), 3, 100
        args.redis_benchmark_n, args.client_mixes, args.cpu_requests = 50_000, 1000, 500
        args.heavy_users = min(args.heavy_users, 2)
    settings = StackSettings.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="fb-bench-serving-"))
    prefix = f"bsv{uuid.uuid4().hex[:10]}"
    keyspace = f"bench_serving_{uuid.uuid4().hex[:10]}"
    cluster = new_cluster(settings.host, settings.cassandra_port)
    session = cluster.connect()
    private = PrivateRedis() if args.redis == "private" else None
    redis_port = settings.redis_port if private is None else private.port
    redis_store = RedisFeedStore.from_url(
        settings.redis_url if private is None else private.url, prefix)
    floor = None
    results: dict = {"args": vars(args)}
    try:
        t0 = time.monotonic()
        ds = Dataset(args.users, args.feed_len, args.celebrities, args.heavy_users,
                     args.heavy_follows, args.heavy_celebrities)
        migrate(session, keyspace)
        load_redis(ds, redis_store, ds.users)
        if not args.skip_http:  # the outage step's durable copy
            load_cassandra(ds, CassandraFeedStore(session, keyspace), ds.users[:args.outage_users])
        print(f"data: {len(ds.users)} users x {args.feed_len} feed entries, {len(ds.posts):,} posts, "
              f"{args.celebrities} celebrities (pulled), ranked feeds for half the users, stories "
              f"for half the authors; {len(ds.heavy_users)} heavy users following "
              f"{len(ds.heavy_following):,} accounts ({len(ds.heavy_celebrities):,} above the push "
              f"threshold of {ds.push_threshold}); loaded in {time.monotonic() - t0:.0f} s", flush=True)
        ctx = {"ds": ds, "settings": settings, "prefix": prefix, "keyspace": keyspace, "tmp": tmp,
               "layout": redis_store.keys, "loadgen": build_loadgen(settings),
               "redis_port": redis_port}
        if args.cpu_requests:
            results["cpu"] = cpu_per_request(ctx, args)
        if args.clients:
            results["clients"] = compare_clients(ctx, args)
        if not args.skip_http:
            if args.floor_workers:
                floor = FloorServer(args.floor_workers, free_port(), tmp / "floor.log")
                ctx["floor_targets"] = tmp / "targets-floor.tsv"
                write_targets(ctx["floor_targets"], floor.base, ds.users)
                loadgen(ctx["loadgen"], ctx["floor_targets"], min(args.rate, 1000), args.warmup_s)
            results["configs"] = [measure_config(spec, ctx, args) for spec in args.configs.split(",")]
            if floor is not None:
                floor.stop()
                floor = None
            best = min(results["configs"], key=lambda c: c["p99_ms"])
            if ds.heavy_users:
                results["heavy"] = measure_heavy(best["config"], ctx, args)
            if args.ladder:
                results["ladder"] = measure_ladder(best["config"], ctx, args,
                                                   [float(r) for r in args.ladder.split(",")])
            if not args.skip_outage:
                results["outage"] = measure_outage(ctx, args, best["config"])
    finally:
        if floor is not None:
            floor.stop()
        keys = list(redis_store.client.scan_iter(match=f"{prefix}:*", count=5000))
        for i in range(0, len(keys), 5000):
            redis_store.client.delete(*keys[i:i + 5000])
        redis_store.close()
        if private is not None:
            private.stop()
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print_summary(results, args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {RESULTS}")
    return 0


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def print_summary(results: dict, args) -> None:
    print(f"\n==== serving benchmark: GET /v1/users/{{u}}/feed?limit={PAGE}, open loop at "
          f"{args.rate:,.0f} req/s for {args.duration_s:.0f} s, median of {args.runs} run(s) ====")
    for c in results.get("configs", []):
        ratio = c["achieved_rps"] / c["redis_benchmark_rps"] if c["redis_benchmark_rps"] else 0
        print(f"  {c['config']:<11} API p50 {c['p50_ms']:6.2f} ms  p99 {c['p99_ms']:6.2f} ms  "
              f"achieved {c['achieved_rps']:7,.0f} req/s, 200s {c['completed_share']:.1%} of offered"
              f"   | redis-benchmark ZREVRANGEBYSCORE {c['redis_benchmark_rps']:9,.0f} req/s p50 "
              f"{c['redis_benchmark_p50_ms']:.3f} ms p99 {c['redis_benchmark_p99_ms']:.3f} ms "
              f"(API rate / Redis max = {ratio:.2f})")
        f = c.get("floor")
        if f:
            print(f"  {f['config']:<11} p50 {f['p50_ms']:6.2f} ms  p99 {f['p99_ms']:6.2f} ms  "
                  f"achieved {f['achieved_rps']:7,.0f} req/s, 200s {f['completed_share']:.1%} of "
                  "offered   | constant body, no token check, no Redis, same runs")
    best = min(results.get("configs", []), key=lambda c: c["p99_ms"], default={})
    f = best.get("floor")
    if f:
        p99_ratio = best["p99_ms"] / f["p99_ms"] if f["p99_ms"] else float("inf")
        ok = best["completed_share"] >= 0.95 and p99_ratio <= 2.0
        print(f"  BAR serving at {args.rate:,.0f} req/s ({best['config']}): completed "
              f"{best['completed_share']:.1%} of offered (>= 95%); p99 {best['p99_ms']:.2f} ms vs "
              f"floor {f['p99_ms']:.2f} ms = {p99_ratio:.2f}x (<= 2x) -> {_verdict(ok)}")
    heavy = results.get("heavy")
    if heavy:
        p99 = heavy["p99_ms"]
        line = []
        ok = True
        for kind in ("feed", "tray"):
            if kind in p99 and f"heavy_{kind}" in p99:
                r = p99[f"heavy_{kind}"] / p99[kind] if p99[kind] else float("inf")
                ok = ok and r <= 2.0
                line.append(f"{kind} p99 {p99[f'heavy_{kind}']:.2f} ms vs ordinary {p99[kind]:.2f} ms "
                            f"= {r:.2f}x")
        print(f"  BAR heavy users (following {args.heavy_follows:,}, {args.heavy_celebrities:,} above "
              f"the push threshold; {heavy['share']:.0%} of {heavy['rate']:,.0f} req/s, "
              f"{heavy['config']}): {'; '.join(line)} (<= 2x) -> {_verdict(ok)}")
    clients = results.get("clients")
    if clients:
        print(f"  Redis clients on the feed read's commands ({clients['commands'][0]}-command "
              f"pipeline, then {clients['commands'][1]} HMGETs), {clients['concurrency']} at once, "
              "one uvloop process, same private Redis:")
        print(f"    {'client':<14} {'mixes/s':>9} {'CPU us/mix':>11} {'p50 ms':>8} {'p99 ms':>8}")
        for name, r in clients["table"].items():
            if "error" in r:
                print(f"    {name:<14} {r['error']}")
            else:
                print(f"    {name:<14} {r['mixes_per_s']:9,.0f} {r['cpu_us_per_mix']:11.0f} "
                      f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
        own = clients["table"].get("hand-written", {})
        libs = {n: r for n, r in clients["table"].items() if n != "hand-written" and "error" not in r}
        if "cpu_us_per_mix" in own and libs:
            name, lib = min(libs.items(), key=lambda kv: kv[1]["cpu_us_per_mix"])
            print(f"    hand-written vs the best library ({name}): "
                  f"{lib['cpu_us_per_mix'] / own['cpu_us_per_mix']:.2f}x less CPU per mix, "
                  f"{own['mixes_per_s'] / lib['mixes_per_s']:.2f}x the mixes/s")
    cpu = results.get("cpu")
    if cpu:
        print("  in-process, per request (no HTTP server): " + "; ".join(
            f"{g} {r['cpu_us']:.0f} us CPU" for g, r in cpu.items()))
    for step in results.get("ladder", []):
        a = step["api"]
        print(f"  ladder {step['rate']:>7,.0f} req/s: p50 {a['p50_ms']:.2f} ms p99 {a['p99_ms']:.2f} ms "
              f"achieved {a['achieved_rps']:,.0f} req/s")
    if "outage" in results:
        o = results["outage"]
        print(f"  Redis outage ({o['config']}, {o['rate']:,.0f} req/s over {o['users']} users): "
              f"fallback p50 {o['redis_down']['p50_ms']:.2f} ms p99 {o['redis_down']['p99_ms']:.2f} "
              f"ms achieved {o['redis_down']['achieved_rps']:,.0f} req/s, statuses "
              f"{o['redis_down']['statuses']} (healthy p99 {o['healthy']['p99_ms']:.2f} ms)")


if __name__ == "__main__":
    sys.exit(main())
