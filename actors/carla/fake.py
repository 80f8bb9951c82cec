"""An in-process stand-in for the part of the ``carla`` module convoy uses.

A ring road (one driving lane, radius 100 m, lane width 4 m), kinematic cars, NPCs that
follow the ring on "autopilot", and sensors that deliver on every tick with the tick's
frame number: enough world for the CARLA env's own logic — connection, synchronous
settings, traffic manager, spawning and destroying actors, sensor matching, route planning
through waypoints, termination, crash handling — to run in CI and on machines without
CARLA (``carla.stand_in=true``). Names and signatures follow CARLA 0.9.16's Python API;
coordinates are CARLA's (left-handed, yaw in degrees). Nothing here is used with a real
server.

Pacing: ``FakeCarla(pace=...)`` runs every tick inside ``pace()`` (actors.envs.pacing.Pacer's
``step`` with ``env.step_hz``), so a tick lasts as long as a real server's.

Crash injection: ``FakeCarla.crash_after(ticks, mode)`` makes the current server die
("die": later calls time out as with a dead server) or stop answering ("hang") after
``ticks`` more ticks.

The value types and the map live in :mod:`actors.carla.fake_types`, the simulated server
(actors, sensors, world) in :mod:`actors.carla.fake_world`; this module holds the batch
commands, the client, the module-like :class:`FakeCarla` and its :class:`FakeServerHandle`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.carla.errors import SimulatorUnavailable
from actors.carla.fake_types import (
    Blueprint,
    LaneType,
    Location,
    Rotation,
    Transform,
    Vector3D,
    VehicleControl,
    WorldSettings,
)
from actors.carla.fake_world import FakeServer, Pace, TrafficManager, Vehicle, World, timeout_error
from actors.carla.server_api import ServerEndpoint

# ----- commands, client -------------------------------------------------------------------


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


class Client:
    def __init__(self, fake: FakeCarla, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> None:
        self._fake = fake
        self.host = host
        self.port = port
        self._timeout = 5.0

    def _server(self) -> FakeServer:
        server = self._fake.servers.get(self.port)
        if server is None:
            raise timeout_error(self.port, self._timeout)
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

    def __init__(self, pace: Pace = contextlib.nullcontext) -> None:
        self.servers: dict[int, FakeServer] = {}
        self.loads_total = 0
        self.pace = pace  # every server's tick runs inside it (env.step_hz pacing)

    def Client(self, host: str = "127.0.0.1", port: int = 2000, worker_threads: int = 0) -> Client:
        return Client(self, host, port, worker_threads)

    def launch(self, port: int) -> FakeServer:
        self.servers[port] = FakeServer(port, pace=self.pace)
        return self.servers[port]

    def crash_after(self, ticks: int, mode: str = "die", port: int | None = None) -> None:
        if mode not in ("die", "hang"):
            raise ValueError(f"crash mode {mode!r}: allowed: 'die', 'hang'")
        server = self.servers[port] if port is not None else next(iter(self.servers.values()))
        server.crash_at = server.ticks + ticks
        server.crash_mode = mode


class FakeServerHandle:
    """The :class:`actors.carla.server_api.SimulatorServer` for the stand-in: restarting means a
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
