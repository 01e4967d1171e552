"""The Kafka source on a real broker and a real runner (Prism).

Streaming jobs never finish by themselves: each test runs one, waits until the
expected records are visible in Redis (bounded by a deadline), then cancels
it. The kill test runs the job in its own process group and SIGKILLs it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms import userstate
from apache_beam.transforms.timeutil import TimeDomain
from confluent_kafka import Producer

from infra.install import prism_binary
from infra.services import flink_job_endpoint, flink_ready
from pipelines.io.kafka import KafkaReadOptions, ReadFromKafka
from tests.integration import kafka_to_redis

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _produce(bootstrap: str, topic: str, count: int, partitions: list[int],
             timestamp_ms: int | None = None) -> dict[int, list[int]]:
    """Produce ``count`` records round-robin over ``partitions``; returns offsets per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    offsets: dict[int, list[int]] = {p: [] for p in partitions}

    def delivered(err, msg):
        assert err is None, err
        offsets[msg.partition()].append(msg.offset())

    for i in range(count):
        producer.produce(topic, value=f"v{i}".encode(), partition=partitions[i % len(partitions)],
                         timestamp=timestamp_ms or 0, on_delivery=delivered)
        if i % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return offsets


def _runner_args(stack, runner: str) -> list[str]:
    if runner == "flink":
        return ["--runner=FlinkRunner", f"--job_endpoint={flink_job_endpoint(stack)}",
                "--environment_type=LOOPBACK"]
    return ["--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
            "--environment_type=LOOPBACK"]


def _options(stack, group: str, *extra: str, runner: str = "prism") -> PipelineOptions:
    return PipelineOptions([
        *_runner_args(stack, runner), "--streaming",
        f"--kafka_bootstrap={stack.kafka_bootstrap}", f"--consumer_group={group}", *extra])


def _cancel(result, timeout_s: float = 60.0) -> None:
    """Cancel a streaming job and wait until the runner says it ended.

    A job left running on the shared Flink job server would keep its task
    slots and starve the next test's job.
    """
    from apache_beam.runners.runner import PipelineState

    result.cancel()
    deadline = time.monotonic() + timeout_s
    while not PipelineState.is_terminal(result.state):
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {result.state} {timeout_s:.0f}s after cancel")
        time.sleep(0.5)


def flink_ready_or_fail(stack) -> None:
    if not flink_ready(stack):
        pytest.fail("the Flink job server is not running; start it with "
                    "`feedbeam infra up flink` (the test command does)", pytrace=False)


def _wait_for(predicate, timeout_s: float, what: str, result=None, state=None):
    """Poll ``predicate`` until truthy; fail early if the job ``result`` ended.

    ``state``: a callable whose value is put in the failure message (what the
    test saw when it gave up), so a CI failure says where the data stopped.
    """
    from apache_beam.runners.runner import PipelineState

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if result is not None and PipelineState.is_terminal(result.state):
            raise AssertionError(f"the job ended ({result.state}) before {what}")
        time.sleep(0.25)
    seen = "" if state is None else f"; last seen: {state()!r}"
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{seen}")


def _seen(redis_client, prefix: str, partition: int) -> list[str]:
    return [v.decode() for v in redis_client.lrange(f"{prefix}:seen:{partition}", 0, -1)]


def _count(redis_client, prefix: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis_client.hgetall(f"{prefix}:count").items()}


def _run_to_redis(stack, topic: str, key_prefix: str, *extra: str, runner: str = "prism"):
    """Start ``kafka_to_redis`` on ``topic`` from the earliest offsets: the job's result."""
    options = _options(stack, f"g-{uuid.uuid4().hex[:8]}", "--start_from=earliest", *extra,
                       runner=runner)
    pipeline = beam.Pipeline(options=options)
    kafka_to_redis.build(pipeline, topic, options, stack.redis_url, key_prefix)
    return pipeline.run()


@pytest.mark.parametrize("runner", ["prism", "flink"])
def test_reads_every_partition_completely_and_in_order(stack, kafka_topic, redis_client,
                                                       key_prefix, runner):
    if runner == "flink":
        flink_ready_or_fail(stack)
    topic = kafka_topic(partitions=3)
    produced = _produce(stack.kafka_bootstrap, topic, 3000, [0, 1, 2])
    result = _run_to_redis(stack, topic, key_prefix, runner=runner)
    try:
        _wait_for(lambda: len(_count(redis_client, key_prefix)) >= 3000, 180, "3000 records",
                  result)
    finally:
        _cancel(result)
    for partition, offsets in produced.items():
        seen = _seen(redis_client, key_prefix, partition)
        # Every record once, in partition order (no restart here, so no repeats).
        assert seen == [f"{partition}:{o}" for o in sorted(offsets)]
    assert set(_count(redis_client, key_prefix).values()) == {1}


class _FireAfter(beam.DoFn):
    """Sets an event-time timer 10 s after the first record's timestamp; marks Redis when it fires."""

    FIRST = userstate.ReadModifyWriteStateSpec("first", beam.coders.VarIntCoder())
    TIMER = userstate.TimerSpec("timer", TimeDomain.WATERMARK)

    def __init__(self, redis_url: str, key: str):
        self._url = redis_url
        self._key = key

    def process(self, element, ts=beam.DoFn.TimestampParam,
                first=beam.DoFn.StateParam(FIRST), timer=beam.DoFn.TimerParam(TIMER)):
        if first.read() is None:
            first.write(1)
            timer.set(ts + 10)

    @userstate.on_timer(TIMER)
    def fired(self, ts=beam.DoFn.TimestampParam):
        import redis

        client = redis.Redis.from_url(self._url)
        client.set(self._key, str(ts.micros // 1000))
        client.close()


def _timer_after_first_record(stack, topic: str, redis_client, key_prefix: str) -> int:
    """Read ``topic`` from the start with a timer 10 s after the first record's time;
    the time it fired at (the test fails if it does not within 90 s)."""
    options = _options(stack, f"g-{uuid.uuid4().hex[:8]}", "--start_from=earliest",
                       "--idle_skew_s=1")
    config = options.view_as(KafkaReadOptions).source_config(default_group="unused")
    fired_key = f"{key_prefix}:fired"
    pipeline = beam.Pipeline(options=options)
    (pipeline
     | "Read" >> ReadFromKafka(config, [topic])
     | "OneKey" >> beam.FlatMap(lambda batch: [("all", o) for o in batch.offsets])
     | "Timer" >> beam.ParDo(_FireAfter(stack.redis_url, fired_key)))
    result = pipeline.run()
    try:
        fired_at = _wait_for(lambda: redis_client.get(fired_key), 90, "the event-time timer",
                             result)
    finally:
        _cancel(result)
    return int(fired_at)


def test_idle_partition_lets_the_watermark_pass_a_timer(stack, kafka_topic, redis_client,
                                                        key_prefix):
    # Records only on partition 0, stamped "now"; partitions 1 and 2 never get
    # any. The timer 10 s after them fires only if the idle partitions (and
    # partition 0 once it is caught up) advance the watermark on their own.
    topic = kafka_topic(partitions=3)
    now_ms = int(time.time() * 1000)
    _produce(stack.kafka_bootstrap, topic, 20, [0], timestamp_ms=now_ms)
    assert _timer_after_first_record(stack, topic, redis_client, key_prefix) == now_ms + 10_000


def test_a_partition_ending_in_a_transaction_marker_still_goes_idle(
        stack, kafka_topic, redis_client, key_prefix):
    # A transactional producer's commit marker takes the offset after the last
    # record, so the partition's end is never reached by a record; the
    # partition must still count as caught up and let the timer fire.
    topic = kafka_topic(partitions=1)
    now_ms = int(time.time() * 1000)
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap,
                         "transactional.id": f"test-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(20):
        producer.produce(topic, value=f"v{i}".encode(), partition=0, timestamp=now_ms)
    producer.commit_transaction(30)
    assert _timer_after_first_record(stack, topic, redis_client, key_prefix) == now_ms + 10_000


class _CountBefore(beam.DoFn):
    """Counts the records stamped at or before ``at_ms``; when the watermark passes
    ``at_ms`` writes the count to Redis. Every such record counted by then means
    the watermark never overtook one of them."""

    COUNT = userstate.ReadModifyWriteStateSpec("count", beam.coders.VarIntCoder())
    ARMED = userstate.ReadModifyWriteStateSpec("armed", beam.coders.VarIntCoder())
    TIMER = userstate.TimerSpec("timer", TimeDomain.WATERMARK)

    def __init__(self, redis_url: str, key: str, at_ms: int):
        self._url = redis_url
        self._key = key
        self._at_ms = at_ms

    def process(self, element, ts=beam.DoFn.TimestampParam,
                count=beam.DoFn.StateParam(COUNT), armed=beam.DoFn.StateParam(ARMED),
                timer=beam.DoFn.TimerParam(TIMER)):
        if armed.read() is None:
            armed.write(1)
            timer.set(beam.utils.timestamp.Timestamp(micros=self._at_ms * 1000))
        if ts.micros // 1000 <= self._at_ms:
            count.write((count.read() or 0) + 1)

    @userstate.on_timer(TIMER)
    def fired(self, count=beam.DoFn.StateParam(COUNT)):
        import redis

        client = redis.Redis.from_url(self._url)
        client.set(self._key, str(count.read() or 0))
        client.close()


def test_the_watermark_waits_for_a_partition_with_records_still_to_fetch(
        stack, kafka_topic, redis_client, key_prefix):
    # Partition 1 holds one record stamped now; partition 0 a backlog a day
    # old. Partition 1 is caught up at once and its watermark follows the
    # clock; the combined watermark must still wait for every record of
    # partition 0, including while partition 0's first fetches are on the way.
    topic = kafka_topic(partitions=2)
    now_ms = int(time.time() * 1000)
    _produce(stack.kafka_bootstrap, topic, 1, [1], timestamp_ms=now_ms)
    backlog, start_ms = 30_000, now_ms - 86_400_000
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap, "linger.ms": 20})
    for i in range(backlog):
        producer.produce(topic, value=b"x", partition=0, timestamp=start_ms + i)
        if i % 5000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    last_ms = start_ms + backlog - 1
    options = _options(stack, f"g-{uuid.uuid4().hex[:8]}", "--start_from=earliest",
                       "--idle_skew_s=1")
    config = options.view_as(KafkaReadOptions).source_config(default_group="unused")
    count_key = f"{key_prefix}:count-at-fire"
    pipeline = beam.Pipeline(options=options)
    (pipeline
     | "Read" >> ReadFromKafka(config, [topic])
     | "OneKey" >> beam.FlatMap(
         lambda batch: [beam.window.TimestampedValue(("all", o), t / 1000)
                        for o, t in zip(batch.offsets, batch.timestamps_ms)])
     | "Count" >> beam.ParDo(_CountBefore(stack.redis_url, count_key, last_ms)))
    result = pipeline.run()
    try:
        counted = _wait_for(lambda: redis_client.get(count_key), 120,
                            "the timer at the backlog's last record", result)
    finally:
        _cancel(result)
    assert int(counted) == backlog


def test_a_caught_up_partition_reads_a_new_record_during_its_wait(stack, kafka_topic,
                                                                 redis_client, key_prefix):
    """An idle partition's bundle waits up to --idle_poll_ms in librdkafka for its next
    record (an idle job then costs a bundle per partition per period); a record that
    comes meanwhile is read then, not when the wait ends."""
    topic = kafka_topic(partitions=1)
    _produce(stack.kafka_bootstrap, topic, 1, [0])
    result = _run_to_redis(stack, topic, key_prefix, "--idle_poll_ms=120000")
    try:
        _wait_for(lambda: len(_count(redis_client, key_prefix)) >= 1, 120, "the first record",
                  result)
        time.sleep(5)  # caught up: the partition's next bundle is in its two-minute wait
        sent = time.monotonic()
        _produce(stack.kafka_bootstrap, topic, 1, [0])
        _wait_for(lambda: len(_count(redis_client, key_prefix)) >= 2, 60,
                  "the record sent during the wait", result)
        # Read during the wait: a minute's margin below the wait's two minutes.
        assert time.monotonic() - sent < 60
    finally:
        _cancel(result)
    assert _seen(redis_client, key_prefix, 0) == ["0:0", "0:1"]


def test_a_bundles_commit_does_not_wait_for_the_next_bundles_wait(stack, kafka_topic):
    """A bundle's offsets are committed when the runner finalizes it, which may come
    while the partition's next bundle already waits in ``consume()`` for a record (up
    to --idle_poll_ms). A synchronous commit on that consumer would wait until the
    wait ends (measured: 2.7 s behind a 3 s wait); commits use a client of their own."""
    from pipelines.io.kafka import _CURSORS, KafkaSourceConfig, PartitionRead, _ReadPartitionFn

    topic = kafka_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    _produce(stack.kafka_bootstrap, topic, 1, [0])
    config = KafkaSourceConfig({"bootstrap.servers": stack.kafka_bootstrap, "group.id": group})
    read = _ReadPartitionFn(config, "commit-test")
    read.setup()
    try:
        cursor = _CURSORS.get(config, topic, 0, 0)
        assert len(cursor.consumer.consume(num_messages=10, timeout=30)) == 1
        waiting = threading.Thread(target=cursor.consumer.consume,
                                   kwargs={"num_messages": 1, "timeout": 10})
        waiting.start()
        time.sleep(0.5)  # the next bundle's wait has begun
        started = time.monotonic()
        read._commit_callback(PartitionRead(topic, 0, 0), cursor, 1)()
        took = time.monotonic() - started
        assert waiting.is_alive()  # the commit came back while the wait went on
        assert _committed(stack.kafka_bootstrap, group, topic, 1) == {0: 1}
        assert took < 5, f"the commit took {took:.1f} s"
        waiting.join()
    finally:
        read.teardown()


class _OneReader:
    """The partition reads of one ``_ReadPartitionFn`` driven as a runner drives them
    when it bundles them together (Prism bundles a stage's pending residuals): every
    bundle reads each partition once, in order, each from where its last read ended."""

    def __init__(self, stack, topic: str, partitions: int, idle_poll_ms: int,
                 shared_watermarks: bool = False):
        from apache_beam.utils.timestamp import MIN_TIMESTAMP

        from pipelines.io.kafka import KafkaSourceConfig, PartitionRead, _ReadPartitionFn

        config = KafkaSourceConfig({"bootstrap.servers": stack.kafka_bootstrap,
                                    "group.id": f"g-{uuid.uuid4().hex[:8]}"},
                                   commit_offsets=False, idle_poll_ms=idle_poll_ms,
                                   shared_watermarks=shared_watermarks)
        self.fn = _ReadPartitionFn(config, f"reader-{uuid.uuid4().hex[:8]}")
        self.fn.setup()
        self.elements = [PartitionRead(topic, p, 0, partitions=partitions)
                         for p in range(partitions)]
        self.next = [0] * partitions
        self.state = [MIN_TIMESTAMP] * partitions  # each residual's watermark state
        self.reported = [MIN_TIMESTAMP] * partitions  # what each last bundle reported

    def bundle(self, only: list[int] | None = None) -> list[tuple[int, float]]:
        """One bundle (of the partitions ``only``, default all): per partition, the
        records read and the seconds its read took."""
        from apache_beam.io.restriction_trackers import OffsetRange
        from apache_beam.runners.sdf_utils import (RestrictionTrackerView,
                                                   ThreadsafeRestrictionTracker)

        from pipelines.io.kafka import UNBOUNDED_STOP, _OffsetTracker, _PartitionWatermark

        self.fn.start_bundle()
        out = []
        for element in self.elements:
            p = element.partition
            if only is not None and p not in only:
                continue
            tracker = RestrictionTrackerView(ThreadsafeRestrictionTracker(_OffsetTracker(
                OffsetRange(self.next[p], UNBOUNDED_STOP))))
            watermark = _PartitionWatermark(self.state[p])
            started = time.monotonic()
            offsets = [o for batch in self.fn._read(element, tracker, watermark, None)
                       for o in batch.value.offsets]
            out.append((len(offsets), time.monotonic() - started))
            self.state[p], self.reported[p] = watermark.own(), watermark.current_watermark()
            if offsets:
                self.next[p] = offsets[-1] + 1
        return out

    def until_caught_up(self, records: int) -> None:
        """Bundles until the ``records`` in the topic are read and a bundle reads none
        (a new consumer's first polls return nothing before its first fetch)."""
        for _ in range(20):
            if all(n == 0 for n, _ in self.bundle()) and sum(self.next) >= records:
                return
        raise AssertionError(f"the partitions never caught up: read {self.next}")

    def read_until(self, offsets: list[int]) -> None:
        """Bundles until partition ``p`` has read up to ``offsets[p]``, exactly (a new
        consumer's first polls may return nothing for a partition before its first
        fetch, so one bundle need not read every partition)."""
        for _ in range(50):
            if self.next == offsets:
                return
            self.bundle()
            assert all(n <= want for n, want in zip(self.next, offsets)), self.next
            time.sleep(0.1)
        raise AssertionError(f"the partitions never read {offsets}: read {self.next}")

    def close(self) -> None:
        self.fn.teardown()


def test_an_idle_partition_does_not_hold_up_a_busy_one_bundled_with_it(stack, kafka_topic):
    """A caught-up partition waits for its next record (--idle_poll_ms), and while it
    waits its bundle stands still. Bundled with partitions that have records (an idle
    topic beside a busy one, as post-events beside engagement-events), waiting would
    let them read one bundle per wait (measured before: a backlog read at 1.2k
    records/s, 25 times slower than without). It does not wait then."""
    topic = kafka_topic(partitions=2)
    _produce(stack.kafka_bootstrap, topic, 2, [0, 1])
    reader = _OneReader(stack, topic, 2, idle_poll_ms=30_000)
    try:
        reader.until_caught_up(2)
        _produce(stack.kafka_bootstrap, topic, 3000, [1])
        time.sleep(1)  # partition 1's consumer has fetched some of them
        (idle, idle_s), (busy, _) = reader.bundle()
        assert (idle, busy > 0) == (0, True)
        assert idle_s < 10, f"the idle partition waited {idle_s:.1f} s"
    finally:
        reader.close()


def test_an_idle_wait_ends_when_another_partition_of_its_bundle_gets_a_record(stack,
                                                                             kafka_topic):
    """Every partition of a bundle caught up: the first waits, and comes back when a
    record comes to another one (read in the same bundle then), not when its wait
    ends; the others do not wait again in that bundle."""
    topic = kafka_topic(partitions=3)
    _produce(stack.kafka_bootstrap, topic, 3, [0, 1, 2])
    reader = _OneReader(stack, topic, 3, idle_poll_ms=30_000)
    try:
        reader.until_caught_up(3)
        late = threading.Timer(2.0, _produce, (stack.kafka_bootstrap, topic, 1, [2]))
        late.start()
        started = time.monotonic()
        (first, first_s), (second, second_s), (third, _) = reader.bundle()
        took = time.monotonic() - started
        late.join()
        assert (first, second, third) == (0, 0, 1)
        assert 1.5 < first_s < 10, f"the first partition waited {first_s:.1f} s"
        assert second_s < 1, f"the second partition waited {second_s:.1f} s"
        assert took < 12, f"the bundle took {took:.1f} s"
    finally:
        reader.close()


def test_a_bundles_new_watermark_holds_its_records_until_its_next_bundle(stack, kafka_topic):
    """With shared watermarks (Prism), a bundle that ends reports the least watermark
    of its read. A partition's bundle that has read far ahead must not lift that
    for the others before the runner has its records: were the others' bundles to
    end meanwhile, the stage's watermark would pass records still on their way
    (seen: 2,487 records of a replayed backlog dead-lettered as too late)."""
    from apache_beam.utils.timestamp import Timestamp

    topic = kafka_topic(partitions=2)
    now = int(time.time() * 1000)
    hour = 3_600_000
    _produce(stack.kafka_bootstrap, topic, 1, [0], timestamp_ms=now - 3 * hour)
    _produce(stack.kafka_bootstrap, topic, 1, [1], timestamp_ms=now - 2 * hour)
    reader = _OneReader(stack, topic, 2, idle_poll_ms=0, shared_watermarks=True)
    try:
        reader.read_until([1, 1])
        # Partition 0's next bundle reads a record at -2.5 h, then one at -1 h.
        _produce(stack.kafka_bootstrap, topic, 1, [0], timestamp_ms=now - 5 * hour // 2)
        _produce(stack.kafka_bootstrap, topic, 1, [0], timestamp_ms=now - hour)
        assert [n for n, _ in reader.bundle(only=[0])] == [2]
        assert reader.state[0] == Timestamp(micros=(now - hour) * 1000)
        # Partition 1's bundle ends before the runner has partition 0's: it may not
        # pass -2.5 h (it was -2 h before: partition 0's new watermark counted).
        reader.bundle(only=[1])
        assert reader.reported[1] <= Timestamp(micros=(now - 3 * hour) * 1000)
        # Once partition 0's next bundle has started, its records are the runner's.
        reader.bundle(only=[0])
        reader.bundle(only=[1])
        assert reader.reported[1] > Timestamp(micros=(now - 5 * hour // 2) * 1000)
    finally:
        reader.close()


def _start_job(stack, topic: str, group: str, prefix: str) -> subprocess.Popen:
    log = open(os.path.join(stack.state_dir, "logs", f"test-{prefix}.log"), "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.kafka_to_redis", "--topic", topic,
         "--redis_url", stack.redis_url, "--redis_prefix", prefix,
         f"--prism_location={prism_binary(stack)}", "--runner=PrismRunner",
         "--environment_type=LOOPBACK", f"--kafka_bootstrap={stack.kafka_bootstrap}",
         f"--consumer_group={group}", "--fallback_start=earliest"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(process: subprocess.Popen) -> None:
    # The job, its Prism runner and its workers: the whole process group.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                   timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in found}
    finally:
        consumer.close()


def test_kill_and_restart_loses_nothing(stack, kafka_topic, redis_client, key_prefix):
    topic = kafka_topic(partitions=3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    produced: dict[int, list[int]] = {}

    stop = threading.Event()

    def produce_steadily():  # 1000 records a second from before the kill until after it
        while not stop.is_set():
            for partition, offsets in _produce(stack.kafka_bootstrap, topic, 1000,
                                               [0, 1, 2]).items():
                produced.setdefault(partition, []).extend(offsets)
            time.sleep(1)

    producer = threading.Thread(target=produce_steadily)
    first = _start_job(stack, topic, group, key_prefix)
    producer.start()
    try:
        try:
            _wait_for(lambda: sum(_committed(stack.kafka_bootstrap, group, topic, 3).values()) > 0
                      and len(_count(redis_client, key_prefix)) >= 1000, 120,
                      "the first job to store records and commit offsets")
        finally:
            _kill(first)  # mid-stream: no chance to flush or commit anything more
        committed_at_kill = _committed(stack.kafka_bootstrap, group, topic, 3)
        before_restart = len(_count(redis_client, key_prefix))
        time.sleep(2.5)  # records keep coming while no job runs
    finally:
        stop.set()
        producer.join()
    expected = {f"{p}:{o}" for p, offsets in produced.items() for o in offsets}
    assert before_restart < len(expected), "the kill came after the last record"

    second = _start_job(stack, topic, group, key_prefix)
    try:
        _wait_for(lambda: len(_count(redis_client, key_prefix)) >= len(expected), 120,
                  f"all {len(expected)} records after the restart")
    finally:
        _kill(second)
    counts = _count(redis_client, key_prefix)
    assert set(counts) == expected  # nothing lost, nothing invented
    # The restart resumed from the committed offsets: what lay below them was
    # stored once; only records after them may have been read twice.
    for key, count in counts.items():
        partition, offset = map(int, key.split(":"))
        if offset < committed_at_kill[partition]:
            assert count == 1, key


def _commit(bootstrap: str, group: str, topic: str, offsets: dict[int, tuple[int, str]]) -> None:
    """Commit ``{partition: (offset, metadata)}`` for ``group``, as an earlier run would have."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o, metadata=m)
                                 for p, (o, m) in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def _committed_metadata(bootstrap: str, group: str, topic: str, partitions: int) -> dict:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in range(partitions)],
                                   timeout=10)
        return {tp.partition: (tp.offset, tp.metadata) for tp in found}
    finally:
        consumer.close()


def test_a_commit_without_a_timestamp_never_rewinds_to_the_start(stack, kafka_topic):
    from pipelines.io.kafka import KafkaSourceConfig, resolve_start_offsets

    topic = kafka_topic(partitions=2)
    now_ms = int(time.time() * 1000)
    _produce(stack.kafka_bootstrap, topic, 40, [0, 1], timestamp_ms=now_ms - 3_600_000)
    group = f"g-{uuid.uuid4().hex[:8]}"
    # Partition 0: committed by an earlier version for a partition it read idle;
    # partition 1: with the timestamp of its last record.
    _commit(stack.kafka_bootstrap, group, topic,
            {0: (15, '{"ts":-1}'), 1: (15, '{"ts":%d}' % (now_ms - 3_600_000))})
    config = KafkaSourceConfig({"bootstrap.servers": stack.kafka_bootstrap, "group.id": group},
                               rewind_ms=60_000)
    reads = {r.partition: r for r in resolve_start_offsets(config, [topic])}
    assert reads[0].start == 15 and reads[0].committed_timestamp_ms is None
    # All 20 records of partition 1 share the committed timestamp: the rewind reaches them.
    assert reads[1].start == 0 and reads[1].committed_timestamp_ms == now_ms - 3_600_000


def test_an_idle_partition_keeps_its_last_commit_timestamp(stack, kafka_topic, redis_client,
                                                          key_prefix):
    from pipelines.io.kafka import _committed_timestamp

    topic = kafka_topic(partitions=2)
    old_ms = int(time.time() * 1000) - 3_600_000
    offsets = _produce(stack.kafka_bootstrap, topic, 20, [0, 1], timestamp_ms=old_ms)
    group = f"g-{uuid.uuid4().hex[:8]}"
    # An earlier run read everything and recorded the records' time (spelt so that
    # a commit of this run, which writes it compactly, shows as a change).
    earlier = '{"ts": %d}' % old_ms
    _commit(stack.kafka_bootstrap, group, topic,
            {p: (max(o) + 1, earlier) for p, o in offsets.items()})
    # This run reads one new record on partition 0; partition 1 stays idle (no
    # rewind: it would re-read partition 1's old records).
    options = _options(stack, group)
    pipeline = beam.Pipeline(options=options)
    kafka_to_redis.build(pipeline, topic, options, stack.redis_url, key_prefix)
    result = pipeline.run()
    try:
        new_ms = int(time.time() * 1000)
        _produce(stack.kafka_bootstrap, topic, 1, [0], timestamp_ms=new_ms)

        def committed():
            # Both partitions committed by this run: the new record's offset on
            # partition 0, the unchanged offset of the idle partition 1.
            meta = _committed_metadata(stack.kafka_bootstrap, group, topic, 2)
            return meta if meta[0][0] == 11 and meta[1][1] != earlier else None

        meta = _wait_for(committed, 120, "both partitions' commits", result,
                         state=lambda: _committed_metadata(stack.kafka_bootstrap, group, topic, 2))
    finally:
        _cancel(result)
    assert _committed_timestamp(meta[0][1]) == new_ms
    # The idle partition's commit kept the earlier timestamp (never -1).
    assert meta[1][0] == 10 and _committed_timestamp(meta[1][1]) == old_ms
