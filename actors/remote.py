"""The thin Ray wrapper around :class:`actors.collector.Collector`; nothing else here uses Ray."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from common.config import from_dict
from common.metrics import MetricsExporter
from common.protocols import SegmentSink


@ray.remote(max_restarts=3, max_task_retries=0)
class CollectorActor:
    """A Collector in its own process, exporting its metrics on its own Prometheus endpoint.

    ``sink_factory`` builds the segment sink inside this process (deploy/ passes a replay
    writer factory), so only configuration crosses the process boundary, never data.
    """

    def __init__(
        self,
        config: dict[str, Any],
        collector_id: int,
        sink_factory: Callable[[], SegmentSink],
    ) -> None:
        import torch

        from actors.collector import Collector
        from actors.envs import make_env

        # One simulator and one small forward pass per step: extra torch threads only contend
        # with the other collectors and the learner for the node's cores.
        torch.set_num_threads(1)
        cfg = from_dict(config)
        self.collector = Collector(
            cfg, collector_id, sink_factory(), lambda: make_env(cfg.env, cfg.carla, index=collector_id)
        )
        self.exporter = (
            MetricsExporter(cfg.run.metrics_host, labels={"component": "collector", "collector": str(collector_id)})
            if cfg.run.metrics
            else None
        )

    def metrics_url(self) -> str | None:
        return self.exporter.url if self.exporter else None

    def collect(self, num_steps: int, run_env_steps: int, weights: bytes | None) -> dict[str, float]:
        self.collector.set_run_env_steps(run_env_steps)
        if weights is not None:
            self.collector.set_weights(weights)
        metrics = self.collector.collect(num_steps)
        if self.exporter:
            self.exporter.update(metrics)
        return metrics

    def close(self) -> None:
        self.collector.close()
        if self.exporter:
            self.exporter.close()
