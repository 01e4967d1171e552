"""A pipeline worker's garbage-collection thresholds (pipelines.common.collect_for_batches)."""
import gc
import weakref

import pytest

from pipelines import common


@pytest.fixture
def fresh_worker(monkeypatch):
    """As if no store sink of this process had been set up yet; Python's thresholds
    as they were afterwards."""
    before = gc.get_threshold()
    monkeypatch.setattr(common, "_worker_gc_set", False)
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_a_worker_collects_less_often_once_its_first_sink_is_set_up(fresh_worker, monkeypatch):
    monkeypatch.delenv(common.WORKER_GC_ENV, raising=False)
    common.collect_for_batches()
    assert gc.get_threshold() == common.WORKER_GC_THRESHOLDS
    gc.set_threshold(1000, 10, 10)  # set by someone else since: a second sink leaves it
    common.collect_for_batches()
    assert gc.get_threshold() == (1000, 10, 10)


def test_the_environment_can_keep_pythons_thresholds(fresh_worker, monkeypatch):
    monkeypatch.setenv(common.WORKER_GC_ENV, " Python ")
    common.collect_for_batches()
    assert gc.get_threshold() == (700, 10, 10)


def test_the_young_generations_still_free_cycles_under_the_worker_thresholds(fresh_worker,
                                                                            monkeypatch):
    monkeypatch.delenv(common.WORKER_GC_ENV, raising=False)
    common.collect_for_batches()

    class Cycle:
        def __init__(self):
            self.me = self

    gc.collect()
    young = gc.get_threshold()[0]
    ref = weakref.ref(Cycle())
    assert ref() is not None  # no collection yet
    held = [[] for _ in range(2 * young)]  # containers enough for a young collection
    assert ref() is None and len(held) == 2 * young
