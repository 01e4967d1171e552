"""``stores.kafka.lag`` against the real broker: committed offsets, end offsets, lag."""
from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from stores.kafka.lag import (
    GroupLag, caught_up, commit_offsets, committed_offsets, end_offsets, group_lag,
)
from stores.kafka.offsets import UnknownTopicError

pytestmark = pytest.mark.integration


def test_lag_follows_the_group_commits(stack, kafka_topic):
    topic = kafka_topic(partitions=2)
    group = f"t-lag-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
    for i in range(3):
        producer.produce(topic, value=b"x%d" % i, partition=0)
    assert producer.flush(30) == 0

    ends = end_offsets(stack.kafka_bootstrap, [topic])
    assert ends == {(topic, 0): 3, (topic, 1): 0}
    before = {(p.topic, p.partition): p for p in group_lag(stack.kafka_bootstrap, group, [topic])}
    assert before[(topic, 0)].committed is None and before[(topic, 0)].lag is None
    assert before[(topic, 0)].remaining == 3 and before[(topic, 1)].remaining == 0

    commit_offsets(stack.kafka_bootstrap, group, {(topic, 0): 2})
    with GroupLag(stack.kafka_bootstrap, group, [topic]) as lag:
        assert [(p.partition, p.committed, p.lag) for p in lag.read()] == [
            (0, 2, 1), (1, None, None)]
        assert not caught_up(lag.committed(), ends)

    commit_offsets(stack.kafka_bootstrap, group, ends)
    assert caught_up(committed_offsets(stack.kafka_bootstrap, group, [topic]), ends)


def test_a_missing_topic_is_an_error_unless_missing_ok(stack, kafka_topic):
    topic = kafka_topic(partitions=1)
    missing = f"t.missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(UnknownTopicError):
        group_lag(stack.kafka_bootstrap, "t-lag-missing", [missing])
    found = group_lag(stack.kafka_bootstrap, "t-lag-missing", [missing, topic], missing_ok=True)
    assert [(p.topic, p.partition) for p in found] == [(topic, 0)]
