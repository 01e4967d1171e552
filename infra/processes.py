"""Detached server processes: start, find, stop, plus their logs and pid files.

Knows nothing about which server runs: ``infra.services`` builds the command
lines and ``infra.stack`` decides what to start. A process is started in its
own session with its output appended to ``<state_dir>/logs/<name>.log``, and
its pid and start time go to ``<state_dir>/pids/<name>.pid``; a pid file whose
start time no longer matches the live process is stale and never signalled.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from infra.errors import UserFacingError
from infra.settings import StackSettings

log = logging.getLogger(__name__)

# Popen handles of services started by this Python process, kept so that a
# service that dies while we are still running gets reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


def ensure_dirs(settings: StackSettings) -> None:
    """Create the log, pid and cache directories."""
    for sub in ("logs", "pids"):
        (settings.state_dir / sub).mkdir(parents=True, exist_ok=True)
    settings.cache_dir.mkdir(parents=True, exist_ok=True)


def log_path(settings: StackSettings, name: str) -> Path:
    """Where a service's stdout/stderr (its whole log) goes."""
    return settings.state_dir / "logs" / f"{name}.log"


def install_log_path(settings: StackSettings) -> Path:
    """Where downloads and builds (Maven, go install, apt) log."""
    return settings.state_dir / "logs" / "install.log"


def pid_file(settings: StackSettings, name: str) -> Path:
    return settings.state_dir / "pids" / f"{name}.pid"


def lower_priority(pid: int, nice: int) -> bool:
    """Run ``pid`` and its session at niceness ``nice`` (>= 0): it yields the CPU
    to the processes at 0 (the servers, the serving API) when they want it.

    Sets the niceness of each of the process's threads (what they start from
    then on inherits it) and that of its session's scheduling group. With the
    kernel's autogroups on (``/proc/sys/kernel/sched_autogroup_enabled``) each
    session is one group that shares the CPU equally with every other, however
    many threads it runs, and a process's niceness only weighs it against its
    own session's other processes: a job started in a session of its own and
    niced with ``nice(1)`` keeps its full share. Writing ``/proc/<pid>/autogroup``
    lowers the group's. Returns whether there was a group to lower. Raising a
    niceness needs no privileges.

    Not the idle scheduling class (``SCHED_IDLE``) at 19: tried on 2026-12-06,
    a ``bench_e2e.py`` run lost its features job to a Prism panic (a bundle's
    progress asked of a worker that was not there) after a minute of starving
    at 200 % load, and the API's p99 did not clearly improve.
    """
    if not 0 <= nice <= 19:
        raise UserFacingError(f"a niceness from 0 to 19 is needed, not {nice}")
    try:
        for tid in _threads(pid):
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:
                if tid == pid:
                    raise
                # a thread that ended meanwhile
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UserFacingError(f"cannot lower the priority of pid {pid} to niceness "
                              f"{nice}: {exc}") from exc
    return True


def _threads(pid: int) -> list[int]:
    """The thread ids of ``pid`` (the process itself first); just ``pid`` where
    ``/proc`` does not list them."""
    try:
        others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    except FileNotFoundError:
        others = []
    return [pid, *others]


def spawn(settings: StackSettings, name: str, cmd: list[str]) -> int:
    """Start ``cmd`` detached (own session), logging to the service log; returns its pid."""
    path = log_path(settings, name)
    with open(path, "ab") as out:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        out.write(f"\n==== feedbeam: starting {name} at {stamp}\n"
                  f"==== {subprocess.list2cmdline(cmd)}\n".encode())
        out.flush()
        # Own session: the server survives the CLI exiting, ignores the
        # terminal's Ctrl-C, and `down` can signal its whole process group.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=settings.state_dir,
                                start_new_session=True)
    _CHILDREN[proc.pid] = proc
    # The start time guards against signalling a recycled pid later.
    pid_file(settings, name).write_text(f"{proc.pid} {_start_ticks(proc.pid)}\n")
    log.info("%s: started, pid %d, log %s", name, proc.pid, path)
    return proc.pid


def running_pid(settings: StackSettings, name: str) -> int | None:
    """Pid of the live process ``spawn`` started for ``name``; clears stale files."""
    path = pid_file(settings, name)
    try:
        pid_text, ticks = path.read_text().split()
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(pid, None)
    if _start_ticks(pid) != ticks:
        log.debug("%s: removing stale pid file %s", name, path)
        path.unlink(missing_ok=True)
        return None
    return pid


def stop(settings: StackSettings, name: str, pid: int, timeout_s: float) -> None:
    """SIGTERM the process group of ``pid``, SIGKILL after ``timeout_s``; remove its pid file."""
    log.info("%s: stopping pid %d (SIGTERM, SIGKILL after %.0f s)", name, pid, timeout_s)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while running_pid(settings, name) is not None:
        if time.monotonic() > deadline:
            log.warning("%s: still running after %.0f s; sending SIGKILL", name, timeout_s)
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while running_pid(settings, name) is not None and time.monotonic() < deadline:
                time.sleep(0.2)
            break
        time.sleep(0.2)
    pid_file(settings, name).unlink(missing_ok=True)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.poll()


def rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB, None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts a TCP connection on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def run(cmd: list[str], log_file: Path, *, what: str,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run a one-off command to completion, appending its output to ``log_file``.

    Raises UserFacingError with the log's last lines when it fails.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        out.write(f"\n==== {subprocess.list2cmdline(cmd)}\n".encode())
        out.flush()
        code = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode
    if code != 0:
        raise UserFacingError(
            f"{what} failed (exit {code}); read {log_file}:\n{tail(log_file, 20)}")


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log (read from its last 64 KiB); empty if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _start_ticks(pid: int) -> str | None:
    """Process start time (clock ticks since boot) or None if gone/zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces; fields are counted after it.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        # We started it as a session leader, so its group id is its pid;
        # signalling the group also reaches any helper processes it forked.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass
