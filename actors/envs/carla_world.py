"""Populating and reading a CARLA world for :class:`actors.envs.carla_env.CarlaDrivingEnv`.

The ego vehicle at a random spawn point, its sensors (front camera, collision, lane
invasion), NPC traffic on the traffic manager's autopilot, the planned route, the camera
frame as grayscale, and the ego's pose and lane state. Functions of the world handles the env
holds, so the env keeps its own episode state (route progress, frame stack, metrics).

The route is planned by walking the map's waypoints (``Waypoint.next``) for the route length
plus look-ahead, choosing a random branch at junctions — the ``agents`` GlobalRoutePlanner
is not part of the client wheel.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.carla.client import CarlaModule
from actors.envs.driving import GRAY_WEIGHTS, WAYPOINT_SPACING, Route, from_carla_xy_yaw, wrap_angle
from common.schema import FRAME_SHAPE, NUM_WAYPOINTS

log = logging.getLogger(__name__)

ROUTE_STEP_M = 2.0  # spacing of the planned route's waypoints
ROUTE_LOOKAHEAD_M = NUM_WAYPOINTS * WAYPOINT_SPACING + 10.0  # route beyond the goal, for the vector
CAMERA_TRANSFORM = (1.5, 0.0, 2.4)  # x forward, y, z up (m), as CARLA's examples mount a hood camera
NPC_SPAWN_CLEARANCE_M = 15.0
SPAWN_ATTEMPTS = 10


def plan_route(start_wp: Any, rng: np.random.Generator, route_length_m: float) -> Route:
    points = [start_wp]
    walked = 0.0
    wp = start_wp
    while walked < route_length_m + ROUTE_LOOKAHEAD_M:
        options = wp.next(ROUTE_STEP_M)
        if not options:
            break  # dead end: the route is shorter than asked
        wp = options[int(rng.integers(len(options)))]
        points.append(wp)
        walked += ROUTE_STEP_M
    xy = np.array([from_carla_xy_yaw(p.transform.location.x, p.transform.location.y, 0.0)[:2] for p in points])
    return Route(xy, goal_s=min(route_length_m, walked))


def spawn_ego(
    api: CarlaModule, world: Any, carla_map: Any, blueprint_id: str, rng: np.random.Generator
) -> tuple[Any, Any]:
    """The ego vehicle at a random free spawn point, and the lane waypoint it starts on."""
    lib = world.get_blueprint_library()
    bp = lib.find(blueprint_id)
    bp.set_attribute("role_name", "hero")
    spawn_points = carla_map.get_spawn_points()
    if not spawn_points:
        raise RuntimeError(f"map {carla_map.name} has no spawn points")
    for _ in range(SPAWN_ATTEMPTS):
        sp = spawn_points[int(rng.integers(len(spawn_points)))]
        ego = world.try_spawn_actor(bp, sp)
        if ego is None:
            continue
        return ego, carla_map.get_waypoint(sp.location, True, api.LaneType.Driving)
    raise RuntimeError(f"could not spawn {blueprint_id} at {SPAWN_ATTEMPTS} random spawn points")


def attach_sensors(
    api: CarlaModule,
    world: Any,
    ego: Any,
    camera_fov: float,
    on_camera: Callable[[Any], None],
    on_collision: Callable[[Any], None],
    on_invasion: Callable[[Any], None],
) -> list[Any]:
    """Front camera (every tick, at the observation's frame size), collision and lane-invasion
    sensors on ``ego``, each listening into its callback; returns them in spawn order."""
    lib = world.get_blueprint_library()
    sensors = []
    cam_bp = lib.find("sensor.camera.rgb")
    cam_bp.set_attribute("image_size_x", str(FRAME_SHAPE[1]))
    cam_bp.set_attribute("image_size_y", str(FRAME_SHAPE[0]))
    cam_bp.set_attribute("fov", str(camera_fov))
    cam_bp.set_attribute("sensor_tick", "0.0")  # every tick
    x, y, z = CAMERA_TRANSFORM
    mount = api.Transform(api.Location(x=x, y=y, z=z), api.Rotation())
    camera = world.spawn_actor(cam_bp, mount, attach_to=ego)
    sensors.append(camera)
    camera.listen(on_camera)
    for blueprint_id, callback in (
        ("sensor.other.collision", on_collision),
        ("sensor.other.lane_invasion", on_invasion),
    ):
        sensor = world.spawn_actor(lib.find(blueprint_id), api.Transform(), attach_to=ego)
        sensors.append(sensor)
        sensor.listen(callback)
    return sensors


def spawn_npcs(
    api: CarlaModule,
    client: Any,
    world: Any,
    carla_map: Any,
    rng: np.random.Generator,
    ego_location: Any,
    n: int,
    tm_port: int,
) -> list[int]:
    """Up to ``n`` four-wheeled NPCs on the traffic manager's autopilot, away from the ego, in
    one batch; returns the ids of those that spawned."""
    lib = world.get_blueprint_library()
    cars = [
        bp
        for bp in lib.filter("vehicle.*")
        if not bp.has_attribute("number_of_wheels") or int(bp.get_attribute("number_of_wheels").as_int()) == 4
    ]
    points = [p for p in carla_map.get_spawn_points() if p.location.distance(ego_location) > NPC_SPAWN_CLEARANCE_M]
    rng.shuffle(points)
    cmd = api.command
    batch = []
    for p in points[:n]:
        bp = cars[int(rng.integers(len(cars)))]
        if bp.has_attribute("role_name"):
            bp.set_attribute("role_name", "autopilot")
        batch.append(cmd.SpawnActor(bp, p).then(cmd.SetAutopilot(cmd.FutureActor, True, tm_port)))
    ids = [r.actor_id for r in client.apply_batch_sync(batch, False) if not r.has_error()]
    if len(ids) < n:
        log.info(
            "spawned %d of %d NPC vehicles (map %s has %d free spawn points)",
            len(ids),
            n,
            carla_map.name,
            len(points),
        )
    return ids


def gray_frame(image: Any) -> np.ndarray:
    """A camera image (BGRA) as one uint8 grayscale frame of the observation's size."""
    bgra = np.frombuffer(image.raw_data, np.uint8).reshape(image.height, image.width, 4)
    gray = np.dot(bgra[..., 2::-1].astype(np.float32), np.asarray(GRAY_WEIGHTS, np.float32))
    if gray.shape != FRAME_SHAPE:  # only if the server ignored the requested size
        rows = np.linspace(0, gray.shape[0] - 1, FRAME_SHAPE[0]).astype(int)
        cols = np.linspace(0, gray.shape[1] - 1, FRAME_SHAPE[1]).astype(int)
        gray = gray[np.ix_(rows, cols)]
    return gray.clip(0, 255).astype(np.uint8)


def ego_state(api: CarlaModule, ego: Any, carla_map: Any) -> dict[str, Any]:
    """Pose and lane state in the right-handed frame of actors/envs/driving.py."""
    t = ego.get_transform()
    v = ego.get_velocity()
    x, y, heading = from_carla_xy_yaw(t.location.x, t.location.y, t.rotation.yaw)
    speed = math.hypot(v.x, v.y)
    lane = carla_map.get_waypoint(t.location, True, api.LaneType.Driving)
    on_road = carla_map.get_waypoint(t.location, False, api.LaneType.Driving) is not None
    cx, cy, lane_heading = from_carla_xy_yaw(
        lane.transform.location.x, lane.transform.location.y, lane.transform.rotation.yaw
    )
    lateral = math.cos(lane_heading) * (y - cy) - math.sin(lane_heading) * (x - cx)  # + = left of the lane
    return {
        "position": np.array([x, y]),
        "heading": heading,
        "speed": speed,
        "lateral": lateral,
        "half_width": float(lane.lane_width) / 2.0,
        "heading_error": wrap_angle(heading - lane_heading),
        "on_road": on_road,
    }
