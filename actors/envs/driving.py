"""Pure driving logic shared by convoy's simulators: the observation and action spaces, route
geometry, the contract's vector, the reward terms, termination and leaderboard-style driving
metrics. Every rule of the driving task is written here once; the simulator adapters
(actors/envs/embedded.py for highway-env, actors/envs/carla_env.py for CARLA) measure the
world and call these functions, and this module imports neither of them.

Everything here works in a right-handed world frame (x east, y north, heading counter-
clockwise from +x, metres and radians), the frame the embedded env uses. CARLA's world is
left-handed (y points right, yaw clockwise seen from above); :func:`from_carla_xy_yaw` is
the one conversion, so "+ = left" means the same for lateral offsets, heading errors,
waypoints and steering in every simulator.

The vector (float32, 23), scaled to roughly [-1, 1]:
    [0]  speed / SPEED_SCALE (m/s)
    [1]  lateral offset from the lane (route) centre / (lane width / 2)
    [2]  heading error w.r.t. the lane direction / pi (wrapped to [-1, 1])
    [3:23] the next 10 route waypoints, WAYPOINT_SPACING apart, as (x forward, y left) in the
    ego frame / WAYPOINT_SCALE (m)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from common.schema import ACTION_DIM, IMAGE_SHAPE, NUM_WAYPOINTS, VECTOR_DIM

__all__ = [
    "CENTERING_WEIGHT",
    "GRAY_WEIGHTS",
    "SPEED_SCALE",
    "WAYPOINT_SCALE",
    "WAYPOINT_SPACING",
    "DrivingMetrics",
    "RewardWeights",
    "Route",
    "RouteProjection",
    "action_space",
    "driving_vector",
    "from_carla_xy_yaw",
    "lane_following_action",
    "observation_space",
    "reward_terms",
    "termination",
    "to_ego_frame",
    "total_reward",
    "wrap_angle",
]

SPEED_SCALE = 10.0
WAYPOINT_SPACING = 4.0
WAYPOINT_SCALE = 20.0
CENTERING_WEIGHT = 0.2
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R BT.601 luma, RGB -> grayscale frames


def observation_space() -> gym.spaces.Dict:
    return gym.spaces.Dict(
        {
            "image": gym.spaces.Box(0, 255, IMAGE_SHAPE, np.uint8),
            "vector": gym.spaces.Box(-np.inf, np.inf, (VECTOR_DIM,), np.float32),
        }
    )


def action_space() -> gym.spaces.Box:
    return gym.spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)


def wrap_angle(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def to_ego_frame(points: np.ndarray, position: np.ndarray, heading: float) -> np.ndarray:
    """World points (N, 2) -> ego frame (x forward, y left)."""
    d = points - position
    c, s = math.cos(heading), math.sin(heading)
    return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]], axis=1)


def from_carla_xy_yaw(x: float, y: float, yaw_deg: float) -> tuple[float, float, float]:
    """CARLA's left-handed (x, y, yaw in degrees) -> right-handed (x, y, heading in radians)."""
    return float(x), -float(y), wrap_angle(-math.radians(float(yaw_deg)))


# ----- route geometry ----------------------------------------------------------------------


@dataclass(frozen=True)
class RouteProjection:
    s: float  # arc length of the closest route point (m)
    lateral: float  # signed distance from the route, + = left of its direction (m)
    heading: float  # route direction at s (rad)
    index: int  # segment index, the search hint for the next projection


class Route:
    """A polyline from spawn to goal (plus look-ahead beyond the goal), with arc lengths.

    Projection searches a window of segments ahead of the previous one, so a route that
    passes near itself (a loop, a parallel street) never makes the ego jump along it.
    """

    SEARCH_BACK = 2
    SEARCH_AHEAD = 40

    def __init__(self, points: np.ndarray, goal_s: float | None = None) -> None:
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2:
            raise ValueError(f"route points: expected shape (N >= 2, 2), got {pts.shape}")
        seg = np.diff(pts, axis=0)
        seg_len = np.hypot(seg[:, 0], seg[:, 1])
        keep = np.concatenate([[True], seg_len > 1e-6])  # drop repeated points
        pts = pts[keep]
        if len(pts) < 2:
            raise ValueError("route points: all points coincide")
        self.points = pts
        self._seg = np.diff(pts, axis=0)
        self._seg_len = np.hypot(self._seg[:, 0], self._seg[:, 1])
        self.cumulative = np.concatenate([[0.0], np.cumsum(self._seg_len)])
        self.length = float(self.cumulative[-1])
        self.goal_s = self.length if goal_s is None else float(min(goal_s, self.length))

    def project(self, position: np.ndarray, hint: int = 0) -> RouteProjection:
        p = np.asarray(position, dtype=np.float64)
        lo = max(hint - self.SEARCH_BACK, 0)
        hi = min(hint + self.SEARCH_AHEAD, len(self._seg))
        seg, seg_len = self._seg[lo:hi], self._seg_len[lo:hi]
        d = p - self.points[lo:hi]
        t = np.clip((d * seg).sum(axis=1) / seg_len**2, 0.0, 1.0)
        closest = self.points[lo:hi] + t[:, None] * seg
        dist = np.hypot(*(p - closest).T)
        k = int(np.argmin(dist))
        i = lo + k
        direction = seg[k] / seg_len[k]
        rel = p - self.points[i]
        lateral = float(direction[0] * rel[1] - direction[1] * rel[0])  # cross product: + = left
        return RouteProjection(
            s=float(self.cumulative[i] + t[k] * seg_len[k]),
            lateral=lateral,
            heading=math.atan2(direction[1], direction[0]),
            index=i,
        )

    def point_at(self, s: float) -> np.ndarray:
        """The point at arc length ``s``; beyond either end, extended along the end segment."""
        return self.points_at(np.array([s], dtype=np.float64))[0]

    def points_at(self, s: np.ndarray) -> np.ndarray:
        """:meth:`point_at` of each arc length in ``s`` (1-D), as an (n, 2) array."""
        i = np.clip(np.searchsorted(self.cumulative, s, side="right") - 1, 0, len(self._seg) - 1)
        return self.points[i] + ((s - self.cumulative[i]) / self._seg_len[i])[:, None] * self._seg[i]

    def points_ahead(self, s: float, n: int = NUM_WAYPOINTS, spacing: float = WAYPOINT_SPACING) -> np.ndarray:
        """``n`` points at ``s + spacing, s + 2 spacing, ...`` (the vector's waypoints). One
        vectorised lookup: it runs every env step of every CARLA collector."""
        return self.points_at(s + spacing * np.arange(1, n + 1, dtype=np.float64))


# ----- observation vector -------------------------------------------------------------------


def driving_vector(
    speed: float,
    lateral: float,
    half_lane_width: float,
    heading_error: float,
    waypoints: np.ndarray,
    position: np.ndarray,
    heading: float,
) -> np.ndarray:
    """The 23-float vector of the contract (layout and scaling in the module docstring)."""
    out = np.empty(VECTOR_DIM, np.float32)
    out[0] = speed / SPEED_SCALE
    out[1] = lateral / half_lane_width
    out[2] = wrap_angle(heading_error) / math.pi
    out[3:] = (
        to_ego_frame(np.asarray(waypoints, float), np.asarray(position, float), heading) / WAYPOINT_SCALE
    ).reshape(-1)
    return out


# ----- reward and termination ---------------------------------------------------------------


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward terms. The defaults (speed and comfort off) are the embedded env's
    reward: progress - CENTERING_WEIGHT * lateral^2 - penalty."""

    progress: float = 1.0
    centering: float = CENTERING_WEIGHT
    speed: float = 0.0
    comfort: float = 0.0
    collision_penalty: float = 5.0


def reward_terms(
    progress_m: float,
    dt: float,
    target_speed: float,
    lateral_norm: float,
    speed: float,
    action: np.ndarray,
    previous_action: np.ndarray,
) -> dict[str, float]:
    """Unweighted reward terms of one step, each of order 1.

    progress   metres gained along the route in units of ``target_speed * dt``, capped at 1
               (faster than the target earns nothing more; reversing is negative)
    centering  -(lateral offset in half-lane units)^2
    speed      1 at the target speed, falling linearly to 0 at standstill and at twice it
    comfort    -(|d steer| + |d throttle|) / 4, in [-1, 0] (each action is in [-1, 1])
    """
    a = np.asarray(action, np.float64)
    b = np.asarray(previous_action, np.float64)
    return {
        "progress": min(progress_m / (target_speed * dt), 1.0),
        "centering": -(lateral_norm**2),
        "speed": max(0.0, 1.0 - abs(speed - target_speed) / target_speed),
        "comfort": -float(np.abs(a - b).sum()) / 4.0,
    }


def total_reward(terms: dict[str, float], weights: RewardWeights, reason: str | None) -> float:
    r = (
        weights.progress * terms["progress"]
        + weights.centering * terms["centering"]
        + weights.speed * terms["speed"]
        + weights.comfort * terms["comfort"]
    )
    if reason in ("collision", "off_road"):
        r -= weights.collision_penalty
    return float(r)


def termination(
    collided: bool, off_road: bool, progress_m: float, route_length_m: float, steps: int, max_steps: int
) -> tuple[str | None, bool, bool]:
    """(reason, terminated, truncated) with the embedded env's precedence: collision, then
    off_road, then route_completed; the time limit only truncates (TD3 bootstraps through it)."""
    reason: str | None = None
    if collided:
        reason = "collision"
    elif off_road:
        reason = "off_road"
    elif progress_m >= route_length_m:
        reason = "route_completed"
    terminated = reason is not None
    truncated = not terminated and steps >= max_steps
    if truncated:
        reason = "time_limit"
    return reason, terminated, truncated


# ----- driving metrics ----------------------------------------------------------------------

# CARLA leaderboard 1.0 infraction coefficients (leaderboard.carla.org/#driving-score):
# a collision multiplies the driving score by 0.50 (pedestrian), 0.60 (vehicle), 0.65 (other).
COLLISION_COEFFICIENTS = {"walker": 0.50, "vehicle": 0.60, "static": 0.65}
MIN_DISTANCE_KM = 0.001  # per-km rates divide by at least 1 m, so a crash at the start is finite


def collision_kind(other_type_id: str) -> str:
    if other_type_id.startswith("walker."):
        return "walker"
    if other_type_id.startswith("vehicle."):
        return "vehicle"
    return "static"


DRIVING_PREFIX = "driving/"
"""Prefix of the per-episode driving metrics in an episode's last ``info`` (:class:`DrivingMetrics`)."""


class DrivingMetrics:
    """One episode's driving metrics as the CARLA leaderboard reports them: route completion,
    infractions per km driven, mean speed, and the driving score (route completion times the
    infraction coefficients)."""

    KEYS = (
        "driving/route_completion",
        "driving/distance_km",
        "driving/mean_speed_mps",
        "driving/collisions_per_km",
        "driving/lane_invasions_per_km",
        "driving/off_road_per_km",
        "driving/infraction_penalty",
        "driving/driving_score",
    )

    def __init__(self, route_length_m: float) -> None:
        self.route_length_m = route_length_m
        self.progress_m = 0.0
        self.steps = 0
        self._speed_sum = 0.0
        self._collided_with: dict[int, str] = {}
        self.lane_invasions = 0
        self.off_road_events = 0
        self._off_road = False

    def step(self, speed: float, progress_m: float) -> None:
        self.steps += 1
        self._speed_sum += speed
        self.progress_m = max(self.progress_m, progress_m)

    def collision(self, other_actor_id: int, other_type_id: str) -> None:
        """Many sensor events per contact; one infraction per other actor (as the leaderboard)."""
        self._collided_with.setdefault(other_actor_id, collision_kind(other_type_id))

    def lane_invasion(self, count: int = 1) -> None:
        self.lane_invasions += count

    def set_off_road(self, off_road: bool) -> None:
        """Counts each time the ego leaves the road, not each step it stays off it."""
        if off_road and not self._off_road:
            self.off_road_events += 1
        self._off_road = off_road

    @property
    def collisions(self) -> int:
        return len(self._collided_with)

    def summary(self) -> dict[str, float]:
        km = self.progress_m / 1000.0
        per_km = max(km, MIN_DISTANCE_KM)
        completion = min(self.progress_m / self.route_length_m, 1.0)
        penalty = 1.0
        for kind in self._collided_with.values():
            penalty *= COLLISION_COEFFICIENTS[kind]
        return {
            "driving/route_completion": completion,
            "driving/distance_km": km,
            "driving/mean_speed_mps": self._speed_sum / self.steps if self.steps else 0.0,
            "driving/collisions_per_km": self.collisions / per_km,
            "driving/lane_invasions_per_km": self.lane_invasions / per_km,
            "driving/off_road_per_km": self.off_road_events / per_km,
            "driving/infraction_penalty": penalty,
            "driving/driving_score": completion * penalty,
        }


# ----- a scripted driver ----------------------------------------------------------------------


def lane_following_action(vector: np.ndarray, target_speed: float = 8.0) -> np.ndarray:
    """A scripted pure-pursuit driver on the contract's vector (benchmark data, tests, a
    baseline for evaluation): steer towards the 2nd waypoint, hold ``target_speed``.
    It follows the lane but does not avoid other vehicles."""
    x, y = vector[5] * WAYPOINT_SCALE, vector[6] * WAYPOINT_SCALE
    steer = float(np.clip(math.atan2(y, x) / (math.pi / 4), -1.0, 1.0))
    throttle = float(np.clip((target_speed - vector[0] * SPEED_SCALE) / 4.0, -1.0, 1.0))
    return np.array([steer, throttle], np.float32)
