"""CPU time per process group from ``/proc``: what a benchmark's processes spent.

``cpu_ticks``/``session_pids``/``thread_ticks`` read one process, one session or
the threads of some processes; ``CpuSplit`` takes a snapshot of named groups
(the stack's servers, each job's session, the API) and of the whole machine,
and turns two snapshots into shares of one core, with ``other`` for what no
group accounts for (the load generator, the kernel, anything else running).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def pids_by_session() -> dict[int, list[int]]:
    """Every live process, grouped by session id (one pass over ``/proc``)."""
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found.setdefault(int(fields[3]), []).append(int(entry.name))  # field 6: the session
    return found


def session_pids(session_id: int) -> list[int]:
    """Every live process of session ``session_id`` (a job and its helpers)."""
    return pids_by_session().get(session_id, [])


def thread_ticks(pids: Sequence[int]) -> dict[str, int]:
    """utime + stime of every thread of ``pids``, summed per thread name (digits dropped)."""
    per_name: dict[str, int] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip().rstrip("0123456789") or "?"
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            per_name[name] = per_name.get(name, 0) + int(fields[11]) + int(fields[12])
    return per_name


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs together (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4] - sum(fields[8:])  # guest time is in user


class CpuSplit:
    """Shares of one core per named group between two snapshots.

    ``groups`` is called at each snapshot and names the pids of each group then
    (a session's processes can come and go); a process that ended between the
    snapshots drops out of its group's share, so the share is a lower bound.
    """

    def __init__(self, groups: Callable[[], Mapping[str, Sequence[int]]]):
        self.groups = groups

    def snapshot(self) -> tuple[float, int, dict[str, dict[int, int]]]:
        ticks = {name: {pid: cpu_ticks(pid) for pid in pids}
                 for name, pids in self.groups().items()}
        return time.monotonic(), machine_busy_ticks(), ticks

    @staticmethod
    def shares(before, after) -> dict[str, float]:
        """``{group: share of one core}`` from ``before`` to ``after``, plus ``other``
        (the machine's busy time no group accounts for) and ``machine``."""
        (t0, busy0, ticks0), (t1, busy1, ticks1) = before, after
        elapsed = max(t1 - t0, 1e-9)
        out = {}
        for name, now in ticks1.items():
            then = ticks0.get(name, {})
            spent = sum(t - then.get(pid, 0) for pid, t in now.items() if pid in then)
            out[name] = spent / TICKS_PER_S / elapsed
        machine = (busy1 - busy0) / TICKS_PER_S / elapsed
        out["other"] = max(0.0, machine - sum(out.values()))
        out["machine"] = machine
        return out


def format_shares(shares: Mapping[str, float]) -> str:
    """``kafka 45%, cassandra 60%, ...`` busiest first, ``machine`` last."""
    parts = sorted(((v, k) for k, v in shares.items() if k != "machine"), reverse=True)
    return ", ".join(f"{k} {v:.0%}" for v, k in parts) + f"; machine {shares['machine']:.0%}"
