"""The jobs' check for a Redis that lost its data (``stores.restore.RedisHealer``) and the
fan-out's use of it, on an in-memory stand-in for the generation marker and its lock:
one restorer at a time, the others wait for its token, a failed restore is a transient
error, and a batch Redis was lost under is applied again before its durable copy."""
from __future__ import annotations

import pytest

from pipelines.fanout import _FanoutApplier
from stores.fanout import FanoutBatch
from stores.restore import RedisHealer, RedisNotRestored
from stores.retry import is_transient


class _Keys:
    prefix = "t"


class FakeGeneration:
    """``RedisGeneration`` in memory: ``token`` is the marker, ``holder`` the lock."""

    lock_ttl_ms = 60_000
    keys = _Keys()

    def __init__(self, token: str | None = None):
        self.token = token
        self.holder: str | None = None
        self.marks = 0
        self.reads = 0

    def read(self):
        self.reads += 1
        return self.token

    def mark(self, token=None):
        self.marks += 1
        self.token = token or f"g{self.marks}"
        return self.token

    def try_lock(self, holder):
        if self.holder is None:
            self.holder = holder
            return True
        return False

    def extend(self, holder):
        return self.holder == holder

    def unlock(self, holder):
        if self.holder == holder:
            self.holder = None


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def healer(generation, restore, clock=None, wait_s=10.0):
    clock = clock or Clock()
    return RedisHealer(generation, restore, poll_s=1.0, wait_s=wait_s, clock=clock,
                       sleep=clock.sleep)


def test_a_marked_redis_costs_one_read_and_no_restore():
    generation, restored = FakeGeneration("g0"), []
    h = healer(generation, restored.append)
    assert h.check() == "g0" and generation.reads == 1 and restored == [] and h.restores == 0


def test_a_lost_redis_is_restored_under_the_lock_then_marked():
    generation = FakeGeneration(None)
    seen = []

    def restore(bar):
        seen.append(generation.holder)   # restored while holding the lock
        bar.update(3)

    h = healer(generation, restore)
    token = h.check()
    assert token == generation.token == "g1" and h.restores == 1
    assert seen and seen[0] is not None and generation.holder is None  # released after


def test_a_job_that_finds_the_lock_taken_waits_for_the_token():
    generation = FakeGeneration(None)
    generation.holder = "another job"
    clock = Clock()

    def sleep(s):  # the other job finishes its restore while we wait
        clock.now += s
        if clock.now >= 3:
            generation.token, generation.holder = "theirs", None

    h = RedisHealer(generation, lambda bar: pytest.fail("restored twice"), poll_s=1.0,
                    wait_s=10.0, clock=clock, sleep=sleep)
    assert h.check() == "theirs" and h.restores == 0


def test_waiting_too_long_or_a_failed_restore_is_a_transient_error():
    generation = FakeGeneration(None)
    generation.holder = "a job that hangs"
    with pytest.raises(RedisNotRestored) as waited:
        healer(generation, lambda bar: None, wait_s=5.0).check()
    assert is_transient(waited.value)

    def broken(bar):
        raise ValueError("no such table")

    generation = FakeGeneration(None)
    with pytest.raises(RedisNotRestored, match="no such table") as failed:
        healer(generation, broken).check()
    # Retried, never dead-lettered: nothing is wrong with the batch's records.
    assert is_transient(failed.value)
    assert generation.token is None and generation.holder is None


def test_a_restore_that_lost_its_lock_midway_runs_again():
    generation = FakeGeneration(None)
    runs = []

    def restore(bar):
        runs.append(1)
        if len(runs) == 1:
            generation.holder = None   # Redis lost again: the lock went with it

    h = healer(generation, restore)
    assert h.check() == "g1" and len(runs) == 2 and generation.marks == 1


class FakeFanout:
    """``FeedFanout.apply_to_redis`` that loses Redis (the marker) during chosen calls."""

    def __init__(self, generation: FakeGeneration, lose_on: set[int]):
        self.generation, self.lose_on, self.calls = generation, lose_on, 0

    def apply_to_redis(self, events):
        self.calls += 1
        if self.calls in self.lose_on:
            self.generation.token = None
        return FanoutBatch([None] * len(events))


def test_a_batch_redis_was_lost_under_is_applied_again_after_the_restore():
    generation = FakeGeneration("g0")
    restores = []
    fanout = FakeFanout(generation, lose_on={1})
    applier = _FanoutApplier.__new__(_FanoutApplier)
    applier._fanout = fanout
    applier._healer = healer(generation, restores.append)
    applier._counters = type("C", (), {"inc": lambda self, name, n=1: None})()
    batch = applier._apply_to_redis(["e1", "e2"])
    # Applied, lost, restored, applied again on the new generation.
    assert fanout.calls == 2 and len(restores) == 1 and generation.token == "g1"
    assert len(batch.outcomes) == 2


def test_a_batch_another_job_restored_under_is_applied_again_without_a_restore():
    generation = FakeGeneration("g0")

    class Swapping(FakeFanout):
        def apply_to_redis(self, events):
            self.calls += 1
            if self.calls == 1:
                generation.token = "restored by the stories job"
            return FanoutBatch([None] * len(events))

    fanout = Swapping(generation, set())
    applier = _FanoutApplier.__new__(_FanoutApplier)
    applier._fanout = fanout
    applier._healer = healer(generation, lambda bar: pytest.fail("not ours to restore"))
    applier._counters = type("C", (), {"inc": lambda self, name, n=1: None})()
    applier._apply_to_redis(["e1"])
    assert fanout.calls == 2
