"""The durable step giving way to the Redis step in one worker process
(``pipelines.io.durable_log.BusySteps``) and its chunks (``row_chunks``)."""
from __future__ import annotations

import threading
import time

import pytest

from pipelines.io.durable_log import BusySteps, row_chunks
from pipelines.fanout import _rows
from schemas.fanout import (CelebrityAdd, CelebrityRemove, Edge, FeedAdd, FeedRemove,
                            FollowerCount, Post)


def test_an_idle_step_is_not_waited_for():
    steps = BusySteps()
    assert steps.wait_idle(5.0) < 0.5
    assert steps.wait_idle(0) == 0.0


def test_the_wait_ends_when_the_last_overlapping_apply_ends():
    steps, release_first, release_second = BusySteps(), threading.Event(), threading.Event()
    started = threading.Barrier(3)

    def apply(release):
        with steps.busy():
            started.wait()
            release.wait(10)

    threads = [threading.Thread(target=apply, args=(r,)) for r in (release_first,
                                                                   release_second)]
    for t in threads:
        t.start()
    started.wait()
    waited: list[float] = []
    waiter = threading.Thread(target=lambda: waited.append(steps.wait_idle(10.0)))
    waiter.start()
    release_first.set()
    time.sleep(0.2)
    assert waiter.is_alive()  # one apply still runs
    release_second.set()
    waiter.join(5)
    for t in threads:
        t.join(5)
    assert not waiter.is_alive() and 0.15 < waited[0] < 5.0


def test_the_wait_is_bounded_and_an_apply_that_raises_still_ends():
    steps, release = BusySteps(), threading.Event()
    inside = threading.Event()

    def apply():
        with pytest.raises(RuntimeError):
            with steps.busy():
                inside.set()
                release.wait(10)
                raise RuntimeError("the batch failed")

    t = threading.Thread(target=apply)
    t.start()
    inside.wait(5)
    assert 0.25 <= steps.wait_idle(0.3) < 2.0  # timed out: the apply still runs
    release.set()
    t.join(5)
    assert steps.wait_idle(5.0) < 0.5


def test_chunks_keep_order_and_bound_rows_and_writes():
    writes = [FeedAdd(tuple(range(300)), 1, 2, 3, 4), Edge(1, 2, 3, True),
              FeedRemove(tuple(range(50)), 1, 3, 4), *[Edge(i, 9, 3, True) for i in range(5)],
              CelebrityAdd(tuple((u, 1) for u in range(250)), 7, 5)]
    chunks = row_chunks(writes, _rows, max_rows=200, max_writes=4)
    assert [w for c in chunks for w in c] == writes
    assert [len(c) for c in chunks] == [1, 4, 3, 1]  # a write over 200 rows alone
    assert all(sum(map(_rows, c)) <= 200 or len(c) == 1 for c in chunks)
    assert row_chunks([], _rows, 10, 10) == []
    with pytest.raises(ValueError):
        row_chunks(writes, _rows, 0, 10)


def test_rows_count_users_of_feed_and_celebrity_writes_and_one_otherwise():
    assert _rows(FeedAdd((1, 2, 3), 1, 2, 3, 4)) == 3
    assert _rows(FeedRemove((1, 2), 1, 3, 4)) == 2
    assert _rows(CelebrityAdd(((1, 5), (2, 6)), 7, 8)) == 2
    assert _rows(CelebrityRemove((1, 2, 3, 4), 7, 8)) == 4
    assert _rows(FollowerCount(1, 20_000, 3)) == 1  # a count, not a row per follower
    assert _rows(Edge(1, 2, 3, True)) == 1
    assert _rows(Post(1, 2, 3, "photo", 0, (), 4)) == 1
