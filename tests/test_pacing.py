"""env.step_hz: a paced simulator keeps its step rate and sleeps (no CPU) while it waits, as a
server-bound simulator does; the embedded env and the CARLA stand-in both honour it."""

from __future__ import annotations

import time

import pytest

from actors.envs import make_env
from actors.envs.driving import lane_following_action
from actors.envs.pacing import Pacer
from common.config import CarlaConfig, EnvConfig


def _paced_window(env: object, hz: float, steps: int) -> tuple[float, float]:
    """(steps per wall second, process CPU seconds per wall second) over ``steps`` steps."""
    obs, _ = env.reset(seed=0)  # type: ignore[attr-defined]
    wall0, cpu0 = time.monotonic(), time.process_time()
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(lane_following_action(obs["vector"]))  # type: ignore[attr-defined]
        assert not (terminated or truncated), "the window must not include a reset"
    wall = time.monotonic() - wall0
    return steps / wall, (time.process_time() - cpu0) / wall


def test_pacer_sleeps_out_the_rest_of_the_period() -> None:
    pacer = Pacer(50.0)
    t0 = time.monotonic()
    with pacer.step():
        pass
    took = time.monotonic() - t0
    assert 0.02 <= took < 0.03
    assert pacer.slept_seconds_total > 0.015
    off = Pacer(0.0)
    t0 = time.monotonic()
    with off.step():
        pass
    assert not off.enabled and time.monotonic() - t0 < 0.005
    with pytest.raises(ValueError):
        Pacer(-1.0)


def test_paced_embedded_env_keeps_its_rate_without_cpu() -> None:
    hz = 5.0  # highway-env's step takes tens of ms on a loaded machine; the period must cover it
    env = make_env(EnvConfig(step_hz=hz, other_vehicles=0, max_episode_steps=1000, route_length_m=10_000.0))
    try:
        rate, cpu = _paced_window(env, hz, 20)
    finally:
        env.close()
    assert abs(rate - hz) / hz < 0.05, f"paced at {hz} Hz, measured {rate:.2f} steps/s"
    assert cpu < 0.35, f"waiting must sleep: {cpu:.2f} CPU seconds per wall second"


def test_paced_carla_stand_in_keeps_its_rate_without_cpu() -> None:
    # The stand-in paces its server's tick, as a real server takes its time there; the env's
    # client-side work (frame, route projection) comes on top, a few ms on a loaded machine.
    hz = 5.0
    env = make_env(
        EnvConfig(backend="carla", step_hz=hz, max_episode_steps=1000, route_length_m=10_000.0),
        CarlaConfig(stand_in=True),
    )
    try:
        rate, cpu = _paced_window(env, hz, 15)
    finally:
        env.close()
    assert abs(rate - hz) / hz < 0.05, f"paced at {hz} Hz, measured {rate:.2f} steps/s"
    assert cpu < 0.35, f"waiting must sleep: {cpu:.2f} CPU seconds per wall second"
