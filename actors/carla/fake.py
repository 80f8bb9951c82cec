"""An in-process stand-in for the part of the ``carla`` module convoy uses.

A ring road (one driving lane, radius 100 m, lane width 4 m), kinematic cars, NPCs that
follow the ring on "autopilot", and sensors that deliver on every tick with the tick's
frame number: enough world for the CARLA env's own logic — connection, synchronous
settings, traffic manager, spawning and destroying actors, sensor matching, route planning
through waypoints, termination, crash handling — to run in CI and on machines without
CARLA (``carla.stand_in=true``). Names and signatures follow CARLA 0.9.16's Python API;
coordinates are CARLA's (left-handed, yaw in degrees). Nothing here is used with a real
server.

Crash injection: ``FakeCarla.crash_after(ticks, mode)`` makes the current server die
("die": later calls time out as with a dead server) or stop answering ("hang") after
``ticks`` more ticks.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.carla.server import ServerEndpoint

RING_RADIUS = 100.0
LANE_WIDTH = 4.0
NUM_SPAWN_POINTS = 24
WHEELBASE = 2.9
MAX_STEER_RAD = 0.6
NPC_SPEED = 6.0
COLLISION_DISTANCE = 3.0


def _timeout(port: int, seconds: float) -> RuntimeError:
    # The real client's wording (LibCarla/source/carla/client/detail/Client.cpp).
    return RuntimeError(
        f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the simulator is "
        f"ready and connected to localhost:{port}"
    )


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


@dataclass
class CollisionEvent:
    frame: int
    actor: Actor
    other_actor: Actor
    normal_impulse: Vector3D = field(default_factory=Vector3D)


@dataclass
class LaneInvasionEvent:
    frame: int
    actor: Actor
    crossed_lane_markings: list[str]


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


# ----- actors --------------------------------------------------------------------------------


class Actor:
    def __init__(
        self, world: World, actor_id: int, blueprint: Blueprint, transform: Transform, parent: Actor | None
    ) -> None:
        self.world = world
        self.id = actor_id
        self.type_id = blueprint.id
        self.attributes = {k: v for k, v in blueprint._attributes.items()}
        self.parent = parent
        self._transform = transform
        self.is_alive = True

    def get_transform(self) -> Transform:
        self.world.server.check()
        if self.parent is not None:
            return self.parent.get_transform()
        return Transform(Location(**vars(self._transform.location)), Rotation(**vars(self._transform.rotation)))

    def get_velocity(self) -> Vector3D:
        self.world.server.check()
        return Vector3D()

    def destroy(self) -> bool:
        self.world.server.check()
        return self.world._remove(self.id)


class Vehicle(Actor):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.speed = 0.0
        self.control = VehicleControl()
        self.autopilot_port: int | None = None

    def get_velocity(self) -> Vector3D:
        self.world.server.check()
        yaw = math.radians(self._transform.rotation.yaw)
        return Vector3D(self.speed * math.cos(yaw), self.speed * math.sin(yaw), 0.0)

    def apply_control(self, control: VehicleControl) -> None:
        self.world.server.check()
        self.control = control

    def set_autopilot(self, enabled: bool = True, port: int = 8000) -> None:
        self.autopilot_port = port if enabled else None

    def _advance(self, dt: float) -> None:
        loc, rot = self._transform.location, self._transform.rotation
        if self.autopilot_port is not None:
            theta = math.atan2(loc.y, loc.x) + NPC_SPEED * dt / RING_RADIUS
            wp = Waypoint(theta).transform
            self._transform = Transform(Location(wp.location.x, wp.location.y, loc.z), Rotation(yaw=wp.rotation.yaw))
            self.speed = NPC_SPEED
            return
        c = self.control
        accel = 5.0 * c.throttle - 8.0 * c.brake - 0.05 * self.speed
        self.speed = max(0.0, self.speed + accel * dt)
        # CARLA: positive steer turns right, i.e. towards +y, increasing yaw.
        yaw_rate = self.speed / WHEELBASE * math.tan(c.steer * MAX_STEER_RAD)
        rot.yaw = math.degrees(math.radians(rot.yaw) + yaw_rate * dt)
        yaw = math.radians(rot.yaw)
        loc.x += self.speed * math.cos(yaw) * dt
        loc.y += self.speed * math.sin(yaw) * dt


class Sensor(Actor):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._callback: Callable[[Any], None] | None = None
        self._was_on_lane = True

    def listen(self, callback: Callable[[Any], None]) -> None:
        self._callback = callback

    def stop(self) -> None:
        self._callback = None

    def is_listening(self) -> bool:
        return self._callback is not None

    def _emit(self, frame: int) -> None:
        if self._callback is None or self.parent is None:
            return
        parent = self.parent
        if self.type_id == "sensor.camera.rgb":
            self._callback(self._render(frame, parent))
        elif self.type_id == "sensor.other.collision":
            for other in self.world.vehicles():
                if (
                    other is not parent
                    and other._transform.location.distance(parent._transform.location) < COLLISION_DISTANCE
                ):
                    self._callback(CollisionEvent(frame, parent, other))
        elif self.type_id == "sensor.other.lane_invasion":
            loc = parent._transform.location
            on_lane = abs(math.hypot(loc.x, loc.y) - RING_RADIUS) <= LANE_WIDTH / 2
            if on_lane != self._was_on_lane:
                self._callback(LaneInvasionEvent(frame, parent, ["Solid"]))
            self._was_on_lane = on_lane

    def _render(self, frame: int, parent: Actor) -> Image:
        """A cheap picture that changes with the pose: a bright road band whose position and
        slant follow the lateral offset and heading error, plus a frame-dependent stripe."""
        w, h = int(self.attributes["image_size_x"]), int(self.attributes["image_size_y"])
        loc, yaw = parent._transform.location, parent._transform.rotation.yaw
        theta = math.atan2(loc.y, loc.x)
        offset = math.hypot(loc.x, loc.y) - RING_RADIUS
        err = math.radians(yaw) - (theta + math.pi / 2)
        cols = np.arange(w)[None, :]
        rows = np.arange(h)[:, None]
        centre = w / 2 - offset * w / 8 + (rows - h) * math.tan(math.atan2(math.sin(err), math.cos(err))) * 0.5
        gray = np.where((np.abs(cols - centre) < w / 4) & (rows > h / 2), 160, 60).astype(np.uint8)
        gray[(frame % h), :] = 255
        bgra = np.repeat(gray[..., None], 4, axis=-1)
        bgra[..., 3] = 255
        return Image(frame, w, h, bgra.tobytes())


# ----- world, traffic manager, client, commands -----------------------------------------------


class World:
    def __init__(self, server: FakeServer, town: str) -> None:
        self.server = server
        self._map = Map(town)
        self._settings = WorldSettings()
        self._actors: dict[int, Actor] = {}
        self.frame = 0
        self._ids = itertools.count(100)
        self._library = BlueprintLibrary()

    def get_settings(self) -> WorldSettings:
        self.server.check()
        return WorldSettings(**vars(self._settings))

    def apply_settings(self, settings: WorldSettings) -> int:
        self.server.check()
        self._settings = WorldSettings(**vars(settings))
        return self.frame

    def get_map(self) -> Map:
        self.server.check()
        return self._map

    def get_blueprint_library(self) -> BlueprintLibrary:
        self.server.check()
        return self._library

    def get_actors(self, actor_ids: list[int] | None = None) -> list[Actor]:
        self.server.check()
        if actor_ids is None:
            return list(self._actors.values())
        return [self._actors[i] for i in actor_ids if i in self._actors]

    def vehicles(self) -> list[Vehicle]:
        return [a for a in self._actors.values() if isinstance(a, Vehicle)]

    def try_spawn_actor(
        self, blueprint: Blueprint, transform: Transform, attach_to: Actor | None = None
    ) -> Actor | None:
        self.server.check()
        if blueprint.id.startswith("vehicle."):
            if any(v._transform.location.distance(transform.location) < 5.0 for v in self.vehicles()):
                return None
            actor: Actor = Vehicle(
                self,
                next(self._ids),
                blueprint,
                Transform(Location(**vars(transform.location)), Rotation(**vars(transform.rotation))),
                None,
            )
        elif blueprint.id.startswith("sensor."):
            if attach_to is None:
                raise RuntimeError("fake CARLA: sensors must be attached to a vehicle")
            actor = Sensor(self, next(self._ids), blueprint, transform, attach_to)
        else:
            raise RuntimeError(f"fake CARLA: cannot spawn {blueprint.id!r}")
        self._actors[actor.id] = actor
        return actor

    def spawn_actor(self, blueprint: Blueprint, transform: Transform, attach_to: Actor | None = None) -> Actor:
        actor = self.try_spawn_actor(blueprint, transform, attach_to)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def _remove(self, actor_id: int) -> bool:
        actor = self._actors.pop(actor_id, None)
        if actor is None:
            return False
        actor.is_alive = False
        return True

    def tick(self, seconds: float = 10.0) -> int:
        self.server.on_tick(seconds)
        self.frame += 1
        dt = self._settings.fixed_delta_seconds or 0.05
        for v in self.vehicles():
            v._advance(dt)
        for a in list(self._actors.values()):
            if isinstance(a, Sensor):
                a._emit(self.frame)
        return self.frame


class TrafficManager:
    def __init__(self, port: int) -> None:
        self.port = port
        self.synchronous = False
        self.seed: int | None = None
        self.leading_distance = 0.0

    def get_port(self) -> int:
        return self.port

    def set_synchronous_mode(self, mode_switch: bool = True) -> None:
        self.synchronous = mode_switch

    def set_random_device_seed(self, value: int) -> None:
        self.seed = value

    def set_global_distance_to_leading_vehicle(self, distance: float) -> None:
        self.leading_distance = distance


class _FutureActor:
    """Placeholder for the actor a SpawnActor command creates (carla.command.FutureActor)."""


@dataclass
class Response:
    actor_id: int = 0
    error: str = ""

    def has_error(self) -> bool:
        return bool(self.error)


@dataclass
class SpawnActor:
    blueprint: Blueprint
    transform: Transform
    parent: Any = None
    then_commands: list[Any] = field(default_factory=list)

    def then(self, command: Any) -> SpawnActor:
        self.then_commands.append(command)
        return self


@dataclass
class SetAutopilot:
    actor: Any
    enabled: bool = True
    tm_port: int = 8000


@dataclass
class DestroyActor:
    actor: Any


class _Commands:
    SpawnActor = SpawnActor
    SetAutopilot = SetAutopilot
    DestroyActor = DestroyActor
    FutureActor = _FutureActor()
    Response = Response


class FakeServer:
    """One "server process": a world, and whether it still answers."""

    def __init__(self, port: int, town: str = "Town01") -> None:
        self.port = port
        self.world = World(self, town)
        self.state = "running"  # running | dead | hung
        self.ticks = 0
        self.crash_at: int | None = None
        self.crash_mode = "die"
        self.traffic_managers: dict[int, TrafficManager] = {}

    def check(self, seconds: float = 5.0) -> None:
        if self.state != "running":
            raise _timeout(self.port, seconds)

    def on_tick(self, seconds: float) -> None:
        self.check(seconds)
        self.ticks += 1
        if self.crash_at is not None and self.ticks >= self.crash_at:
            self.state = "dead" if self.crash_mode == "die" else "hung"
            raise _timeout(self.port, seconds)


class Client:
    def __init__(self, fake: FakeCarla, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self._fake = fake
        self.host = host
        self.port = port
        self._timeout = 5.0

    def _server(self) -> FakeServer:
        server = self._fake.servers.get(self.port)
        if server is None:
            raise _timeout(self.port, self._timeout)
        server.check(self._timeout)
        return server

    def set_timeout(self, seconds: float) -> None:
        self._timeout = seconds

    def get_server_version(self) -> str:
        self._server()
        return "0.9.16"

    def get_client_version(self) -> str:
        return "0.9.16"

    def get_world(self) -> World:
        return self._server().world

    def load_world(self, map_name: str, reset_settings: bool = True) -> World:
        server = self._server()
        server.world = World(server, map_name.rsplit("/", 1)[-1])
        self._fake.loads_total += 1
        return server.world

    def get_trafficmanager(self, client_connection: int = 8000) -> TrafficManager:
        server = self._server()
        return server.traffic_managers.setdefault(client_connection, TrafficManager(client_connection))

    def apply_batch_sync(self, commands: Sequence[Any], do_tick: bool = False) -> list[Response]:
        world = self._server().world
        out = []
        for cmd in commands:
            if isinstance(cmd, SpawnActor):
                actor = world.try_spawn_actor(cmd.blueprint, cmd.transform, cmd.parent)
                if actor is None:
                    out.append(Response(error="Spawn failed because of collision at spawn position"))
                    continue
                for then in cmd.then_commands:
                    if isinstance(then, SetAutopilot) and isinstance(actor, Vehicle):
                        actor.set_autopilot(then.enabled, then.tm_port)
                out.append(Response(actor_id=actor.id))
            elif isinstance(cmd, DestroyActor):
                actor_id = cmd.actor if isinstance(cmd.actor, int) else cmd.actor.id
                ok = world._remove(actor_id)
                out.append(Response(actor_id=actor_id, error="" if ok else f"actor {actor_id} not found"))
            else:
                out.append(Response(error=f"fake CARLA: unsupported command {type(cmd).__name__}"))
        if do_tick:
            world.tick(self._timeout)
        return out


class FakeCarla:
    """The module-like object: ``fake.Client(host, port)``, ``fake.Transform(...)``, ... plus
    the "servers" it simulates, keyed by RPC port."""

    Location = Location
    Rotation = Rotation
    Transform = Transform
    Vector3D = Vector3D
    VehicleControl = VehicleControl
    LaneType = LaneType
    WorldSettings = WorldSettings
    command = _Commands

    def __init__(self) -> None:
        self.servers: dict[int, FakeServer] = {}
        self.loads_total = 0

    def Client(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> Client:
        return Client(self, host, port, worker_threads)

    def launch(self, port: int) -> FakeServer:
        self.servers[port] = FakeServer(port)
        return self.servers[port]

    def crash_after(self, ticks: int, mode: str = "die", port: int | None = None) -> None:
        if mode not in ("die", "hang"):
            raise ValueError(f"crash mode {mode!r}: allowed: 'die', 'hang'")
        server = self.servers[port] if port is not None else next(iter(self.servers.values()))
        server.crash_at = server.ticks + ticks
        server.crash_mode = mode


class FakeServerHandle:
    """The :class:`actors.carla.server.SimulatorServer` for the stand-in: restarting means a
    fresh fake server (empty world, default settings) on the same port, as with a real one."""

    def __init__(self, fake: FakeCarla, port: int = 2000, recycle_episodes: int = 0, max_restarts: int = 5) -> None:
        self.fake = fake
        self.port = port
        self.recycle_episodes = recycle_episodes
        self.max_restarts = max_restarts
        self.launches_total = 0
        self.restarts_total = 0
        self.recycles_total = 0
        self.episodes_since_launch = 0
        self.consecutive_crashes = 0
        self.closed = False

    @property
    def endpoint(self) -> ServerEndpoint:
        return ServerEndpoint("127.0.0.1", self.port, self.port + 3)

    def start(self) -> ServerEndpoint:
        server = self.fake.servers.get(self.port)
        if server is None or server.state != "running":
            self.fake.launch(self.port)
            self.launches_total += 1
            self.episodes_since_launch = 0
        return self.endpoint

    def alive(self) -> bool:
        server = self.fake.servers.get(self.port)
        return server is not None and server.state == "running"

    def restart(self, reason: str) -> ServerEndpoint:
        from actors.envs.errors import SimulatorUnavailable

        self.restarts_total += 1
        self.consecutive_crashes += 1
        if self.consecutive_crashes > self.max_restarts:
            raise SimulatorUnavailable(
                f"fake CARLA server: {self.consecutive_crashes} consecutive failures; last: {reason}"
            )
        self.fake.servers.pop(self.port, None)
        return self.start()

    def episode_finished(self) -> None:
        self.episodes_since_launch += 1
        self.consecutive_crashes = 0

    def recycle_due(self) -> bool:
        return self.recycle_episodes > 0 and self.episodes_since_launch >= self.recycle_episodes

    def recycle(self) -> ServerEndpoint:
        self.recycles_total += 1
        self.fake.servers.pop(self.port, None)
        return self.start()

    def metrics(self) -> dict[str, float]:
        return {
            "simulator/launches_total": self.launches_total,
            "simulator/restarts_total": self.restarts_total,
            "simulator/recycles_total": self.recycles_total,
        }

    def close(self) -> None:
        self.closed = True
        self.fake.servers.pop(self.port, None)
