"""Prism as the project builds it (infra/install.py, with its patches), on the guarantees
the pipelines rely on."""
from __future__ import annotations

import threading
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import userstate

from infra.install import prism_binary

pytestmark = pytest.mark.integration

# Bundles of _SlowCount running now, per key. The LOOPBACK worker runs in this
# process, so the DoFn's instances and the test see the same registry.
_LOCK = threading.Lock()
_ACTIVE: dict[str, int] = {}
_MOST_AT_ONCE: dict[str, int] = {}


class _SlowCount(beam.DoFn):
    """Counts its key's elements in state, slowly enough that Prism finds its bundle
    making no progress and asks to split it; yields the count after each one."""

    COUNT = userstate.ReadModifyWriteStateSpec("count", beam.coders.VarIntCoder())

    def start_bundle(self):
        self._keys: set[str] = set()

    def process(self, element, count=beam.DoFn.StateParam(COUNT)):
        key, _ = element
        if key not in self._keys:
            self._keys.add(key)
            with _LOCK:
                _ACTIVE[key] = _ACTIVE.get(key, 0) + 1
                _MOST_AT_ONCE[key] = max(_MOST_AT_ONCE.get(key, 0), _ACTIVE[key])
        time.sleep(0.2)
        value = (count.read() or 0) + 1
        count.write(value)
        yield key, value

    def finish_bundle(self):
        with _LOCK:
            for key in self._keys:
                _ACTIVE[key] -= 1


def test_a_slow_stateful_bundle_is_not_split_into_two_bundles_of_one_key(stack):
    # Prism splits any bundle whose input index stops moving; split off, the rest
    # of a stateful bundle ran next to it on the same key, and each read the state
    # the other was about to overwrite (a count of 30 ended at 15 unpatched).
    _ACTIVE.clear()
    _MOST_AT_ONCE.clear()
    options = PipelineOptions(["--runner=PrismRunner", f"--prism_location={prism_binary(stack)}",
                               "--environment_type=LOOPBACK"])
    with beam.Pipeline(options=options) as pipeline:
        counts = (pipeline
                  | beam.Create([("k", i) for i in range(30)])
                  | beam.ParDo(_SlowCount()))
        assert_that(counts, equal_to([("k", n) for n in range(1, 31)]))
    assert _MOST_AT_ONCE == {"k": 1}
