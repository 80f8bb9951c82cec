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

from common.config import ConvoyConfig
from deploy.run.curves import CurveWriter
from deploy.run.exporter import MetricsExporter

# TensorBoard tag -> flat key of the learner's dict.
LEARNER_CURVES = {
    "loss/critic": "learner/critic_loss",
    "loss/actor": "learner/actor_loss",
    "q/mean": "learner/critic_q_mean",
    "q/max": "learner/critic_q_max",
    "q/target_mean": "learner/critic_target_mean",
    "grad_norm/critic": "learner/critic_grad_norm",
    "grad_norm/critic_clipped": "learner/critic_grad_norm_clipped",
    "grad_norm/actor": "learner/actor_grad_norm",
    "grad_norm/actor_clipped": "learner/actor_grad_norm_clipped",
    "policy_lag/mean": "learner/policy_lag_mean",
    "policy_lag/max": "learner/policy_lag_max",
}
# TensorBoard tag -> flat key of each collector's dict, averaged over collectors.
COLLECTOR_CURVES = {
    "return/train": "collector/mean_return",
    "route_completion/train": "collector/route_completion",
    "success_rate/train": "collector/success_rate",
}
EVAL_CURVES = {
    "return/eval": "eval/return",
    "route_completion/eval": "eval/route_completion",
    "success_rate/eval": "eval/success_rate",
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
        current = tuple(float(evaluation.get(k, math.nan)) for k in (*EVAL_CURVES.values(), "eval/weights_version"))
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
