"""The driver's one export edge: every component's latest metric dict to Prometheus, and the
run's learning curves to TensorBoard.

The driver already receives every component's flat metric dict (a collector's with each
``collect`` result, the learner's with each ``train`` result, a shard's when polled), so it
exports them all, once, with the entity as a label (deploy/run/exporter.py has the rules).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

from actors.metric_keys import (
    COLLECTOR_MEAN_RETURN,
    COLLECTOR_ROUTE_COMPLETION,
    COLLECTOR_SUCCESS_RATE,
    EVAL_RETURN,
    EVAL_ROUTE_COMPLETION,
    EVAL_SUCCESS_RATE,
    EVAL_WEIGHTS_VERSION,
)
from common.config import ConvoyConfig
from deploy.run.curves import CurveWriter
from deploy.run.exporter import MetricsExporter
from learner.metric_keys import (
    ACTOR_GRAD_NORM_CLIPPED_KEY,
    ACTOR_GRAD_NORM_KEY,
    ACTOR_LOSS_KEY,
    CRITIC_GRAD_NORM_CLIPPED_KEY,
    CRITIC_GRAD_NORM_KEY,
    CRITIC_LOSS_KEY,
    CRITIC_Q_MAX_KEY,
    CRITIC_Q_MEAN_KEY,
    CRITIC_TARGET_MEAN_KEY,
    POLICY_LAG_MAX_KEY,
    POLICY_LAG_MEAN_KEY,
)

# TensorBoard tag -> flat key of the learner's dict.
LEARNER_CURVES = {
    "loss/critic": CRITIC_LOSS_KEY,
    "loss/actor": ACTOR_LOSS_KEY,
    "q/mean": CRITIC_Q_MEAN_KEY,
    "q/max": CRITIC_Q_MAX_KEY,
    "q/target_mean": CRITIC_TARGET_MEAN_KEY,
    "grad_norm/critic": CRITIC_GRAD_NORM_KEY,
    "grad_norm/critic_clipped": CRITIC_GRAD_NORM_CLIPPED_KEY,
    "grad_norm/actor": ACTOR_GRAD_NORM_KEY,
    "grad_norm/actor_clipped": ACTOR_GRAD_NORM_CLIPPED_KEY,
    "policy_lag/mean": POLICY_LAG_MEAN_KEY,
    "policy_lag/max": POLICY_LAG_MAX_KEY,
}
# TensorBoard tag -> flat key of each collector's dict, averaged over collectors.
COLLECTOR_CURVES = {
    "return/train": COLLECTOR_MEAN_RETURN,
    "route_completion/train": COLLECTOR_ROUTE_COMPLETION,
    "success_rate/train": COLLECTOR_SUCCESS_RATE,
}
EVAL_CURVES = {
    "return/eval": EVAL_RETURN,
    "route_completion/eval": EVAL_ROUTE_COMPLETION,
    "success_rate/eval": EVAL_SUCCESS_RATE,
}


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def curve_scalars(
    summary: Mapping[str, float],
    collectors: Iterable[Mapping[str, float]],
    learner: Mapping[str, float],
) -> dict[str, float]:
    """The TensorBoard scalars of one progress tick (throughput is added by :class:`RunTelemetry`)."""
    collectors = list(collectors)
    out = {tag: _mean(m.get(key, math.nan) for m in collectors) for tag, key in COLLECTOR_CURVES.items()}
    out.update({tag: float(learner.get(key, math.nan)) for tag, key in LEARNER_CURVES.items()})
    out["replay/size"] = float(summary.get("run/replay_size", math.nan))
    out["collectors/live"] = float(summary.get("run/collectors_live", math.nan))
    return out


class RunTelemetry:
    """Feeds a :class:`MetricsExporter` and a :class:`CurveWriter` from the driver's progress.

    ``tick`` is cheap to call on every supervisor iteration: it exports at most every
    ``export_every_s`` and adds a curve point at most every ``run.progress_every_s``.
    """

    def __init__(self, cfg: ConvoyConfig, run: str, backend: str = "ray", export_every_s: float = 1.0) -> None:
        self.exporter = MetricsExporter(run, backend=backend) if cfg.run.metrics else None
        self.curves = CurveWriter(cfg.run.out_dir)
        self.export_every_s = export_every_s
        self.curve_every_s = cfg.run.progress_every_s
        self._next_export = 0.0
        self._next_curve = 0.0
        self._last_point: tuple[float, float, float] | None = None  # elapsed, env steps, updates
        self._last_eval: tuple[float, ...] | None = None

    def export(
        self,
        summary: Mapping[str, float],
        collectors: Mapping[int, Mapping[str, float]],
        learner: Mapping[str, float],
        shards: Mapping[int, Mapping[str, float]],
        evaluation: Mapping[str, float],
    ) -> None:
        if self.exporter is None:
            return
        self.exporter.update(summary, component="driver")
        for index, values in collectors.items():
            self.exporter.update(values, component="collector", collector=str(index))
        if learner:
            self.exporter.update(learner, component="learner")
        for index, values in shards.items():
            self.exporter.update(values, component="shard", shard=str(index))
        if evaluation:
            self.exporter.update(evaluation, component="evaluator")

    def add_curves(
        self,
        summary: Mapping[str, float],
        collectors: Iterable[Mapping[str, float]],
        learner: Mapping[str, float],
        evaluation: Mapping[str, float],
    ) -> None:
        scalars = curve_scalars(summary, collectors, learner)
        elapsed = float(summary.get("run/elapsed_seconds", 0.0))
        steps = float(summary.get("run/env_steps_total", 0.0))
        updates = float(summary.get("run/updates_total", 0.0))
        if self._last_point is not None and elapsed > self._last_point[0]:
            dt = elapsed - self._last_point[0]
            scalars["throughput/env_steps_per_s"] = (steps - self._last_point[1]) / dt
            scalars["throughput/updates_per_s"] = (updates - self._last_point[2]) / dt
        self._last_point = (elapsed, steps, updates)
        # An evaluation is one point, at the env step it was reported at, not repeated every tick.
        current = tuple(float(evaluation.get(k, math.nan)) for k in (*EVAL_CURVES.values(), EVAL_WEIGHTS_VERSION))
        if evaluation and current != self._last_eval:
            self._last_eval = current
            scalars.update({tag: float(evaluation.get(key, math.nan)) for tag, key in EVAL_CURVES.items()})
        self.curves.add(scalars, int(steps), elapsed)

    def tick(self, progress: Any, evaluation: Mapping[str, float] | None = None, force: bool = False) -> None:
        """``progress``: deploy.run.supervisor.Progress (``summary()``, ``collector``, ``learner``,
        ``shards``); ``evaluation``: the latest ``eval/...`` results (EvalScheduler.summary())."""
        now = time.monotonic()
        export_due, curve_due = force or now >= self._next_export, force or now >= self._next_curve
        if not (export_due or curve_due):
            return
        summary = progress.summary()
        evaluation = evaluation or {}
        if export_due:
            self._next_export = now + self.export_every_s
            self.export(summary, progress.collector, progress.learner, progress.shards, evaluation)
        if curve_due:
            self._next_curve = now + self.curve_every_s
            self.add_curves(summary, progress.collector.values(), progress.learner, evaluation)

    def close(self, progress: Any | None = None, evaluation: Mapping[str, float] | None = None) -> None:
        """A last export and curve point (the run's final counters), then flush both."""
        try:
            if progress is not None:
                self.tick(progress, evaluation, force=True)
        finally:
            if self.exporter is not None:
                self.exporter.close()
            self.curves.close()
