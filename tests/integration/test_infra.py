"""The local stack started by ``infra.stack``: idempotent, ready, and usable.

Runs against the stack ``feedbeam infra up`` started (the ``stack`` fixture
fails when it is not answering). ``up`` is called again here to check that it
is idempotent; ``down`` is never called, because other tests share the stack.
"""
from __future__ import annotations

import os

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from infra import install, services
from infra import stack as infra_stack

pytestmark = pytest.mark.integration

_SERVERS = ("cassandra", "kafka", "redis", "prism")


def _by_name(statuses):
    return {s.name: s for s in statuses}


def test_up_twice_is_idempotent(stack):
    first = _by_name(infra_stack.up(stack, resolve_flink=False))
    second = _by_name(infra_stack.up(stack, resolve_flink=False))
    assert set(first) == set(second) == set(_SERVERS)
    for name in _SERVERS:
        # Same process both times: the second call started nothing.
        assert second[name].pid == first[name].pid, name
        assert second[name].ready, name


def test_status_reports_every_server_ready(stack):
    statuses = _by_name(infra_stack.status(stack))
    for name in _SERVERS:
        s = statuses[name]
        # Redis may be one that was already running ("external").
        assert s.state in ("running", "external"), s
        assert s.ready, s
        if s.state == "running":
            assert s.pid and s.rss_mb and s.rss_mb > 0, s
    assert statuses["flink"].port == stack.flink_job_port
    assert "ready" in statuses["kafka"].line()


def test_the_local_cassandra_yields_the_cpu_to_the_api(stack):
    # The stack the tests run on was started by `feedbeam infra up` with the
    # default settings: Cassandra's session group at its niceness, the others at 0.
    status = _by_name(infra_stack.status(stack))
    cassandra, redis = status["cassandra"], status["redis"]
    assert os.getpriority(os.PRIO_PROCESS, cassandra.pid) == stack.cassandra_nice == 10
    if os.path.exists(f"/proc/{cassandra.pid}/autogroup"):
        with open(f"/proc/{cassandra.pid}/autogroup") as f:
            assert f.read().split()[-1] == "10"   # "/autogroup-N nice 10"
    if redis.state == "running":
        assert os.getpriority(os.PRIO_PROCESS, redis.pid) == 0


def test_readiness_probes(stack):
    assert services.kafka_ready(stack)
    assert services.cassandra_ready(stack)
    assert services.redis_ready(stack)
    assert services.prism_ready(stack)


def test_probes_say_no_on_a_closed_port(stack):
    import dataclasses

    nowhere = dataclasses.replace(
        stack, kafka_port=1, cassandra_port=1, redis_port=1, flink_job_port=1, prism_job_port=1)
    assert not services.kafka_ready(nowhere)
    assert not services.cassandra_ready(nowhere)
    assert not services.redis_ready(nowhere)
    assert not services.flink_ready(nowhere)
    assert not services.prism_ready(nowhere)


def test_pipeline_runs_on_the_shared_prism_job_server(stack):
    options = PipelineOptions([
        "--runner=PrismRunner", f"--job_endpoint={services.prism_job_endpoint(stack)}",
        "--environment_type=LOOPBACK"])
    with beam.Pipeline(options=options) as p:
        tripled = p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 3)
        assert_that(tripled, equal_to([3, 6, 9]))


def test_pipeline_runs_on_prism(stack, tmp_path):
    prism = install.prism_binary(stack)
    assert os.access(prism, os.X_OK)
    options = PipelineOptions([
        "--runner=PrismRunner", f"--prism_location={prism}",
        "--environment_type=LOOPBACK"])
    with beam.Pipeline(options=options) as p:
        doubled = p | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2)
        assert_that(doubled, equal_to([2, 4, 6]))


def test_flink_job_endpoint_uses_settings(stack):
    assert services.flink_job_endpoint(stack) == f"{stack.host}:{stack.flink_job_port}"
