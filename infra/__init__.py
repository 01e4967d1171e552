"""Local real stack for development and tests: Kafka, Cassandra, Redis, Prism, Flink.

Everything is installed from package registries (Maven Central, Debian, the Go
module proxy) into one cache directory and run from one state directory.

* ``infra.settings``: locations, ports and versions (``FEEDBEAM_*`` variables).
* ``infra.install``: downloads and builds into the cache (Maven, go, apt).
* ``infra.services``: each server's ports, command line and readiness probe.
* ``infra.processes``: pid files, start and stop of detached processes.
* ``infra.cluster``: the cluster topology's servers (Redis Cluster, Cassandra
  nodes, Flink session cluster), with the same interface as ``infra.services``.
* ``infra.stack``: ``up``, ``down`` and ``status`` of the whole stack, either topology.
* ``infra.cli``: the ``feedbeam infra ...`` subcommands.
* ``infra.errors``: ``UserFacingError``, which the CLI prints without a traceback.
"""
