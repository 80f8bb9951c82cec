"""The CARLA stand-in's value types, blueprint library and map (a ring road).

Names and fields follow CARLA 0.9.16's Python API (``carla.Location``, ``carla.Transform``,
``carla.Map``, ...); coordinates are CARLA's (left-handed, yaw in degrees). The ring has one
driving lane of radius ``RING_RADIUS`` and width ``LANE_WIDTH``; driving direction is
increasing angle. :mod:`actors.carla.fake` is the module-like object that exposes them.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

RING_RADIUS = 100.0
LANE_WIDTH = 4.0
NUM_SPAWN_POINTS = 24
WHEELBASE = 2.9
MAX_STEER_RAD = 0.6
NPC_SPEED = 6.0
COLLISION_DISTANCE = 3.0


# ----- value types ---------------------------------------------------------------------------


@dataclass
class Location:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0

    def distance(self, other: Location) -> float:
        return math.dist((self.x, self.y, self.z), (other.x, other.y, other.z))


@dataclass
class Rotation:
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0


@dataclass
class Transform:
    location: Location = field(default_factory=Location)
    rotation: Rotation = field(default_factory=Rotation)


@dataclass
class Vector3D:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


@dataclass
class VehicleControl:
    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0
    hand_brake: bool = False
    reverse: bool = False


class LaneType:
    Driving = 2
    Any = -2


@dataclass
class WorldSettings:
    synchronous_mode: bool = False
    fixed_delta_seconds: float | None = None
    no_rendering_mode: bool = False


@dataclass
class Image:
    frame: int
    width: int
    height: int
    raw_data: bytes


class ActorAttribute:
    def __init__(self, value: str) -> None:
        self.value = value

    def as_int(self) -> int:
        return int(self.value)

    def as_str(self) -> str:
        return self.value

    def __str__(self) -> str:
        return self.value


class Blueprint:
    def __init__(self, blueprint_id: str, **attributes: str) -> None:
        self.id = blueprint_id
        self._attributes = dict(attributes)

    def set_attribute(self, key: str, value: str) -> None:
        if key not in self._attributes:
            raise IndexError(f"blueprint {self.id!r} has no attribute {key!r}")
        self._attributes[key] = str(value)

    def has_attribute(self, key: str) -> bool:
        return key in self._attributes

    def get_attribute(self, key: str) -> ActorAttribute:
        return ActorAttribute(self._attributes[key])


def _library() -> list[Blueprint]:
    cars = ["vehicle.tesla.model3", "vehicle.audi.a2", "vehicle.lincoln.mkz_2020", "vehicle.nissan.micra"]
    out = [Blueprint(c, number_of_wheels="4", role_name="autopilot", color="0,0,0") for c in cars]
    out.append(Blueprint("vehicle.kawasaki.ninja", number_of_wheels="2", role_name="autopilot"))
    out.append(Blueprint("sensor.camera.rgb", image_size_x="800", image_size_y="600", fov="90", sensor_tick="0.0"))
    out.append(Blueprint("sensor.other.collision"))
    out.append(Blueprint("sensor.other.lane_invasion"))
    return out


class BlueprintLibrary:
    def __init__(self) -> None:
        self._bps = _library()

    def find(self, blueprint_id: str) -> Blueprint:
        for bp in self._bps:
            if bp.id == blueprint_id:
                return Blueprint(bp.id, **bp._attributes)
        raise IndexError(f"blueprint {blueprint_id!r} not found")

    def filter(self, pattern: str) -> list[Blueprint]:
        return [Blueprint(bp.id, **bp._attributes) for bp in self._bps if fnmatch.fnmatch(bp.id, pattern)]


# ----- the map: a ring road ----------------------------------------------------------------


class Waypoint:
    """A lane-centre point at angle ``theta`` on the ring; driving direction: increasing theta."""

    def __init__(self, theta: float) -> None:
        self.theta = theta % (2 * math.pi)
        self.lane_width = LANE_WIDTH
        self.transform = Transform(
            Location(RING_RADIUS * math.cos(self.theta), RING_RADIUS * math.sin(self.theta), 0.0),
            Rotation(yaw=math.degrees(self.theta + math.pi / 2)),
        )

    def next(self, distance: float) -> list[Waypoint]:
        return [Waypoint(self.theta + distance / RING_RADIUS)]


class Map:
    def __init__(self, town: str) -> None:
        self.name = f"Carla/Maps/{town}"

    def get_spawn_points(self) -> list[Transform]:
        out = []
        for k in range(NUM_SPAWN_POINTS):
            t = Waypoint(2 * math.pi * k / NUM_SPAWN_POINTS).transform
            out.append(Transform(Location(t.location.x, t.location.y, 0.3), Rotation(yaw=t.rotation.yaw)))
        return out

    def get_waypoint(
        self, location: Location, project_to_road: bool = True, lane_type: Any = LaneType.Driving
    ) -> Waypoint | None:
        r = math.hypot(location.x, location.y)
        if not project_to_road and abs(r - RING_RADIUS) > LANE_WIDTH / 2:
            return None
        return Waypoint(math.atan2(location.y, location.x))
