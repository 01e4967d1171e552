"""Running a pipeline from its module's ``run()``: wait, and cancel cleanly on SIGTERM/Ctrl-C.

    result = run_until_done(pipeline)

A streaming job submitted by ``python -m pipelines.<name>`` runs until it is
stopped. With the LOOPBACK environment the submitting process hosts the SDK
workers, so if that process simply died, the job would stay RUNNING on the
runner without workers (on Flink it keeps its task slots and restarts
forever). So a SIGTERM or SIGINT asks the runner to cancel the job and waits
until the runner reports it ended (or ``cancel_timeout_s`` passes) before the
process exits. ``feedbeam cancel`` sends that SIGTERM.

    options = pipeline_options(argv)   # what every pipeline's run() parses

``pipeline_options`` adds what a runner needs for our Kafka source to work
(``runner_flags``): on Flink with ``--checkpointing_interval``, the flag
``--finish_bundle_before_checkpointing``. Without it Beam's Flink runner
(2.70) finishes a bundle that is open when a checkpoint starts with its
output held in the operator's checkpointed buffer, and emits that buffer
only when the operator next starts a bundle (an element, a watermark or a
timer). The steps before the source's read (Impulse, partition listing,
restriction pairing) see their few elements once and the Impulse never
advances its watermark while checkpointing keeps it alive: the partitions
stay in the buffer, the read never starts, nothing is emitted and no offset
is committed. Finishing the bundle before the barrier flushes it instead;
its finalization (the offset commit) then runs when the checkpoint completes.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)


def has_flag(args: list[str], name: str) -> bool:
    return any(a == name or a.startswith(name + "=") for a in args)


#: Flink restarts a failed job this many times, this far apart, then fails it. With
#: checkpointing and no restart strategy Flink restarts forever, and a LOOPBACK job
#: whose launcher died can never come back: it would hold its slots and memory for good.
FLINK_RESTARTS = 3
FLINK_RESTART_DELAY_MS = 5000


def runner_flags(args: list[str]) -> list[str]:
    """``args`` (a pipeline's command line) plus the runner flags our jobs need on
    Flink, unless given: ``--finish_bundle_before_checkpointing`` with checkpointing
    (see the module docstring) and a bounded restart strategy (``FLINK_RESTARTS``)."""
    runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "")
    if "--runner" in args[:-1]:
        runner = args[args.index("--runner") + 1]
    out = list(args)
    if runner.lower() not in ("flink", "flinkrunner"):
        return out
    if (has_flag(args, "--checkpointing_interval")
            and not has_flag(args, "--finish_bundle_before_checkpointing")):
        out.append("--finish_bundle_before_checkpointing")
    if not has_flag(args, "--number_of_execution_retries"):
        out.append(f"--number_of_execution_retries={FLINK_RESTARTS}")
        if not has_flag(args, "--execution_retry_delay"):
            out.append(f"--execution_retry_delay={FLINK_RESTART_DELAY_MS}")
    return out


def pipeline_options(argv=None):
    """The pipeline options of a job's command line (``sys.argv`` when None), with
    ``runner_flags`` applied."""
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(runner_flags(list(sys.argv[1:] if argv is None else argv)))


class _Stop(Exception):
    """Raised in the main thread by the signal handler."""


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def cancel_and_wait(result, timeout_s: float = 60.0) -> str:
    """Cancel the job behind ``result`` and wait for a terminal state; returns it."""
    from apache_beam.runners.runner import PipelineState

    try:
        result.cancel()
    except Exception as exc:  # the runner may already be gone; report and go on
        log.warning("cancelling the job failed: %s", exc)
        return str(getattr(result, "state", "UNKNOWN"))
    deadline = time.monotonic() + timeout_s
    while not PipelineState.is_terminal(result.state):
        if time.monotonic() > deadline:
            log.warning("the job is still %s %.0fs after cancel", result.state, timeout_s)
            break
        time.sleep(0.5)
    return str(result.state)


#: Deadline of the launcher's watch on a streaming job. Beam's portable runner
#: puts ``--job_server_timeout`` (default 300 s) on the job-state stream as a
#: gRPC deadline and ``wait_until_finish()`` raises when it passes: the
#: launcher, with the LOOPBACK workers inside it, would end the job after five
#: minutes.
WATCH_S = 365 * 24 * 3600
_BEAM_DEFAULT_JOB_SERVER_TIMEOUT_S = 300


def _watch_for_as_long_as_it_runs(pipeline) -> None:
    from apache_beam.options.pipeline_options import PortableOptions

    portable = pipeline.options.view_as(PortableOptions)
    if portable.job_server_timeout == _BEAM_DEFAULT_JOB_SERVER_TIMEOUT_S:
        portable.job_server_timeout = WATCH_S


def run_until_done(pipeline, cancel_timeout_s: float = 60.0):
    """Run ``pipeline`` and wait until it ends; cancel it on SIGTERM or SIGINT.

    Returns the ``PipelineResult``. Signal handlers are only installed from
    the main thread (tests may call this from another one; they cancel the
    result themselves).
    """
    _watch_for_as_long_as_it_runs(pipeline)
    result = pipeline.run()
    if threading.current_thread() is not threading.main_thread():
        result.wait_until_finish()
        return result
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        result.wait_until_finish()
    except (_Stop, KeyboardInterrupt) as stop:
        log.info("%s: cancelling the job", stop or "SIGINT")
        for sig in previous:  # a second signal during the cancel must not interrupt it
            signal.signal(sig, signal.SIG_IGN)
        state = cancel_and_wait(result, cancel_timeout_s)
        log.info("job %s", state)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return result
