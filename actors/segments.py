"""Cutting a collector's stream of steps into replay segments: consecutive steps of one
episode, each frame stored once (plus the frames that rebuild the first stack and the last
next stack), with vectors, actions, rewards, flags and the policy version that acted."""

from __future__ import annotations

import numpy as np

from common.schema import STACK, Observation, Segment


class SegmentBuilder:
    """Accumulates the steps of one episode and emits :class:`Segment` objects.

    A segment is emitted when it holds ``segment_length`` steps or the episode ends. The next
    segment of the same episode starts from the last observation of the previous one, so the
    4-frame overlap is the only duplication.
    """

    def __init__(self, collector_id: int, segment_length: int) -> None:
        self.collector_id = collector_id
        self.segment_length = segment_length
        self._episode_id = -1
        self._segment_index = 0
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._frames: list[np.ndarray] = []
        self._vectors: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []
        self._terminated: list[bool] = []
        self._truncated: list[bool] = []
        self._versions: list[int] = []

    @property
    def pending_steps(self) -> int:
        return len(self._actions)

    def start_episode(self, episode_id: int, obs: Observation) -> None:
        """Begin a new episode; any unfinished steps of the previous one are dropped."""
        self._episode_id = episode_id
        self._segment_index = 0
        self._start_from(obs["image"], obs["vector"])

    def _start_from(self, image: np.ndarray, vector: np.ndarray) -> None:
        self._reset_buffers()
        self._frames.extend(image[i].copy() for i in range(STACK))
        self._vectors.append(vector.copy())

    def add(
        self,
        action: np.ndarray,
        reward: float,
        next_obs: Observation,
        terminated: bool,
        truncated: bool,
        policy_version: int,
    ) -> Segment | None:
        """Record one step; returns a finished segment when one is complete."""
        if self._episode_id < 0:
            raise RuntimeError("SegmentBuilder.add before start_episode")
        self._frames.append(next_obs["image"][-1].copy())
        self._vectors.append(next_obs["vector"].copy())
        self._actions.append(np.asarray(action, np.float32))
        self._rewards.append(float(reward))
        self._terminated.append(bool(terminated))
        self._truncated.append(bool(truncated))
        self._versions.append(int(policy_version))
        if terminated or truncated or len(self._actions) >= self.segment_length:
            segment = Segment(
                frames=np.stack(self._frames),
                vectors=np.stack(self._vectors).astype(np.float32),
                actions=np.stack(self._actions).astype(np.float32),
                rewards=np.asarray(self._rewards, np.float32),
                terminated=np.asarray(self._terminated, bool),
                truncated=np.asarray(self._truncated, bool),
                policy_versions=np.asarray(self._versions, np.int64),
                episode_id=self._episode_id,
                collector_id=self.collector_id,
                segment_index=self._segment_index,
            )
            self._segment_index += 1
            self._start_from(next_obs["image"], next_obs["vector"])
            return segment
        return None

    def drop(self) -> int:
        """Discard the unfinished segment (after a simulator failure); returns steps dropped."""
        n = len(self._actions)
        self._reset_buffers()
        self._episode_id = -1
        return n
