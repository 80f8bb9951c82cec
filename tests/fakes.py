"""Small test doubles: a fast fake driving env with the real contract, and an in-memory sink."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from actors.envs.driving import action_space, observation_space
from common.schema import Batch, Segment


class FakeDrivingEnv(gym.Env):
    """Random frames and vectors; episode ends after ``episode_len`` steps (terminated), or
    at ``truncate_at`` (truncated); ``nan_at`` injects a NaN vector at that global step."""

    def __init__(self, episode_len: int = 7, truncate_at: int = 10**9, nan_at: int = -1, seed: int = 0) -> None:
        self.observation_space = observation_space()
        self.action_space = action_space()
        self.episode_len = episode_len
        self.truncate_at = truncate_at
        self.nan_at = nan_at
        self.rng = np.random.default_rng(seed)
        self.global_steps = 0
        self.t = 0
        self.actions: list[np.ndarray] = []
        self.closed = False

    def _obs(self, image: np.ndarray | None = None, poison: bool = False) -> dict[str, np.ndarray]:
        frame = self.rng.integers(0, 256, (84, 84), dtype=np.uint8)
        image = np.stack([frame] * 4) if image is None else np.concatenate([image[1:], frame[None]])
        vector = self.rng.normal(size=23).astype(np.float32)
        if poison:
            vector[5] = np.nan
        return {"image": image, "vector": vector}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        self.t = 0
        self._last = self._obs()
        return self._last, {}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        self.actions.append(np.asarray(action))
        self.t += 1
        self.global_steps += 1
        self._last = self._obs(self._last["image"], poison=self.global_steps == self.nan_at)
        terminated = self.t >= self.episode_len
        truncated = not terminated and self.t >= self.truncate_at
        reason = "route_completed" if terminated else ("time_limit" if truncated else None)
        info = {"termination_reason": reason, "route_completion": min(1.0, self.t / self.episode_len)}
        return self._last, float(self.t), terminated, truncated, info

    def close(self) -> None:
        self.closed = True


class ListSink:
    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.closed = False

    def write(self, segment: Segment) -> None:
        segment.validate()
        self.segments.append(segment)

    def metrics(self) -> dict[str, float]:
        return {"sink/segments_total": len(self.segments)}

    def close(self) -> None:
        self.closed = True


def random_batch(n: int, generator: torch.Generator, terminated: torch.Tensor | None = None) -> Batch:
    """A batch of random transitions with the contract's shapes (uint8 images)."""
    g = generator
    return Batch(
        image=torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g),
        vector=torch.randn(n, 23, generator=g),
        action=torch.rand(n, 2, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_image=torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g),
        next_vector=torch.randn(n, 23, generator=g),
        terminated=terminated if terminated is not None else (torch.rand(n, generator=g) < 0.1).float(),
        policy_version=torch.zeros(n, dtype=torch.int64),
    )
