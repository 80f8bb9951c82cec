"""Simulators behind the observation/action contract of DESIGN.md."""

from __future__ import annotations

import gymnasium as gym

from common.config import EnvConfig


def make_env(config: EnvConfig) -> gym.Env:
    """The simulator ``env.backend`` names."""
    if config.backend == "embedded":
        from actors.envs.embedded import EmbeddedDrivingEnv

        return EmbeddedDrivingEnv(config)
    raise ValueError(f"env.backend={config.backend!r}: allowed: 'embedded'")


gym.register(id="convoy/EmbeddedDriving-v0", entry_point="actors.envs.embedded:EmbeddedDrivingEnv")
