"""Helpers for tests that run pipelines through the CLI (``feedbeam submit|status|cancel``).

``submitted(...)`` submits a pipeline detached on a runner with its own state
directory, yields the job id, and on exit cancels the job and checks it is
gone: the job's process (and, on Flink, the job on the shared job server).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from typing import Iterator

import pytest

from infra.services import flink_job_endpoint, flink_job_server_ready
from jobs.submit import process_alive
from tests.integration.serving_harness import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m jobs.cli ARGS`` from the checkout under test."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _ended_states() -> set:
    from apache_beam.portability.api import beam_job_api_pb2 as api

    s = api.JobState
    return {s.DONE, s.FAILED, s.CANCELLED, s.UPDATED, s.DRAINED}


_ENDED = _ended_states()


def flink_running_jobs(stack) -> set[str]:
    """Names (``--job_name``) of the jobs the Flink job server has not ended: running,
    starting, cancelling or restarting (a job whose workers are gone restarts)."""
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2 as api
    from apache_beam.portability.api import beam_job_api_pb2_grpc as api_grpc

    with grpc.insecure_channel(flink_job_endpoint(stack)) as channel:
        jobs = api_grpc.JobServiceStub(channel).GetJobs(api.GetJobsRequest(), timeout=30)
    # The portable runner names every job "job"; the option holds the name given.
    return {j.pipeline_options.fields["beam:option:job_name:v1"].string_value
            for j in jobs.job_info if j.state not in _ENDED}


def job_pid(env: dict, job_id: str) -> int:
    """The pid ``feedbeam status JOB`` lists for ``job_id`` (asserting it is running)."""
    status = cli(env, "status", job_id, "--interval=0")
    assert status.returncode == 0, status.stderr
    assert job_id in status.stdout and "running" in status.stdout, status.stdout
    return int(status.stdout.split(job_id)[1].split("pid")[1].split()[0])


class SubmittedJob:
    """A job started by ``feedbeam submit --detach``: its id, log, and the CLI env."""

    def __init__(self, env: dict, job_id: str, log: str):
        self.env, self.job_id, self.log = env, job_id, log

    def wait_until(self, check, timeout_s: float, what: str):
        """``serving_harness.wait_until`` every half second; on a timeout the error
        carries the tail of the job's log."""
        try:
            return wait_until(check, timeout_s, what, interval_s=0.5)
        except AssertionError as exc:
            tail = ""
            if os.path.exists(self.log):
                with open(self.log, errors="replace") as f:
                    tail = "".join(f.readlines()[-40:])
            raise AssertionError(f"{exc}\njob log tail:\n{tail}") from None

    def wait_caught_up(self, group: str, timeout_s: float = 60, *scope: str) -> None:
        """Wait until ``feedbeam status JOB`` (or scoped by ``scope``, e.g.
        ``--topic-prefix P``) shows lag 0 for ``group``: the job's source committed the
        end of every partition it reads."""
        scope = scope or (self.job_id,)
        self.wait_until(
            lambda: f"{group}: lag 0," in cli(self.env, "status", *scope, "--interval=0").stdout,
            timeout_s, f"lag 0 of {group} in status {' '.join(scope)}")


@contextlib.contextmanager
def submitted(stack, state_dir, runner: str, pipeline: str,
              *args: str) -> Iterator[SubmittedJob]:
    """Submit ``pipeline`` detached on ``runner`` with ``args``; cancel it on exit and
    assert its process ended and (Flink) the job server no longer runs it."""
    if runner == "flink" and not flink_job_server_ready(stack):
        pytest.fail(f"the Flink job server of the {stack.topology} topology is not answering "
                    f"at {flink_job_endpoint(stack)}; start it with `feedbeam infra up` "
                    "(the test command does)", pytrace=False)
    # A unique job name: other jobs may come and go on the shared Flink job server.
    job_name = f"test-{pipeline}-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, FEEDBEAM_STATE_DIR=str(state_dir), FEEDBEAM_TOPOLOGY=stack.topology)
    started = cli(env, "submit", pipeline, "--runner", runner, "--detach",
                  f"--job_name={job_name}", *args)
    assert started.returncode == 0, started.stderr + started.stdout
    job_id = started.stdout.split()[0]
    assert job_id.startswith(pipeline + "-"), started.stdout
    job = SubmittedJob(env, job_id, started.stdout.split(" log ")[1].split()[0])
    pid = job_pid(env, job_id)
    try:
        if runner == "flink":  # it runs on the job server, not somewhere else
            job.wait_until(lambda: job_name in flink_running_jobs(stack), 120,
                           "the job to run on Flink")
        yield job
    finally:
        cancelled = cli(env, "cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"{job_id} stopped" in cancelled.stdout
    # Gone or a zombie: whoever adopted the job after its submit exited may reap it late.
    assert not process_alive(pid), f"{job_id} (pid {pid}) still runs after cancel"
    assert job_id not in cli(env, "status", "--interval=0").stdout
    assert not os.path.exists(os.path.join(state_dir, "jobs", f"{job_id}.json"))
    if runner == "flink":  # cancelled on the job server too, not left without its workers
        wait_until(lambda: job_name not in flink_running_jobs(stack), 60, "the Flink job to end",
                   interval_s=0.5)
