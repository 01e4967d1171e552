"""Settings of the serving API (``feedbeam serve`` builds one from its options)."""
from __future__ import annotations

import dataclasses
import json
import os

from domain.fanout import DAY_MS, FanoutPolicy

_FANOUT = FanoutPolicy()


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Where the stores are, the auth key, and the budgets of a request.

    ``feed_cap`` and ``inactive_days`` must match the fan-out pipeline's
    options: they say where the Redis feed is truncated and who stopped getting
    pushes. Which followees are pulled at read time comes from the fan-out's
    followed-celebrities sets; ``push_threshold`` no longer changes a read.
    """

    jwt_key: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "fb"
    cassandra_host: str = "127.0.0.1"
    cassandra_port: int = 9042
    keyspace: str = "feedbeam"
    push_threshold: int = _FANOUT.push_threshold
    feed_cap: int = _FANOUT.feed_cap
    inactive_days: float = _FANOUT.inactive_days
    default_limit: int = 20
    max_limit: int = 100
    #: One Redis round trip; past it the read falls back to Cassandra. Normal
    #: round trips take well under a millisecond, but on a shared, saturated
    #: machine Redis' own p99 reaches ~100 ms (redis-benchmark in
    #: bench/bench_serving.py), and a false "Redis is down" sends reads to the
    #: slower Cassandra path, so the bar is set well above that.
    redis_timeout_s: float = 0.25
    #: One Cassandra read.
    cassandra_timeout_s: float = 0.5
    #: A whole request; past it the answer is 503 (nothing hangs).
    request_budget_s: float = 1.5
    #: A cold or inactive user's rebuild; past it the page is served without it.
    rebuild_budget_s: float = 0.5
    rebuild_followees: int = 500
    rebuild_per_followee: int = 20
    #: Bounded work per request, whatever the account (docs/serving.md, "Bounded
    #: reads"): followed celebrities whose timelines a feed page pulls (the most
    #: recently followed; one read of the set the fan-out keeps), ...
    max_pulled_timelines: int = 64
    #: ... followees whose story indexes one tray page reads (the next page
    #: continues with the next ones) ...
    tray_followees: int = 50
    #: ... and rows of the follow list a Cassandra fallback reads for a tray page:
    #: the table cannot seek to a follow rank, so the pages end this deep while
    #: Redis fails.
    max_followees_scanned: int = 1000
    #: How long a user's followee list and celebrity set are reused.
    graph_cache_s: float = 60.0
    #: Last-read writes are skipped when a newer one was written this recently
    #: (fan-out's inactivity is measured in days; a write per request buys nothing).
    last_read_redis_every_s: float = 60.0
    last_read_cassandra_every_s: float = 3600.0
    #: Durable last-read writes wait up to this long to go to Cassandra together
    #: (unlogged batches, one request per ``LAST_READ_BATCH`` users): one driver
    #: request per read cost about a sixth of a worker's CPU at 1,000 reads/s of
    #: users new to it. A worker that dies loses at most this much of them;
    #: Redis holds the same reads (``last_read_redis_every_s``).
    last_read_flush_s: float = 1.0
    #: Requests a worker serves at once; past it, 503 at once (load shedding:
    #: queueing more only makes every request late, and a late Redis reply
    #: would read as a Redis failure).
    max_in_flight: int = 128
    #: Cassandra fallback reads at once per worker; past it, 503.
    max_fallback_in_flight: int = 32
    #: Seconds a hydrated post is reused by a worker (0: always read Redis);
    #: bounds how long a just-deleted post can still show in a ranked page.
    post_cache_s: float = 1.0
    #: The same for chronological pages: their entries come from feeds and
    #: timelines, which the fan-out clears of deleted posts, so any cached copy
    #: serves (bounded only by memory).
    post_cache_chrono_s: float = 300.0
    #: How often a worker reads the fan-out's log of deleted posts
    #: (``KeyLayout.deleted_posts``; the read rides on a ranked page's round
    #: trip). While it keeps up, ranked pages use cached posts for
    #: ``post_cache_chrono_s`` too, and a deleted post leaves them about this
    #: long after the fan-out applied the delete; otherwise they read each post
    #: every ``post_cache_s``. 0: not followed.
    deletion_poll_s: float = 0.25
    breaker_failures: int = 5
    breaker_reset_s: float = 1.0
    #: A worker runs its full garbage collections itself, one each this many
    #: seconds, after freezing what it holds once started (``serving.app.
    #: FullCollections``): Python's own schedule stopped a loaded worker for
    #: 83-125 ms a few times a minute. 0: Python's own schedule.
    full_gc_every_s: float = 600.0
    #: How often a worker reads Redis' generation marker (``KeyLayout.generation``;
    #: one GET, not one per request). While it is missing Redis lost its data and
    #: the jobs are restoring it: reads go to Cassandra. 0: never checked.
    generation_check_s: float = 1.0
    #: Edges of the HTTP server (jobs/serve.py sets them on granian and uvicorn):
    #: request line + headers, a request body (no route takes one), and how long
    #: a client may take to send its headers (slow clients hold a connection).
    max_header_bytes: int = 8192
    max_body_bytes: int = 1024
    header_read_timeout_s: float = 5.0
    keep_alive_s: float = 5.0

    def __post_init__(self):
        if not 1 <= self.default_limit <= self.max_limit:
            raise ValueError("need 1 <= default_limit <= max_limit")
        for name in ("push_threshold", "feed_cap", "rebuild_followees", "rebuild_per_followee",
                     "breaker_failures", "max_in_flight", "max_fallback_in_flight",
                     "max_followees_scanned", "max_pulled_timelines", "tray_followees"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("redis_timeout_s", "cassandra_timeout_s", "request_budget_s",
                     "rebuild_budget_s", "inactive_days", "breaker_reset_s",
                     "header_read_timeout_s", "keep_alive_s", "last_read_flush_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.deletion_poll_s < 0:
            raise ValueError("deletion_poll_s must be >= 0 (0: the log is not followed)")
        if self.full_gc_every_s < 0:
            raise ValueError("full_gc_every_s must be >= 0 (0: Python's own schedule)")
        if self.max_header_bytes < 8192 or self.max_body_bytes < 0:
            raise ValueError("need max_header_bytes >= 8192 (granian's least) and max_body_bytes >= 0")

    @property
    def inactive_ms(self) -> int:
        return int(self.inactive_days * DAY_MS)


#: The environment variable ``feedbeam serve`` hands the ``ServingConfig`` to its
#: worker processes in (granian and uvicorn start workers by import string).
CONFIG_ENV = "FEEDBEAM_SERVE_CONFIG"


def config_from_environment(environ=None) -> ServingConfig:
    """The ``ServingConfig`` ``feedbeam serve`` handed to its workers (``CONFIG_ENV``)."""
    raw = (os.environ if environ is None else environ).get(CONFIG_ENV)
    if not raw:
        raise RuntimeError(f"{CONFIG_ENV} is not set: start the API with `feedbeam serve`")
    return ServingConfig(**json.loads(raw))
