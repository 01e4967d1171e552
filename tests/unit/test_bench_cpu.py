"""The benchmarks' CPU split (bench/cpu.py): shares of one core per process group."""
import os
import subprocess
import sys
import time

from bench.cpu import TICKS_PER_S, CpuSplit, cpu_ticks, format_shares, session_pids


def test_shares_are_per_group_and_other_is_what_no_group_accounts_for():
    before = (10.0, 1000, {"kafka": {1: 100, 2: 50}, "api": {3: 10}})
    after = (12.0, 1000 + 3 * TICKS_PER_S,  # the machine: 1.5 cores busy over 2 s
             {"kafka": {1: 100 + TICKS_PER_S, 2: 50},
              "api": {3: 10 + TICKS_PER_S // 2, 4: 999}})  # pid 4 is new: not counted
    shares = CpuSplit.shares(before, after)
    assert shares["kafka"] == 0.5 and shares["api"] == 0.25 and shares["machine"] == 1.5
    assert shares["other"] == 0.75
    assert format_shares(shares) == "other 75%, kafka 50%, api 25%; machine 150%"
    # Groups that account for more than the machine (rounding): never a negative rest.
    assert CpuSplit.shares(before, (12.0, 1000, after[2]))["other"] == 0.0


def test_a_busy_child_shows_in_its_session_group():
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        split = CpuSplit(lambda: {"spinner": session_pids(child.pid)})
        first = split.snapshot()
        spent = first[2]["spinner"][child.pid]
        deadline = time.monotonic() + 30
        while cpu_ticks(child.pid) - spent < TICKS_PER_S // 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        shares = CpuSplit.shares(first, split.snapshot())
        assert shares["spinner"] > 0
        assert shares["machine"] + 0.05 >= shares["spinner"]  # ticks are coarse
    finally:
        child.kill()
        child.wait()
    assert cpu_ticks(child.pid) == 0  # gone: counts nothing
    assert session_pids(os.getsid(0)) and child.pid not in session_pids(os.getsid(0))
