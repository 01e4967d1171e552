"""Reference-counted ``FeedRanker``s of a worker process, shared by the refresh step.

A runner runs several bundles of a stage at once, each on its own instance of
the sink DoFn (``pipelines.io.sink``); a ranker holds a model, a Cassandra
session and a Redis pool that take seconds to build and are thread-safe, so
one per process and configuration is enough. ``RANKERS.hold(config, policy)``
returns it (built by ``config.open(policy)`` on first use), ``release`` gives
it back and the last release closes it. ``pipelines.ranking.RefreshConfig``
holds it in ``open()`` and releases it in its applier's ``close()``.

A module of its own with no Beam in it: the pool is process state, never
pickled (the refresh step pickles only its ``RefreshConfig``).
"""
from __future__ import annotations

import threading


class RankerPool:
    """``(config, policy) -> [ranker, holders]``; configs and policies are hashable."""

    def __init__(self):
        self._lock = threading.Lock()
        self._rankers: dict[tuple, list] = {}

    def hold(self, config, policy):
        with self._lock:
            entry = self._rankers.get((config, policy))
            if entry is None:
                entry = self._rankers[(config, policy)] = [config.open(policy), 0]
            entry[1] += 1
            return entry[0]

    def release(self, config, policy) -> None:
        with self._lock:
            entry = self._rankers[(config, policy)]
            entry[1] -= 1
            if entry[1]:
                return
            del self._rankers[(config, policy)]
        entry[0].close()


RANKERS = RankerPool()
