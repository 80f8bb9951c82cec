"""The thin Ray wrapper around :class:`learner.loop.Learner`; nothing else here uses Ray."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from common.config import from_dict
from common.metrics import MetricsExporter
from common.protocols import BatchSource


@ray.remote(max_restarts=0)
class LearnerActor:
    """A Learner in its own process; ``source_factory`` builds its batch source in-process."""

    def __init__(self, config: dict[str, Any], source_factory: Callable[[], BatchSource], run_dir: str) -> None:
        from common.sysutil import tune_malloc_for_bulk_buffers
        from learner.loop import Learner

        tune_malloc_for_bulk_buffers()  # the sampler allocates and frees ~10 MB per batch
        cfg = from_dict(config)
        self.learner = Learner(cfg, source_factory(), run_dir)
        self.exporter = (
            MetricsExporter(cfg.run.metrics_host, labels={"component": "learner"}) if cfg.run.metrics else None
        )
        self._sent_version = 0

    def metrics_url(self) -> str | None:
        return self.exporter.url if self.exporter else None

    def train(self, num_updates: int, env_steps: int) -> tuple[dict[str, float], tuple[int, bytes] | None]:
        """Updates, then (version, message) of the newest weights if newer than the last returned."""
        metrics = self.learner.train(num_updates, env_steps)
        if self.exporter:
            self.exporter.update(metrics)
        published = self.learner.weights(newer_than=self._sent_version)
        if published is not None:
            self._sent_version = published[0]
        return metrics, published

    def restore(self, path: str) -> dict[str, Any]:
        restored = self.learner.restore(path)
        return {"checkpoint": str(restored), "updates": self.learner.updates, "env_steps": self.learner.env_steps}

    def checkpoint(self, env_steps: int) -> str:
        self.learner.env_steps = max(self.learner.env_steps, env_steps)
        return str(self.learner.checkpoint())

    def close(self) -> None:
        self.learner.close()
        if self.exporter:
            self.exporter.close()
