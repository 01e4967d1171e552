"""``feedbeam generate``: produce a synthetic workload to Kafka and/or a file.

    feedbeam generate --seed 42 --users 20000 --duration 2h          # to Kafka
    feedbeam generate --users 2000 --no-kafka --out /tmp/w.jsonl     # to a file
    feedbeam generate --rate 5000 --topic-prefix demo.               # paced

The workload is the pure model in ``jobs/workload.py``; this module adds the
sinks, pacing and the CLI. The topics must exist; delivery failures end the run
with exit code 2. Files are JSON lines ``{"topic", "key", "event"}``, read back
by ``read_workload_file``. Details: docs/workload.md.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from infra.settings import StackSettings
from infra.errors import UserFacingError
from jobs.workload import Workload, WorkloadConfig
from schemas.events import TOPIC_TYPES, TOPICS, Event

_PROGRESS_EVERY = 1024
_POLL_EVERY = 4096

#: Producer settings tuned for throughput: large lz4 batches, delivery reports
#: for failures only (the count of successes is produced minus failed).
PRODUCER_CONFIG: dict[str, object] = {
    "acks": "all",
    "enable.idempotence": True,
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    "message.timeout.ms": 120_000,
    "delivery.report.only.error": True,
}


# ---------------------------------------------------------------- parsing

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """``"2h"``, ``"90m"``, ``"1h30m"``, ``"45s"``, ``"1500ms"``, ``"2d"`` -> milliseconds."""
    s = text.strip().lower()
    if not s or _DURATION_PART.sub("", s):
        raise UserFacingError(
            f"bad duration {text!r}: use a number with a unit, such as 2h, 90m, 1h30m, 45s")
    return int(round(sum(float(n) * _UNIT_MS[u] for n, u in _DURATION_PART.findall(s))))


def parse_start(text: str) -> int:
    """An ISO 8601 time (naive means UTC) or milliseconds since the epoch -> ms."""
    s = text.strip()
    if re.fullmatch(r"\d+", s):
        return int(s)
    try:
        when = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise UserFacingError(
            f"bad --start {text!r}: use ISO 8601 (2024-05-01T12:00:00Z) or epoch ms") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- pacing


class TokenBucket:
    """Blocks so that events leave at ``rate`` per second, with a small burst.

    Generic cell rate algorithm: a theoretical arrival time advances by
    exactly ``1 / rate`` per event, so the long-run rate does not drift with
    sleep overshoot or loop overhead; up to ``burst`` events (default: 50 ms
    worth) may go back to back, which keeps sleeps few and long enough to be
    accurate.
    """

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._tolerance = (max(1.0, burst if burst is not None else rate * 0.05) - 1) \
            * self._interval
        self._clock, self._sleep = clock, sleep
        self._tat = clock()

    def acquire(self) -> None:
        now = self._clock()
        tat = max(self._tat, now)
        wait = tat - self._tolerance - now
        if wait > 0:
            # Sleep until half the burst is available again, not just one
            # event: fewer, longer sleeps; the rate is set by _tat alone.
            self._sleep(wait + self._tolerance / 2)
        self._tat = tat + self._interval


# ---------------------------------------------------------------- sinks


class EventSink(Protocol):
    def send(self, topic: str, key: bytes, event: Event) -> None: ...

    def close(self) -> None:
        """Flush; raise ``UserFacingError`` if anything was not written."""


class KafkaEventSink:
    """Produces events in wire format to ``<topic_prefix><topic>``."""

    def __init__(self, bootstrap: str, topic_prefix: str = "", codec=None,
                 config: dict | None = None, check_topics_timeout_s: float = 10.0):
        from confluent_kafka import Producer

        from schemas.codec import WireCodec

        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self.codec = codec if codec is not None else WireCodec()
        self.produced: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.first_errors: list[str] = []
        self._topic = {t: topic_prefix + t for t in TOPICS}
        self._producer = Producer({
            "bootstrap.servers": bootstrap, **PRODUCER_CONFIG, **(config or {}),
            "on_delivery": self._on_delivery, "error_cb": self._on_error})
        self._unsent = 0
        self._check_topics(check_topics_timeout_s)

    def _check_topics(self, timeout_s: float) -> None:
        from confluent_kafka import KafkaException

        try:
            existing = self._producer.list_topics(timeout=timeout_s).topics
        except KafkaException as exc:
            raise UserFacingError(
                f"Kafka at {self.bootstrap} does not answer ({exc}); start it with "
                f"`feedbeam infra up` or pass --kafka-bootstrap (or --no-kafka)") from None
        missing = sorted(t for t in self._topic.values() if t not in existing)
        if missing:
            raise UserFacingError(
                f"topics missing on {self.bootstrap}: {', '.join(missing)}; create them "
                f"with `feedbeam topics create --topic-prefix '{self.prefix}'` or fix --topic-prefix")

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self.failed[msg.topic()] += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(f"{msg.topic()}: {err}")

    def _on_error(self, err) -> None:
        # Client-level errors (broker down ...) are retried by librdkafka;
        # messages that finally fail arrive in _on_delivery.
        if len(self.first_errors) < 5 and err.fatal():
            self.first_errors.append(f"fatal: {err}")

    def send(self, topic: str, key: bytes, event: Event) -> None:
        target = self._topic[topic]
        value = self.codec.encode(event, target)
        while True:
            try:
                # The record timestamp is the event time, so replays by time
                # range (offsets_for_times) select simulated time, not wall time.
                self._producer.produce(target, value, key, timestamp=event.event_time)
                break
            except BufferError:  # local queue full: let deliveries drain
                self._producer.poll(0.05)
        self.produced[target] += 1
        self._unsent += 1
        if self._unsent >= _POLL_EVERY:
            self._producer.poll(0)
            self._unsent = 0

    def close(self, timeout_s: float = 120.0) -> None:
        left = self._producer.flush(timeout_s)
        total = sum(self.produced.values())
        failed = sum(self.failed.values())
        if left or failed:
            detail = "; ".join(self.first_errors) or "no error reported"
            per_topic = ", ".join(f"{t}: {c}" for t, c in sorted(self.failed.items()))
            raise UserFacingError(
                f"{failed + left} of {total} events were not delivered to Kafka at "
                f"{self.bootstrap} ({failed} failed{f' [{per_topic}]' if per_topic else ''}, "
                f"{left} still queued after {timeout_s:g}s): {detail}")

    @property
    def delivered(self) -> int:
        return sum(self.produced.values()) - sum(self.failed.values())


class JsonLinesSink:
    """Writes ``{"topic", "key", "event"}`` lines (canonical topic names)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._file = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise UserFacingError(f"cannot write --out {path}: {exc.strerror}") from None

    def send(self, topic: str, key: bytes, event: Event) -> None:
        self._file.write(json.dumps(
            {"topic": topic, "key": key.decode(), "event": event.to_avro()},
            separators=(",", ":")))
        self._file.write("\n")

    def close(self) -> None:
        self._file.close()


def read_workload_file(path: str | Path) -> Iterator[tuple[str, bytes, Event]]:
    """Yield ``(topic, key, event)`` from a file written by ``--out``."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                record_type = TOPIC_TYPES[row["topic"]]
                yield row["topic"], row["key"].encode(), record_type.from_avro(row["event"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a workload line: {exc!r}") from None


# ---------------------------------------------------------------- the loop


def pump(events: Iterable[tuple[str, bytes, Event]], sinks: list[EventSink],
         limit: int | None = None, bucket: TokenBucket | None = None,
         progress=None) -> collections.Counter[str]:
    """Send events to every sink (at most ``limit``, paced by ``bucket``).

    Returns events per canonical topic. ``progress`` is a tqdm-like object.
    """
    counts: collections.Counter[str] = collections.Counter()
    stream = islice(events, limit) if limit is not None else events
    pending = 0
    for topic, key, event in stream:
        if bucket is not None:
            bucket.acquire()
        for sink in sinks:
            sink.send(topic, key, event)
        counts[topic] += 1
        pending += 1
        if progress is not None and pending >= _PROGRESS_EVERY:
            progress.update(pending)
            pending = 0
    if progress is not None and pending:
        progress.update(pending)
    return counts


def config_from_args(args: argparse.Namespace, now_ms: int | None = None) -> WorkloadConfig:
    duration_ms = parse_duration(args.duration)
    if args.start is not None:
        start_ms = parse_start(args.start)
    else:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        start_ms = now - duration_ms
    config = WorkloadConfig(
        start_ms=start_ms, seed=args.seed, users=args.users, avg_following=args.avg_following,
        celebrities=args.celebrities, push_threshold=args.push_threshold,
        duration_ms=duration_ms, posts_per_user_day=args.posts_per_day,
        stories_per_user_day=args.stories_per_day, churn_per_user_day=args.churn_per_day,
        late_fraction=args.late_fraction, max_lateness_ms=parse_duration(args.max_lateness),
        graph_lead_ms=parse_duration(args.graph_lead))
    try:
        config.validate()
    except ValueError as exc:
        raise UserFacingError(str(exc)) from None
    return config


def run_generate(args: argparse.Namespace, settings: StackSettings) -> int:
    if args.count is not None and args.count < 0:
        raise UserFacingError("--count must be >= 0")
    if args.rate < 0:
        raise UserFacingError("--rate must be >= 0 (0 means as fast as possible)")
    config = config_from_args(args)
    from tqdm import tqdm

    print(f"feedbeam generate: seed {config.seed}, {config.users} users, span "
          f"{_iso(config.start_ms)} .. {_iso(config.end_ms)} (--start {config.start_ms})",
          file=sys.stderr)
    built = time.perf_counter()
    workload = Workload(config)
    print(f"graph: {workload.edge_count} follow edges, celebrities "
          f"{list(workload.celebrities)} with "
          f"{[int(workload.follower_counts()[c - 1]) for c in workload.celebrities]} followers "
          f"({time.perf_counter() - built:.1f}s)", file=sys.stderr)

    sinks: list = []
    kafka = None
    try:
        if not args.no_kafka:
            kafka = KafkaEventSink(args.bootstrap or settings.kafka_bootstrap, args.topic_prefix)
            sinks.append(kafka)
        if args.out:
            sinks.append(JsonLinesSink(args.out))
        bucket = TokenBucket(args.rate) if args.rate > 0 else None
        started = time.perf_counter()
        # disable=None: a bar on a terminal, no log spam when piped.
        with tqdm(total=args.count, unit="ev", unit_scale=True, dynamic_ncols=True,
                  mininterval=0.5, desc="generate", disable=None, leave=False) as bar:
            counts = pump(workload.events(), sinks, args.count, bucket, bar)
            # Closing flushes Kafka: part of the time the events took.
            for sink in sinks:
                sink.close()
            sinks = []
        elapsed = time.perf_counter() - started
    finally:
        for sink in sinks:  # on error: release files and connections, keep the error
            try:
                sink.close()
            except UserFacingError:
                pass
    total = sum(counts.values())
    where = []
    if kafka is not None:
        where.append(f"{kafka.delivered} delivered to {kafka.bootstrap}"
                     + (f" (prefix {args.topic_prefix!r})" if args.topic_prefix else ""))
    if args.out:
        where.append(f"written to {args.out}")
    print(f"{total:,} events in {elapsed:.1f}s ({total / max(elapsed, 1e-9):,.0f} ev/s)"
          + (": " + ", ".join(where) if where else " (dry run)"))
    print("  " + ", ".join(f"{topic} {counts.get(topic, 0):,}" for topic in TOPICS))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="produce a synthetic social workload to Kafka",
        description="Produce a synthetic workload (power-law follower graph with "
        "celebrities, posts, stories, engagement with planted preferences) to Kafka "
        "and/or a JSON lines file. The same --seed, options and --start give the same "
        "events. The model is described in jobs/workload.py.")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    p.add_argument("--users", type=int, default=20_000,
                   help="number of users (default: %(default)s)")
    p.add_argument("--avg-following", type=float, default=150.0,
                   help="mean number of accounts a user follows (default: %(default)g)")
    p.add_argument("--celebrities", type=int, default=3,
                   help="users given more followers than --push-threshold (default: %(default)s)")
    p.add_argument("--push-threshold", type=int, default=10_000,
                   help="fan-out push threshold in followers (default: %(default)s)")
    p.add_argument("--duration", default="2h",
                   help="simulated span: 2h, 90m, 1h30m, 1d ... (default: %(default)s)")
    p.add_argument("--start", default=None,
                   help="start of the span: ISO 8601 or epoch ms (default: now - duration)")
    p.add_argument("--graph-lead", default="1h",
                   help="the initial follow graph is spread over this span before --start "
                   "(default: %(default)s)")
    p.add_argument("--posts-per-day", type=float, default=1 / 7,
                   help="mean posts per user per day (default: 1/7)")
    p.add_argument("--stories-per-day", type=float, default=0.5,
                   help="mean stories per user per day (default: %(default)g)")
    p.add_argument("--churn-per-day", type=float, default=0.05,
                   help="mean follow/unfollow changes per user per day during the span "
                   "(default: %(default)g)")
    p.add_argument("--late-fraction", type=float, default=0.0,
                   help="fraction of events emitted after their event time, out of order "
                   "(default: %(default)g)")
    p.add_argument("--max-lateness", default="5m",
                   help="upper bound of that delay (default: %(default)s)")
    p.add_argument("--count", type=int, default=None,
                   help="stop after this many events (default: the whole span)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="events per second, 0 = as fast as possible (default: %(default)g)")
    p.add_argument("--kafka-bootstrap", "--bootstrap", dest="bootstrap", default=None,
                   help="Kafka bootstrap servers (default: the local stack's)")
    p.add_argument("--topic-prefix", default="",
                   help="prepended to every topic name: test1. -> test1.post-events")
    p.add_argument("--out", type=Path, default=None,
                   help="also write JSON lines {topic, key, event} to this file")
    p.add_argument("--no-kafka", action="store_true",
                   help="do not produce to Kafka (with --out: file only; alone: a dry run)")
    p.set_defaults(handler=run_generate)


__all__ = ["register", "run_generate", "read_workload_file", "pump", "TokenBucket",
           "KafkaEventSink", "JsonLinesSink", "parse_duration", "parse_start",
           "config_from_args"]
