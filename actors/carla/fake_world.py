"""The CARLA stand-in's simulated server: actors, sensors, the world, the traffic manager.

Cars are kinematic (a bicycle model for the ego vehicle, NPCs that follow the ring at a
fixed speed on "autopilot"); sensors deliver on every tick with the tick's frame number.
A :class:`FakeServer` is one "server process" that can die or hang, after which every call
times out with the real client's wording.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actors.carla.fake_types import (
    COLLISION_DISTANCE,
    LANE_WIDTH,
    MAX_STEER_RAD,
    NPC_SPEED,
    RING_RADIUS,
    WHEELBASE,
    Blueprint,
    BlueprintLibrary,
    Image,
    Location,
    Map,
    Rotation,
    Transform,
    Vector3D,
    VehicleControl,
    Waypoint,
    WorldSettings,
)

# What a server's tick runs inside: a context that lasts at least one step period when the
# stand-in is paced (actors.envs.pacing.Pacer.step), else nothing.
Pace = Callable[[], contextlib.AbstractContextManager[object]]


def timeout_error(port: int, seconds: float) -> RuntimeError:
    # The real client's wording (LibCarla/source/carla/client/detail/Client.cpp).
    return RuntimeError(
        f"time-out of {int(seconds * 1000)}ms while waiting for the simulator, make sure the simulator is "
        f"ready and connected to localhost:{port}"
    )


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
        # A paced server (env.step_hz) takes at least its period per tick, as CARLA's does.
        with self.server.pace():
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


class FakeServer:
    """One "server process": a world, and whether it still answers."""

    def __init__(self, port: int, town: str = "Town01", pace: Pace = contextlib.nullcontext) -> None:
        self.port = port
        self.pace = pace
        self.world = World(self, town)
        self.state = "running"  # running | dead | hung
        self.ticks = 0
        self.crash_at: int | None = None
        self.crash_mode = "die"
        self.traffic_managers: dict[int, TrafficManager] = {}

    def check(self, seconds: float = 5.0) -> None:
        if self.state != "running":
            raise timeout_error(self.port, seconds)

    def on_tick(self, seconds: float) -> None:
        self.check(seconds)
        self.ticks += 1
        if self.crash_at is not None and self.ticks >= self.crash_at:
            self.state = "dead" if self.crash_mode == "die" else "hung"
            raise timeout_error(self.port, seconds)
