"""Running a pipeline from its module's ``run()``: wait, and cancel cleanly on SIGTERM/Ctrl-C.

    result = run_until_done(pipeline)

A streaming job submitted by ``python -m pipelines.<name>`` runs until it is
stopped. With the LOOPBACK environment the submitting process hosts the SDK
workers, so if that process simply died, the job would stay RUNNING on the
runner without workers (on Flink it keeps its task slots and restarts
forever). So a SIGTERM or SIGINT asks the runner to cancel the job and waits
until the runner reports it ended (or ``cancel_timeout_s`` passes) before the
process exits. ``feedbeam cancel`` sends that SIGTERM.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)


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


def run_until_done(pipeline, cancel_timeout_s: float = 60.0):
    """Run ``pipeline`` and wait until it ends; cancel it on SIGTERM or SIGINT.

    Returns the ``PipelineResult``. Signal handlers are only installed from
    the main thread (tests may call this from another one; they cancel the
    result themselves).
    """
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
