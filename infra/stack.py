"""The local stack as a whole: ``up``, ``down`` and ``status`` of its servers.

From the command line (``infra.cli``)::

    feedbeam infra up [--with-flink]   # install if needed, start, wait until ready
    feedbeam infra status              # one line per service
    feedbeam infra down                # stop what `up` started

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

from infra import install, processes, services
from infra.errors import UserFacingError
from infra.services import ALL_SERVICES, DEFAULT_SERVICES
from infra.settings import StackSettings

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
        return (f"{self.name:<10} {self.state:<8} pid {pid:<8} "
                f"port {self.port:<6} {ready:<10} rss {rss}")


def up(settings: StackSettings, names: Iterable[str] | None = None,
       *, resolve_flink: bool = True) -> list[ServiceStatus]:
    """Start the services ``names`` (default: Cassandra, Redis, Kafka, Prism) and wait until ready.

    Idempotent: services already running from an earlier ``up`` are left
    alone, so a second call only re-runs the readiness probes. Installs
    whatever is missing first (including the Flink job server's classpath
    unless ``resolve_flink`` is False, so no run downloads later). Raises
    UserFacingError on a port held by a foreign process, a server that
    exits, or one that is not ready within ``settings.ready_timeout_s``.
    """
    wanted = services.check_names(DEFAULT_SERVICES if names is None else names)
    to_install = set(wanted) | ({"flink"} if resolve_flink else set())
    install.install(settings, to_install)

    started: dict[str, float] = {}
    managed: set[str] = set()
    # Start order is ALL_SERVICES order: Cassandra first, as it is the
    # slowest to become ready; Redis next because it is instant; Kafka last
    # because formatting its storage on first start takes a few seconds.
    # All then become ready concurrently.
    for name in sorted(wanted, key=ALL_SERVICES.index):
        if processes.running_pid(settings, name) is not None:
            managed.add(name)
            continue
        if name == "redis" and services.redis_ready(settings):
            log.info("redis: using the Redis already answering on port %d "
                     "(not started by feedbeam, so `down` leaves it)",
                     settings.redis_port)
            continue
        services.check_ports_free(settings, name)
        services.start(settings, name)
        started[name] = time.monotonic()
        managed.add(name)

    _wait_ready(settings, wanted, started, managed)
    return status(settings, wanted)


def down(settings: StackSettings, names: Iterable[str] | None = None) -> list[str]:
    """Stop the services ``names`` that ``up`` started (default: all); return their names.

    SIGTERM first so Kafka and Cassandra shut down cleanly, SIGKILL after a
    per-service timeout. Services not started by ``up`` are never touched.
    """
    wanted = services.check_names(ALL_SERVICES if names is None else names)
    targets = {name: pid for name in wanted
               if (pid := processes.running_pid(settings, name)) is not None}
    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        futures = {name: pool.submit(processes.stop, settings, name, pid,
                                     services.STOP_TIMEOUT_S[name])
                   for name, pid in targets.items()}
        for future in futures.values():
            future.result()
    return sorted(targets, key=ALL_SERVICES.index)


def status(settings: StackSettings,
           names: Iterable[str] | None = None) -> list[ServiceStatus]:
    """Current state of each service in ``names`` (default: all), probing readiness."""
    result = []
    for name in services.check_names(ALL_SERVICES if names is None else names):
        pid = processes.running_pid(settings, name)
        ready = services.is_ready(settings, name)
        if pid is not None:
            state = "running"
        elif ready:
            state = "external"
        else:
            state = "stopped"
        result.append(ServiceStatus(
            name=name, state=state, pid=pid, port=services.main_port(settings, name),
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
            if services.is_ready(settings, name):
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
