"""Consumer-group lag arithmetic (``stores.kafka.lag``) without Kafka."""
from __future__ import annotations

from stores.kafka.lag import PartitionLag, caught_up, sum_by_topic


def test_lag_of_a_partition_never_committed_is_unknown():
    assert PartitionLag("t", 0, None, 0, 10).lag is None
    assert PartitionLag("t", 0, 4, 0, 10).lag == 6
    assert PartitionLag("t", 0, 12, 0, 10).lag == 0  # end read before the commit


def test_remaining_counts_from_the_first_retained_offset_without_a_commit():
    assert PartitionLag("t", 0, None, 3, 10).remaining == 7
    assert PartitionLag("t", 0, 8, 3, 10).remaining == 2
    assert PartitionLag("t", 0, None, 5, 5).remaining == 0  # empty: nothing to wait for


def test_caught_up_ignores_empty_partitions_and_needs_a_commit_elsewhere():
    targets = {("t", 0): 5, ("t", 1): 0}
    assert caught_up({("t", 0): 5, ("t", 1): None}, targets)
    assert caught_up({("t", 0): 7}, targets)
    assert not caught_up({("t", 0): 4}, targets)
    assert not caught_up({("t", 0): None}, targets)
    assert not caught_up({}, targets)


def test_sum_by_topic_counts_no_commit_as_zero():
    assert sum_by_topic({("a", 0): 3, ("a", 1): None, ("b", 0): 2}) == {"a": 3, "b": 2}
