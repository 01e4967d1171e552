"""Consumer-group positions on Kafka: committed offsets, end offsets and the lag between them.

Plain confluent-kafka, no Beam. The pipelines' Kafka source commits a
bundle's offsets only after its writes are done, so a group with no lag has
applied everything in its topics::

    for p in group_lag(bootstrap, "feedbeam-fanout", ["post-events", "follow-events"]):
        print(p.topic, p.partition, p.committed, p.end, p.lag)

    with GroupLag(bootstrap, group, topics) as lag:   # one consumer, polled many times
        while sum(p.remaining for p in lag.read()):
            time.sleep(1)

Partitions are keyed ``(topic, partition)``. Reading a group's offsets does
not join the group: no rebalance, nothing committed (``commit_offsets`` is
the one function that writes).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Iterable, Mapping

from stores.kafka.offsets import UnknownTopicError, partitions_of, watermarks

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]

DEFAULT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class PartitionLag:
    """One partition's committed offset (None: the group never committed here) and watermarks."""

    topic: str
    partition: int
    committed: int | None
    low: int
    end: int

    @property
    def lag(self) -> int | None:
        """Records after the committed offset; None if the group never committed here."""
        return None if self.committed is None else max(self.end - self.committed, 0)

    @property
    def remaining(self) -> int:
        """Records the group has still to read, from the first retained one if it never committed."""
        return max(self.end - (self.low if self.committed is None else self.committed), 0)


class GroupLag:
    """Offsets of one consumer group on ``topics``, read through one consumer kept open.

    The partitions are listed once, at construction; ``missing_ok`` skips a
    topic that does not exist instead of raising ``UnknownTopicError``.
    """

    def __init__(self, bootstrap: str, group: str, topics: Iterable[str], *,
                 missing_ok: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S):
        from confluent_kafka import Consumer

        self.group = group
        self.topics = list(topics)
        self._timeout_s = timeout_s
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                   "enable.auto.commit": False})
        try:
            self.partitions = self._partitions(missing_ok)
        except BaseException:
            self._consumer.close()
            raise

    def _partitions(self, missing_ok: bool) -> list[TopicPartitionKey]:
        out = []
        for topic in self.topics:
            try:
                out += [(topic, p) for p in partitions_of(self._consumer, topic)]
            except UnknownTopicError:
                if not missing_ok:
                    raise
        return out

    def committed(self) -> dict[TopicPartitionKey, int | None]:
        """The group's committed offset per partition; None where it never committed."""
        from confluent_kafka import TopicPartition

        if not self.partitions:
            return {}
        found = self._consumer.committed([TopicPartition(t, p) for t, p in self.partitions],
                                         timeout=self._timeout_s)
        return {(tp.topic, tp.partition): (tp.offset if tp.offset >= 0 else None)
                for tp in found}

    def watermarks(self) -> dict[TopicPartitionKey, tuple[int, int]]:
        """``(low, end)`` per partition: the first retained offset and the next to be written."""
        out = {}
        for topic in self.topics:
            parts = [p for t, p in self.partitions if t == topic]
            if parts:
                out.update(((topic, p), marks) for p, marks in watermarks(
                    self._consumer, topic, parts, self._timeout_s).items())
        return out

    def read(self) -> list[PartitionLag]:
        """Committed offset and watermarks of every partition, committed read first."""
        committed = self.committed()
        marks = self.watermarks()
        return [PartitionLag(t, p, committed[(t, p)], *marks[(t, p)])
                for t, p in self.partitions]

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> "GroupLag":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def group_lag(bootstrap: str, group: str, topics: Iterable[str], *,
              missing_ok: bool = False) -> list[PartitionLag]:
    """``GroupLag(...).read()`` once: every partition of ``topics`` for ``group``."""
    with GroupLag(bootstrap, group, topics, missing_ok=missing_ok) as lag:
        return lag.read()


def committed_offsets(bootstrap: str, group: str,
                      topics: Iterable[str]) -> dict[TopicPartitionKey, int | None]:
    """``group``'s committed offset per partition of ``topics``; None where it never committed."""
    with GroupLag(bootstrap, group, topics) as lag:
        return lag.committed()


def end_offsets(bootstrap: str, topics: Iterable[str]) -> dict[TopicPartitionKey, int]:
    """The end offset (high watermark) per partition of ``topics``."""
    with GroupLag(bootstrap, "feedbeam-offsets", topics) as lag:
        return {key: end for key, (_, end) in lag.watermarks().items()}


def commit_offsets(bootstrap: str, group: str,
                   offsets: Mapping[TopicPartitionKey, int]) -> None:
    """Set ``group``'s committed offsets, e.g. to ``end_offsets`` to skip what is there.

    Meant for groups whose consumers assign partitions themselves (the
    pipelines' source does): there are no members to fence off.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                        asynchronous=False)
    finally:
        consumer.close()


def sum_by_topic(values: Mapping[TopicPartitionKey, int | None]) -> dict[str, int]:
    """Per-partition numbers summed per topic (None counts as 0)."""
    out: dict[str, int] = {}
    for (topic, _), value in values.items():
        out[topic] = out.get(topic, 0) + (value or 0)
    return out


def caught_up(committed: Mapping[TopicPartitionKey, int | None],
              targets: Mapping[TopicPartitionKey, int]) -> bool:
    """True when the group committed at least ``targets`` on every partition that has records.

    A partition whose target is 0 never gets a commit, so it does not count.
    """
    return all((committed.get(key) or 0) >= target
               for key, target in targets.items() if target > 0)


def wait_caught_up(committed: Callable[[], Mapping[TopicPartitionKey, int | None]],
                   targets: Mapping[TopicPartitionKey, int], timeout_s: float,
                   poll_s: float = 0.5, on_poll: Callable[[], None] = lambda: None,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> int:
    """Poll ``committed()`` until it reaches ``targets`` (``caught_up``) or ``timeout_s``
    passed; ``on_poll()`` runs between polls. Returns the records still behind the
    targets at the end (0: caught up)."""
    deadline = clock() + timeout_s
    while True:
        held = committed()
        if caught_up(held, targets):
            return 0
        if clock() >= deadline:
            return sum(max(target - (held.get(key) or 0), 0) for key, target in targets.items())
        on_poll()
        sleep(poll_s)


@dataclasses.dataclass(frozen=True)
class LogCatchUp:
    """Waiting for consumer group ``group`` to have committed everything ``topics`` held
    when the wait began, for at most ``timeout_s``. Picklable (a pipeline's applier
    config carries it); ``wait()`` opens its own consumer (``GroupLag``).

    The fan-out's restore runs it before reading Cassandra, so the durable log's
    records written before Redis was lost are in Cassandra when it is read
    (docs/operations.md, "Redis lost its data")."""

    bootstrap: str
    group: str
    topics: tuple[str, ...]
    timeout_s: float = 60.0
    poll_s: float = 0.5
    #: Further logs waited for after this one, within the same ``timeout_s``
    #: (every durable log a restore reads Cassandra after: the fan-out's, the
    #: stories').
    also: tuple["LogCatchUp", ...] = ()

    def each(self) -> list["LogCatchUp"]:
        """This log's wait and each of ``also``, one log each."""
        return [dataclasses.replace(self, also=()), *(w for a in self.also for w in a.each())]

    def wait(self, on_poll: Callable[[], None] = lambda: None) -> int:
        """Records the groups are still behind at the end: 0 once each caught up, more
        when ``timeout_s`` passed first (the caller says what that means)."""
        deadline = time.monotonic() + self.timeout_s
        return sum(one._wait_one(max(0.0, deadline - time.monotonic()), on_poll)
                   for one in self.each())

    def _wait_one(self, timeout_s: float, on_poll: Callable[[], None]) -> int:
        started = time.monotonic()
        with GroupLag(self.bootstrap, self.group, self.topics, missing_ok=True) as lag:
            targets = {key: end for key, (_, end) in lag.watermarks().items()}
            behind = wait_caught_up(lag.committed, targets, timeout_s, self.poll_s, on_poll)
        if not behind:
            log.info("consumer group %r caught up with %s in %.1fs", self.group,
                     ", ".join(self.topics), time.monotonic() - started)
        return behind


def wait_while_behind(read: Callable[[], tuple[int, tuple]], max_behind: int,
                      max_wait_s: float, stall_s: float, poll_s: float,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep,
                      stalled_at: tuple | None = None) -> tuple[float, tuple | None]:
    """Wait while ``read()`` says a group is more than ``max_behind`` records behind
    and still moving: ``read()`` returns (records behind, its committed offsets).
    Ends once it is within ``max_behind``, when its offsets have not moved for
    ``stall_s`` (it is not draining: stopped, or waiting itself), or after
    ``max_wait_s``; at once while they are still ``stalled_at`` (where a previous
    wait found them stalled). Returns the seconds waited and, when it ended on a
    stall, the offsets it stalled at."""
    start = last_move = clock()
    last = None
    while True:
        behind, committed = read()
        now = clock()
        if stalled_at is not None and committed == stalled_at:
            return now - start, stalled_at
        stalled_at = None
        if committed != last:
            last, last_move = committed, now
        if behind <= max_behind or now - start >= max_wait_s:
            return now - start, None
        if now - last_move >= stall_s:
            return now - start, committed
        sleep(poll_s)


@dataclasses.dataclass(frozen=True)
class GroupPriority:
    """Giving way to consumer group ``group`` on ``topics``: a step of lower
    priority (a durable copy) waits before each batch while that group is more
    than ``max_behind`` records behind and draining (``wait_while_behind``), so
    on a machine they share the group's backlog drains first. Picklable; ``open()``
    gives the waiter, on a consumer of its own."""

    bootstrap: str
    group: str
    topics: tuple[str, ...]
    max_behind: int = 20_000
    max_wait_s: float = 30.0
    stall_s: float = 5.0
    poll_s: float = 0.25
    #: After a look that found the group within reach, the next batches go
    #: without looking for this long (a look is a few broker round trips).
    recheck_s: float = 1.0

    def open(self) -> "PriorityWait":
        return PriorityWait(self)


class PriorityWait:
    """``GroupPriority``'s waiter: ``wait()`` before each batch (seconds waited)."""

    def __init__(self, priority: GroupPriority, clock: Callable[[], float] = time.monotonic):
        self._priority = priority
        self._clock = clock
        self._lag = GroupLag(priority.bootstrap, priority.group, priority.topics,
                             missing_ok=True)
        self._stalled_at: tuple | None = None
        self._within_reach_at: float | None = None

    def _read(self) -> tuple[int, tuple]:
        parts = self._lag.read()
        return sum(p.remaining for p in parts), tuple(p.committed for p in parts)

    def wait(self) -> float:
        """Seconds waited; none while the group stays where a wait found it stalled,
        nor within ``recheck_s`` of a look that found it within reach."""
        p = self._priority
        now = self._clock()
        if self._within_reach_at is not None and now - self._within_reach_at < p.recheck_s:
            return 0.0
        waited, self._stalled_at = wait_while_behind(
            self._read, p.max_behind, p.max_wait_s, p.stall_s, p.poll_s,
            stalled_at=self._stalled_at)
        self._within_reach_at = (self._clock() if self._stalled_at is None
                                 and waited < p.max_wait_s else None)
        return waited

    def close(self) -> None:
        self._lag.close()


__all__ = ["PartitionLag", "GroupLag", "group_lag", "committed_offsets", "end_offsets",
           "commit_offsets", "sum_by_topic", "caught_up", "wait_caught_up", "LogCatchUp",
           "wait_while_behind", "GroupPriority", "PriorityWait"]
