"""The thin Ray wrapper around :class:`actors.collector.Collector`; nothing else here uses Ray."""

from __future__ import annotations

import os
import threading
from typing import Any, Protocol

import ray

from common.config import from_dict
from common.protocols import SegmentSink
from common.weights import CheckpointLoader


class SinkFactory(Protocol):
    """Builds a collector's segment sink in the collector's process; a sink that can wait
    (the replay writer's rate limit) stops waiting once ``stop`` is set."""

    def __call__(self, *, stop: threading.Event) -> SegmentSink: ...


# No Ray-level restarts: the driver's supervisor replaces a dead collector itself, so that the
# replacement gets the newest weights and a fresh seed of its index's stream.
# ``stop`` has a concurrency group (a thread) of its own: it must reach a collector that is
# inside a long ``collect`` (waiting on the replay rate limit), while ``collect``, ``close`` and
# ``node`` stay one at a time in the default group (the Collector is not thread-safe; only the
# Event crosses threads). A deadline sent with each call could not know about a Ctrl-C that
# comes later. (Ray's typed overloads of ``remote`` leave out ``concurrency_groups``.)
# ``offer_weights`` has a group of its own too, so that newer weights reach a collector during a
# long ``collect`` (they load between two of its steps) without ever delaying ``stop``.
@ray.remote(max_restarts=0, max_task_retries=0, concurrency_groups={"control": 1, "weights": 1})  # type: ignore[call-overload]
class CollectorActor:
    """A Collector in its own process. Its metric dict goes back to the driver with every
    ``collect`` result; the driver exports all metrics, once (deploy/run/exporter.py).

    ``sink_factory`` builds the segment sink inside this process (deploy/ passes a replay
    writer factory), so only configuration crosses the process boundary, never data.
    """

    def __init__(
        self,
        config: dict[str, Any],
        collector_id: int,
        sink_factory: SinkFactory,
        incarnation: int = 0,
    ) -> None:
        import torch

        from actors.collector import Collector
        from actors.envs import make_env

        # One simulator and one small forward pass per step: extra torch threads only contend
        # with the other collectors and the learner for the node's cores.
        torch.set_num_threads(1)
        cfg = from_dict(config)
        self.stopping = threading.Event()
        self.collector = Collector(
            cfg,
            collector_id,
            sink_factory(stop=self.stopping),
            lambda: make_env(cfg.env, cfg.carla, index=collector_id),
            incarnation=incarnation,
            stop=self.stopping,
        )

    def node(self) -> dict[str, Any]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),
            "pid": os.getpid(),  # for per-process measurements (`convoy bench scale`)
        }

    def collect(self, num_steps: int, run_env_steps: int, weights: bytes | None) -> dict[str, float]:
        self.collector.set_run_env_steps(run_env_steps)
        if weights is not None:
            self.collector.set_weights(weights)
        return self.collector.collect(num_steps)

    @ray.method(concurrency_group="weights")
    def offer_weights(self, weights: bytes) -> dict[str, float]:
        """Newer weights while ``collect`` runs; returns once the collector acts with them (or
        after a few seconds), with the version it acts with and since when."""
        return self.collector.offer(weights)

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        """End the call in flight after its current step and make later calls return at once:
        the run is ending (Ctrl-C, SIGTERM, its time budget or a give-up)."""
        self.stopping.set()

    def close(self) -> None:
        self.collector.close()


# ``stop`` has its own concurrency group for the collector's reason: it must reach an evaluator
# that is inside a long ``evaluate_checkpoint`` (ten episodes can take a minute), or the end of
# a run would wait for those episodes and then kill the actor.
@ray.remote(max_restarts=1, max_task_retries=0, concurrency_groups={"control": 1})  # type: ignore[call-overload]
class EvaluatorActor:
    """An :class:`actors.evaluator.Evaluator` in its own process with its own simulator
    (``env_index`` picks its CARLA server the way a collector id does), so evaluations never
    take a collector's simulator or steps."""

    def __init__(self, config: dict[str, Any], env_index: int, load_checkpoint: CheckpointLoader) -> None:
        import torch

        from actors.envs import make_env
        from actors.evaluator import Evaluator

        torch.set_num_threads(1)  # one small forward pass per step, like a collector
        cfg = from_dict(config)
        videos = cfg.run.video_every_evals > 0
        self.evaluator = Evaluator(
            cfg,
            lambda: make_env(cfg.env, cfg.carla, index=env_index, render_mode="rgb_array" if videos else None),
            publish_videos=videos,
            load_checkpoint=load_checkpoint,
        )

    def evaluate_checkpoint(self, uri: str) -> tuple[dict[str, float], dict[str, int]]:
        """Evaluate the checkpoint at ``uri``, read from run storage here (``load_checkpoint``,
        given by deploy/, verifies it), so its bytes never go through the driver; its video, if
        due, is written by this process to run storage, so only the metric dict goes back."""
        return self.evaluator.evaluate_checkpoint(uri)

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        """End the evaluation in flight after its current step (it raises
        ``EvaluationStopped``); later evaluations stop at once too: the run is ending."""
        self.evaluator.stopping.set()

    def close(self) -> None:
        self.evaluator.close()
