"""Benchmark: stories backlog drain (events/s) and expiry delay (expires_at -> removed).

    .venv/bin/python bench/bench_stories.py [--quick] [--stories 100000]
        [--views-per-story 2] [--runs 3] [--steady-s 60] [--steady-rate 1000] [--partitions 2]
        [--split-steps [--durable-nice N]]

In one run it measures, median of ``--runs`` where repeated:

* limits and floors, while nothing else of ours runs: a raw confluent-kafka
  consume + Avro decode of the backlog (the read floor); the **plain loop**
  (the limit of the bar): the same Redis and Cassandra state written straight
  from the decoded events in batches of ``BATCH`` per partition (one thread
  each), no checks, no reads, no Beam, no Kafka: per batch one Redis pipeline
  (the plain commands run by bulk script calls) and one concurrent Cassandra
  execution (unlogged batches), what happened kept in memory
  (``PlainLoop``); each half of it alone, its Redis writes and its
  Cassandra writes; ``StoryWriter.apply`` in process over the same batches
  (both stores, no Beam, no Kafka), and its Redis step alone
  (``apply_to_redis`` and the durable log's records encoded): the job's
  writes without the runner;
* backlog drain: ``--stories`` PUBLISHED events (expiring in 24 h) with
  ``--views-per-story`` VIEWED events each on average (1% of the stories also
  deleted) queued in a fresh ``story-events`` topic; then
  ``python -m pipelines.stories`` starts on Prism (streaming, LOOPBACK, own
  process, fresh consumer group, Redis prefix and keyspace, from earliest;
  with ``--split-steps`` its Redis and durable steps as two jobs, the durable
  one at niceness ``--durable-nice``). Drain time = from the first story hash
  written to the group's committed offsets reaching the end of the topic
  (committed only after a bundle's Redis writes are done and its durable log
  records delivered): trays are right from then on; events/s over it (the
  bar: >= 20,000). The durable copy's time = from the same start to the
  durable step's group committing the end of the durable log (which cannot
  move once the drain is over); events/s over it (the bar: >= 50% of the
  plain loop, which writes both stores too). Start-up reported apart. A
  sample of stories is checked against what the events imply (present or
  deleted, unique view count). After each drain a sentinel story expiring
  2 s later is published: when it is removed says the expiry step keeps up
  after a backlog;
* expiry delay under steady traffic: a fresh job (from the topic's end, own
  prefix and keyspace) runs while this process produces ``--steady-rate``
  events/s for ``--steady-s`` (a fifth publishes expiring 5-20 s later, the
  rest views of them), event time = produce time; a poller (every
  ``POLL_S``) stamps when each due story is gone from both Redis (its hash a
  tombstone) and Cassandra (its ``stories_by_id`` row). Delay = that time -
  ``expires_at``, p50/p99 over the stories that expired while traffic was
  flowing (the bar: p99 <= 1 s at 1,000 events/s).

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

from bench_fanout import FanoutJob, delete_prefix  # noqa: E402
from infra.settings import StackSettings  # noqa: E402
from domain.fanout import percentile_of  # noqa: E402
from domain.stories import StoryPolicy  # noqa: E402
from schemas.codec import WireCodec  # noqa: E402
from schemas.events import MediaType, StoryEvent, StoryEventKind, dlq_topic  # noqa: E402
from schemas.keys import KeyLayout  # noqa: E402
from pipelines.common import DURABLE_GROUP_SUFFIX, STORIES_DURABLE_LOG_TOPIC  # noqa: E402
from stores.kafka.lag import (  # noqa: E402
    caught_up,
    commit_offsets,
    committed_offsets,
    end_offsets,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "stories.json"
POLL_S = 0.05
DAY_MS = 24 * 3600 * 1000
#: Events per batch of the plain loop and the in-process writer (the source's --batch_records).
BATCH = 1000
#: The bar (docs/benchmarks.md, "Stories").
DRAIN_TARGET = 20_000
PLAIN_TARGET_RATIO = 0.50
EXPIRY_P99_TARGET_MS = 1000
QUICK = dict(stories=10_000, views_per_story=2.0, runs=3, steady_s=30.0, steady_rate=1000.0)
FULL = dict(stories=100_000, views_per_story=2.0, runs=3, steady_s=60.0, steady_rate=1000.0)
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


def _writers(ctx, tag: str):
    """Store config of a fresh Redis prefix and migrated keyspace for ``tag``."""
    from stores.config import StoreConfig

    key_prefix, keyspace = ctx.key_prefix + tag, ctx.keyspace + tag
    ctx.migrate(keyspace)
    return StoreConfig(ctx.settings.redis_url, key_prefix, ctx.settings.host,
                       ctx.settings.cassandra_port, keyspace)


def _per_partition(by_partition: dict[int, list[StoryEvent]], make, apply_batch) -> float:
    """``apply_batch(state, events)`` over each partition's events in batches of
    ``BATCH``, one thread and ``make()`` state per partition (as the job has one
    reader per partition); seconds. ``make()`` returns (state, close)."""
    from concurrent.futures import ThreadPoolExecutor

    made = [make() for _ in by_partition]

    def run_all(state, events):
        for i in range(0, len(events), BATCH):
            apply_batch(state, events[i:i + BATCH])

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(len(made)) as pool:
            for f in [pool.submit(run_all, state, es)
                      for (state, _), es in zip(made, by_partition.values())]:
                f.result()
        return time.perf_counter() - t
    finally:
        for _, close in made:
            close()


def in_process(ctx, by_partition: dict[int, list[StoryEvent]], tag: str,
               redis_step: bool = False) -> float:
    """``StoryWriter.apply`` over each partition's events in batches, a batch retried
    whole on a transient store error (as the job's sink does); seconds. With
    ``redis_step``, the Redis step's own work instead: ``apply_to_redis`` and the
    durable log's records encoded (not produced)."""
    from schemas.stories import encode_story_writes
    from stores.retry import RetryPolicy
    from stores.stories import open_story_writer

    stores = _writers(ctx, tag)
    retry = RetryPolicy()

    def make():
        writer = open_story_writer(stores, ctx.policy)
        return writer, writer.close

    def apply(writer, events):
        if redis_step:
            return encode_story_writes(writer.apply_to_redis(events)[1])
        return writer.apply(events)

    return _per_partition(by_partition, make, lambda writer, events: retry.call(
        lambda: apply(writer, events), what="StoryWriter.apply"))


#: The plain loop's Redis writes: a list of commands run blind, no reads, no checks.
#: KEYS: one per command. ARGV: per command its name, #args after the key, the args.
_BULK = """
local j = 1
for i = 1, #KEYS do
  local n = tonumber(ARGV[j + 1])
  redis.call(ARGV[j], KEYS[i], unpack(ARGV, j + 2, j + 1 + n))
  j = j + 2 + n
end
return #KEYS
"""
_BULK_PER_CALL = 1000
#: The stores the plain loop writes; each alone is measured too.
HALVES = ("redis", "cassandra")


class PlainLoop:
    """The limit: the state ``StoryWriter`` leaves, written as plainly as it can be
    in batches. What was published, viewed and deleted is known from memory (one
    partition holds all of a story's events), so there are no reads and no
    checks: per batch, one Redis pipeline of bulk script calls that run the
    plain commands (HSET, ZADD, SADD, PEXPIREAT, ...; cheaper for the client
    than as many pipelined commands) and one concurrent Cassandra execution of
    the same rows in unlogged batches. ``halves`` names the stores it writes
    (both by default; one alone is the limit of a design that keeps the other
    off the drain path)."""

    def __init__(self, stores, policy: StoryPolicy, halves: tuple[str, ...] = HALVES):
        from stores.cassandra.stories import CassandraStoryStore
        from stores.redis.client import new_client
        from stores.retry import RetryPolicy

        self.redis = new_client(stores.redis_url)
        self.bulk = self.redis.register_script(_BULK)
        self.keys = KeyLayout(stores.redis_key_prefix)
        self.db = CassandraStoryStore.connect(stores.cassandra_host, stores.cassandra_port,
                                              stores.cassandra_keyspace, policy)
        self.policy = policy
        self.halves = halves
        self.retry = RetryPolicy()
        self.stories: dict[int, tuple[int, int]] = {}   # story -> (author, expires_at)
        self.viewers: dict[int, set[int]] = {}
        self.removed: set[int] = set()

    def close(self) -> None:
        self.redis.close()
        self.db.close()

    def apply(self, events: list[StoryEvent]) -> None:
        """What ``events`` change, from memory, then written (retried whole on a
        transient store error, as the job's sink does)."""
        cmds, rows = self._plan(events)
        self.retry.call(lambda: self._write(cmds, rows), what="plain loop batch")

    def _plan(self, events: list[StoryEvent]) -> tuple[list[tuple], list[tuple[str, tuple]]]:
        from domain.stories import (expiry_bucket, expiry_shard, removal_timestamp_us,
                                    story_created_at, story_expiry, ttl_seconds,
                                    write_timestamp_us)
        keys, grace, now = self.keys, self.policy.grace_ms, now_ms()
        cmds: list[tuple] = []   # (name, key, *args)
        rows: list[tuple[str, tuple]] = []
        viewed: set[int] = set()
        for e in events:
            sid = e.story_id
            if e.kind is PUBLISHED:
                if sid in self.removed:
                    continue
                exp, created = story_expiry(e), story_created_at(e)
                self.stories[sid] = (e.author_id, exp)
                hk, ak = keys.story(sid), keys.author_stories(e.author_id)
                cmds += [("HSET", hk, "author_id", e.author_id, "created_at", created,
                          "expires_at", exp, "media_type", e.media_type.value),
                         ("PEXPIREAT", hk, exp + grace), ("ZADD", ak, exp, sid),
                         ("PEXPIREAT", ak, exp + grace)]
                ts, ttl = write_timestamp_us(e.event_time, exp), ttl_seconds(exp, now, self.policy)
                row = (sid, e.author_id, created, exp, e.media_type.value, ts, ttl)
                rows += [("put_by_author", row), ("put_by_id", row),
                         ("put_index", (expiry_bucket(exp), expiry_shard(sid), exp, sid,
                                        e.author_id, ts, ttl))]
            elif e.kind is VIEWED:
                if sid not in self.stories or sid in self.removed:
                    continue
                author, exp = self.stories[sid]
                self.viewers.setdefault(sid, set()).add(e.viewer_id)
                viewed.add(sid)
                vk, sk = keys.story_viewers(sid), keys.seen_stories(e.viewer_id)
                cmds += [("SADD", vk, e.viewer_id), ("PEXPIREAT", vk, exp + grace),
                         ("ZADD", sk, exp, sid), ("PEXPIREAT", sk, exp + grace)]
                ts, ttl = write_timestamp_us(e.event_time, exp), ttl_seconds(exp, now, self.policy)
                rows += [("put_view", (sid, e.viewer_id, e.event_time, ts, ttl)),
                         ("put_seen", (e.viewer_id, sid, author, exp, ts, ttl))]
            elif sid in self.stories and sid not in self.removed:
                author, exp = self.stories[sid]
                self.removed.add(sid)
                viewed.discard(sid)
                who = self.viewers.pop(sid, set())
                hk = keys.story(sid)
                cmds += [("ZREM", keys.seen_stories(v), sid) for v in who]
                cmds += [("ZREM", keys.author_stories(author), sid),
                         ("DEL", keys.story_viewers(sid)), ("DEL", hk),
                         ("HSET", hk, "author_id", author, "expires_at", exp, "removed", "deleted"),
                         ("PEXPIREAT", hk, exp + grace)]
                ts, ttl = removal_timestamp_us(exp), ttl_seconds(exp, now, self.policy)
                rows += [("del_seen", (ts, v, sid)) for v in who]
                rows += [("put_deletion", (sid, author, exp, ts, ttl)),
                         ("del_by_author", (ts, author, sid)), ("del_by_id", (ts, sid)),
                         ("del_index", (ts, expiry_bucket(exp), expiry_shard(sid), exp, sid)),
                         ("del_views", (ts, sid))]
        cmds += [("HSET", keys.story(sid), "views", len(self.viewers[sid])) for sid in viewed]
        return cmds, rows

    def _write(self, cmds: list[tuple], rows: list[tuple[str, tuple]]) -> None:
        from stores.cassandra.feeds import pack_batches
        from stores.redis.client import chunks

        if "redis" in self.halves:
            pipe = self.redis.pipeline(transaction=False)
            for chunk in chunks(cmds, _BULK_PER_CALL):
                args: list = []
                for name, _, *rest in chunk:
                    args += [name, len(rest), *rest]
                self.bulk(keys=[c[1] for c in chunk], args=args, client=pipe)
            pipe.execute()
        if "cassandra" in self.halves:
            db = self.db._db
            db._execute(pack_batches([(db.prepare(self.db._cql[name]), params)
                                      for name, params in rows], db.batch_rows))


def plain_loop(ctx, by_partition: dict[int, list[StoryEvent]], tag: str,
               halves: tuple[str, ...] = HALVES) -> float:
    """``PlainLoop`` (writing ``halves``) over each partition's events in batches; seconds."""
    stores = _writers(ctx, tag)

    def make():
        loop = PlainLoop(stores, ctx.policy, halves)
        return loop, loop.close

    return _per_partition(by_partition, make, lambda loop, events: loop.apply(events))


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


def new_group(ctx) -> str:
    """A fresh consumer group for a job, its durable step's group set to the durable
    log's end: each run's durable step applies only what its own Redis step logs."""
    group = f"bench-stories-{uuid.uuid4().hex[:8]}"
    log = ctx.topic_prefix + STORIES_DURABLE_LOG_TOPIC
    commit_offsets(ctx.settings.kafka_bootstrap, group + DURABLE_GROUP_SUFFIX,
                   end_offsets(ctx.settings.kafka_bootstrap, [log]))
    return group


def wait_committed(ctx, job: FanoutJob, group: str, topic: str, ends: dict, deadline: float,
                   until=lambda: True) -> float:
    """When ``group`` has committed ``ends`` of ``topic`` (and ``until()`` holds), polling."""
    while True:
        if job.poll() is not None:
            raise RuntimeError(f"the stories job exited ({job.returncode}); see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{group} did not reach the end of {topic} in time")
        if until():
            done = committed_offsets(ctx.settings.kafka_bootstrap, group, [topic])
            if caught_up(done, ends):
                return time.time()
        time.sleep(0.2)


def drain_once(ctx, run: int, backlog: Backlog,
               ends: dict[int, int]) -> tuple[dict, FanoutJob, KeyLayout]:
    """Start a job over the queued topic; returns its measures, the running job and its keys.
    The drain ends when the job's group has committed the topic's end (its Redis
    writes done, its durable log delivered); the durable copy when its durable
    step's group has committed that log's end, which cannot move after."""
    key_prefix, keyspace = f"{ctx.key_prefix}r{run}", f"{ctx.keyspace}r{run}"
    ctx.migrate(keyspace)
    keys = KeyLayout(key_prefix)
    t_submit = time.time()
    group = new_group(ctx)
    log = ctx.topic_prefix + STORIES_DURABLE_LOG_TOPIC
    log_before = sum(end_offsets(ctx.settings.kafka_bootstrap, [log]).values())
    job = FanoutJob(ctx, ctx.topic_prefix, key_prefix, f"stories-run{run}", keyspace=keyspace,
                    module="pipelines.stories", group=group, durable_nice=ctx.args.durable_nice)
    ctx.jobs.append(job)
    topic = ctx.topic_prefix + StoryEvent.TOPIC
    first = []
    deadline = time.monotonic() + ctx.args.timeout_s

    def started() -> bool:
        if not first and any(ctx.client.exists(keys.story(s)) for s in backlog.first_ids):
            first.append(time.time())
        return bool(first)

    last = wait_committed(ctx, job, group, topic, {(topic, p): e for p, e in ends.items()},
                          deadline, started)
    log_ends = end_offsets(ctx.settings.kafka_bootstrap, [log])
    durable_last = wait_committed(ctx, job, group + DURABLE_GROUP_SUFFIX, log, log_ends,
                                  deadline)
    seconds, durable_s = last - first[0], durable_last - first[0]
    checked = check_sample(ctx.client, keys, backlog, random.Random(run))
    catch_up = timers_caught_up(ctx, keys, backlog.ids[-1] + 1 + run, deadline)
    n = len(backlog.ids)
    return ({"stories": n, "events": len(backlog.events), "seconds": seconds,
             "stories_per_s": n / seconds, "events_per_s": len(backlog.events) / seconds,
             "durable_seconds": durable_s, "durable_events_per_s": len(backlog.events) / durable_s,
             "log_records": sum(log_ends.values()) - log_before,
             "startup_s": first[0] - t_submit, "sample_checked": checked,
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


def fresh_job(ctx, base_id: int) -> tuple[FanoutJob, KeyLayout, str]:
    """A job on the topic from its end (``--start_from=latest``), with its own Redis
    prefix and keyspace, answering once a probe publish is applied."""
    key_prefix, keyspace = f"{ctx.key_prefix}s", f"{ctx.keyspace}s"
    ctx.migrate(keyspace)
    keys = KeyLayout(key_prefix)
    job = FanoutJob(ctx, ctx.topic_prefix, key_prefix, "stories-steady",
                    extra=["--start_from=latest"], keyspace=keyspace, module="pipelines.stories",
                    group=new_group(ctx), durable_nice=ctx.args.durable_nice)
    ctx.jobs.append(job)
    deadline = time.monotonic() + 300
    while not ctx.client.exists(keys.story(base_id)):
        if job.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the steady-traffic job did not start; see its log")
        t = now_ms()   # until the job has its partitions, a probe may land before them
        produce(ctx.settings.kafka_bootstrap, ctx.topic_prefix + StoryEvent.TOPIC, [StoryEvent(
            f"probe{t}", t, PUBLISHED, base_id, 1, created_at=t, expires_at=t + 600_000)])
        time.sleep(2)
    return job, keys, keyspace


def steady_expiry(ctx, keys: KeyLayout, keyspace: str, rate: float, duration_s: float,
                  base_id: int) -> dict:
    """Produce steady traffic into a running job; delay from expires_at to gone from
    both stores."""
    from confluent_kafka import Producer

    from cassandra import OperationTimedOut, RequestExecutionException

    from schemas.cassandra import STORIES_BY_ID

    topic = ctx.topic_prefix + StoryEvent.TOPIC
    codec = WireCodec()
    producer = Producer({"bootstrap.servers": ctx.settings.kafka_bootstrap, "linger.ms": 5})
    by_id = ctx.session.prepare(f"SELECT story_id FROM {keyspace}.{STORIES_BY_ID} "
                                "WHERE story_id IN ?")
    rng = random.Random(99)
    stories: dict[int, int] = {}       # story -> expires_at
    authors: dict[int, int] = {}
    gone_redis: dict[int, int] = {}
    removed_at: dict[int, int] = {}    # gone from both
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
        try:
            still = {r.story_id for part in range(0, len(due), 100)
                     for r in ctx.session.execute(by_id, (due[part:part + 100],))}
        except (RequestExecutionException, OperationTimedOut) as exc:
            print(f"  (poll skipped: {type(exc).__name__})")
            return   # a busy Cassandra: poll again next time
        stamp = now_ms()
        for s, gone in zip(due, pipe.execute()):
            if gone:
                gone_redis.setdefault(s, stamp)
            if s in gone_redis and s not in still:
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
        time.sleep(0.002)
    producer.flush(30)
    t_traffic_end = now_ms()
    deadline = time.monotonic() + 60
    measured = [s for s, exp in stories.items() if exp <= t_traffic_end]
    while any(s not in removed_at for s in measured) and time.monotonic() < deadline:
        poll_removed()
        time.sleep(POLL_S)
    missing = [s for s in measured if s not in removed_at]
    delays = sorted(removed_at[s] - stories[s] for s in measured if s in removed_at)
    redis_delays = sorted(gone_redis[s] - stories[s] for s in measured if s in gone_redis)
    achieved = sent / (time.time() - t_start)
    return {"rate": rate, "achieved_rate": achieved, "seconds": duration_s, "events": sent,
            "stories": len(stories), "measured": len(measured),
            "not_removed_within_60s": len(missing), "poll_s": POLL_S,
            "p50_ms": percentile_of(delays, 0.50) if delays else None,
            "p99_ms": percentile_of(delays, 0.99) if delays else None,
            "max_ms": delays[-1] if delays else None,
            "redis_p99_ms": percentile_of(redis_delays, 0.99) if redis_delays else None}


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
        self.jobs: list[FanoutJob] = []
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
    parser.add_argument("--split-steps", action="store_true",
                        help="run the job's Redis step and its durable step (with the expiry "
                             "timers) as two jobs (--parts)")
    parser.add_argument("--durable-nice", type=int, default=0,
                        help="with --split-steps: OS niceness of the durable step's job")
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
                                 "steady_rate", "partitions", "split_steps", "durable_nice")}}
    try:
        log = ctx.topic_prefix + STORIES_DURABLE_LOG_TOPIC
        create_topics(settings.kafka_bootstrap, [topic, dlq_topic(topic), log, dlq_topic(log)],
                      partitions=args.partitions)
        backlog = Backlog(args.stories, args.views_per_story, ctx.base_id, random.Random(5))
        t = time.perf_counter()
        produce(settings.kafka_bootstrap, topic, backlog.events)
        ends = {p: end for (_, p), end in end_offsets(settings.kafka_bootstrap, [topic]).items()}
        print(f"queued {len(backlog.ids):,} stories, {len(backlog.events):,} events in "
              f"{time.perf_counter() - t:.1f}s", flush=True)

        raw, drains, stores, plain, redis_steps = [], [], [], [], []
        alone: dict[str, list[float]] = {half: [] for half in HALVES}
        job, keys = None, None
        n_events = len(backlog.events)
        for run in range(args.runs):
            if job is not None:
                job.stop()   # nothing of ours runs while the limits are measured
            by_partition, raw_s = raw_loop(settings.kafka_bootstrap, topic, ends)
            assert sum(len(es) for es in by_partition.values()) == n_events
            raw.append(n_events / raw_s)
            plain.append(n_events / plain_loop(ctx, by_partition, f"p{run}"))
            for half in HALVES:
                alone[half].append(n_events / plain_loop(ctx, by_partition,
                                                         f"p{half[0]}{run}", (half,)))
            stores.append(n_events / in_process(ctx, by_partition, f"w{run}"))
            redis_steps.append(n_events / in_process(ctx, by_partition, f"x{run}",
                                                     redis_step=True))
            res, job, keys = drain_once(ctx, run, backlog, ends)
            drains.append(res)
            print(f"run {run + 1}: pipeline drain {res['events_per_s']:,.0f} events/s "
                  f"({res['stories_per_s']:,.0f} stories/s, {res['seconds']:.1f}s; durable copy "
                  f"{res['durable_events_per_s']:,.0f} events/s, {res['durable_seconds']:.1f}s, "
                  f"{res['log_records']:,} log records; start-up "
                  f"{res['startup_s']:.1f}s, {res['sample_checked']} sampled stories checked; "
                  f"timers caught up {res['timers_caught_up_s']:.1f}s later)  plain loop "
                  f"{plain[-1]:,.0f} (Redis alone {alone['redis'][-1]:,.0f}, Cassandra alone "
                  f"{alone['cassandra'][-1]:,.0f})  StoryWriter {stores[-1]:,.0f} (Redis step "
                  f"{redis_steps[-1]:,.0f})  consume+decode "
                  f"{raw[-1]:,.0f} events/s", flush=True)
        results["raw_events_per_s"] = raw
        results["plain_loop_events_per_s"] = plain
        results["plain_loop_alone_events_per_s"] = alone
        results["in_process_events_per_s"] = stores
        results["in_process_redis_step_events_per_s"] = redis_steps
        results["drain"] = drains
        job.stop()
        base = ctx.base_id + args.stories + 1000
        job, keys, keyspace = fresh_job(ctx, base)
        results["expiry"] = steady_expiry(ctx, keys, keyspace, args.steady_rate, args.steady_s,
                                          base + 1)
        job.stop()
        med = {
            "raw_events_per_s": statistics.median(raw),
            "plain_events_per_s": statistics.median(plain),
            **{f"plain_{half}_events_per_s": statistics.median(alone[half]) for half in HALVES},
            "store_events_per_s": statistics.median(stores),
            "redis_step_events_per_s": statistics.median(redis_steps),
            "drain_stories_per_s": statistics.median(d["stories_per_s"] for d in drains),
            "drain_events_per_s": statistics.median(d["events_per_s"] for d in drains),
            "drain_s": statistics.median(d["seconds"] for d in drains),
            "durable_events_per_s": statistics.median(d["durable_events_per_s"] for d in drains),
            "durable_s": statistics.median(d["durable_seconds"] for d in drains),
            "timers_caught_up_s": statistics.median(d["timers_caught_up_s"] for d in drains),
        }
        # Ratios per run (limit and drain measured in the same run), then their median.
        med["ratio_to_plain"] = statistics.median(
            d["events_per_s"] / p for d, p in zip(drains, plain))
        med["durable_ratio_to_plain"] = statistics.median(
            d["durable_events_per_s"] / p for d, p in zip(drains, plain))
        med["ratio_to_redis_half"] = statistics.median(
            d["events_per_s"] / p for d, p in zip(drains, alone["redis"]))
        med["ratio_to_store"] = statistics.median(
            d["events_per_s"] / w for d, w in zip(drains, stores))
        med["ratio_to_raw"] = statistics.median(d["events_per_s"] / r for d, r in zip(drains, raw))
        med["ratio_to_target"] = med["drain_events_per_s"] / DRAIN_TARGET
        results["summary"] = med
    finally:
        for job in ctx.jobs:
            job.stop()
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        log = ctx.topic_prefix + STORIES_DURABLE_LOG_TOPIC
        for f in admin.delete_topics([topic, dlq_topic(topic), log, dlq_topic(log)],
                                     operation_timeout=30).values():
            try:
                f.result(timeout=60)
            except Exception as exc:  # keep cleaning the rest
                print(f"topic cleanup: {exc}")
        for ks in ctx.keyspaces:
            ctx.session.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)
        cluster.shutdown()
        for p in [f"{ctx.key_prefix}{x}{run}" for run in range(args.runs)
                  for x in ("r", "w", "x", "p", "pr", "pc")] + [
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
    steps = (f"steps as two jobs, the durable one at nice {c['durable_nice']}"
             if c["split_steps"] else "one job")
    print(f"\n==== stories benchmark ({r['preset']} preset; median of {c['runs']} runs; "
          f"{steps}) ====")
    print(f"backlog: {c['stories']:,} stories, {c['views_per_story']} views/story, 1% deleted, "
          f"{c['partitions']} partitions")
    print(f"drain (pipeline, trays right): {s['drain_events_per_s']:>9,.0f} events/s "
          f"({s['drain_stories_per_s']:,.0f} stories/s, {s['drain_s']:.1f}s)  "
          f"target {DRAIN_TARGET:,}: ratio {s['ratio_to_target']:.2f}")
    print(f"durable copy (pipeline):       {s['durable_events_per_s']:>9,.0f} events/s "
          f"({s['durable_s']:.1f}s from the first story written to the durable log applied)")
    print(f"limit: plain batched loop:     {s['plain_events_per_s']:>9,.0f} events/s  "
          f"drain/plain {s['ratio_to_plain']:.2f}, durable copy/plain "
          f"{s['durable_ratio_to_plain']:.2f} (target >= {PLAIN_TARGET_RATIO:.2f})")
    print(f"limits of each half: the plain loop's Redis half alone "
          f"{s['plain_redis_events_per_s']:,.0f} events/s (drain/Redis half "
          f"{s['ratio_to_redis_half']:.2f}), its Cassandra half alone "
          f"{s['plain_cassandra_events_per_s']:,.0f}")
    print(f"floor: StoryWriter only:   {s['store_events_per_s']:>9,.0f} events/s  "
          f"drain/StoryWriter {s['ratio_to_store']:.2f}; its Redis step alone (apply_to_redis "
          f"and the log records encoded) {s['redis_step_events_per_s']:,.0f} events/s")
    print(f"floor: consume+decode:     {s['raw_events_per_s']:>9,.0f} events/s  "
          f"drain/consume {s['ratio_to_raw']:.2f}")
    print(f"expiry step caught up with the backlog's timers {s['timers_caught_up_s']:.1f}s "
          f"after the drain")
    if e["p99_ms"] is not None:
        print(f"expiry delay (expires_at -> gone from Redis and Cassandra) at "
              f"{e['achieved_rate']:,.0f} events/s for {e['seconds']:.0f}s: p50 "
              f"{e['p50_ms']:.0f} ms, p99 {e['p99_ms']:.0f} ms (target <= "
              f"{EXPIRY_P99_TARGET_MS} ms: ratio {e['p99_ms'] / EXPIRY_P99_TARGET_MS:.2f}), "
              f"max {e['max_ms']:.0f} ms over {e['measured']} stories "
              f"({e['not_removed_within_60s']} not removed within 60 s; Redis alone p99 "
              f"{e['redis_p99_ms']:.0f} ms; poll every {e['poll_s'] * 1000:.0f} ms)")


if __name__ == "__main__":
    sys.exit(main())
