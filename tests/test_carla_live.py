"""Against a real CARLA 0.9.16 server: run with ``pytest -m carla`` and either CARLA_HOST
(attach to a running server; CARLA_PORT, default 2000) or CARLA_ROOT (launch one). Skipped
automatically otherwise (tests/conftest.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from actors.envs import make_env
from common.config import CarlaConfig, EnvConfig
from common.schema import check_observation

pytestmark = pytest.mark.carla


def _carla_config(**kw: object) -> CarlaConfig:
    host = os.environ.get("CARLA_HOST", "")
    port = int(os.environ.get("CARLA_PORT", "2000"))
    return CarlaConfig(host=host, port=port, root=os.environ.get("CARLA_ROOT", ""), timeout_s=60.0, **kw)  # type: ignore[arg-type]


def test_one_short_episode_against_a_live_server() -> None:
    pytest.importorskip("carla")
    cfg = EnvConfig(backend="carla", max_episode_steps=40, route_length_m=100.0)
    env = make_env(cfg, _carla_config(scenario=1, npc_vehicles_light=5, recycle_episodes=0))
    try:
        obs, info = env.reset(seed=0)
        check_observation(obs)
        frames = [info["frame"]]
        ids = env.spawned_actor_ids()  # type: ignore[attr-defined]
        assert len(ids) >= 4  # ego + camera + collision + lane invasion (+ NPCs)
        done = False
        while not done:
            obs, reward, terminated, truncated, info = env.step(np.array([0.0, 0.5], np.float32))
            check_observation(obs)
            assert np.isfinite(reward)
            frames.append(info["frame"])
            done = terminated or truncated
        assert np.diff(frames).tolist() == [1] * (len(frames) - 1)  # one tick per step, synchronous
        assert info["termination_reason"] in ("collision", "off_road", "route_completed", "time_limit")
        assert "driving/route_completion" in info
        assert obs["image"].std() > 0  # the camera renders something
        world = env._world  # type: ignore[attr-defined]
        client = env._client  # type: ignore[attr-defined]
        env._destroy_actors()  # type: ignore[attr-defined]
        world.tick()
        assert not [a for a in world.get_actors(ids)], "actors the env spawned survived the reset"
        assert client is not None
    finally:
        env.close()
