"""The embedded simulator honours the observation/action contract: uint8 (4, 84, 84) image
stack, float32 (23,) vector, float32 (2,) action in [-1, 1]."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from actors.envs import make_env
from actors.envs.driving import GRAY_WEIGHTS, to_ego_frame, wrap_angle
from actors.envs.embedded import RENDER_SCALING, RENDER_SIZE, RENDER_VIEW_SCALING, EmbeddedDrivingEnv
from common.config import EnvConfig
from common.schema import FRAME_SHAPE, check_observation


@pytest.fixture(scope="module")
def env() -> EmbeddedDrivingEnv:
    e = EmbeddedDrivingEnv(EnvConfig(max_episode_steps=400))
    yield e
    e.close()


def test_spaces_match_the_contract(env: EmbeddedDrivingEnv) -> None:
    space = env.observation_space
    assert space["image"].shape == (4, 84, 84) and space["image"].dtype == np.uint8
    assert space["vector"].shape == (23,) and space["vector"].dtype == np.float32
    assert env.action_space.shape == (2,) and env.action_space.dtype == np.float32
    assert float(env.action_space.low.min()) == -1.0 and float(env.action_space.high.max()) == 1.0


def test_observations_shapes_dtypes_ranges(env: EmbeddedDrivingEnv) -> None:
    obs, info = env.reset(seed=3)
    check_observation(obs)
    assert env.observation_space.contains(obs)
    assert info["termination_reason"] is None
    for _ in range(5):
        obs, reward, _, _, info = env.step(np.array([0.0, 0.3], np.float32))
        check_observation(obs)
        assert isinstance(reward, float) and np.isfinite(reward)
        assert 0.0 <= info["route_completion"] <= 1.0
    # Speed is positive, the vehicle starts on the lane centre, waypoints lie ahead.
    v = obs["vector"]
    assert v[0] > 0
    assert abs(v[1]) < 1.0
    waypoints = v[3:].reshape(10, 2)
    assert (np.diff(waypoints[:, 0]) > 0).all(), "waypoints must go forward along the route"


def test_frames_are_not_blank_and_change(env: EmbeddedDrivingEnv) -> None:
    obs, _ = env.reset(seed=4)
    first = obs["image"][-1].copy()
    assert first.std() > 5 and len(np.unique(first)) > 2, "blank frame: check SDL_VIDEODRIVER (use offscreen)"
    for _ in range(4):
        obs, *_ = env.step(np.array([0.0, 1.0], np.float32))
    img = obs["image"]
    assert not np.array_equal(img[-1], first), "frames must change while driving"
    # The stack is oldest-first: consecutive frames differ and the last is the newest.
    assert not np.array_equal(img[0], img[-1])


def test_frames_have_the_renders_orientation() -> None:
    """The policy's frame is the centre of the colour render, in grayscale at half the scale:
    rows are the screen's rows. (highway-env's own grayscale observation is transposed.)"""
    env = EmbeddedDrivingEnv(EnvConfig(max_episode_steps=400, other_vehicles=1), render_mode="rgb_array")
    try:
        for seed in range(3):
            obs, _ = env.reset(seed=seed)
            for _ in range(3 * seed):
                obs, *_ = env.step(np.array([0.0, 0.5], np.float32))
            frame = obs["image"][-1].astype(np.float64)
            render = env.render()
            assert render is not None
            # The render's centre shows what the frame shows, at `zoom` times its pixels per metre.
            gray = render.astype(np.float64) @ np.array(GRAY_WEIGHTS)
            size, zoom = FRAME_SHAPE[0], int(RENDER_VIEW_SCALING / RENDER_SCALING)
            lo = (RENDER_SIZE - size * zoom) // 2
            centre = gray[lo : lo + size * zoom, lo : lo + size * zoom]
            centre = centre.reshape(size, zoom, size, zoom).mean(axis=(1, 3))
            same = np.corrcoef(frame.ravel(), centre.ravel())[0, 1]
            transposed = np.corrcoef(frame.T.ravel(), centre.ravel())[0, 1]
            assert same > 0.7 and transposed < 0.3, (seed, same, transposed)
    finally:
        env.close()


def test_stack_shifts_by_one_frame_per_step(env: EmbeddedDrivingEnv) -> None:
    obs, _ = env.reset(seed=5)
    nxt, *_ = env.step(np.array([0.0, 0.5], np.float32))
    np.testing.assert_array_equal(nxt["image"][:3], obs["image"][1:])


def test_truncated_is_not_terminated() -> None:
    env = EmbeddedDrivingEnv(EnvConfig(max_episode_steps=3, other_vehicles=0))
    try:
        env.reset(seed=0)
        results = [env.step(np.array([0.0, 0.0], np.float32)) for _ in range(3)]
        assert [r[3] for r in results] == [False, False, True]
        assert not any(r[2] for r in results)
        assert results[-1][4]["termination_reason"] == "time_limit"
    finally:
        env.close()


def test_leaving_the_road_terminates_with_reason() -> None:
    env = EmbeddedDrivingEnv(EnvConfig(max_episode_steps=200, other_vehicles=0))
    try:
        env.reset(seed=0)
        for _ in range(200):
            _, reward, terminated, truncated, info = env.step(np.array([1.0, 1.0], np.float32))
            if terminated or truncated:
                break
        assert terminated and not truncated
        assert info["termination_reason"] == "off_road"
        assert reward < 0  # the penalty applies on the terminal step
    finally:
        env.close()


def test_bad_actions_are_rejected_by_name(env: EmbeddedDrivingEnv) -> None:
    env.reset(seed=1)
    with pytest.raises(ValueError, match="action: expected shape"):
        env.step(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="action: non-finite"):
        env.step(np.array([np.nan, 0.0], np.float32))


def test_dummy_video_driver_is_overridden() -> None:
    """Under SDL_VIDEODRIVER=dummy highway-env renders black frames; the env must not."""
    code = (
        "import numpy as np\n"
        "from actors.envs.embedded import EmbeddedDrivingEnv\n"
        "e = EmbeddedDrivingEnv(); o, _ = e.reset(seed=0)\n"
        "assert o['image'].std() > 5, 'blank frames'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "SDL_VIDEODRIVER": "dummy"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def test_geometry_helpers() -> None:
    assert wrap_angle(3 * np.pi / 2) == pytest.approx(-np.pi / 2)
    # Ego at (1, 1) heading +90 deg: a point at (1, 3) is 2 m straight ahead.
    ego = to_ego_frame(np.array([[1.0, 3.0], [0.0, 1.0]]), np.array([1.0, 1.0]), np.pi / 2)
    np.testing.assert_allclose(ego, [[2.0, 0.0], [0.0, 1.0]], atol=1e-9)


def test_make_env_and_gym_registration() -> None:
    import gymnasium as gym

    e = make_env(EnvConfig())
    assert isinstance(e, EmbeddedDrivingEnv)
    e.close()
    g = gym.make("convoy/EmbeddedDriving-v0")
    obs, _ = g.reset(seed=0)
    check_observation(obs)
    g.close()


def test_a_lane_following_driver_completes_the_route() -> None:
    from actors.envs.driving import lane_following_action

    env = EmbeddedDrivingEnv(EnvConfig(max_episode_steps=400, other_vehicles=0, route_length_m=150.0))
    try:
        obs, _ = env.reset(seed=1)
        total, done, steps = 0.0, False, 0
        while not done:
            obs, reward, terminated, truncated, info = env.step(lane_following_action(obs["vector"]))
            total += reward
            steps += 1
            done = terminated or truncated
        assert terminated and info["termination_reason"] == "route_completed"
        assert info["route_completion"] == 1.0
        # Progress dominates the reward of a clean drive: about one per step at target speed.
        assert total > 0.5 * steps
    finally:
        env.close()
