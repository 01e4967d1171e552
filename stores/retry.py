"""The one retry policy of feedbeam's store writes, and which errors it retries.

    RetryPolicy().call(lambda: store.write(batch), on_retry=count)

Store clients make one attempt per call (``stores.redis.client.new_client``
does not retry, ``CassandraFeedStore`` raises the first transient error of a
round); whoever applies a batch retries it whole with this policy: every
write is idempotent, so running a batch twice leaves the state it leaves
once. In a pipeline that is the batching sink (``pipelines.io.sink``), in a
job the job's own batch loop. With the defaults a batch is tried 5 times over
at most 7.5 s of back-off (0.5, 1, 2, 4 s) before its error fails the bundle.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, TypeVar

import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")


@functools.cache
def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which running the same idempotent batch again may succeed."""
    import redis
    from cassandra import OperationTimedOut, Timeout, Unavailable
    from cassandra.cluster import NoHostAvailable
    from cassandra.protocol import IsBootstrappingErrorMessage, OverloadedErrorMessage

    return (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
            OperationTimedOut, Timeout, Unavailable, NoHostAvailable,
            OverloadedErrorMessage, IsBootstrappingErrorMessage)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is one of ``transient_errors()``."""
    return isinstance(exc, transient_errors())


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all, waiting ``first_delay_s`` doubled each time (at most
    ``max_delay_s``) between them; only ``transient_errors()`` are retried."""

    attempts: int = 5
    first_delay_s: float = 0.5
    max_delay_s: float = 4.0

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.first_delay_s < 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError("need 0 <= first_delay_s <= max_delay_s")

    def delays(self) -> list[float]:
        """The waits between attempts, in order (``attempts - 1`` of them)."""
        return [min(self.max_delay_s, self.first_delay_s * 2 ** i)
                for i in range(self.attempts - 1)]

    def call(self, fn: Callable[[], T], what: str = "batch",
             on_retry: Callable[[BaseException], None] | None = None) -> T:
        """``fn()``, again after each transient error until ``attempts`` are used; the
        last error (or any other error at once) is raised. ``on_retry`` is called
        with each error that leads to another attempt."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception()
            log.warning("%s: transient error (attempt %d/%d), retrying in %.1fs: %s: %s",
                        what, state.attempt_number, self.attempts, state.upcoming_sleep,
                        type(exc).__name__, exc)
            if on_retry is not None:
                on_retry(exc)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.first_delay_s, exp_base=2,
                                           min=self.first_delay_s, max=self.max_delay_s),
            retry=tenacity.retry_if_exception_type(transient_errors()),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)
