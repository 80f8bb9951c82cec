"""Pure driving logic of the CARLA env (actors/envs/driving.py, actors/carla/sensors.py):
frames, route geometry, the vector, reward terms, termination, leaderboard metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from actors.carla.sensors import EventBuffer, FrameQueue, SensorTimeout
from actors.envs.driving import (
    CENTERING_WEIGHT,
    SPEED_SCALE,
    WAYPOINT_SCALE,
    DrivingMetrics,
    RewardWeights,
    Route,
    driving_vector,
    from_carla_xy_yaw,
    reward_terms,
    termination,
    total_reward,
)


def test_carla_left_handed_pose_becomes_right_handed() -> None:
    # CARLA: y points right, yaw clockwise seen from above. A car at y=+2 facing yaw=90 deg
    # is 2 m to the right of the x axis, driving towards the right: (x, -2), heading -pi/2.
    x, y, h = from_carla_xy_yaw(10.0, 2.0, 90.0)
    assert (x, y) == (10.0, -2.0) and h == pytest.approx(-math.pi / 2)
    assert from_carla_xy_yaw(0, 0, 270.0)[2] == pytest.approx(math.pi / 2)


def test_route_projection_arc_length_and_signed_lateral() -> None:
    route = Route(np.array([[0, 0], [10, 0], [10, 10]], float))
    assert route.length == pytest.approx(20.0)
    p = route.project(np.array([5.0, 1.0]))
    assert (p.s, p.lateral, p.heading) == (pytest.approx(5.0), pytest.approx(1.0), pytest.approx(0.0))
    q = route.project(np.array([11.0, 4.0]), hint=p.index)  # right of the northbound leg
    assert (q.s, q.lateral, q.heading) == (pytest.approx(14.0), pytest.approx(-1.0), pytest.approx(math.pi / 2))
    np.testing.assert_allclose(route.point_at(25.0), [10.0, 15.0])  # extended past the end
    np.testing.assert_allclose(route.points_ahead(8.0, n=3, spacing=4.0), [[10, 2], [10, 6], [10, 10]])


def test_points_ahead_are_exactly_the_scalar_lookups() -> None:
    # The waypoints are looked up in one vectorised call each env step; each must be the
    # scalar formula's point, bit for bit, before the start, inside and past the end.
    rng = np.random.default_rng(0)
    route = Route(np.cumsum(rng.uniform(0.5, 3.0, (40, 2)), axis=0))

    def scalar(s: float) -> np.ndarray:
        i = min(max(int(np.searchsorted(route.cumulative, s, side="right")) - 1, 0), len(route.points) - 2)
        seg = route.points[i + 1] - route.points[i]
        return route.points[i] + (s - route.cumulative[i]) / float(np.hypot(*seg)) * seg

    for s in [-3.0, 0.0, 0.7, *rng.uniform(0, route.length, 50), route.length, route.length + 9.5]:
        got = route.points_ahead(float(s), n=10, spacing=2.0)
        assert got.shape == (10, 2)
        np.testing.assert_array_equal(got, np.stack([scalar(float(s) + 2.0 * (k + 1)) for k in range(10)]))
        np.testing.assert_array_equal(route.point_at(float(s)), scalar(float(s)))


def test_route_projection_does_not_jump_to_a_nearby_later_part_of_the_route() -> None:
    # Out along y=0 and back along y=0.5: near the start, the return leg is closer in
    # arc length terms but must not be chosen while the ego is on the way out.
    out = [[float(x), 0.0] for x in range(0, 101, 2)]
    back = [[float(x), 0.5] for x in range(100, -1, -2)]
    route = Route(np.array(out + back))
    p = route.project(np.array([4.0, 0.3]), hint=0)
    assert p.s == pytest.approx(4.0, abs=0.01)


def test_vector_from_a_known_pose_and_route_matches_the_embedded_layout() -> None:
    # Ego at the origin facing north (heading pi/2), 1 m left of its lane centre (half width
    # 2 m), 0.25 pi off the lane's heading, 5 m/s; the route runs north.
    waypoints = np.array([[0.0, 4.0 * (k + 1)] for k in range(10)])
    v = driving_vector(5.0, 1.0, 2.0, 0.25 * math.pi, waypoints, np.zeros(2), math.pi / 2)
    assert v.dtype == np.float32 and v.shape == (23,)
    assert v[0] == pytest.approx(5.0 / SPEED_SCALE)
    assert v[1] == pytest.approx(0.5)
    assert v[2] == pytest.approx(0.25)
    expected = np.array([[4.0 * (k + 1), 0.0] for k in range(10)]) / WAYPOINT_SCALE  # straight ahead
    np.testing.assert_allclose(v[3:].reshape(10, 2), expected, atol=1e-6)
    # A waypoint to the west of a north-facing ego is on its left: +y in the ego frame.
    left = driving_vector(0.0, 0.0, 2.0, 0.0, np.array([[-4.0, 0.0]] * 10), np.zeros(2), math.pi / 2)
    assert left[3] == pytest.approx(0.0, abs=1e-6) and left[4] == pytest.approx(4.0 / WAYPOINT_SCALE)


def test_reward_terms_by_hand() -> None:
    t = reward_terms(0.4, 0.05, 10.0, 0.5, 5.0, np.array([0.5, 1.0]), np.array([0.0, 0.0]))
    assert t["progress"] == pytest.approx(0.4 / 0.5)
    assert t["centering"] == pytest.approx(-0.25)
    assert t["speed"] == pytest.approx(0.5)
    assert t["comfort"] == pytest.approx(-(0.5 + 1.0) / 4)
    fast = reward_terms(2.0, 0.05, 10.0, 0.0, 25.0, np.zeros(2), np.zeros(2))
    assert fast["progress"] == 1.0 and fast["speed"] == 0.0  # capped; no reward beyond 2x target
    w = RewardWeights(progress=1.0, centering=0.2, speed=0.5, comfort=0.1, collision_penalty=5.0)
    assert total_reward(t, w, None) == pytest.approx(0.8 - 0.05 + 0.25 - 0.0375)
    assert total_reward(t, w, "off_road") == pytest.approx(0.8 - 0.05 + 0.25 - 0.0375 - 5.0)
    assert total_reward(t, w, "time_limit") == total_reward(t, w, None)


def test_default_weights_reproduce_the_embedded_reward() -> None:
    t = reward_terms(0.3, 0.05, 10.0, -0.7, 6.0, np.array([1.0, -1.0]), np.zeros(2))
    embedded = min(0.3 / (10.0 * 0.05), 1.0) - CENTERING_WEIGHT * 0.7**2 - 5.0
    assert total_reward(t, RewardWeights(), "collision") == pytest.approx(embedded)


@pytest.mark.parametrize(
    ("collided", "off_road", "progress", "steps", "expected"),
    [
        (True, True, 500.0, 999, ("collision", True, False)),
        (False, True, 500.0, 999, ("off_road", True, False)),
        (False, False, 300.0, 999, ("route_completed", True, False)),
        (False, False, 10.0, 1000, ("time_limit", False, True)),
        (True, False, 10.0, 1000, ("collision", True, False)),  # a crash at the limit is a crash
        (False, False, 10.0, 5, (None, False, False)),
    ],
)
def test_termination_reasons_and_truncation_are_kept_apart(
    collided: bool, off_road: bool, progress: float, steps: int, expected: tuple
) -> None:
    assert termination(collided, off_road, progress, 300.0, steps, 1000) == expected


def test_driving_metrics_as_the_leaderboard_reports_them() -> None:
    m = DrivingMetrics(route_length_m=1000.0)
    for k in range(10):
        m.step(speed=float(k), progress_m=50.0 * (k + 1))
    m.collision(7, "vehicle.audi.a2")
    m.collision(7, "vehicle.audi.a2")  # the same contact over several frames: one infraction
    m.collision(9, "walker.pedestrian.0001")
    m.lane_invasion(3)
    for off in (True, True, False, True):
        m.set_off_road(off)
    s = m.summary()
    assert s["driving/route_completion"] == pytest.approx(0.5)
    assert s["driving/distance_km"] == pytest.approx(0.5)
    assert s["driving/mean_speed_mps"] == pytest.approx(4.5)
    assert s["driving/collisions_per_km"] == pytest.approx(4.0)
    assert s["driving/lane_invasions_per_km"] == pytest.approx(6.0)
    assert s["driving/off_road_per_km"] == pytest.approx(4.0)
    assert s["driving/infraction_penalty"] == pytest.approx(0.60 * 0.50)
    assert s["driving/driving_score"] == pytest.approx(0.5 * 0.3)
    assert set(s) == set(DrivingMetrics.KEYS)
    crash_at_start = DrivingMetrics(100.0)
    crash_at_start.collision(1, "static.wall")
    assert math.isfinite(crash_at_start.summary()["driving/collisions_per_km"])


@dataclass
class _Data:
    frame: int


def test_frame_queue_returns_the_ticks_frame_and_drops_stale_data() -> None:
    q: FrameQueue[_Data] = FrameQueue()
    for f in (3, 4, 5, 6):
        q.put(_Data(f))
    assert q.get(5, timeout=0.5).frame == 5 and q.stale_total == 2
    assert q.get(6, timeout=0.5).frame == 6
    with pytest.raises(SensorTimeout, match="frame 7"):
        q.get(7, timeout=0.05)
    q.put(_Data(9))
    with pytest.raises(SensorTimeout, match="jumped"):
        q.get(8, timeout=0.5)


def test_event_buffer_takes_events_up_to_the_frame_and_keeps_later_ones() -> None:
    b: EventBuffer[_Data] = EventBuffer()
    for f in (4, 5, 7):
        b.put(_Data(f))
    assert [e.frame for e in b.pop_until(5)] == [4, 5]
    assert b.pop_until(6) == []
    assert [e.frame for e in b.pop_until(7)] == [7]
