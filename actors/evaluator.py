"""The evaluator: the deterministic policy (no exploration noise) on fixed seeds.

Plain Python; ``actors.remote.EvaluatorActor`` is the thin Ray wrapper the driver runs next to
the collectors, in its own process with its own simulator, so evaluating never takes a
collector's simulator or steps. It receives weights in the same message format as the
collectors (common/weights.py: msgpack + safetensors, never pickle), or loads the checkpoint
it is told to evaluate from run storage itself (``evaluate_checkpoint``, with the checkpoint
reader it was given), so checkpoint bytes never pass through the driver.

Every evaluation plays the same episodes: episode ``k`` resets with seed ``run.eval_seed + k``,
so two evaluations differ only by the weights, and "best" compares like with like.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from actors.envs.driving import DRIVING_PREFIX
from common.config import ConvoyConfig
from common.networks import Actor
from common.schema import check_observation
from common.weights import CheckpointLoader, load_into, message_from_bytes

log = logging.getLogger(__name__)

# Episode endings counted as rates over the evaluation's episodes (infractions of the
# embedded env; CARLA's leaderboard-style "driving/*" metrics are averaged as well).
ENDINGS = ("route_completed", "collision", "off_road", "time_limit")

# Metric keys of Evaluator.evaluate() that other components read (the eval scheduler's
# choice of the best checkpoint, the training curves, `convoy evaluate`, the learning bench).
EVAL_PREFIX = "eval/"
EVAL_RETURN = "eval/return"
EVAL_RETURN_MIN = "eval/return_min"
EVAL_ROUTE_COMPLETION = "eval/route_completion"
EVAL_SUCCESS_RATE = "eval/success_rate"
EVAL_COLLISION_RATE = "eval/collision_rate"
EVAL_OFF_ROAD_RATE = "eval/off_road_rate"
EVAL_EPISODE_STEPS = "eval/episode_steps"
EVAL_WEIGHTS_VERSION = "eval/weights_version"
EVAL_DRIVING_PREFIX = EVAL_PREFIX + DRIVING_PREFIX  # the env's "driving/*" episode metrics, averaged


class Evaluator:
    """Runs ``episodes`` deterministic episodes of the newest weights it was given."""

    def __init__(
        self,
        cfg: ConvoyConfig,
        env_factory: Callable[[], gym.Env],
        episodes: int | None = None,
        seed: int | None = None,
        load_checkpoint: CheckpointLoader | None = None,
    ) -> None:
        self.cfg = cfg
        self.load_checkpoint = load_checkpoint
        self.episodes = cfg.run.eval_episodes if episodes is None else episodes
        if self.episodes < 1:
            raise ValueError(f"run.eval_episodes={self.episodes}: must be >= 1")
        self.seed = cfg.run.eval_seed if seed is None else seed
        self.env = env_factory()
        self.policy = Actor(cfg.learner.encoder, cfg.learner.hidden_dim).eval()
        self.policy.requires_grad_(False)
        self.weights_version = -1  # nothing loaded yet
        self.evaluations_total = 0

    def set_weights(self, message: bytes) -> int:
        """Load a weight message (any version: the driver may evaluate an older checkpoint)."""
        msg = message_from_bytes(message)
        load_into(self.policy, msg.payload)
        self.weights_version = msg.version
        return msg.version

    def load_actor_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load an actor state dict (a checkpoint's ``actor`` network) as weights ``version``."""
        self.policy.load_state_dict(state)
        self.weights_version = version

    def evaluate_checkpoint(self, uri: str) -> tuple[dict[str, float], dict[str, int]]:
        """Load the checkpoint at ``uri`` (verified by the reader) and evaluate its actor:
        (the ``eval/...`` metrics, the checkpoint's ``updates`` and ``env_steps``)."""
        if self.load_checkpoint is None:
            raise RuntimeError("evaluator: built without a checkpoint reader; pass load_checkpoint")
        checkpoint = self.load_checkpoint(uri)
        self.load_actor_state(checkpoint.actor, checkpoint.weights_version)
        return self.evaluate(), {"updates": checkpoint.updates, "env_steps": checkpoint.env_steps}

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            image = torch.from_numpy(obs["image"])[None]
            return self.policy(image, torch.from_numpy(obs["vector"])[None])[0].numpy()

    def evaluate(
        self,
        message: bytes | None = None,
        on_episode: Callable[[int, float, int, dict[str, Any]], None] | None = None,
    ) -> dict[str, float]:
        """Play the fixed episodes; returns a flat dict of ``eval/...`` means over episodes.

        ``on_episode(index, return, steps, final info)`` is called after each episode (progress
        output for ``convoy evaluate``)."""
        if message is not None:
            self.set_weights(message)
        if self.weights_version < 0:
            raise RuntimeError("evaluator: no weights loaded; pass a weight message")
        start = time.perf_counter()
        returns, completion, steps = [], [], []
        endings = dict.fromkeys(ENDINGS, 0)
        driving: dict[str, list[float]] = {}
        for ep in range(self.episodes):
            obs, info = self.env.reset(seed=self.seed + ep)
            check_observation(obs)
            total, n, done = 0.0, 0, False
            while not done:
                obs, reward, terminated, truncated, info = self.env.step(self.act(obs))
                total += float(reward)
                n += 1
                done = terminated or truncated
            if on_episode is not None:
                on_episode(ep, total, n, info)
            returns.append(total)
            completion.append(float(info.get("route_completion", 0.0)))
            steps.append(n)
            reason = info.get("termination_reason")
            if reason in endings:
                endings[reason] += 1
            for key, value in info.items():
                if key.startswith(DRIVING_PREFIX):
                    driving.setdefault(key, []).append(float(value))
        self.evaluations_total += 1
        out = {
            EVAL_RETURN: float(np.mean(returns)),
            EVAL_RETURN_MIN: float(np.min(returns)),
            EVAL_ROUTE_COMPLETION: float(np.mean(completion)),
            EVAL_SUCCESS_RATE: endings["route_completed"] / self.episodes,
            EVAL_COLLISION_RATE: endings["collision"] / self.episodes,
            EVAL_OFF_ROAD_RATE: endings["off_road"] / self.episodes,
            "eval/time_limit_rate": endings["time_limit"] / self.episodes,
            EVAL_EPISODE_STEPS: float(np.mean(steps)),
            "eval/episodes": float(self.episodes),
            EVAL_WEIGHTS_VERSION: float(self.weights_version),
            "eval/seconds": time.perf_counter() - start,
            **{f"{EVAL_PREFIX}{key}": float(np.mean(values)) for key, values in driving.items()},
        }
        log.info(
            "evaluation of weights v%d: route completion %.3f, success %.2f, return %.2f",
            self.weights_version,
            out[EVAL_ROUTE_COMPLETION],
            out[EVAL_SUCCESS_RATE],
            out[EVAL_RETURN],
        )
        return out

    def metrics(self) -> dict[str, Any]:
        return {"evaluator/evaluations_total": self.evaluations_total}

    def close(self) -> None:
        self.env.close()
