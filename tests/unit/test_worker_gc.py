"""A pipeline worker's garbage-collection thresholds: ``--worker_gc``, set by the first
store sink of the process (pipelines.common.collect_for_batches)."""
import gc
import weakref

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as _TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import common
from pipelines.common import StoreOptions, worker_gc_thresholds
from pipelines.io.sink import ApplyInBatches

PYTHONS = (700, 10, 10)


@pytest.fixture
def fresh_worker(monkeypatch):
    """As if no store sink of this process had been set up yet, under Python's
    thresholds; the thresholds as they were afterwards."""
    before = gc.get_threshold()
    monkeypatch.setattr(common, "_worker_gc_set", False)
    gc.set_threshold(*PYTHONS)
    yield
    gc.set_threshold(*before)


def test_the_option_reads_python_or_three_integers():
    assert worker_gc_thresholds(" Python ") is None
    assert worker_gc_thresholds("700, 10, 1000") == (700, 10, 1000)
    for bad in ("700,10", "0,10,10", "a,b,c", "-1,10,10", ""):
        with pytest.raises(ValueError, match="--worker_gc"):
            worker_gc_thresholds(bad)
    default = PipelineOptions([]).view_as(StoreOptions).worker_gc
    assert worker_gc_thresholds(default) == common.WORKER_GC_THRESHOLDS
    assert common.WORKER_GC_THRESHOLDS[:2] == PYTHONS[:2]  # young generations as Python's
    with pytest.raises(SystemExit):  # argparse refuses it when the job starts
        PipelineOptions(["--worker_gc=10,10"]).view_as(StoreOptions).worker_gc


def test_the_first_sink_of_a_worker_sets_the_thresholds_and_later_ones_leave_them(fresh_worker):
    common.collect_for_batches((900, 10, 500))
    assert gc.get_threshold() == (900, 10, 500)
    gc.set_threshold(1000, 10, 10)  # set by someone else since: a second sink leaves it
    common.collect_for_batches((900, 10, 500))
    assert gc.get_threshold() == (1000, 10, 10)


def test_python_leaves_the_thresholds_alone(fresh_worker):
    common.collect_for_batches(None)
    assert gc.get_threshold() == PYTHONS


class _ThresholdsSeen:
    """An applier configuration whose applier answers each element with the
    process' thresholds, as they are once the sink is set up."""

    def open(self):
        return self

    def apply(self, batch):
        return [gc.get_threshold() for _ in batch]

    def close(self):
        pass


@pytest.mark.parametrize("flag, expected", [
    ("--worker_gc=900,10,500", (900, 10, 500)),
    ("--worker_gc=python", PYTHONS),
])
def test_a_pipeline_s_sinks_take_the_thresholds_from_its_options(fresh_worker, flag, expected):
    options = PipelineOptions(["--runner=FnApiRunner", flag])
    with _TestPipeline(options=options) as p:
        out = p | beam.Create([1, 2]) | ApplyInBatches(_ThresholdsSeen(), "test.gc")
        assert_that(out, equal_to([expected, expected]))


def test_the_young_generations_still_free_cycles_under_the_worker_thresholds(fresh_worker):
    common.collect_for_batches(common.WORKER_GC_THRESHOLDS)

    class Cycle:
        def __init__(self):
            self.me = self

    gc.collect()
    young = gc.get_threshold()[0]
    ref = weakref.ref(Cycle())
    assert ref() is not None  # no collection yet
    held = [[] for _ in range(2 * young)]  # containers enough for a young collection
    assert ref() is None and len(held) == 2 * young
