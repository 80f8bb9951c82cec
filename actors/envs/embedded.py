"""The embedded driving simulator: highway-env's racetrack behind convoy's observation contract.

highway-env supplies the road network, vehicle dynamics, other traffic and the top-down
renderer. This adapter measures the ego vehicle's lane state and hands it to the pure driving
logic in actors/envs/driving.py, which builds the vector, the reward and the termination for
every simulator, so they mean the same as the CARLA env's:

``image``  uint8 (4, 84, 84): the last four grayscale top-down frames centred on the ego
           vehicle, oldest first (at reset the first frame is repeated).
``vector`` float32 (23,): :func:`actors.envs.driving.driving_vector` of the ego's lane state,
           with the next 10 waypoints on the lane centre (following the lane into the next).
``action`` float32 (2,) in [-1, 1]: steering (+ = left, scaled to +-45 deg), and
           throttle (>0) / brake (<0) (scaled to +-5 m/s^2).

Reward per step (:func:`driving.reward_terms` with the default :class:`driving.RewardWeights`):
progress along the lane (speed * cos(heading error) * dt, in units of ``target_speed * dt``
and capped at 1, so going faster than the target earns nothing more), minus
``CENTERING_WEIGHT * lateral^2`` (lateral in half-lane units), minus ``env.collision_penalty``
on collision or leaving the road.

``terminated`` with ``info["termination_reason"]`` in collision / off_road / route_completed;
``truncated`` at ``env.max_episode_steps`` (reason time_limit), by :func:`driving.termination`.
``info["route_completion"]`` is progress / route length in [0, 1].

With ``env.step_hz`` > 0 every step lasts at least ``1 / step_hz`` of wall time, slept out
(actors/envs/pacing.py), like a server-bound simulator: a test and benchmark aid.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import gymnasium as gym
import numpy as np

from actors.envs.driving import (
    GRAY_WEIGHTS,
    WAYPOINT_SPACING,
    RewardWeights,
    action_space,
    driving_vector,
    observation_space,
    reward_terms,
    termination,
    total_reward,
    wrap_angle,
)
from actors.envs.pacing import Pacer
from common.config import EnvConfig
from common.schema import FRAME_SHAPE, IMAGE_SHAPE, NUM_WAYPOINTS, Observation, check_action

log = logging.getLogger(__name__)

RENDER_SCALING = 2.0  # pixels per metre: 84 px show 42 m around the ego vehicle
# render(): highway-env's colour top-down view, larger than the policy's frames (videos).
RENDER_SIZE = 336  # px, square
RENDER_VIEW_SCALING = 4.0  # pixels per metre: 336 px show 84 m around the ego vehicle


def _ensure_offscreen_video() -> None:
    # highway-env's viewer disables itself under SDL's "dummy" driver and then silently
    # returns all-black frames; "offscreen" renders for real without a display.
    current = os.environ.get("SDL_VIDEODRIVER")
    if current in (None, "", "dummy"):
        if current == "dummy":
            log.warning("SDL_VIDEODRIVER=dummy renders blank frames in highway-env; using 'offscreen'")
        os.environ["SDL_VIDEODRIVER"] = "offscreen"


class EmbeddedDrivingEnv(gym.Env[Observation, np.ndarray]):
    """Lane following on highway-env's racetrack with convoy's Dict observation."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 5}  # noqa: RUF012 - gymnasium API

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = None) -> None:
        _ensure_offscreen_video()
        from highway_env.envs.common.graphics import EnvViewer
        from highway_env.envs.racetrack_env import RacetrackEnv

        self.config = config or EnvConfig()
        self.render_mode = render_mode
        self.observation_space = observation_space()
        self.action_space = action_space()
        self._sim = RacetrackEnv(
            config={
                # The inner observation is unused; Kinematics is the cheapest one that works here.
                "observation": {"type": "Kinematics", "vehicles_count": 1},
                "action": {"type": "ContinuousAction", "longitudinal": True, "lateral": True},
                "other_vehicles": self.config.other_vehicles,
                "duration": 1e9,  # time limits are ours (truncated), not highway-env's
                "offscreen_rendering": True,
            }
        )
        self._dt = 1.0 / float(self._sim.config["policy_frequency"])
        viewer_config = dict(self._sim.config)
        viewer_config.update(
            {
                "offscreen_rendering": True,
                "screen_width": FRAME_SHAPE[1],
                "screen_height": FRAME_SHAPE[0],
                "scaling": RENDER_SCALING,
                "centering_position": [0.5, 0.5],
            }
        )
        # One viewer for the env's life: highway-env's own GrayscaleObservation builds a new
        # one on every reset.
        self._viewer = EnvViewer(self._sim, config=viewer_config)
        self._viewer_config = viewer_config
        self._render_viewer: Any = None  # built on the first render() call
        self._stack = np.zeros(IMAGE_SHAPE, np.uint8)
        self._steps = 0
        self._progress = 0.0
        self._weights = RewardWeights(collision_penalty=self.config.collision_penalty)
        self._previous_action = np.zeros(2, np.float32)
        self.pacer = Pacer(self.config.step_hz)

    # ----- observation -------------------------------------------------------------------

    def _frame(self) -> np.ndarray:
        self._viewer.observer_vehicle = self._sim.vehicle
        self._viewer.display()
        # get_image() is already rows x columns (H, W, 3). highway-env's own
        # GrayscaleObservation moves the axes once more and so hands out transposed frames
        # (column-major, x down); ours keep the screen's orientation, as a camera's do.
        rgb = self._viewer.get_image()
        return np.dot(rgb[..., :3], GRAY_WEIGHTS).clip(0, 255).astype(np.uint8)

    def _lane_state(self) -> tuple[float, float, float]:
        """(longitudinal s, lateral offset m, heading error rad) w.r.t. the ego's current lane."""
        v = self._sim.vehicle
        s, lateral = v.lane.local_coordinates(v.position)
        return float(s), float(lateral), wrap_angle(float(v.heading) - float(v.lane.heading_at(s)))

    def _waypoints(self, s: float) -> np.ndarray:
        """The next NUM_WAYPOINTS lane-centre points ahead, following the lane into the next ones."""
        v = self._sim.vehicle
        network = self._sim.road.network
        lane_index, lane = v.lane_index, v.lane
        points = np.empty((NUM_WAYPOINTS, 2))
        target = s
        for k in range(NUM_WAYPOINTS):
            target += WAYPOINT_SPACING
            while target > lane.length:
                target -= lane.length
                lane_index = network.next_lane(lane_index, position=v.position)
                lane = network.get_lane(lane_index)
            points[k] = lane.position(target, 0.0)
        return points

    def _vector(self) -> np.ndarray:
        v = self._sim.vehicle
        s, lateral, heading_err = self._lane_state()
        return driving_vector(
            speed=float(v.speed),
            lateral=lateral,
            half_lane_width=float(v.lane.width_at(s)) / 2.0,
            heading_error=heading_err,
            waypoints=self._waypoints(s),
            position=np.asarray(v.position, float),
            heading=float(v.heading),
        )

    def _observation(self) -> Observation:
        return {"image": self._stack.copy(), "vector": self._vector()}

    # ----- gymnasium API -----------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        self._sim.reset(seed=seed)
        self._steps = 0
        self._progress = 0.0
        self._previous_action = np.zeros(2, np.float32)
        self._stack[:] = self._frame()
        return self._observation(), {"route_completion": 0.0, "termination_reason": None}

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        with self.pacer.step():
            return self._step(action)

    def _step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        a = check_action(action)
        # highway-env orders continuous actions [acceleration, steering]; the contract is
        # [steering, throttle/brake].
        self._sim.step(np.array([a[1], a[0]], dtype=np.float32))
        self._steps += 1
        self._stack[:-1] = self._stack[1:]
        self._stack[-1] = self._frame()

        v = self._sim.vehicle
        _, lateral, heading_err = self._lane_state()
        half_width = float(v.lane.width_at(0.0)) / 2.0
        ds = float(v.speed) * math.cos(heading_err) * self._dt
        self._progress += max(ds, 0.0)
        route_completion = min(self._progress / self.config.route_length_m, 1.0)

        reason, terminated, truncated = termination(
            collided=bool(v.crashed),
            off_road=not v.on_road or abs(lateral) > self.config.off_road_m,
            progress_m=self._progress,
            route_length_m=self.config.route_length_m,
            steps=self._steps,
            max_steps=self.config.max_episode_steps,
        )
        terms = reward_terms(
            progress_m=ds,
            dt=self._dt,
            target_speed=self.config.target_speed,
            lateral_norm=lateral / half_width,
            speed=float(v.speed),
            action=a,
            previous_action=self._previous_action,
        )
        self._previous_action = a
        reward = total_reward(terms, self._weights, reason)
        info = {
            "termination_reason": reason,
            "route_completion": route_completion,
            "progress_m": self._progress,
            "speed": float(v.speed),
        }
        return self._observation(), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        """uint8 (RENDER_SIZE, RENDER_SIZE, 3): highway-env's colour top-down view centred on
        the ego vehicle (``render_mode="rgb_array"``; None otherwise)."""
        if self.render_mode != "rgb_array":
            return None
        if self._render_viewer is None:
            from highway_env.envs.common.graphics import EnvViewer

            config = {
                **self._viewer_config,
                "screen_width": RENDER_SIZE,
                "screen_height": RENDER_SIZE,
                "scaling": RENDER_VIEW_SCALING,
            }
            self._render_viewer = EnvViewer(self._sim, config=config)
        self._render_viewer.observer_vehicle = self._sim.vehicle
        self._render_viewer.display()
        return np.ascontiguousarray(self._render_viewer.get_image()[..., :3], dtype=np.uint8)

    def close(self) -> None:
        if self._render_viewer is not None:
            self._render_viewer.close()
        self._viewer.close()
        self._sim.close()
