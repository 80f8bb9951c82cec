"""The ``carla`` client API: its import, and the narrow part of it convoy uses, as Protocols.

convoy talks to CARLA 0.9.16 through its official Python client (the ``[carla]`` extra).
The Protocols below list exactly the calls the env makes, so the real module and
convoy's in-process stand-in (:mod:`actors.carla.fake`) are interchangeable and the env's
logic is exercised in CI without a server.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

INSTALL_HINT = "pip install 'convoy[carla]'"
CLIENT_VERSION = "0.9.16"


class CarlaNotInstalled(ImportError):
    """The ``carla`` client module is missing; the message names the extra to install."""


class Waypoint(Protocol):
    transform: Any  # carla.Transform: .location.x/.y, .rotation.yaw
    lane_width: float

    def next(self, distance: float) -> Sequence[Waypoint]: ...


class Map(Protocol):
    name: str

    def get_spawn_points(self) -> list[Any]: ...

    def get_waypoint(self, location: Any, project_to_road: bool = True, lane_type: Any = ...) -> Waypoint | None: ...


class Actor(Protocol):
    id: int
    type_id: str

    def get_transform(self) -> Any: ...

    def get_velocity(self) -> Any: ...

    def destroy(self) -> bool: ...


class Vehicle(Actor, Protocol):
    def apply_control(self, control: Any) -> None: ...


class Sensor(Actor, Protocol):
    def listen(self, callback: Callable[[Any], None]) -> None: ...

    def stop(self) -> None: ...


class Blueprint(Protocol):
    id: str

    def set_attribute(self, key: str, value: str) -> None: ...

    def has_attribute(self, key: str) -> bool: ...

    def get_attribute(self, key: str) -> Any: ...


class BlueprintLibrary(Protocol):
    def find(self, blueprint_id: str) -> Blueprint: ...

    def filter(self, pattern: str) -> Sequence[Blueprint]: ...


class World(Protocol):
    def get_settings(self) -> Any: ...

    def apply_settings(self, settings: Any) -> int: ...

    def get_map(self) -> Map: ...

    def get_blueprint_library(self) -> BlueprintLibrary: ...

    def tick(self, seconds: float = 10.0) -> int: ...

    def try_spawn_actor(self, blueprint: Any, transform: Any, attach_to: Any = None) -> Any: ...

    def spawn_actor(self, blueprint: Any, transform: Any, attach_to: Any = None) -> Any: ...

    def get_actors(self, actor_ids: list[int] | None = None) -> Sequence[Actor]: ...


class TrafficManager(Protocol):
    def set_synchronous_mode(self, mode_switch: bool = True) -> None: ...

    def set_random_device_seed(self, value: int) -> None: ...

    def set_global_distance_to_leading_vehicle(self, distance: float) -> None: ...


class Client(Protocol):
    def set_timeout(self, seconds: float) -> None: ...

    def get_server_version(self) -> str: ...

    def get_world(self) -> World: ...

    def load_world(self, map_name: str) -> World: ...

    def get_trafficmanager(self, client_connection: int = 8000) -> TrafficManager: ...

    def apply_batch_sync(self, commands: Sequence[Any], do_tick: bool = False) -> list[Any]: ...


class CarlaModule(Protocol):
    """The attributes of the ``carla`` module the env uses (classes and enums), read-only."""

    @property
    def Client(self) -> Callable[..., Client]: ...

    @property
    def Location(self) -> Callable[..., Any]: ...

    @property
    def Rotation(self) -> Callable[..., Any]: ...

    @property
    def Transform(self) -> Callable[..., Any]: ...

    @property
    def VehicleControl(self) -> Callable[..., Any]: ...

    @property
    def LaneType(self) -> Any: ...

    @property
    def command(self) -> Any: ...


def import_carla() -> CarlaModule:
    """The real ``carla`` module, or :class:`CarlaNotInstalled` naming the extra."""
    try:
        module = importlib.import_module("carla")
    except ImportError as exc:
        raise CarlaNotInstalled(
            f"env.backend='carla' needs the CARLA {CLIENT_VERSION} Python client, which is not installed "
            f"({exc}); install it with: {INSTALL_HINT}  (or set carla.stand_in=true for a dry run without CARLA)"
        ) from exc
    return cast(CarlaModule, module)
