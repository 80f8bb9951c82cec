"""The driver's own timings: loop work per iteration and weight fan-out (deploy/run/timing.py)."""

from __future__ import annotations

import math

import pytest

from deploy.run.progress import Progress
from deploy.run.timing import FanoutClock, RecentDurations, quantile


def test_quantile_is_nearest_rank() -> None:
    assert math.isnan(quantile([], 0.5))
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_recent_durations_by_end_time() -> None:
    d = RecentDurations()
    d.observe(0.1, at=10.0)
    d.observe(0.3, at=20.0)
    assert d.since(15.0) == [0.3] and d.since(0.0) == [0.1, 0.3]


def test_fanout_ends_when_every_live_collector_acts_with_the_version() -> None:
    clock = FanoutClock()
    clock.published(1, [0, 1], at=0.0)  # random warm-up: collectors act with nothing yet
    assert not clock.records
    clock.acted(0, 1, since=1.0)
    clock.acted(1, 1, since=1.5)
    clock.published(2, [0, 1], at=100.0)
    clock.acted(0, 2, since=100.4)
    clock.settle([0, 1], now=100.5)
    assert not clock.records, "collector 1 does not act with version 2 yet"
    clock.acted(1, 3, since=101.0)  # a newer version also completes version 2
    clock.settle([0, 1], now=101.2)
    assert [lat for _, lat in clock.records] == pytest.approx([1.0])
    clock.published(4, [0, 1], at=200.0)
    clock.forget(1)  # collector 1 was replaced: only the live ones count
    clock.acted(0, 4, since=200.2)
    clock.settle([0], now=200.3)
    assert clock.since(200.0) == pytest.approx([0.2])


def test_progress_summary_reports_the_driver_timings() -> None:
    p = Progress()
    p.loop_times.observe(0.002)
    s = p.summary()
    assert s["run/driver_loop_p99_seconds"] == 0.002 and s["run/weights_fanouts_total"] == 0.0
    assert math.isnan(s["run/weights_fanout_p50_seconds"])
