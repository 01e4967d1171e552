"""Which Kafka client errors the source rides out and which end the read."""
from __future__ import annotations

import pytest


def test_broker_outages_are_recoverable_source_errors_but_unknown_topics_are_not():
    from confluent_kafka import KafkaError

    from pipelines.io.kafka import recoverable

    assert recoverable(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert recoverable(KafkaError(KafkaError._TRANSPORT))
    assert not recoverable(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    assert not recoverable(KafkaError(KafkaError._TRANSPORT, fatal=True))


# --------------------------------------------------------------------------- times and commits


NOW = 1_796_000_000_000
H = 3_600_000


def _read_fn(policy: str):
    from pipelines.io.kafka import KafkaSourceConfig, _ReadPartitionFn

    return _ReadPartitionFn(KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"},
                                              timestamp_policy=policy), "read-1")


def test_element_times_never_pass_the_allowed_skew_and_odd_event_times_are_not_used():
    import struct

    from schemas.codec import WireCodec
    from schemas.events import FollowEvent, FollowKind

    def value(event_time: int) -> bytes:
        return WireCodec().encode(FollowEvent("f", event_time, FollowKind.FOLLOW, 1, 2))

    latest = NOW + H
    kafka = _read_fn("kafka")
    assert kafka._timestamp_ms(NOW - 5, None, latest) == NOW - 5
    assert kafka._timestamp_ms(NOW * 1000, None, latest) == latest   # a producer's µs clock
    assert kafka._timestamp_ms(-1, None, latest) == -1               # no timestamp: as Kafka says
    event = _read_fn("event")
    assert event._timestamp_ms(NOW, value(NOW - 7), latest) == NOW - 7
    # Event times validation will refuse fall back to the Kafka timestamp: they
    # must not move the watermark, or overflow Beam's timestamps (ns).
    for odd in (NOW * 1000, NOW * 1_000_000, NOW // 1000, 2**63 - 1):
        assert event._timestamp_ms(NOW, value(odd), latest) == NOW, odd
    assert event._timestamp_ms(NOW, b"\x00" + struct.pack(">I", 1) + b"\xff", latest) == NOW


def test_commit_metadata_never_records_a_negative_or_missing_timestamp_as_one():
    from pipelines.io.kafka import _commit_metadata, _committed_timestamp

    assert _committed_timestamp(_commit_metadata(NOW)) == NOW
    assert _committed_timestamp(_commit_metadata(None)) is None
    # What earlier versions committed for a partition read idle: no rewind point.
    assert _committed_timestamp('{"ts":-1}') is None
    assert _committed_timestamp("written by another tool") is None
    assert _committed_timestamp(None) is None


class _FakeConsumer:
    def __init__(self):
        self.commits = []

    def commit(self, offsets, asynchronous):
        self.commits.extend(offsets)


def test_an_idle_partition_commits_the_timestamp_of_the_previous_commit():
    from pipelines.io.kafka import PartitionRead, _PartitionCursor, _committed_timestamp

    fn = _read_fn("kafka")
    fn.setup()
    element = PartitionRead("t", 0, 10, committed_timestamp_ms=NOW - H)
    reader = _FakeConsumer()
    cursor = _PartitionCursor(reader, 10, _FakeConsumer(), carried_timestamp_ms=NOW - H)
    fn._commit_callback(element, cursor, 10)()
    (tp,) = cursor.committer.commits
    assert (tp.offset, _committed_timestamp(tp.metadata)) == (10, NOW - H)
    assert reader.commits == []  # never the reading consumer (it may be in a wait)
    # Once a record was read, its time is what the commit records.
    cursor.last_timestamp_ms = NOW
    fn._commit_callback(element, cursor, 11)()
    assert _committed_timestamp(cursor.committer.commits[-1].metadata) == NOW
    # Never read, nothing carried: the commit records no time (no rewind), never -1.
    fresh = _PartitionCursor(_FakeConsumer(), 0, _FakeConsumer())
    fn._commit_callback(PartitionRead("t", 1, 0), fresh, 0)()
    assert _committed_timestamp(fresh.committer.commits[0].metadata) is None
    assert "-1" not in fresh.committer.commits[0].metadata
    fn.teardown()


class _Message:
    def __init__(self, offset: int, timestamp_ms: int, value: bytes = b"v"):
        self._offset, self._ts, self._value = offset, timestamp_ms, value

    def error(self):
        return None

    def offset(self):
        return self._offset

    def timestamp(self):
        return (1, self._ts)

    def key(self):
        return None

    def value(self):
        return self._value


class _ScriptedConsumer:
    """Returns the scripted polls one by one, then nothing."""

    def __init__(self, polls):
        self.polls = list(polls)

    def consume(self, num_messages, timeout):
        return self.polls.pop(0) if self.polls else []

    def get_watermark_offsets(self, tp, cached=False):
        return (0, 0)


def test_a_record_stamped_ahead_of_the_clock_does_not_move_the_watermark_past_it(monkeypatch):
    import time

    from apache_beam.io.restriction_trackers import OffsetRange
    from pipelines.io import kafka
    from pipelines.io.kafka import (PartitionRead, _OffsetTracker, _PartitionCursor,
                                    _PartitionWatermark)

    now_ms = int(time.time() * 1000)
    ahead = now_ms + 30 * 60_000  # within the window: valid, keeps its own time
    far = now_ms * 1000            # a µs timestamp: capped at clock + window
    cursor = _PartitionCursor(_ScriptedConsumer([[_Message(0, now_ms - 5), _Message(1, ahead),
                                                  _Message(2, far)]]), 0)
    monkeypatch.setattr(kafka._CURSORS, "get", lambda *args: cursor)
    fn = _read_fn("kafka")
    fn.setup()
    watermark = _PartitionWatermark(None)
    tracker = _OffsetTracker(OffsetRange(0, kafka.UNBOUNDED_STOP))
    tracker.defer_remainder = lambda delay=None: None  # what the runner's tracker view adds
    (batch,) = [wv.value for wv in fn._read(PartitionRead("t", 0, 0), tracker, watermark, None)]
    fn.teardown()
    after_ms = int(time.time() * 1000)
    assert batch.timestamps_ms[:2] == [now_ms - 5, ahead]
    assert now_ms + H <= batch.timestamps_ms[2] <= after_ms + H
    assert list(batch.kafka_timestamps_ms) == [now_ms - 5, ahead, far]
    assert now_ms <= watermark.current_watermark().micros // 1000 <= after_ms
    assert now_ms <= cursor.last_timestamp_ms <= after_ms


class _Partition:
    """A partition's consumer running through scripted polls, then empty ones. A poll
    is a list of messages, ``("dry", n)``: nothing returned while ``n`` more records
    are in the partition (the prefetch ran dry in a backlog), or ``("new",)``: nothing
    returned by a consumer that has not fetched yet (its end offset unknown)."""

    def __init__(self, polls):
        self.polls = list(polls)
        self.taken = self.unseen = 0
        self.fetched = True

    def consume(self, num_messages, timeout):
        got = self.polls.pop(0) if self.polls else []
        self.fetched = got != ("new",)
        if isinstance(got, tuple):
            self.unseen = got[1] if self.fetched else self.unseen
            return []
        self.taken += len(got)
        self.unseen = max(0, self.unseen - len(got))
        return got

    def get_watermark_offsets(self, tp, cached=False):
        if not self.fetched:
            return (-1001, -1001)
        return (0, self.taken + self.unseen)

    def position(self, tps):
        from confluent_kafka import TopicPartition

        return [TopicPartition(tps[0].topic, tps[0].partition, self.taken)]


def _bundles(monkeypatch, bundles: list[list], later_s: float = 0,
             idle_watermark: str = "clock") -> list[int]:
    """Run one bundle per entry of ``bundles`` (the polls it makes, ending on an empty
    one) on one partition of a source with no idle wait and a 2 s skew, the last
    one ``later_s`` later by the source's wall clock; each bundle's end watermark (ms)."""
    import time
    import types

    from apache_beam.io.restriction_trackers import OffsetRange
    from pipelines.io import kafka
    from pipelines.io.kafka import (KafkaSourceConfig, PartitionRead, _OffsetTracker,
                                    _PartitionCursor, _PartitionWatermark, _ReadPartitionFn)

    cursor = _PartitionCursor(_Partition([poll for polls in bundles for poll in polls]), 0)
    monkeypatch.setattr(kafka._CURSORS, "get", lambda *args: cursor)
    monkeypatch.setattr(kafka, "time", time)
    fn = _ReadPartitionFn(KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"},
                                            idle_poll_ms=0, idle_skew_ms=2000,
                                            idle_watermark=idle_watermark), "read-1")
    fn.setup()
    watermark = _PartitionWatermark(None)
    marks = []
    for i, _ in enumerate(bundles):
        if i == len(bundles) - 1:
            monkeypatch.setattr(kafka, "time", types.SimpleNamespace(
                time=lambda: time.time() + later_s, monotonic=time.monotonic))
        fn.start_bundle()
        tracker = _OffsetTracker(OffsetRange(cursor.next_offset, kafka.UNBOUNDED_STOP))
        tracker.defer_remainder = lambda delay=None: None
        list(fn._read(PartitionRead("t", 0, 0), tracker, watermark, None))
        mark = watermark.current_watermark()
        marks.append(None if mark is None else mark.micros // 1000)
    fn.teardown()
    return marks


def _records(first: int, *times_ms: int) -> list:
    return [_Message(first + i, t) for i, t in enumerate(times_ms)]


def test_an_idle_partition_after_a_backlog_follows_the_clock_not_its_last_records_age(
        monkeypatch):
    import time

    now_ms = int(time.time() * 1000)
    old = now_ms - 30_000
    # A backlog whose newest record is 30 s old when read, then nothing: with
    # idle_watermark=clock the idle watermark is the clock less the skew, not 30 s
    # further back (a quiet partition held every story expiry downstream back by its
    # backlog's age). The consumer has not fetched yet at its first poll, and the
    # second bundle's prefetch runs dry once: the records after either are the
    # backlog's still.
    backlog = [[("new",)],
               [_records(0, now_ms - 60_000, now_ms - 50_000), ("dry", 1)],
               [_records(2, old), []],
               [[]]]
    _, read, rest, idle = _bundles(monkeypatch, backlog, later_s=10)
    assert read == now_ms - 50_000 and rest == old
    assert idle >= now_ms + 10_000 - 2000
    # With record (the default), history produced after a pause is not made late:
    # the watermark follows the clock from the last record, as far behind as it was.
    *_, idle = _bundles(monkeypatch, backlog, later_s=10, idle_watermark="record")
    after_ms = int(time.time() * 1000)
    assert old + 10_000 - 2000 <= idle <= old + (after_ms - now_ms) + 10_000 - 2000


def test_an_idle_partition_keeps_the_delay_its_live_records_came_with(monkeypatch):
    import time

    now_ms = int(time.time() * 1000)
    # The partition was caught up when the second bundle's record, 30 s old, came: the
    # producers are 30 s late, and the idle watermark 10 s later stays that far (and
    # the skew) behind the clock, so that their next records are not late.
    _, read, idle = _bundles(monkeypatch, [[_records(0, now_ms - 31_000), []],
                                           [_records(1, now_ms - 30_000), []], [[]]], later_s=10)
    after_ms = int(time.time() * 1000)
    assert read == now_ms - 30_000
    assert now_ms - 22_000 <= idle <= after_ms - 22_000


class _Quiet:
    """A caught-up partition's consumer: each poll waits out its timeout and returns
    nothing; ``end`` is where its last fetch saw the partition end."""

    def __init__(self):
        self.end = 0

    def consume(self, num_messages, timeout):
        import time

        time.sleep(timeout)
        return []

    def get_watermark_offsets(self, tp, cached=False):
        return (0, self.end)

    def position(self, tps):
        from confluent_kafka import TopicPartition

        return [TopicPartition(tps[0].topic, tps[0].partition, 0)]

    def close(self):
        pass


def _fn_over(monkeypatch, config, cursors: dict):
    """A set-up ``_ReadPartitionFn`` of ``config`` and the fresh cursor pool it reads
    through, holding ``cursors`` (partition of topic ``t`` -> cursor)."""
    from pipelines.io import kafka

    pool = kafka._CursorPool()
    monkeypatch.setattr(kafka, "_CURSORS", pool)
    pool._cursors.update({(config.identity(), "t", p): c for p, c in cursors.items()})
    fn = kafka._ReadPartitionFn(config, "read-1")
    fn.setup()
    return pool, fn


def _read_once(fn, partition: int) -> list:
    """One bundle's read of partition ``partition`` of topic ``t`` from offset 0."""
    from apache_beam.io.restriction_trackers import OffsetRange
    from pipelines.io import kafka

    tracker = kafka._OffsetTracker(OffsetRange(0, kafka.UNBOUNDED_STOP))
    tracker.defer_remainder = lambda delay=None: None
    return list(fn._read(kafka.PartitionRead("t", partition, 0), tracker,
                         kafka._PartitionWatermark(None), None))


def test_a_partition_that_waited_out_its_bundle_counts_as_read_when_the_bundle_ends(
        monkeypatch):
    """A partition's idle wait looks whether the other partitions read with it have
    records, leaving out those not read lately (read elsewhere now). One that spent its
    last bundle waiting was read until that bundle ended, not only when it began: else
    a wait as long as that look-back left it out, and the next bundle's wait ignored
    the records that came to it (a CI run waited 30 s beside a 3,000-record backlog)."""
    from pipelines.io import kafka
    from pipelines.io.kafka import KafkaSourceConfig, _PartitionCursor

    monkeypatch.setattr(kafka, "RECENT_CURSOR_S", 0.2)
    config = KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"}, idle_poll_ms=400)
    waiting, busy = _PartitionCursor(_Quiet(), 0), _PartitionCursor(_Quiet(), 0)
    busy.caught_up = True
    pool, fn = _fn_over(monkeypatch, config, {0: waiting, 1: busy})
    fn.start_bundle()
    assert _read_once(fn, 1) == []
    busy.consumer.end = 3000  # records come to it after its bundle
    assert pool.records_waiting(pool.between_reads(config, waiting))
    monkeypatch.setattr(kafka, "RECENT_CURSOR_S", 0.0)
    assert not pool.records_waiting(pool.between_reads(config, waiting))  # not read lately
    fn.teardown()


class _QuietTimed(_Quiet):
    """A ``_Quiet`` consumer that records the timeout of each poll."""

    def __init__(self):
        super().__init__()
        self.timeouts = []

    def consume(self, num_messages, timeout):
        self.timeouts.append(timeout)
        return super().consume(num_messages, timeout)


class _Closable(_Partition):
    def close(self):
        pass


def test_a_bundle_that_emitted_records_does_not_wait_on_a_quiet_partition(monkeypatch):
    """Records a bundle emitted travel on only when it ends, so a later partition of
    the same bundle must not wait there for new records (2 s by default): a post read
    just before such a wait reached its feeds 2 s late, now and then, in the demo."""
    import time

    from pipelines.io import kafka
    from pipelines.io.kafka import KafkaSourceConfig, _PartitionCursor

    config = KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"}, idle_poll_ms=400)
    now_ms = int(time.time() * 1000)
    busy = _PartitionCursor(_Closable([_records(0, now_ms), []]), 0)
    quiet = _PartitionCursor(_QuietTimed(), 0)
    quiet.caught_up = True
    _, fn = _fn_over(monkeypatch, config, {0: busy, 1: quiet})

    fn.start_bundle()
    assert len(_read_once(fn, 0)) == 1            # a batch emitted ...
    assert _read_once(fn, 1) == [] and max(quiet.consumer.timeouts) < kafka.IDLE_WAIT_SLICE_S
    fn.start_bundle()                             # ... while a bundle that emitted
    quiet.consumer.timeouts.clear()               # nothing yet does wait
    assert _read_once(fn, 1) == [] and kafka.IDLE_WAIT_SLICE_S in quiet.consumer.timeouts
    fn.teardown()


def test_an_idle_wait_looks_at_other_partitions_only_while_one_is_between_reads(
        monkeypatch):
    """Only a partition no bundle is reading can be later in the waiting one's bundle.
    While every other partition is in a bundle of its own, the wait polls in long slices
    and looks at nothing (slices of 0.1 s, each looking at the others, cost an idle
    fan-out job about a third of its CPU); once one is between two reads, the wait looks
    every 0.1 s."""
    from pipelines.io import kafka
    from pipelines.io.kafka import KafkaSourceConfig, _PartitionCursor

    monkeypatch.setattr(kafka, "IDLE_WAIT_LONG_SLICE_S", 0.25)
    config = KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"}, idle_poll_ms=500)
    quiet, other = _PartitionCursor(_QuietTimed(), 0), _PartitionCursor(_Quiet(), 0)
    quiet.caught_up = True
    other.read_at = kafka.time.monotonic()
    _, fn = _fn_over(monkeypatch, config, {0: quiet, 1: other})

    def wait_timeouts() -> list:
        quiet.consumer.timeouts.clear()
        fn.start_bundle()
        assert _read_once(fn, 0) == []
        assert not quiet.reading  # its read is over
        return quiet.consumer.timeouts

    other.reading = True   # in a bundle of its own
    timeouts = wait_timeouts()
    assert len(timeouts) <= 3 and min(timeouts[:-1]) == 0.25, timeouts
    other.reading = False  # between reads: maybe next in this bundle
    timeouts = wait_timeouts()
    assert len(timeouts) >= 3 and max(timeouts) <= kafka.IDLE_WAIT_SLICE_S, timeouts
    fn.teardown()


def test_a_quiet_partition_is_polled_less_often_the_longer_it_is_quiet():
    from pipelines.io.kafka import MIN_IDLE_RESUME_MS, KafkaSourceConfig, idle_resume_ms

    config = KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"}, idle_wait_ms=5000)
    assert idle_resume_ms(config, 10_000, 10_010) == MIN_IDLE_RESUME_MS  # live traffic
    assert idle_resume_ms(config, 10_000, 11_000) == 250                  # a quarter of 1 s
    assert idle_resume_ms(config, 10_000, 100_000) == 5000                # capped
    assert idle_resume_ms(config, 10_000, 9_000) == MIN_IDLE_RESUME_MS    # clock went back


def test_a_partition_quiet_for_long_waits_longer_for_its_next_record():
    from pipelines.io.kafka import KafkaSourceConfig, idle_poll_s

    config = KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"},
                               idle_poll_ms=2000, idle_poll_max_ms=8000)
    assert idle_poll_s(config, 10_000, 10_500) == 2.0     # right after a record
    assert idle_poll_s(config, 10_000, 30_000) == 5.0     # a quarter of 20 s quiet
    assert idle_poll_s(config, 10_000, 900_000) == 8.0    # capped
    assert idle_poll_s(config, 10_000, 9_000) == 2.0      # clock went back
    flat = KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"},
                             idle_poll_ms=2000, idle_poll_max_ms=0)
    assert idle_poll_s(flat, 10_000, 900_000) == 2.0      # never grows
    with pytest.raises(ValueError, match="idle_poll_max_ms"):
        KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"}, idle_poll_max_ms=-1)


def test_a_shared_watermark_waits_for_every_partition_and_is_their_least():
    from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp

    from pipelines.io.kafka import PartitionRead, _SharedWatermarks

    marks = _SharedWatermarks()
    p0, p1 = (PartitionRead("t", p, 0, partitions=2) for p in (0, 1))
    # Partition 1 has not reported yet: nothing may pass its records.
    assert marks.report("r", p0, Timestamp(500)) == MIN_TIMESTAMP
    assert marks.report("r", p1, Timestamp(100)) == Timestamp(100)
    assert marks.report("r", p0, Timestamp(900)) == Timestamp(100)
    # Another read's partitions are no part of it.
    assert marks.report("other", PartitionRead("t", 0, 0), Timestamp(5)) == Timestamp(5)
    assert marks.report("r", p1, Timestamp(300)) == Timestamp(300)
    # A bounded partition read to its end holds no one back.
    marks.finish("r", p1)
    assert marks.report("r", p0, Timestamp(950)) == Timestamp(950)
    marks.finish("r", p0)
    assert marks.report("r", p1, MAX_TIMESTAMP) == MAX_TIMESTAMP


def test_a_bundles_end_watermark_is_no_mark_for_the_other_partitions():
    from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

    from pipelines.io.kafka import PartitionRead, _SharedWatermarks

    marks = _SharedWatermarks()
    p0, p1 = (PartitionRead("t", p, 0, partitions=2) for p in (0, 1))
    assert marks.settle("r", p0, Timestamp(500)) == MIN_TIMESTAMP  # partition 1 unheard
    marks.report("r", p0, Timestamp(100))
    assert marks.report("r", p1, Timestamp(200)) == Timestamp(100)
    # Partition 0's bundle ends at 900: its own estimate only. Partition 1's bundle
    # ending meanwhile still counts partition 0 at 100 (its records between 100
    # and 900 may not have reached the runner yet).
    assert marks.settle("r", p0, Timestamp(900)) == Timestamp(200)
    assert marks.settle("r", p1, Timestamp(950)) == Timestamp(100)
    # Partition 0's next bundle starts from 900: the runner has the records before it.
    marks.report("r", p0, Timestamp(900))
    assert marks.settle("r", p1, Timestamp(950)) == Timestamp(900)


def test_a_partition_reports_the_shared_watermark_but_keeps_its_own_as_state():
    from apache_beam.utils.timestamp import MIN_TIMESTAMP, Timestamp

    from pipelines.io.kafka import _WatermarkProvider

    estimator = _WatermarkProvider().create_watermark_estimator(MIN_TIMESTAMP)
    estimator.set_watermark(Timestamp(900))
    assert estimator.current_watermark() == Timestamp(900)
    estimator.share(Timestamp(100))
    assert estimator.current_watermark() == Timestamp(100)
    # The residual restarts from the partition's own position, not the shared one.
    assert estimator.get_estimator_state() == Timestamp(900)
    estimator.set_watermark(Timestamp(950))  # still monotonic in its own terms
    assert estimator.own() == Timestamp(950)


def test_watermarks_are_shared_on_prism_only_unless_told():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.io.kafka import KafkaReadOptions

    def shared(*args: str) -> bool:
        options = PipelineOptions(list(args)).view_as(KafkaReadOptions)
        return options.source_config(default_group="g").shared_watermarks

    assert shared("--runner=PrismRunner")
    assert not shared("--runner=FlinkRunner")
    assert shared("--runner=FlinkRunner", "--partition_watermarks=shared")
    assert not shared("--runner=PrismRunner", "--partition_watermarks=own")


def test_the_idle_watermark_is_the_pipelines_unless_told():
    import pytest
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.io.kafka import KafkaReadOptions, KafkaSourceConfig

    def policy(*args: str, **defaults) -> str:
        options = PipelineOptions(list(args)).view_as(KafkaReadOptions)
        return options.source_config(default_group="g", **defaults).idle_watermark

    assert policy() == "record"
    assert policy(default_idle_watermark="clock") == "clock"
    assert policy("--idle_watermark=record", default_idle_watermark="clock") == "record"
    with pytest.raises(ValueError, match="idle_watermark"):
        KafkaSourceConfig({"bootstrap.servers": "x", "group.id": "g"}, idle_watermark="wall")


def test_a_transient_offset_fetch_error_is_asked_again_and_others_are_not(monkeypatch):
    from confluent_kafka import KafkaError, KafkaException

    from pipelines.io import kafka

    monkeypatch.setattr(kafka.time, "sleep", lambda s: None)
    answers = [KafkaException(KafkaError(KafkaError.NOT_COORDINATOR)),
               KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)), ["tp"]]

    def fetch():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert kafka._retrying_transient(fetch, timeout_s=30) == ["tp"]
    assert answers == []

    calls = []

    def refused():
        calls.append(1)
        raise KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))

    with pytest.raises(KafkaException):
        kafka._retrying_transient(refused, timeout_s=30)
    assert len(calls) == 1


def test_a_transient_offset_fetch_error_ends_in_the_error_at_the_deadline(monkeypatch):
    from confluent_kafka import KafkaError, KafkaException

    from pipelines.io import kafka

    clock = [0.0]
    monkeypatch.setattr(kafka.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(kafka.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    calls = []

    def never():
        calls.append(clock[0])
        raise KafkaException(KafkaError(KafkaError.NOT_COORDINATOR))

    with pytest.raises(KafkaException):
        kafka._retrying_transient(never, timeout_s=5)
    assert 3 <= len(calls) <= 10 and calls[-1] <= 5
