"""Pure helpers of the benchmarks' rate ladders (no IO, no clocks), tested in
``tests/unit/test_bench_ladder.py``.

A ladder offers a load at increasing rates, one step per rate, possibly several
runs of the whole ladder. Each step yields a dict with at least ``p50_ms``,
``p99_ms`` and ``overloaded``; ``summarize_ladder`` takes the median of every
numeric figure per rate over the runs and picks the headline: the highest rate up
to which every rate has its median p99 within the bar, was measured in every run
and was overloaded in none.
"""
from __future__ import annotations

import statistics
from typing import Iterable, Mapping, Sequence

from domain.fanout import percentile_of


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float]:
    """``{"n", "p50_ms", "p99_ms", "max_ms"}`` of the latencies (nearest rank)."""
    values = sorted(latencies_ms)
    if not values:
        raise ValueError("no latencies")
    return {"n": len(values), "p50_ms": percentile_of(values, 0.5),
            "p99_ms": percentile_of(values, 0.99), "max_ms": values[-1]}


def median_fields(rows: Sequence[Mapping], skip: Iterable[str] = ()) -> dict[str, float]:
    """The median of each numeric (non-bool) field the rows share, except ``skip``."""
    if not rows:
        return {}
    skip = set(skip)
    shared = set(rows[0]).intersection(*rows[1:]) - skip
    return {k: statistics.median(r[k] for r in rows) for k in sorted(shared)
            if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)}


def meets_bar(row: Mapping, p99_limit_ms: float, runs: int) -> bool:
    """A summary row meets the bar: median p99 within it, every run reached the rate
    and none was overloaded there."""
    return row["p99_ms"] <= p99_limit_ms and not row["overloaded_runs"] and row["runs"] == runs


def headline_rate(summary: Sequence[Mapping], p99_limit_ms: float, runs: int) -> float | None:
    """The highest rate up to which every measured rate meets the bar, or ``None``.

    A pass above a failed rate is not counted: the bar is for sustained load, and on a
    shared machine a lucky step above a failing one is noise, not capacity.
    """
    best = None
    for row in sorted(summary, key=lambda r: r["rate"]):
        if not meets_bar(row, p99_limit_ms, runs):
            break
        best = row["rate"]
    return best


def summarize_ladder(steps: Mapping[float, Sequence[Mapping]], runs: int,
                     p99_limit_ms: float) -> dict:
    """Per rate (ascending), the medians over its runs; and the headline rate.

    ``steps`` maps each offered rate to its steps (one per run that reached
    it; a run that stopped early at an overloaded step has none above it).
    """
    rows = []
    for rate in sorted(steps):
        got = steps[rate]
        if not got:
            continue
        row = {"rate": rate, "runs": len(got),
               "overloaded_runs": sum(bool(s.get("overloaded")) for s in got)}
        row.update(median_fields(got, skip=("rate", "overloaded")))
        row["steps"] = list(got)
        rows.append(row)
    return {"rates": rows, "p99_limit_ms": p99_limit_ms,
            "headline_rate": headline_rate(rows, p99_limit_ms, runs)}


def ratio(value: float | None, limit: float | None) -> float | None:
    """``value / limit``, or ``None`` when either is missing or the limit is not positive."""
    if value is None or not limit or limit <= 0:
        return None
    return value / limit
