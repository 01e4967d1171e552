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

    def wait(self, on_poll: Callable[[], None] = lambda: None) -> int:
        """Records the group is still behind at the end: 0 once it caught up, more when
        ``timeout_s`` passed first (the caller says what that means)."""
        started = time.monotonic()
        with GroupLag(self.bootstrap, self.group, self.topics, missing_ok=True) as lag:
            targets = {key: end for key, (_, end) in lag.watermarks().items()}
            behind = wait_caught_up(lag.committed, targets, self.timeout_s, self.poll_s,
                                    on_poll)
        if not behind:
            log.info("consumer group %r caught up with %s in %.1fs", self.group,
                     ", ".join(self.topics), time.monotonic() - started)
        return behind


__all__ = ["PartitionLag", "GroupLag", "group_lag", "committed_offsets", "end_offsets",
           "commit_offsets", "sum_by_topic", "caught_up", "wait_caught_up", "LogCatchUp"]
