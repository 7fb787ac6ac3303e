"""What a session reports of its functions on each keepalive (the dashboard's Sessions
page): the figures a pool keeps, and the scheduler keeping a client's report bounded."""

from __future__ import annotations

import math

from aviato._pool_state import FunctionTally
from aviato.protocol import PoolFigures
from scheduler.server import MAX_NAME, MAX_POOLS, pool_figures


def test_a_hostile_report_is_kept_bounded_and_finite() -> None:
    report = tuple(
        PoolFigures("f" * 10_000, calls_per_second=x, run_p50_ms=-x, run_p99_ms=x)
        for x in (math.nan, math.inf, -1.0, 5.0) * 300
    )
    kept = pool_figures(report)
    assert len(kept) == MAX_POOLS
    assert all(len(p.name) == MAX_NAME for p in kept)
    for p in kept:
        for x in (p.calls_per_second, p.run_p50_ms, p.run_p99_ms):
            assert math.isfinite(x) and x >= 0
    assert kept[3].calls_per_second == 5.0  # a fine figure is kept as it is


def test_a_function_tally_keeps_only_recent_run_times() -> None:
    tally = FunctionTally()
    for i in range(10_000):
        tally.calls += 1
        tally.recent.append(float(i))
    assert tally.calls == 10_000
    assert len(tally.recent) == 512 and tally.recent[0] == 10_000 - 512
