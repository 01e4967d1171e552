"""The benchmarks' Redis PING probe (bench/redis_ping.py) against the real Redis."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_probe_times_pings_to_the_stack_redis(stack):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "redis_ping.py"), "--host",
                          stack.host, "--port", str(stack.redis_port), "--seconds", "0.5",
                          "--interval-ms", "10"],
                         capture_output=True, text=True, check=True, timeout=60)
    got = json.loads(out.stdout)
    assert 10 <= got["n"] <= 51   # one each 10 ms, fewer when the machine is slow
    assert 0 < got["p50_ms"] <= got["p99_ms"] <= got["max_ms"]


def test_the_probe_refuses_a_port_without_redis(stack):
    with pytest.raises(subprocess.CalledProcessError) as info:
        subprocess.run([sys.executable, str(REPO / "bench" / "redis_ping.py"), "--port", "1",
                        "--seconds", "0.1"], capture_output=True, text=True, check=True,
                       timeout=60)
    assert "Connection refused" in info.value.stderr
