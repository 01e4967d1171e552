"""The benchmarks' ladder summary: percentiles, medians over runs, headline rate."""
import pytest

from bench.ladder import (headline_rate, latency_summary, median_fields, ratio,
                          summarize_ladder)


def step(rate, p50, p99, overloaded=False, **extra):
    return {"rate": rate, "p50_ms": p50, "p99_ms": p99, "overloaded": overloaded, **extra}


def test_latency_summary_nearest_rank():
    got = latency_summary(float(v) for v in range(100, 0, -1))  # unsorted input
    assert got == {"n": 100, "p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0}
    assert latency_summary([7.0]) == {"n": 1, "p50_ms": 7.0, "p99_ms": 7.0, "max_ms": 7.0}
    with pytest.raises(ValueError):
        latency_summary([])


def test_median_fields_takes_shared_numbers_only():
    rows = [{"a": 1, "b": 10.0, "flag": True, "name": "x", "only_here": 3},
            {"a": 3, "b": 30.0, "flag": False, "name": "y"},
            {"a": 2, "b": 20.0, "flag": True, "name": "z"}]
    assert median_fields(rows) == {"a": 2, "b": 20.0}
    assert median_fields(rows, skip=("a",)) == {"b": 20.0}
    assert median_fields([]) == {}


def test_summary_is_the_median_per_rate_over_runs():
    steps = {50: [step(50, 100, 900, achieved_rate=49.0), step(50, 300, 1200, achieved_rate=50.0),
                  step(50, 200, 950, achieved_rate=48.0)],
             25: [step(25, 80, 400)] * 3}
    got = summarize_ladder(steps, runs=3, p99_limit_ms=1000)
    assert [r["rate"] for r in got["rates"]] == [25, 50]
    row = got["rates"][1]
    assert (row["p50_ms"], row["p99_ms"], row["achieved_rate"]) == (200, 950, 49.0)
    assert row["runs"] == 3 and row["overloaded_runs"] == 0 and len(row["steps"]) == 3
    assert got["headline_rate"] == 50


def test_headline_needs_every_lower_rate_to_meet_the_bar():
    steps = {10: [step(10, 100, 1500)], 25: [step(25, 100, 800)], 50: [step(50, 100, 700)]}
    assert summarize_ladder(steps, runs=1, p99_limit_ms=1000)["headline_rate"] is None
    steps[10] = [step(10, 100, 600)]
    assert summarize_ladder(steps, runs=1, p99_limit_ms=1000)["headline_rate"] == 50


def test_headline_excludes_overloaded_and_unreached_rates():
    rows = [{"rate": 25, "p99_ms": 500, "overloaded_runs": 0, "runs": 2},
            {"rate": 50, "p99_ms": 600, "overloaded_runs": 1, "runs": 2},
            {"rate": 100, "p99_ms": 700, "overloaded_runs": 0, "runs": 1}]
    assert headline_rate(rows, 1000, runs=2) == 25
    rows[1]["overloaded_runs"] = 0
    assert headline_rate(rows, 1000, runs=2) == 50  # 100 was reached by one run of two
    assert headline_rate(rows, 1000, runs=1) is None  # runs must match exactly
    assert headline_rate([], 1000, runs=1) is None


def test_empty_rates_are_left_out():
    got = summarize_ladder({25: [step(25, 10, 20)], 50: []}, runs=1, p99_limit_ms=1000)
    assert [r["rate"] for r in got["rates"]] == [25]
    assert got["headline_rate"] == 25


def test_ratio():
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(None, 200.0) is None
    assert ratio(50.0, None) is None
    assert ratio(50.0, 0.0) is None
