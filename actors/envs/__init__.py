"""Simulators behind convoy's observation/action contract (common/schema.py): a uint8
(4, 84, 84) stack of grayscale frames, a float32 (23,) driving vector, and a float32 (2,)
action (steering, throttle / brake) in [-1, 1]."""

from __future__ import annotations

import gymnasium as gym

from common.config import CarlaConfig, EnvConfig


def make_env(
    config: EnvConfig, carla: CarlaConfig | None = None, *, index: int = 0, render_mode: str | None = None
) -> gym.Env:
    """The simulator ``env.backend`` names. ``carla`` is the run's ``carla.*`` section and
    ``index`` the collector's id (which attached server it uses); both only matter for CARLA.
    ``render_mode="rgb_array"`` makes ``render()`` return frames (evaluation videos)."""
    if config.backend == "embedded":
        from actors.envs.embedded import EmbeddedDrivingEnv

        return EmbeddedDrivingEnv(config, render_mode=render_mode)
    if config.backend == "carla":
        from actors.envs.carla_env import CarlaDrivingEnv

        carla = carla or CarlaConfig()
        if carla.stand_in:
            from actors.carla.fake import FakeCarla, FakeServerHandle
            from actors.envs.pacing import Pacer

            fake = FakeCarla(pace=Pacer(config.step_hz).step)
            server = FakeServerHandle(fake, port=carla.port + 4 * index, recycle_episodes=carla.recycle_episodes)
            return CarlaDrivingEnv(config, carla, server=server, api=fake, index=index, render_mode=render_mode)
        return CarlaDrivingEnv(config, carla, index=index, render_mode=render_mode)
    raise ValueError(f"env.backend={config.backend!r}: allowed: 'embedded', 'carla'")


gym.register(id="convoy/EmbeddedDriving-v0", entry_point="actors.envs.embedded:EmbeddedDrivingEnv")
