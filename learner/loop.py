"""The learner: pulls batches from a BatchSource, runs TD3 updates, publishes versioned actor
weights and writes checkpoints. Plain Python; learner.remote.LearnerActor wraps it for Ray."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConvoyConfig
from common.protocols import BatchSource
from common.weights import message_to_bytes, pack_weights
from learner.agent import TD3Agent, resolve_device
from learner.checkpoint import CheckpointData, save_checkpoint

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, cfg: ConvoyConfig, source: BatchSource, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.learner.device)
        if self.device.type == "cpu":
            torch.set_num_threads(cfg.learner.num_threads or os.cpu_count() or 1)
        torch.manual_seed(cfg.run.seed)
        self.np_rng = np.random.default_rng(cfg.run.seed)
        self.agent = TD3Agent(cfg.learner, self.device)
        self.source = source
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.weights_version = 0
        self._weights: bytes | None = None
        self.env_steps = 0
        self.last_checkpoint: Path | None = None
        self.train_seconds_total = 0.0
        self.data_wait_seconds_total = 0.0
        self._non_blocking = self.device.type == "cuda"

    @property
    def updates(self) -> int:
        return self.agent.updates

    @property
    def min_replay_size(self) -> int:
        return max(self.cfg.collector.start_steps, self.cfg.learner.batch_size)

    def ready(self) -> bool:
        """No updates before the run has ``collector.start_steps`` transitions in replay."""
        return self.source.size >= self.min_replay_size

    def train(self, num_updates: int, env_steps: int | None = None) -> dict[str, float]:
        """Run up to ``num_updates`` updates (none while replay is below the minimum size)."""
        if env_steps is not None:
            self.env_steps = max(self.env_steps, env_steps)
        if not self.ready():
            time.sleep(0.05)
            return self.metrics({})
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = defaultdict(int)
        start = time.perf_counter()
        for _ in range(num_updates):
            t0 = time.perf_counter()
            batch = next(self.source).to(self.device, non_blocking=self._non_blocking)
            self.data_wait_seconds_total += time.perf_counter() - t0
            for key, value in self.agent.update(batch).items():
                sums[key] = sums[key] + value.detach() if key in sums else value.detach().clone()
                counts[key] += 1
            # Also right after the first update: collectors leave uniform random actions as
            # soon as the learner trains, rather than publish_every updates later.
            if self.agent.updates % self.cfg.learner.publish_every == 0 or self.weights_version == 0:
                self.publish()
            if self.agent.updates % self.cfg.run.checkpoint_every_updates == 0:
                self.checkpoint()
        self.train_seconds_total += time.perf_counter() - start
        # One host sync per call, not per update.
        return self.metrics({k: float(v) / counts[k] for k, v in sums.items()})

    def publish(self) -> int:
        self.weights_version += 1
        self._weights = message_to_bytes(pack_weights(self.weights_version, self.agent.actor))
        return self.weights_version

    def weights(self, newer_than: int = -1) -> bytes | None:
        """The newest weight message if its version is above ``newer_than``."""
        return self._weights if self.weights_version > newer_than else None

    def checkpoint(self) -> Path:
        data = CheckpointData(
            networks=self.agent.state_dicts(),
            optimizers={"actor": self.agent.actor_opt.state_dict(), "critic": self.agent.critic_opt.state_dict()},
            rng={
                "torch": torch.get_rng_state(),
                **({"cuda": torch.cuda.get_rng_state()} if self.device.type == "cuda" else {}),
            },
            state={
                "env_steps": self.env_steps,
                "weights_version": self.weights_version,
                "nonfinite_total": self.agent.nonfinite_total,
                "numpy_rng": self.np_rng.bit_generator.state,
            },
            config_yaml=self.cfg.to_yaml(),
        )
        self.last_checkpoint = save_checkpoint(
            self.checkpoint_dir, self.agent.updates, data, self.cfg.run.keep_checkpoints
        )
        log.info("checkpoint %s", self.last_checkpoint)
        return self.last_checkpoint

    def metrics(self, update_metrics: dict[str, float]) -> dict[str, float]:
        out: dict[str, Any] = {f"learner/{k.replace('/', '_')}": v for k, v in update_metrics.items()}
        out.update(
            {
                "learner/updates_total": self.agent.updates,
                "learner/weights_version": self.weights_version,
                "learner/nonfinite_total": self.agent.nonfinite_total,
                "learner/train_seconds_total": self.train_seconds_total,
                "learner/data_wait_seconds_total": self.data_wait_seconds_total,
                "learner/ready": float(self.ready()),
                **self.source.metrics(),
            }
        )
        return out

    def close(self) -> None:
        self.source.close()
