"""Benchmark: stories backlog drain (stories/s) and expiry delay (expires_at -> removed in Redis).

    .venv/bin/python bench/bench_stories.py [--quick] [--stories 100000]
        [--views-per-story 2] [--runs 3] [--steady-s 60] [--steady-rate 50] [--partitions 2]

In one run it measures:

* (a) limits: a raw confluent-kafka consume + Avro decode of the backlog
  (events/s: the read limit), and ``StoryWriter.apply`` in this process over
  the decoded events, one thread and writer per partition, in batches of 500,
  against a fresh Redis prefix and keyspace (the store limit: the same writes
  the job does, no Beam, no Kafka);
* (b) backlog drain: ``--stories`` PUBLISHED events (expiring in 24 h) with
  ``--views-per-story`` VIEWED events each on average (1% of the stories also
  deleted) are queued in a fresh ``story-events`` topic; then
  ``python -m pipelines.stories`` starts on Prism (streaming, LOOPBACK, own
  process, fresh consumer group, Redis prefix and keyspace, from earliest).
  Drain time = from the first story hash written to the group's committed
  offsets reaching the end of the topic (committed only after a bundle's
  writes are done); stories/s and events/s over it; start-up reported apart.
  A sample of stories is checked against what the events imply (present or
  deleted, unique view count). Median of ``--runs``;
  After each drain a sentinel story expiring 2 s later is published: its
  removal time says when the expiry step (after the shuffle) had taken in the
  backlog's timer commands, which the drain time (offsets) does not show;
* (c) expiry delay under steady traffic: a fresh job (from the topic's end,
  own prefix and keyspace) runs while this process produces
  ``--steady-rate`` events/s for ``--steady-s`` (a fifth publishes expiring
  5-20 s later, the rest views of them), with event time = produce time; a
  poller (every ``POLL_S``) stamps when each story's hash turns into a
  tombstone. Delay = that time - ``expires_at``, p50/p99 over the stories that
  expired while traffic was flowing (the watermark follows the traffic, not
  the idle clock).

Topics, keyspaces and Redis keys are unique per run and removed at the end.
Results: a summary block and ``bench/results/stories.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from bench_fanout import Job, delete_prefix  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from domain.fanout import percentile_of  # noqa: E402
from domain.stories import StoryPolicy  # noqa: E402
from schemas.codec import WireCodec  # noqa: E402
from schemas.events import MediaType, StoryEvent, StoryEventKind, dlq_topic  # noqa: E402
from schemas.keys import KeyLayout  # noqa: E402
from stores.kafka.lag import caught_up, committed_offsets, end_offsets  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "stories.json"
POLL_S = 0.05
DAY_MS = 24 * 3600 * 1000
QUICK = dict(stories=10_000, views_per_story=2.0, runs=3, steady_s=30.0, steady_rate=50.0)
FULL = dict(stories=100_000, views_per_story=2.0, runs=3, steady_s=60.0, steady_rate=50.0)
PUBLISHED, VIEWED, DELETED = StoryEventKind.PUBLISHED, StoryEventKind.VIEWED, StoryEventKind.DELETED


def now_ms() -> int:
    return int(time.time() * 1000)


# ------------------------------------------------------------------ workload


class Backlog:
    """The queued events and what they imply per story (for the sample check)."""

    def __init__(self, n: int, views_per_story: float, base_id: int, rng: random.Random):
        t = now_ms()
        self.events: list[StoryEvent] = []
        self.viewers: dict[int, set[int]] = {}
        self.deleted: set[int] = set()
        self.ids = [base_id + i for i in range(n)]
        for chunk in range(0, n, 1000):
            ids = self.ids[chunk:chunk + 1000]
            authors = {s: rng.randint(1, 50_000) for s in ids}
            for s in ids:
                created = t - rng.randint(0, 3_600_000)
                self.events.append(StoryEvent(f"p{s}", created, PUBLISHED, s, authors[s],
                                              created_at=created, expires_at=created + DAY_MS,
                                              media_type=MediaType.PHOTO))
            for _ in range(round(len(ids) * views_per_story)):
                s, v = rng.choice(ids), rng.randint(1, 200_000)
                self.events.append(StoryEvent(f"v{s}-{v}-{len(self.events)}", t, VIEWED, s,
                                              authors[s], viewer_id=v))
                self.viewers.setdefault(s, set()).add(v)
            for s in rng.sample(ids, max(1, len(ids) // 100)):
                self.events.append(StoryEvent(f"d{s}", t, DELETED, s, authors[s]))
                self.deleted.add(s)

    @property
    def first_ids(self) -> list[int]:
        return self.ids[:8]


def produce(bootstrap: str, topic: str, events: list[StoryEvent]) -> None:
    from confluent_kafka import Producer

    from jobs.generate import PRODUCER_CONFIG

    codec = WireCodec()
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    for e in events:
        while True:
            try:
                producer.produce(topic, codec.encode(e, topic), e.key, timestamp=e.event_time)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("events were not all delivered")


# ------------------------------------------------------------------ measures


def raw_loop(bootstrap: str, topic: str,
             ends: dict[int, int]) -> tuple[dict[int, list[StoryEvent]], float]:
    """Consume the topic from the start and decode every record; (events by partition,
    seconds)."""
    from confluent_kafka import Consumer, TopicPartition

    from jobs.replay_range import CONSUMER_CONFIG

    codec = WireCodec()
    consumer = Consumer({"bootstrap.servers": bootstrap, **CONSUMER_CONFIG})
    consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
    remaining = {p: end for p, end in ends.items() if end > 0}
    out: dict[int, list[StoryEvent]] = {p: [] for p in remaining}
    t = time.perf_counter()
    try:
        while remaining:
            for msg in consumer.consume(num_messages=10_000, timeout=1.0):
                if msg.error() is not None:
                    continue  # partition EOF
                if msg.partition() not in remaining or msg.offset() >= ends[msg.partition()]:
                    continue  # written after the backlog (sentinels of earlier runs)
                out[msg.partition()].append(codec.decode(msg.value()))
                remaining[msg.partition()] -= 1
                if not remaining[msg.partition()]:
                    del remaining[msg.partition()]
    finally:
        consumer.close()
    return out, time.perf_counter() - t


def in_process(ctx, by_partition: dict[int, list[StoryEvent]], tag: str) -> float:
    """``StoryWriter.apply`` over each partition's events in batches of 500, one thread
    and writer per partition (as the job has one reader per partition); seconds."""
    from concurrent.futures import ThreadPoolExecutor

    from stores.config import StoreConfig
    from stores.stories import open_story_writer

    key_prefix, keyspace = ctx.key_prefix + tag, ctx.keyspace + tag
    ctx.migrate(keyspace)
    stores = StoreConfig(ctx.settings.redis_url, key_prefix, ctx.settings.host,
                         ctx.settings.cassandra_port, keyspace)
    writers = [open_story_writer(stores, ctx.policy) for _ in by_partition]

    def apply_all(writer, events):
        for i in range(0, len(events), 500):
            writer.apply(events[i:i + 500])

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(len(writers)) as pool:
            for f in [pool.submit(apply_all, w, es)
                      for w, es in zip(writers, by_partition.values())]:
                f.result()
        return time.perf_counter() - t
    finally:
        for w in writers:
            w.close()


def check_sample(client: redis.Redis, keys: KeyLayout, backlog: Backlog, rng: random.Random,
                 k: int = 500) -> int:
    """Sampled stories are live with the implied unique views, or tombstoned if deleted."""
    sample = rng.sample(backlog.ids, min(k, len(backlog.ids)))
    pipe = client.pipeline(transaction=False)
    for s in sample:
        pipe.hmget(keys.story(s), "removed", "views")
    for s, (removed, views) in zip(sample, pipe.execute()):
        if s in backlog.deleted:
            assert removed == b"deleted", (s, removed)
        else:
            assert removed is None, (s, removed)
            assert int(views or 0) == len(backlog.viewers.get(s, ())), (s, views)
    return len(sample)


def drain_once(ctx, run: int, backlog: Backlog,
               ends: dict[int, int]) -> tuple[dict, Job, KeyLayout]:
    """Start a job over the queued topic; returns its measures, the running job and its keys."""
    key_prefix, keyspace = f"{ctx.key_prefix}r{run}", f"{ctx.keyspace}r{run}"
    ctx.migrate(keyspace)
    keys = KeyLayout(key_prefix)
    t_submit = time.time()
    job = Job(ctx.settings, ctx.prism, ctx.topic_prefix, key_prefix, keyspace,
              ctx.log_dir / f"stories-run{run}.log", module="pipelines.stories")
    ctx.jobs.append(job)
    topic = ctx.topic_prefix + StoryEvent.TOPIC
    first = None
    deadline = time.monotonic() + ctx.args.timeout_s
    while True:
        if job.poll() is not None:
            raise RuntimeError(f"the stories job exited ({job.returncode}); see its log")
        if time.monotonic() > deadline:
            raise RuntimeError("the backlog did not drain in time")
        if first is None and any(ctx.client.exists(keys.story(s)) for s in backlog.first_ids):
            first = time.time()
        if first is not None:
            done = committed_offsets(ctx.settings.kafka_bootstrap, job.group, [topic])
            if caught_up(done, {(topic, p): end for p, end in ends.items()}):
                break
        time.sleep(0.2)
    last = time.time()
    seconds = last - first
    checked = check_sample(ctx.client, keys, backlog, random.Random(run))
    catch_up = timers_caught_up(ctx, keys, backlog.ids[-1] + 1 + run, deadline)
    n = len(backlog.ids)
    return ({"stories": n, "events": len(backlog.events), "seconds": seconds,
             "stories_per_s": n / seconds, "events_per_s": len(backlog.events) / seconds,
             "startup_s": first - t_submit, "sample_checked": checked,
             "timers_caught_up_s": catch_up}, job, keys)


def timers_caught_up(ctx, keys: KeyLayout, story_id: int, deadline: float) -> float:
    """Seconds after the drain until the expiry step has taken in the backlog's timer
    commands: a sentinel story published now, expiring in 2 s, is removed only
    once the step's input watermark passes it, which the pending commands
    (timestamped before it) hold back."""
    t = now_ms()
    produce(ctx.settings.kafka_bootstrap, ctx.topic_prefix + StoryEvent.TOPIC, [StoryEvent(
        f"sentinel{story_id}", t, PUBLISHED, story_id, 1, created_at=t, expires_at=t + 2000)])
    while ctx.client.hget(keys.story(story_id), "removed") is None:
        if time.monotonic() > deadline:
            raise RuntimeError("the expiry step did not catch up in time")
        time.sleep(POLL_S)
    return (now_ms() - t) / 1000


def fresh_job(ctx, base_id: int) -> tuple[Job, KeyLayout]:
    """A job on the topic from its end (``--start_from=latest``), with its own Redis
    prefix and keyspace, answering once a probe publish is applied."""
    key_prefix, keyspace = f"{ctx.key_prefix}s", f"{ctx.keyspace}s"
    ctx.migrate(keyspace)
    keys = KeyLayout(key_prefix)
    job = Job(ctx.settings, ctx.prism, ctx.topic_prefix, key_prefix, keyspace,
              ctx.log_dir / "stories-steady.log", extra=["--start_from=latest"],
              module="pipelines.stories")
    ctx.jobs.append(job)
    deadline = time.monotonic() + 300
    while not ctx.client.exists(keys.story(base_id)):
        if job.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the steady-traffic job did not start; see its log")
        t = now_ms()   # until the job has its partitions, a probe may land before them
        produce(ctx.settings.kafka_bootstrap, ctx.topic_prefix + StoryEvent.TOPIC, [StoryEvent(
            f"probe{t}", t, PUBLISHED, base_id, 1, created_at=t, expires_at=t + 600_000)])
        time.sleep(2)
    return job, keys


def steady_expiry(ctx, keys: KeyLayout, rate: float, duration_s: float,
                  base_id: int) -> dict:
    """Produce steady traffic into a running job; delay from expires_at to tombstone."""
    from confluent_kafka import Producer

    topic = ctx.topic_prefix + StoryEvent.TOPIC
    codec = WireCodec()
    producer = Producer({"bootstrap.servers": ctx.settings.kafka_bootstrap, "linger.ms": 5})
    rng = random.Random(99)
    stories: dict[int, int] = {}       # story -> expires_at
    authors: dict[int, int] = {}
    removed_at: dict[int, int] = {}
    t_start = time.time()
    t_end = t_start + duration_s
    sent, next_id = 0, base_id

    def poll_removed() -> None:
        due = [s for s, exp in stories.items() if s not in removed_at and exp <= now_ms()]
        if not due:
            return
        pipe = ctx.client.pipeline(transaction=False)
        for s in due:
            pipe.hexists(keys.story(s), "removed")
        stamp = now_ms()
        for s, gone in zip(due, pipe.execute()):
            if gone:
                removed_at[s] = stamp

    next_poll = time.time()
    while time.time() < t_end:
        due_events = int((time.time() - t_start) * rate) - sent
        for _ in range(max(due_events, 0)):
            t = now_ms()
            if sent % 5 == 0 or not stories:
                s, next_id = next_id, next_id + 1
                authors[s] = rng.randint(1, 50_000)
                stories[s] = t + rng.randint(5_000, 20_000)
                e = StoryEvent(f"sp{s}", t, PUBLISHED, s, authors[s], created_at=t,
                               expires_at=stories[s], media_type=MediaType.VIDEO)
            else:
                s = rng.choice(list(stories)[-50:])
                e = StoryEvent(f"sv{s}-{sent}", t, VIEWED, s, authors[s],
                               viewer_id=rng.randint(1, 200_000))
            producer.produce(topic, codec.encode(e, topic), e.key, timestamp=e.event_time)
            sent += 1
        producer.poll(0)
        if time.time() >= next_poll:
            poll_removed()
            next_poll = time.time() + POLL_S
        time.sleep(0.005)
    producer.flush(30)
    t_traffic_end = now_ms()
    deadline = time.monotonic() + 60
    measured = [s for s, exp in stories.items() if exp <= t_traffic_end]
    while any(s not in removed_at for s in measured) and time.monotonic() < deadline:
        poll_removed()
        time.sleep(POLL_S)
    missing = [s for s in measured if s not in removed_at]
    delays = sorted(removed_at[s] - stories[s] for s in measured if s in removed_at)
    return {"rate": rate, "seconds": duration_s, "events": sent, "stories": len(stories),
            "measured": len(measured), "not_removed_within_60s": len(missing),
            "poll_s": POLL_S,
            "p50_ms": percentile_of(delays, 0.50) if delays else None,
            "p99_ms": percentile_of(delays, 0.99) if delays else None,
            "max_ms": delays[-1] if delays else None}


# ------------------------------------------------------------------ main


class Ctx:
    def __init__(self, args, settings, prism, client, session):
        self.args, self.settings, self.prism, self.client = args, settings, prism, client
        self.session = session
        tag = uuid.uuid4().hex[:8]
        self.topic_prefix = f"bench.st{tag}."
        self.key_prefix = f"benchst{tag}"
        self.keyspace = f"bench_st_{tag}"
        self.keyspaces: list[str] = []
        self.jobs: list[Job] = []
        self.policy = StoryPolicy()
        self.log_dir = Path(settings.state_dir) / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.base_id = int(tag[:6], 16) << 32

    def migrate(self, keyspace: str) -> None:
        from stores.cassandra.session import migrate

        self.keyspaces.append(keyspace)
        migrate(self.session, keyspace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    parser.add_argument("--stories", type=int)
    parser.add_argument("--views-per-story", type=float)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--steady-s", type=float)
    parser.add_argument("--steady-rate", type=float, help="events/s of the steady traffic")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    from confluent_kafka.admin import AdminClient

    from infra.install import prism_binary
    from jobs.topics import create_topics
    from stores.cassandra.session import new_cluster

    settings = StackSettings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=60)
    cluster = new_cluster(settings.host, settings.cassandra_port)
    ctx = Ctx(args, settings, str(prism_binary(settings)), client, cluster.connect())
    topic = ctx.topic_prefix + StoryEvent.TOPIC
    results: dict = {"preset": "quick" if args.quick else "full",
                     "config": {k: getattr(args, k) for k in
                                ("stories", "views_per_story", "runs", "steady_s",
                                 "steady_rate", "partitions")}}
    try:
        create_topics(settings.kafka_bootstrap, [topic, dlq_topic(topic)],
                      partitions=args.partitions)
        backlog = Backlog(args.stories, args.views_per_story, ctx.base_id, random.Random(5))
        t = time.perf_counter()
        produce(settings.kafka_bootstrap, topic, backlog.events)
        ends = {p: end for (_, p), end in end_offsets(settings.kafka_bootstrap, [topic]).items()}
        print(f"queued {len(backlog.ids):,} stories, {len(backlog.events):,} events in "
              f"{time.perf_counter() - t:.1f}s", flush=True)

        raw, drains, stores = [], [], []
        job, keys = None, None
        for run in range(args.runs):
            if job is not None:
                job.stop()   # nothing of ours runs while the limits are measured
            by_partition, raw_s = raw_loop(settings.kafka_bootstrap, topic, ends)
            n_events = sum(len(es) for es in by_partition.values())
            assert n_events == len(backlog.events)
            raw.append(n_events / raw_s)
            store_s = in_process(ctx, by_partition, f"w{run}")
            stores.append({"events_per_s": n_events / store_s,
                           "stories_per_s": len(backlog.ids) / store_s})
            res, job, keys = drain_once(ctx, run, backlog, ends)
            drains.append(res)
            print(f"run {run + 1}: raw consume+decode {raw[-1]:,.0f} events/s  in-process "
                  f"StoryWriter {stores[-1]['events_per_s']:,.0f} events/s  pipeline drain "
                  f"{res['stories_per_s']:,.0f} stories/s ({res['events_per_s']:,.0f} events/s, "
                  f"{res['seconds']:.1f}s, start-up {res['startup_s']:.1f}s, "
                  f"{res['sample_checked']} sampled stories checked; timers caught up "
                  f"{res['timers_caught_up_s']:.1f}s later)", flush=True)
        results["raw_events_per_s"] = raw
        results["in_process"] = stores
        results["drain"] = drains
        job.stop()
        base = ctx.base_id + args.stories + 1000
        job, keys = fresh_job(ctx, base)
        results["expiry"] = steady_expiry(ctx, keys, args.steady_rate, args.steady_s, base + 1)
        job.stop()
        med = {
            "raw_events_per_s": statistics.median(raw),
            "store_events_per_s": statistics.median(s["events_per_s"] for s in stores),
            "store_stories_per_s": statistics.median(s["stories_per_s"] for s in stores),
            "drain_stories_per_s": statistics.median(d["stories_per_s"] for d in drains),
            "drain_events_per_s": statistics.median(d["events_per_s"] for d in drains),
            "drain_s": statistics.median(d["seconds"] for d in drains),
            "timers_caught_up_s": statistics.median(d["timers_caught_up_s"] for d in drains),
        }
        med["ratio_to_store"] = med["drain_events_per_s"] / med["store_events_per_s"]
        med["ratio_to_raw"] = med["drain_events_per_s"] / med["raw_events_per_s"]
        results["summary"] = med
    finally:
        for job in ctx.jobs:
            job.stop()
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        for f in admin.delete_topics([topic, dlq_topic(topic)], operation_timeout=30).values():
            try:
                f.result(timeout=60)
            except Exception as exc:  # keep cleaning the rest
                print(f"topic cleanup: {exc}")
        for ks in ctx.keyspaces:
            ctx.session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)
        cluster.shutdown()
        for p in [f"{ctx.key_prefix}{x}{run}" for run in range(args.runs) for x in "rw"] + [
                f"{ctx.key_prefix}s"]:
            delete_prefix(client, p)

    print_summary(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("w") as out:
        json.dump(results, out, indent=2, default=str)
    print(f"\nresults in {RESULTS.relative_to(REPO)}")
    return 0


def print_summary(r: dict) -> None:
    s, c, e = r["summary"], r["config"], r["expiry"]
    print(f"\n==== stories benchmark ({r['preset']} preset; median of {c['runs']} runs) ====")
    print(f"backlog: {c['stories']:,} stories, {c['views_per_story']} views/story, 1% deleted, "
          f"{c['partitions']} partitions")
    print(f"drain (pipeline):        {s['drain_stories_per_s']:>10,.0f} stories/s  "
          f"{s['drain_events_per_s']:>10,.0f} events/s  ({s['drain_s']:.1f}s)")
    print(f"limit: StoryWriter only: {s['store_stories_per_s']:>10,.0f} stories/s  "
          f"{s['store_events_per_s']:>10,.0f} events/s  ratio {s['ratio_to_store']:.2f}")
    print(f"limit: consume+decode:   {'':>10}            {s['raw_events_per_s']:>10,.0f} "
          f"events/s  ratio {s['ratio_to_raw']:.2f}")
    print(f"expiry step caught up with the backlog's timers {s['timers_caught_up_s']:.1f}s "
          f"after the drain")
    if e["p50_ms"] is not None:
        print(f"expiry delay at {e['rate']:.0f} events/s for {e['seconds']:.0f}s: "
              f"p50 {e['p50_ms']:.0f} ms, p99 {e['p99_ms']:.0f} ms, max {e['max_ms']:.0f} ms "
              f"over {e['measured']} stories ({e['not_removed_within_60s']} not removed "
              f"within 60 s; poll every {e['poll_s'] * 1000:.0f} ms)")


if __name__ == "__main__":
    sys.exit(main())
