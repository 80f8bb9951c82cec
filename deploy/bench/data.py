"""Realistic replay data for benchmarks: segments recorded from the embedded simulator."""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np

from actors.envs.driving import lane_following_action
from actors.envs.embedded import EmbeddedDrivingEnv
from actors.segments import SegmentBuilder
from common.config import EnvConfig
from common.schema import Segment


def record_segments(
    num_steps: int, segment_length: int = 64, seed: int = 0, log: TextIO | None = sys.stderr
) -> list[Segment]:
    """Drive the embedded simulator with the lane-following controller plus exploration
    noise (episodes of realistic length, real rendered frames) and cut the stream into
    segments exactly as a collector does."""
    env = EmbeddedDrivingEnv(EnvConfig(max_episode_steps=400))
    rng = np.random.default_rng(seed)
    builder = SegmentBuilder(collector_id=0, segment_length=segment_length)
    segments: list[Segment] = []
    episode = 0
    obs, _ = env.reset(seed=seed)
    builder.start_episode(episode, obs)
    try:
        for step in range(num_steps):
            action = np.clip(lane_following_action(obs["vector"]) + rng.normal(0, 0.1, 2), -1, 1).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            seg = builder.add(action, float(reward), obs, terminated, truncated, policy_version=1)
            if seg is not None:
                segments.append(seg)
            if terminated or truncated:
                episode += 1
                obs, _ = env.reset(seed=seed + episode)
                builder.start_episode(episode, obs)
            if log is not None and (step + 1) % 500 == 0:
                print(f"  recorded {step + 1}/{num_steps} embedded-simulator steps", file=log, flush=True)
    finally:
        env.close()
    return segments
