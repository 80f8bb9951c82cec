"""The one typed schema for what travels between components.

Observation contract (every simulator produces it, every network consumes it): ``image``
uint8 (4, 84, 84), the last four grayscale frames, oldest first; ``vector`` float32 (23,);
``action`` float32 (2,) in [-1, 1] (steering, throttle>0 / brake<0). Images stay uint8
until the learner's device.

A :class:`Segment` is consecutive steps of one episode with every frame stored once:
``frames[t:t+4]`` is the observation stack of step ``t`` and ``frames[t+1:t+5]`` its next
stack, so ``T`` steps hold ``T + 4`` frames instead of ``8 T``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

STACK = 4
FRAME_SHAPE = (84, 84)
IMAGE_SHAPE = (STACK, *FRAME_SHAPE)
VECTOR_DIM = 23
ACTION_DIM = 2
NUM_WAYPOINTS = 10

Observation = dict[str, np.ndarray]
"""``{"image": uint8 (4, 84, 84), "vector": float32 (23,)}``"""


class SchemaError(ValueError):
    """Data does not match the contract; the message names the field and what was expected."""


def _check_array(name: str, arr: Any, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
    if not isinstance(arr, np.ndarray):
        raise SchemaError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.shape != shape:
        raise SchemaError(f"{name}: expected shape {shape}, got {arr.shape}")
    if arr.dtype != np.dtype(dtype):
        raise SchemaError(f"{name}: expected dtype {np.dtype(dtype)}, got {arr.dtype}")


def check_observation(obs: Observation) -> None:
    """Raise :class:`SchemaError` unless ``obs`` follows the contract (and is finite)."""
    _check_array("image", obs.get("image"), IMAGE_SHAPE, np.uint8)
    _check_array("vector", obs.get("vector"), (VECTOR_DIM,), np.float32)
    if not np.isfinite(obs["vector"]).all():
        raise SchemaError(
            f"vector: non-finite values at indices {np.flatnonzero(~np.isfinite(obs['vector'])).tolist()}"
        )


def check_action(action: Any) -> np.ndarray:
    """The action as float32 (2,) clipped to [-1, 1]; a wrong shape or a non-finite value is a
    :class:`SchemaError` naming it (every simulator calls this before acting)."""
    a = np.asarray(action, dtype=np.float32).reshape(-1)
    if a.shape != (ACTION_DIM,):
        raise SchemaError(f"action: expected shape ({ACTION_DIM},), got {np.shape(action)}")
    if not np.isfinite(a).all():
        raise SchemaError(f"action: non-finite values {a.tolist()}")
    return np.clip(a, -1.0, 1.0)


@dataclass(frozen=True)
class Segment:
    """``T`` consecutive steps of one episode, each frame once (see module docstring)."""

    frames: np.ndarray  # uint8 (T + 4, 84, 84)
    vectors: np.ndarray  # float32 (T + 1, 23): vectors[t] for obs t, vectors[t + 1] for next obs
    actions: np.ndarray  # float32 (T, 2)
    rewards: np.ndarray  # float32 (T,)
    terminated: np.ndarray  # bool (T,): no bootstrap through these
    truncated: np.ndarray  # bool (T,): time limit; bootstrap through these
    policy_versions: np.ndarray  # int64 (T,): weight version that chose each action (0 = random)
    episode_id: int
    collector_id: int
    segment_index: int  # position of this segment within its episode

    @property
    def num_transitions(self) -> int:
        return int(self.actions.shape[0])

    def validate(self) -> None:
        t = self.num_transitions
        if t < 1:
            raise SchemaError("actions: a segment holds at least one step")
        _check_array("frames", self.frames, (t + STACK, *FRAME_SHAPE), np.uint8)
        _check_array("vectors", self.vectors, (t + 1, VECTOR_DIM), np.float32)
        _check_array("actions", self.actions, (t, ACTION_DIM), np.float32)
        _check_array("rewards", self.rewards, (t,), np.float32)
        _check_array("terminated", self.terminated, (t,), np.bool_)
        _check_array("truncated", self.truncated, (t,), np.bool_)
        _check_array("policy_versions", self.policy_versions, (t,), np.int64)
        for name in ("vectors", "actions", "rewards"):
            if not np.isfinite(getattr(self, name)).all():
                raise SchemaError(f"{name}: non-finite values")
        if (self.terminated[:-1] | self.truncated[:-1]).any():
            raise SchemaError("terminated/truncated: only the last step of a segment may end the episode")
        for name in ("episode_id", "collector_id", "segment_index"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v < 0 or v >= 2**63:
                raise SchemaError(f"{name}: expected an integer in [0, 2**63), got {v!r}")

    def transition(self, t: int) -> dict[str, np.ndarray]:
        """Rebuild transition ``t`` as full stacks (tests and debugging; the sampler does this in bulk)."""
        return {
            "image": self.frames[t : t + STACK],
            "vector": self.vectors[t],
            "action": self.actions[t],
            "reward": self.rewards[t],
            "next_image": self.frames[t + 1 : t + 1 + STACK],
            "next_vector": self.vectors[t + 1],
            "terminated": self.terminated[t],
        }


@dataclass
class Batch:
    """A batch of transitions as tensors; ``image``/``next_image`` are uint8 until the learner's device."""

    image: torch.Tensor  # uint8 (B, 4, 84, 84)
    vector: torch.Tensor  # float32 (B, 23)
    action: torch.Tensor  # float32 (B, 2)
    reward: torch.Tensor  # float32 (B,)
    next_image: torch.Tensor  # uint8 (B, 4, 84, 84)
    next_vector: torch.Tensor  # float32 (B, 23)
    terminated: torch.Tensor  # float32 (B,): 1.0 where the episode terminated (no bootstrap)
    policy_version: torch.Tensor  # int64 (B,)
    # n-step batches (learner.n_step > 1): ``reward`` is the discounted sum of the window's
    # rewards, ``next_*`` the observation after it, and this the bootstrap discount gamma^k
    # (0 where the window ended in a termination); float32 (B,). None: a one-step batch,
    # bootstrapped with gamma * (1 - terminated) (replay_service/window.py).
    discount: torch.Tensor | None = None
    # When set, uint8 (B, 5, 84, 84) and ``image``/``next_image`` are its views [:, :4] and
    # [:, 1:]: the two stacks share 3 frames, so a batch holds and moves 5 frames, not 8.
    frames: torch.Tensor | None = None

    @staticmethod
    def from_frames(frames: torch.Tensor, **rest: torch.Tensor) -> Batch:
        if frames.dim() != 4 or frames.shape[1] != STACK + 1:
            raise SchemaError(f"frames: expected shape (B, {STACK + 1}, H, W), got {tuple(frames.shape)}")
        return Batch(image=frames[:, :STACK], next_image=frames[:, 1:], frames=frames, **rest)

    @property
    def size(self) -> int:
        return int(self.action.shape[0])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        rest: dict[str, Any] = {
            k: None if v is None else fn(v)
            for k, v in self.__dict__.items()
            if k not in ("image", "next_image", "frames")
        }
        if self.frames is not None:
            return Batch.from_frames(fn(self.frames), **rest)
        return Batch(image=fn(self.image), next_image=fn(self.next_image), **rest)

    def split(self, size: int) -> list[Batch]:
        """Consecutive batches of ``size`` rows (the last may be shorter), as views."""

        def rows(start: int) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda t: t[start : start + size]

        return [self._map(rows(i)) for i in range(0, self.size, size)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


@dataclass(frozen=True)
class WeightsMessage:
    """Actor weights with the version the learner gave them; ``payload`` is safetensors bytes."""

    version: int
    payload: bytes
