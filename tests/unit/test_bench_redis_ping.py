"""The arithmetic of the benchmarks' Redis PING probe (bench/redis_ping.py)."""
import math

from bench.redis_ping import percentile, summary


def test_percentiles_take_the_nearest_rank():
    done = [float(i) for i in range(1, 101)]
    assert percentile(done, 0.5) == 51.0 and percentile(done, 0.99) == 100.0
    assert summary([3.0, 1.0, 2.0]) == {"pings": 3, "p50_ms": 2.0, "p99_ms": 3.0, "max_ms": 3.0}
    assert math.isnan(percentile([], 0.5)) and summary([])["pings"] == 0
