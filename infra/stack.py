"""The local stack as a whole: ``up``, ``down`` and ``status`` of its servers.

From the command line (``infra.cli``)::

    feedbeam infra up [--with-flink]   # install if needed, start, wait until ready
    feedbeam infra status              # one line per service
    feedbeam infra down                # stop what `up` started
    feedbeam infra up --topology cluster   # the clusters of ``infra.cluster`` instead

or from Python (tests, benchmarks): ``up(settings)``, ``down(settings)``,
``status(settings)``. Installing is ``infra.install``, each server's command
line and readiness probe ``infra.services``, the pid files and signals
``infra.processes``; ``docs/operations.md`` explains the design.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import sys
import time
from typing import Iterable

from infra import cluster, install, processes, services
from infra.errors import UserFacingError
from infra.services import ALL_SERVICES, DEFAULT_SERVICES
from infra.settings import StackSettings

#: Every service of either topology, in start order.
EVERY_SERVICE = ALL_SERVICES + cluster.CLUSTER_SERVICES

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` knows about one service.

    ``state`` is ``running`` (started by ``up``), ``external`` (answers on
    its port but was not started by ``up``; only Redis may be external) or
    ``stopped``. ``rss_mb`` is the resident memory of the process, when we
    know its pid.
    """

    name: str
    state: str
    pid: int | None
    port: int
    ready: bool
    rss_mb: float | None

    def line(self) -> str:
        """One human-readable line, as ``feedbeam infra status`` prints it."""
        pid = str(self.pid) if self.pid else "-"
        rss = f"{self.rss_mb:.0f} MiB" if self.rss_mb is not None else "-"
        ready = "ready" if self.ready else "not ready"
        port = str(self.port or "-")  # a TaskManager's ports are the OS's pick
        return (f"{self.name:<18} {self.state:<8} pid {pid:<8} "
                f"port {port:<6} {ready:<10} rss {rss}")


def _runs(name: str):
    """The module that starts and probes ``name``: ``infra.services`` or ``infra.cluster``."""
    return cluster if name in cluster.CLUSTER_SERVICES else services


def check_names(names: Iterable[str]) -> list[str]:
    """``names`` without repeats; UserFacingError for one that neither topology has."""
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in EVERY_SERVICE]
    if unknown:
        raise UserFacingError(
            f"unknown service {', '.join(unknown)}; choose from {', '.join(EVERY_SERVICE)}")
    return names


def topology_services(settings: StackSettings) -> tuple[str, ...]:
    """What ``up`` starts when no names are given: the single stack's default
    services, or the cluster topology's servers and the Kafka they share."""
    if settings.clustered:
        return cluster.SHARED_SERVICES + cluster.CLUSTER_SERVICES
    return DEFAULT_SERVICES


def _to_install(names: list[str], resolve_flink: bool) -> set[str]:
    """The ``infra.install`` names (poms, redis-server) behind service ``names``."""
    out = {n for n in names if n in ALL_SERVICES}
    if resolve_flink or any(n.startswith("flink") for n in names):
        out.add("flink")
    if any(n.startswith("flink-") for n in names):
        out.add("flink-cluster")
    if any(n in cluster.CASSANDRA_NODES for n in names):
        out.add("cassandra")
    if any(n in cluster.REDIS_NODES for n in names):
        out.add("redis")
    return out


def up(settings: StackSettings, names: Iterable[str] | None = None,
       *, resolve_flink: bool = True) -> list[ServiceStatus]:
    """Start the services ``names`` (default: ``topology_services``) and wait until ready.

    Single topology: Cassandra, Redis, Kafka, Prism; cluster topology
    (``settings.topology``): Kafka and the clusters of ``infra.cluster``, the
    Redis Cluster formed once its nodes answer.

    Idempotent: services already running from an earlier ``up`` are left
    alone, so a second call only re-runs the readiness probes. Installs
    whatever is missing first (including the Flink job server's classpath
    unless ``resolve_flink`` is False, so no run downloads later). Raises
    UserFacingError on a port held by a foreign process, a server that
    exits, or one that is not ready within ``settings.ready_timeout_s``.
    """
    wanted = check_names(topology_services(settings) if names is None else names)
    install.install(settings, _to_install(wanted, resolve_flink),
                    prism=any(n in ALL_SERVICES for n in wanted))

    started: dict[str, float] = {}
    managed: set[str] = set()
    # Start order is ALL_SERVICES order: Cassandra first, as it is the
    # slowest to become ready; Redis next because it is instant; Kafka last
    # because formatting its storage on first start takes a few seconds.
    # All then become ready concurrently.
    for name in sorted(wanted, key=EVERY_SERVICE.index):
        if processes.running_pid(settings, name) is not None:
            managed.add(name)
            continue
        if name == "redis" and services.redis_ready(settings):
            log.info("redis: using the Redis already answering on port %d "
                     "(not started by feedbeam, so `down` leaves it)",
                     settings.redis_port)
            continue
        _runs(name).check_ports_free(settings, name)
        _runs(name).start(settings, name)
        started[name] = time.monotonic()
        managed.add(name)

    _wait_ready(settings, wanted, started, managed)
    if set(cluster.REDIS_NODES) <= set(wanted):
        cluster.form_redis_cluster(settings)
    return status(settings, wanted)


def down(settings: StackSettings, names: Iterable[str] | None = None) -> list[str]:
    """Stop the services ``names`` that ``up`` started (default: all of the topology's
    own: the cluster topology leaves the Kafka it shares); return their names.

    SIGTERM first so Kafka and Cassandra shut down cleanly, SIGKILL after a
    per-service timeout. Services not started by ``up`` are never touched.
    """
    default = cluster.CLUSTER_SERVICES if settings.clustered else ALL_SERVICES
    wanted = check_names(default if names is None else names)
    targets = {name: pid for name in wanted
               if (pid := processes.running_pid(settings, name)) is not None}
    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        futures = {name: pool.submit(processes.stop, settings, name, pid,
                                     _runs(name).STOP_TIMEOUT_S[name])
                   for name, pid in targets.items()}
        for future in futures.values():
            future.result()
    return sorted(targets, key=EVERY_SERVICE.index)


def status(settings: StackSettings,
           names: Iterable[str] | None = None) -> list[ServiceStatus]:
    """Current state of each service in ``names`` (default: all of the topology's),
    probing readiness."""
    default = topology_services(settings) if settings.clustered else ALL_SERVICES
    result = []
    for name in check_names(default if names is None else names):
        pid = processes.running_pid(settings, name)
        ready = _runs(name).is_ready(settings, name)
        if pid is not None:
            state = "running"
        elif ready:
            state = "external"
        else:
            state = "stopped"
        result.append(ServiceStatus(
            name=name, state=state, pid=pid, port=_runs(name).main_port(settings, name),
            ready=ready, rss_mb=processes.rss_mb(pid) if pid else None))
    return result


def _wait_ready(settings: StackSettings, wanted: list[str],
                started: dict[str, float], managed: set[str]) -> None:
    """Poll every service until ready; fail fast if one of ours exits.

    ``started`` maps the services this call started to their start time,
    ``managed`` names every service with a pid file of ours.
    """
    t0 = time.monotonic()
    deadline = t0 + settings.ready_timeout_s
    pending = list(wanted)
    progress = _Progress()
    while pending:
        for name in list(pending):
            if name in managed and processes.running_pid(settings, name) is None:
                progress.done()
                path = processes.log_path(settings, name)
                raise UserFacingError(
                    f"{name} exited before it was ready; read "
                    f"{path}:\n{processes.tail(path, 15)}")
            if _runs(name).is_ready(settings, name):
                pending.remove(name)
                if name in started:
                    progress.note(f"{name}: ready after "
                                  f"{time.monotonic() - started[name]:.1f} s")
        if not pending:
            break
        if time.monotonic() > deadline:
            progress.done()
            logs = ", ".join(str(processes.log_path(settings, n)) for n in pending)
            raise UserFacingError(
                f"not ready after {settings.ready_timeout_s:.0f} s: "
                f"{', '.join(pending)}; read {logs} (they are left running; "
                "`feedbeam infra down` stops them)")
        progress.update(f"waiting for {', '.join(pending)}: "
                        f"{time.monotonic() - t0:.0f} s")
        time.sleep(0.5)
    progress.done()


class _Progress:
    """An elapsed-time line: rewritten in place on a terminal, else every 10 s."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._last = 0.0
        self._width = 0

    def update(self, text: str) -> None:
        if self._tty:
            sys.stderr.write("\r" + text.ljust(self._width))
            sys.stderr.flush()
            self._width = len(text)
        elif time.monotonic() - self._last >= 10:
            self._last = time.monotonic()
            log.info("%s", text)

    def note(self, text: str) -> None:
        self.done()
        log.info("%s", text)

    def done(self) -> None:
        if self._tty and self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0
