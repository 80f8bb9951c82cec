"""The CARLA env on convoy's in-process CARLA stand-in (actors/carla/fake.py): the contract,
synchronous world set-up, frame matching, actor bookkeeping, termination, crash recovery
in the env and in the collector. No CARLA needed; the real client must not be needed either."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from actors.carla.client import INSTALL_HINT, CarlaNotInstalled, import_carla
from actors.carla.errors import SimulatorCrashed
from actors.carla.fake import FakeCarla, FakeServerHandle
from actors.collector import Collector
from actors.envs import make_env
from actors.envs.carla_env import WARMUP_TICKS, CarlaDrivingEnv
from common.config import CarlaConfig, EnvConfig, from_dict
from common.schema import check_observation
from tests.fakes import FakeDrivingEnv, ListSink


def _env(max_steps: int = 200, route_m: float = 300.0, handle_kw: dict | None = None, **carla: Any) -> CarlaDrivingEnv:
    fake = FakeCarla()
    server = FakeServerHandle(fake, port=2000, **(handle_kw or {}))
    cfg = EnvConfig(backend="carla", max_episode_steps=max_steps, route_length_m=route_m)
    return CarlaDrivingEnv(cfg, CarlaConfig(**carla), server=server, api=fake)


def _follow(obs: dict[str, np.ndarray], throttle: float = 0.6) -> np.ndarray:
    """A proportional lane follower from the contract's vector alone: steer towards the
    third route waypoint (y left in the ego frame). Only drives if the signs are right."""
    x, y = obs["vector"][7], obs["vector"][8]
    return np.array([np.clip(3.0 * np.arctan2(y, x), -1, 1), throttle], np.float32)


def test_spaces_equal_the_embedded_envs() -> None:
    from actors.envs.embedded import EmbeddedDrivingEnv

    embedded = EmbeddedDrivingEnv(EnvConfig())
    carla_env = _env()
    try:
        assert carla_env.observation_space == embedded.observation_space
        assert carla_env.action_space == embedded.action_space
    finally:
        embedded.close()
        carla_env.close()


def test_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "carla", None)  # makes `import carla` raise ImportError
    with pytest.raises(CarlaNotInstalled, match=INSTALL_HINT.replace("[", r"\[").replace("]", r"\]")):
        import_carla()
    # make_env fails on the import, before it would look for or launch a server.
    with pytest.raises(CarlaNotInstalled, match="convoy\\[carla\\]"):
        make_env(EnvConfig(backend="carla"), CarlaConfig(root="/nonexistent"))


def test_reset_sets_up_a_synchronous_world_with_a_seeded_traffic_manager() -> None:
    env = _env(town="Town03", fixed_delta_seconds=0.1)
    obs, info = env.reset(seed=3)
    fake = env.api
    assert isinstance(fake, FakeCarla)
    world = fake.servers[2000].world
    assert fake.loads_total == 1 and world.get_map().name.endswith("Town03")
    settings = world.get_settings()
    assert settings.synchronous_mode and settings.fixed_delta_seconds == 0.1
    tm = fake.servers[2000].traffic_managers[env.server.endpoint.traffic_manager_port]
    assert tm.synchronous and tm.seed is not None
    assert info["frame"] == WARMUP_TICKS and info["termination_reason"] is None
    check_observation(obs)
    env.close()
    assert not world.get_settings().synchronous_mode  # handed back asynchronous


def test_observation_matches_the_ticks_frame_and_contract() -> None:
    env = _env()
    obs, info = env.reset(seed=0)
    frames = []
    for _ in range(6):
        obs, _reward, _terminated, _truncated, info = env.step(_follow(obs))
        check_observation(obs)
        frames.append(info["frame"])
        # The stand-in draws a white row at (frame % 84) into each camera image: the newest
        # frame of the stack must be the image of exactly this tick.
        assert (obs["image"][-1][info["frame"] % 84] >= 250).all()
        assert (obs["image"][-1][(info["frame"] - 1) % 84] < 250).all()
    assert frames == list(range(frames[0], frames[0] + 6))
    for k in range(4):  # and the stack holds the ticks before it, oldest first
        assert (obs["image"][3 - k][(info["frame"] - k) % 84] >= 250).all()
    assert obs["vector"][0] > 0  # moving
    env.close()


def test_every_spawned_actor_is_destroyed_on_reset_and_close() -> None:
    env = _env(scenario=2, npc_vehicles_dense=10)
    env.reset(seed=1)
    world = env.api.servers[2000].world  # type: ignore[attr-defined]
    first = {a.id for a in world.get_actors()}
    assert len(first) == 1 + 3 + 10 == len(env.spawned_actor_ids())  # ego, camera, collision, lane invasion, NPCs
    for _ in range(3):
        env.step(np.zeros(2, np.float32))
    env.reset(seed=2)
    second = {a.id for a in world.get_actors()}
    assert len(second) == 14 and not first & second
    env.close()
    assert world.get_actors() == []


def test_scenario_presets_set_the_npc_count() -> None:
    counts = {}
    for scenario in (0, 1, 2):
        env = _env(scenario=scenario, npc_vehicles_light=3, npc_vehicles_dense=9)
        env.reset(seed=0)
        counts[scenario] = len(env._npc_ids)
        env.close()
    assert counts == {0: 0, 1: 3, 2: 9}


def test_driving_the_route_completes_it_with_leaderboard_metrics() -> None:
    env = _env(route_m=40.0, max_steps=400)
    obs, _ = env.reset(seed=0)
    for _ in range(400):
        obs, _reward, terminated, truncated, info = env.step(_follow(obs))
        if terminated or truncated:
            break
    assert terminated and not truncated and info["termination_reason"] == "route_completed"
    assert info["route_completion"] == 1.0 and info["driving/route_completion"] == 1.0
    assert info["driving/collisions_per_km"] == 0.0 and info["driving/off_road_per_km"] == 0.0
    assert info["driving/mean_speed_mps"] > 1.0 and info["driving/driving_score"] == 1.0
    assert env.server.episodes_since_launch == 1  # type: ignore[attr-defined]
    env.close()


def test_steering_off_the_road_terminates_with_off_road_and_penalty() -> None:
    env = _env()
    obs, _ = env.reset(seed=0)
    lateral = []
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(np.array([1.0, 0.6], np.float32))
        lateral.append(obs["vector"][1])
        if terminated or truncated:
            break
    assert terminated and info["termination_reason"] == "off_road"
    assert max(lateral) > 0.5  # steering left moved the ego to the left of the lane (+)
    assert reward < -4.0 and info["driving/off_road_per_km"] > 0


def test_collision_terminates_and_counts_the_infraction() -> None:
    env = _env(scenario=1, npc_vehicles_light=1)
    env.reset(seed=0)
    world = env.api.servers[2000].world  # type: ignore[attr-defined]
    npc = world.get_actors([env._npc_ids[0]])[0]
    ego = env._ego
    npc._transform.location.x = ego.get_transform().location.x + 0.5  # parked next to the ego
    npc._transform.location.y = ego.get_transform().location.y + 1.0
    npc.set_autopilot(False)
    _obs, reward, terminated, truncated, info = env.step(np.zeros(2, np.float32))
    assert terminated and not truncated and info["termination_reason"] == "collision"
    assert info["driving/infraction_penalty"] == pytest.approx(0.60)
    assert reward < -4.0
    env.close()


def test_time_limit_truncates_without_terminating() -> None:
    env = _env(max_steps=5)
    env.reset(seed=0)
    for k in range(5):
        _obs, _reward, terminated, truncated, info = env.step(np.array([0.0, -1.0], np.float32))
        assert not terminated
        assert truncated == (k == 4)
    assert info["termination_reason"] == "time_limit"
    env.close()


def test_a_dead_server_raises_simulator_crashed_and_recover_restarts_it() -> None:
    env = _env(scenario=1, npc_vehicles_light=2)
    obs, _ = env.reset(seed=0)
    env.api.crash_after(2, mode="die")  # type: ignore[attr-defined]
    env.step(np.zeros(2, np.float32))
    with pytest.raises(SimulatorCrashed, match="server process dead"):
        env.step(np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="recover"):
        env.step(np.zeros(2, np.float32))
    env.recover()
    obs, _ = env.reset(seed=1)
    check_observation(obs)
    world = env.api.servers[2000].world  # type: ignore[attr-defined]
    assert len(world.get_actors()) == 1 + 3 + 2  # only this episode's actors in the fresh server
    assert env.metrics()["simulator/restarts_total"] == 1
    env.close()


def test_a_hung_tick_is_a_crash_too() -> None:
    env = _env()
    env.reset(seed=0)
    env.api.crash_after(1, mode="hang")  # type: ignore[attr-defined]
    with pytest.raises(SimulatorCrashed, match="time-out"):
        env.step(np.zeros(2, np.float32))
    env.close()  # closing with a hung server must not raise


def test_the_server_is_recycled_every_n_episodes() -> None:
    env = _env(max_steps=2, handle_kw={"recycle_episodes": 2})
    for _ in range(3):
        env.reset(seed=0)
        env.step(np.zeros(2, np.float32))
        env.step(np.zeros(2, np.float32))
    env.reset(seed=0)
    assert env.metrics()["simulator/recycles_total"] == 1
    assert env.metrics()["simulator/launches_total"] == 2
    env.close()


# ----- the collector ---------------------------------------------------------------------------


def _collector_cfg(**carla: Any) -> Any:
    return from_dict(
        {
            "env": {"backend": "carla", "max_episode_steps": 30},
            "carla": {"stand_in": True, **carla},
            "collector": {"num_collectors": 1, "segment_length": 8, "start_steps": 10**6},
            "replay": {"capacity": 1000},
        }
    )


def test_collector_survives_a_server_crash_and_counts_the_restart() -> None:
    cfg = _collector_cfg(scenario=1, npc_vehicles_light=2)
    sink = ListSink()
    collector = Collector(cfg, 0, sink, lambda: make_env(cfg.env, cfg.carla))
    env = collector.env
    assert isinstance(env, CarlaDrivingEnv)
    env.api.crash_after(13, mode="die")  # type: ignore[attr-defined]  # at step 13 of the first episode
    metrics = collector.collect(80)
    assert metrics["collector/simulator_restarts_total"] == 1
    assert metrics["simulator/restarts_total"] == 1
    assert metrics["collector/dropped_steps_total"] == 12 - 8  # the unfinished segment after one full one
    assert metrics["collector/env_steps_total"] == 79  # the crashed step produced nothing
    written = sum(s.num_transitions for s in sink.segments)
    assert written + collector.builder.pending_steps + metrics["collector/dropped_steps_total"] == 79
    first_episode = sink.segments[0].episode_id
    crashed = [s for s in sink.segments if s.episode_id == first_episode]
    assert len(crashed) == 1 and not crashed[0].terminated.any() and not crashed[0].truncated.any()
    assert metrics["collector/episodes_total"] >= 1  # later episodes ran to their end
    assert 0.0 <= metrics["collector/driving/route_completion"] <= 1.0
    assert "collector/driving/collisions_per_km" in metrics
    collector.close()


def test_collector_rebuilds_an_env_that_cannot_recover() -> None:
    class CrashOnce(FakeDrivingEnv):
        crashed = False

        def step(self, action: np.ndarray) -> Any:
            if not CrashOnce.crashed and self.t == 3:
                CrashOnce.crashed = True
                raise SimulatorCrashed("server gone")
            return super().step(action)

    made: list[CrashOnce] = []

    def factory() -> CrashOnce:
        made.append(CrashOnce(episode_len=50))
        return made[-1]

    cfg = from_dict(
        {"collector": {"num_collectors": 1, "segment_length": 8, "start_steps": 10**6}, "replay": {"capacity": 1000}}
    )
    collector = Collector(cfg, 0, ListSink(), factory)
    metrics = collector.collect(10)
    assert len(made) == 2 and made[0].closed
    assert metrics["collector/simulator_restarts_total"] == 1 and metrics["collector/dropped_steps_total"] == 3
