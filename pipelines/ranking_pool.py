"""Reference-counted ``FeedRanker``s of a worker process, shared by DoFn instances.

A runner runs several bundles of a stage at once, each on its own instance of
``pipelines.ranking``'s refresh DoFn; a ranker holds a model, a Cassandra
session and a Redis pool that take seconds to build and are thread-safe, so
one per process and configuration is enough. ``RANKERS.hold(config, policy)``
returns it (built by ``config.open(policy)`` on first use), ``release`` gives
it back and the last release closes it.

A module of its own, with no Beam options: the DoFn imports it inside its
methods, so pickling the DoFn by value (as Beam does for classes of
``__main__`` when the pipeline runs as ``python -m pipelines.ranking``) never
captures the pool and its live clients.
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
