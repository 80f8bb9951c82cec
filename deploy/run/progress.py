"""What the driver knows about a run's progress, from the metric dicts its actors return.

:class:`Progress` keeps each component's latest dict, totals that never go back when a
collector is replaced, and the restart counters; it makes the console line and the ``run/...``
summary that telemetry exports and ``summary.json`` reports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.metric_keys import (
    COLLECTOR_ENV_STEPS_TOTAL,
    COLLECTOR_EPISODES_TOTAL,
    COLLECTOR_LAST_ACTING_VERSION,
    COLLECTOR_LAST_EPISODE_RETURN,
)
from deploy.run.timing import FanoutClock, RecentDurations
from learner.metric_keys import CRITIC_LOSS_KEY, UPDATES_TOTAL_KEY, WEIGHTS_VERSION_KEY
from replay_service.metric_keys import (
    BYTES_TOTAL,
    CORRUPT_TOTAL,
    DROPPED_TRANSITIONS_TOTAL,
    RESTARTS_TOTAL,
    SAMPLED_TRANSITIONS_TOTAL,
    SIZE,
    TRANSITIONS_TOTAL,
)


@dataclass
class Counts:
    collector_restarts: int = 0
    learner_restarts: int = 0
    shard_restarts: int = 0
    failures_in_a_row: int = 0


@dataclass
class Progress:
    """What the driver knows about the run, from the metric dicts the actors return."""

    start: float = field(default_factory=time.monotonic)
    base_env_steps: int = 0  # counters of the run before a resume: rates count only this run's work
    base_updates: int = 0
    collector: dict[int, dict[str, float]] = field(default_factory=dict)
    # Counters of collectors that were replaced or removed, so totals never go back.
    retired: dict[str, float] = field(default_factory=dict)
    learner: dict[str, float] = field(default_factory=dict)
    shards: dict[int, dict[str, float]] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    collectors_live: int = 0
    collectors_wanted: int = 0
    samples_per_insert_target: float = 0.0
    warmup_transitions: int = 0  # inserted before the learner may sample: not part of the ratio
    eval_text: str = ""  # the newest evaluation, from deploy.run.evaluation.EvalScheduler.short()
    # The driver's own timings, fed by the supervisor (deploy/run/timing.py).
    loop_times: RecentDurations = field(default_factory=RecentDurations)
    fanout: FanoutClock = field(default_factory=FanoutClock)
    _last_t: float = field(default_factory=time.monotonic)
    _last_steps: int = 0
    _last_updates: int = 0

    _SUMMED = (
        COLLECTOR_ENV_STEPS_TOTAL,
        COLLECTOR_EPISODES_TOTAL,
        BYTES_TOTAL,
        TRANSITIONS_TOTAL,
        DROPPED_TRANSITIONS_TOTAL,
    )

    def _sum(self, key: str) -> float:
        return self.retired.get(key, 0.0) + sum(m.get(key, 0.0) for m in self.collector.values())

    def retire(self, index: int) -> None:
        """Keep the counters of collector ``index`` (replaced or removed) in the totals."""
        last = self.collector.pop(index, {})
        for key in self._SUMMED:
            self.retired[key] = self.retired.get(key, 0.0) + last.get(key, 0.0)

    def shard_reported(self, index: int, result: dict[str, float]) -> bool:
        """Keep shard ``index``'s newest dict; True when its redis-server restarted since the last."""
        prev = self.shards.get(index, {}).get(RESTARTS_TOTAL, 0)
        now = result.get(RESTARTS_TOTAL, 0)
        if now > prev:
            self.counts.shard_restarts += int(now - prev)
        self.shards[index] = result
        return now > prev

    @property
    def env_steps(self) -> int:
        return self.base_env_steps + int(self._sum(COLLECTOR_ENV_STEPS_TOTAL))

    def resumed_from(self, env_steps: int, updates: int) -> None:
        self.base_env_steps = self._last_steps = env_steps
        self.base_updates = self._last_updates = updates

    @property
    def updates(self) -> int:
        return int(self.learner.get(UPDATES_TOTAL_KEY, self.base_updates))

    def summary(self) -> dict[str, float]:
        returns = [
            m[COLLECTOR_LAST_EPISODE_RETURN]
            for m in self.collector.values()
            if not math.isnan(m.get(COLLECTOR_LAST_EPISODE_RETURN, math.nan))
        ]
        elapsed = time.monotonic() - self.start
        new_steps = self.env_steps - self.base_env_steps
        written = self._sum(TRANSITIONS_TOTAL)
        sampled = self.learner.get(SAMPLED_TRANSITIONS_TOTAL, 0.0)
        loop_p50, loop_p99 = self.loop_times.p50_p99()
        fanout_p50, fanout_max = self.fanout.p50_max()
        return {
            "run/env_steps_total": self.env_steps,
            "run/updates_total": self.updates,
            "run/episodes_total": self._sum(COLLECTOR_EPISODES_TOTAL),
            "run/elapsed_seconds": elapsed,
            "run/env_steps_per_s": new_steps / max(elapsed, 1e-9),
            "run/updates_per_s": (self.updates - self.base_updates) / max(elapsed, 1e-9),
            "run/replay_size": self.learner.get(SIZE, 0),
            "run/weights_version": self.learner.get(WEIGHTS_VERSION_KEY, 0),
            "run/max_acting_version": max(
                (m.get(COLLECTOR_LAST_ACTING_VERSION, 0) for m in self.collector.values()), default=0
            ),
            "run/last_episode_return": returns[-1] if returns else math.nan,
            "run/replay_bytes_written_total": self._sum(BYTES_TOTAL),
            "run/replay_transitions_written_total": written,
            "run/dropped_transitions_total": self._sum(DROPPED_TRANSITIONS_TOTAL),
            "run/corrupt_segments_total": self.learner.get(CORRUPT_TOTAL, 0.0),
            # Measured replay ratio: sampled per transition inserted after the warm-up, the
            # quantity the rate limiter holds at samples_per_insert_target.
            "run/samples_per_insert": sampled / (written - self.warmup_transitions)
            if written > self.warmup_transitions
            else 0.0,
            "run/samples_per_insert_target": self.samples_per_insert_target,
            "run/collectors_live": self.collectors_live,
            "run/collectors_wanted": self.collectors_wanted,
            "run/collector_restarts_total": self.counts.collector_restarts,
            "run/learner_restarts_total": self.counts.learner_restarts,
            "run/shard_restarts_total": self.counts.shard_restarts,
            # Over the last minute: the supervisor loop's work per iteration, and weight fan-out
            # (publish to every live collector acting with the version).
            "run/driver_loop_p50_seconds": loop_p50,
            "run/driver_loop_p99_seconds": loop_p99,
            "run/weights_fanout_p50_seconds": fanout_p50,
            "run/weights_fanout_max_seconds": fanout_max,
            "run/weights_fanouts_total": float(len(self.fanout.records)),
        }

    def line(self) -> str:
        now = time.monotonic()
        dt = max(now - self._last_t, 1e-9)
        steps, updates = self.env_steps, self.updates
        sps, ups = (steps - self._last_steps) / dt, (updates - self._last_updates) / dt
        self._last_t, self._last_steps, self._last_updates = now, steps, updates
        s = self.summary()
        ret = s["run/last_episode_return"]
        restarts = ""
        c = self.counts
        if c.collector_restarts or c.learner_restarts or c.shard_restarts:
            restarts = f" | restarts c{c.collector_restarts} l{c.learner_restarts} s{c.shard_restarts}"
        return (
            f"[{now - self.start:7.1f}s] env_steps {steps:>8d} ({sps:6.1f}/s) | updates {updates:>7d} ({ups:5.1f}/s) | "
            f"collectors {self.collectors_live}/{self.collectors_wanted} | "
            f"replay {int(s['run/replay_size']):>7d} | episodes {int(s['run/episodes_total']):>5d} | "
            f"last_return {ret:8.2f} | weights v{int(s['run/weights_version'])} "
            f"acting v{int(s['run/max_acting_version'])} | spi {s['run/samples_per_insert']:.0f}/"
            f"{self.samples_per_insert_target:.0f}{restarts}" + (f" | {self.eval_text}" if self.eval_text else "")
        )


class RestartClock:
    """How long each replacement took to work again, measured from its predecessor's failure:
    a collector until its first finished ``collect``, a learner until it updates from replay."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._collectors: dict[int, float] = {}  # index -> when its predecessor failed
        self._learner: float | None = None

    def collector_failed(self, index: int) -> None:
        self._collectors[index] = time.monotonic()

    def collector_acted(self, index: int) -> float | None:
        """Seconds since collector ``index``'s predecessor failed, on its replacement's first result."""
        if index not in self._collectors:
            return None
        took = time.monotonic() - self._collectors.pop(index)
        self.records.append({"kind": "collector", "index": index, "seconds": took})
        return took

    def learner_failed(self) -> None:
        self._learner = time.monotonic()

    def learner_trained(self, metrics: Mapping[str, float]) -> float | None:
        """Seconds since the learner failed, once the new one reports updates with a critic loss."""
        if self._learner is None or metrics.get(UPDATES_TOTAL_KEY, 0) <= 0:
            return None
        took = time.monotonic() - self._learner
        if not (metrics.get(SIZE, 0) and CRITIC_LOSS_KEY in metrics):
            return None
        self._learner = None
        self.records.append({"kind": "learner", "seconds": took})
        return took
