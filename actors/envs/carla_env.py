"""The CARLA driving env: a CARLA 0.9.16 world behind convoy's observation contract.

The same observation, action and reward meaning as the embedded env (actors/envs/embedded.py):

``image``  uint8 (4, 84, 84): the last four grayscale frames of a front camera rendered at
           84x84 by the server (no resize on the client), oldest first.
``vector`` float32 (23,): speed, lateral offset from the centre of the lane the ego is in
           (+ = left, in half-lane units), heading error w.r.t. that lane (/ pi), and the
           next 10 points of the planned route every WAYPOINT_SPACING m in the ego frame
           (x forward, y left) / WAYPOINT_SCALE — built by actors/envs/driving.py with the
           embedded env's constants.
``action`` steering (+ = left; CARLA's steer is + = right, so it is negated) and
           throttle (>0) / brake (<0).

World: synchronous mode with ``carla.fixed_delta_seconds``, the traffic manager in
synchronous mode on the collector's own leased port, seeded per episode; NPC traffic by
``carla.scenario``. The route is planned from a random spawn point by walking the map's
waypoints for ``env.route_length_m`` plus look-ahead; spawning, sensors and route planning
are in :mod:`actors.envs.carla_world`.

Every step ticks the server once and takes the camera image of exactly that frame, and the
collision / lane-invasion events up to it (actors/carla/sensors.py). ``terminated`` with
reason collision / off_road / route_completed; ``truncated`` (time_limit) at
``env.max_episode_steps``. A dead or hung server raises :class:`SimulatorCrashed`;
``recover()`` restarts it through the server manager. Every actor the env spawned is
destroyed on reset and close.
"""

from __future__ import annotations

import logging
from typing import Any

import gymnasium as gym
import numpy as np

from actors.carla.client import CarlaModule, import_carla
from actors.carla.errors import SimulatorCrashed
from actors.carla.sensors import EventBuffer, FrameQueue, SensorTimeout
from actors.carla.server_api import SimulatorServer
from actors.envs.carla_world import attach_sensors, ego_state, gray_frame, plan_route, spawn_ego, spawn_npcs
from actors.envs.driving import (
    DrivingMetrics,
    RewardWeights,
    Route,
    action_space,
    driving_vector,
    observation_space,
    reward_terms,
    termination,
    total_reward,
)
from common.config import CarlaConfig, EnvConfig
from common.schema import ACTION_DIM, IMAGE_SHAPE, Observation, check_action

log = logging.getLogger(__name__)

WARMUP_TICKS = 5  # vehicles spawn slightly above the road and settle for a few frames


class CarlaDrivingEnv(gym.Env[Observation, np.ndarray]):
    """One ego vehicle in a CARLA world; see the module docstring."""

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 20}  # noqa: RUF012 - gymnasium API

    def __init__(
        self,
        config: EnvConfig | None = None,
        carla_config: CarlaConfig | None = None,
        *,
        server: SimulatorServer | None = None,
        api: CarlaModule | None = None,
        index: int = 0,
        render_mode: str | None = None,
    ) -> None:
        self.config = config or EnvConfig()
        self.carla_config = carla_config or CarlaConfig()
        # Import first: without the [carla] extra this fails here, with the install hint,
        # before any server is launched.
        self.api: CarlaModule = api if api is not None else import_carla()
        if server is None:
            from actors.carla.server import server_from_config

            server = server_from_config(self.carla_config, index)
        self.server = server
        self.render_mode = render_mode
        self.observation_space = observation_space()
        self.action_space = action_space()
        c = self.carla_config
        self.weights = RewardWeights(
            progress=c.reward_progress,
            centering=c.reward_centering,
            speed=c.reward_speed,
            comfort=c.reward_comfort,
            collision_penalty=self.config.collision_penalty,
        )
        self.dt = c.fixed_delta_seconds
        self._client: Any = None
        self._world: Any = None
        self._map: Any = None
        self._tm: Any = None
        self._tm_port = 0
        self._ego: Any = None
        self._sensors: list[Any] = []
        self._npc_ids: list[int] = []
        self._camera: FrameQueue[Any] = FrameQueue()
        self._collisions: EventBuffer[Any] = EventBuffer()
        self._invasions: EventBuffer[Any] = EventBuffer()
        self._stack = np.zeros(IMAGE_SHAPE, np.uint8)
        self._route: Route | None = None
        self._hint = 0
        self._s = 0.0
        self._progress = 0.0
        self._start_s = 0.0
        self._steps = 0
        self._frame = 0
        self._prev_action = np.zeros(ACTION_DIM, np.float32)
        self._metrics = DrivingMetrics(self.config.route_length_m)
        self._last_crash = ""
        self.crashes_total = 0

    # ----- connection ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._world is not None

    def _connect(self) -> None:
        endpoint = self.server.start()
        c = self.carla_config
        client = self.api.Client(endpoint.host, endpoint.rpc_port)
        client.set_timeout(c.timeout_s)
        world = client.get_world()
        if not world.get_map().name.endswith(c.town):
            world = client.load_world(c.town)
        settings = world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = c.fixed_delta_seconds
        world.apply_settings(settings)
        # The traffic manager must tick with the world, or NPCs act on stale frames
        # (CARLA docs, "Traffic Manager": synchronous mode).
        tm = client.get_trafficmanager(endpoint.traffic_manager_port)
        tm.set_synchronous_mode(True)
        tm.set_global_distance_to_leading_vehicle(2.5)
        self._client, self._world, self._tm = client, world, tm
        self._tm_port = endpoint.traffic_manager_port
        self._map = world.get_map()
        self._ego, self._sensors, self._npc_ids = None, [], []
        log.info(
            "CARLA env connected to %s:%d (%s, traffic manager port %d)",
            endpoint.host,
            endpoint.rpc_port,
            c.town,
            endpoint.traffic_manager_port,
        )

    def _forget_world(self) -> None:
        """Drop every handle into a server that is gone or about to be replaced."""
        self._client = self._world = self._map = self._tm = self._ego = None
        self._sensors, self._npc_ids = [], []

    def _crashed(self, exc: BaseException, during: str) -> SimulatorCrashed:
        self.crashes_total += 1
        alive = self.server.alive()
        self._last_crash = f"{during}: {type(exc).__name__}: {exc} (server process {'alive' if alive else 'dead'})"
        self._forget_world()
        return SimulatorCrashed(f"CARLA {self._last_crash}")

    def recover(self) -> None:
        """Restart the server (same ports, backoff and cap in the manager) after a crash."""
        self._forget_world()
        self.server.restart(self._last_crash or "recover requested")

    # ----- actors --------------------------------------------------------------------------

    def spawned_actor_ids(self) -> list[int]:
        ids = [s.id for s in self._sensors]
        if self._ego is not None:
            ids.append(self._ego.id)
        return ids + list(self._npc_ids)

    def _destroy_actors(self) -> None:
        """Sensors first (stopped, so no callback fires into a destroyed actor), then vehicles,
        in one batch (generate_traffic.py's pattern)."""
        if self._client is None:
            return
        for s in self._sensors:
            s.stop()
        ids = self.spawned_actor_ids()
        if ids:
            cmd = self.api.command
            for response in self._client.apply_batch_sync([cmd.DestroyActor(i) for i in ids], False):
                if response.has_error():
                    log.warning("destroying actor %d: %s", response.actor_id, response.error)
        self._ego, self._sensors, self._npc_ids = None, [], []
        self._camera.clear()
        self._collisions.clear()
        self._invasions.clear()

    def _spawn_ego(self, rng: np.random.Generator) -> tuple[Any, Route]:
        ego, start = spawn_ego(self.api, self._world, self._map, self.carla_config.ego_blueprint, rng)
        return ego, plan_route(start, rng, self.config.route_length_m)

    def _attach_sensors(self) -> None:
        self._sensors.extend(
            attach_sensors(
                self.api,
                self._world,
                self._ego,
                self.carla_config.camera_fov,
                self._camera.put,
                self._collisions.put,
                self._invasions.put,
            )
        )

    def npc_count(self) -> int:
        c = self.carla_config
        return (0, c.npc_vehicles_light, c.npc_vehicles_dense)[c.scenario]

    def _spawn_npcs(self, rng: np.random.Generator, ego_location: Any) -> None:
        n = self.npc_count()
        if n == 0:
            return
        self._npc_ids.extend(
            spawn_npcs(self.api, self._client, self._world, self._map, rng, ego_location, n, self._tm_port)
        )

    # ----- observation ---------------------------------------------------------------------

    def _tick(self) -> np.ndarray:
        """One synchronous tick; returns the camera frame of exactly that tick."""
        timeout = self.carla_config.timeout_s
        self._frame = int(self._world.tick(timeout))
        return gray_frame(self._camera.get(self._frame, timeout))

    def _ego_state(self) -> dict[str, Any]:
        return ego_state(self.api, self._ego, self._map)

    def _observation(self, state: dict[str, Any]) -> Observation:
        assert self._route is not None
        waypoints = self._route.points_ahead(self._s)
        vector = driving_vector(
            state["speed"],
            state["lateral"],
            state["half_width"],
            state["heading_error"],
            waypoints,
            state["position"],
            state["heading"],
        )
        return {"image": self._stack.copy(), "vector": vector}

    # ----- gymnasium API -------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        rng = self.np_random
        try:
            if self.connected and self.server.recycle_due():
                self._destroy_actors()
                self._forget_world()
                self.server.recycle()
            if not self.connected:
                self._connect()
            self._destroy_actors()
            self._tm.set_random_device_seed(int(rng.integers(2**31)))
            self._ego, self._route = self._spawn_ego(rng)
            self._attach_sensors()
            self._spawn_npcs(rng, self._ego.get_transform().location)
            for _ in range(WARMUP_TICKS):
                frame = self._tick()
            self._collisions.pop_until(self._frame)  # contacts while settling are not the policy's
            self._invasions.pop_until(self._frame)
            state = self._ego_state()
        except (RuntimeError, SensorTimeout) as exc:
            raise self._crashed(exc, "reset") from exc
        self._stack[:] = frame
        proj = self._route.project(state["position"])
        self._hint, self._s = proj.index, proj.s
        self._progress = 0.0
        self._start_s = proj.s
        self._steps = 0
        self._prev_action = np.zeros(ACTION_DIM, np.float32)
        self._metrics = DrivingMetrics(self._route.goal_s)
        return self._observation(state), {"route_completion": 0.0, "termination_reason": None, "frame": self._frame}

    def step(self, action: np.ndarray) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        if self._ego is None or self._route is None:
            raise RuntimeError("CarlaDrivingEnv.step before reset (or after a crash: call recover() and reset())")
        a = check_action(action)
        control = self.api.VehicleControl(
            throttle=float(max(a[1], 0.0)), steer=float(-a[0]), brake=float(max(-a[1], 0.0))
        )
        try:
            self._ego.apply_control(control)
            frame = self._tick()
            collisions = self._collisions.pop_until(self._frame)
            invasions = self._invasions.pop_until(self._frame)
            state = self._ego_state()
        except (RuntimeError, SensorTimeout) as exc:
            raise self._crashed(exc, f"step {self._steps + 1} (frame after {self._frame})") from exc
        self._steps += 1
        self._stack[:-1] = self._stack[1:]
        self._stack[-1] = frame

        route = self._route
        proj = route.project(state["position"], self._hint)
        ds = proj.s - self._s
        self._hint, self._s = proj.index, proj.s
        self._progress = max(self._progress, proj.s - self._start_s)
        for event in collisions:
            other = event.other_actor
            self._metrics.collision(int(other.id), str(other.type_id))
        self._metrics.lane_invasion(len(invasions))
        off_road = (not state["on_road"]) or abs(state["lateral"]) > self.config.off_road_m
        self._metrics.set_off_road(off_road)
        self._metrics.step(state["speed"], self._progress)

        reason, terminated, truncated = termination(
            bool(collisions), off_road, self._progress, route.goal_s, self._steps, self.config.max_episode_steps
        )
        terms = reward_terms(
            ds,
            self.dt,
            self.config.target_speed,
            state["lateral"] / state["half_width"],
            state["speed"],
            a,
            self._prev_action,
        )
        reward = total_reward(terms, self.weights, reason)
        self._prev_action = a
        info: dict[str, Any] = {
            "termination_reason": reason,
            "route_completion": min(self._progress / route.goal_s, 1.0),
            "progress_m": self._progress,
            "speed": state["speed"],
            "frame": self._frame,
        }
        if terminated or truncated:
            info.update(self._metrics.summary())
            self.server.episode_finished()
        return self._observation(state), reward, terminated, truncated, info

    def render(self) -> np.ndarray | None:  # type: ignore[override]
        if self.render_mode != "rgb_array":
            return None
        return np.repeat(self._stack[-1][..., None], 3, axis=-1)

    def metrics(self) -> dict[str, float]:
        return {**self.server.metrics(), "simulator/stale_camera_frames_total": self._camera.stale_total}

    def close(self) -> None:
        """Destroy our actors and hand the server back in asynchronous mode (an attached
        server left in synchronous mode would freeze for its next client), then stop ours."""
        if self.connected:
            try:
                self._destroy_actors()
                settings = self._world.get_settings()
                settings.synchronous_mode = False
                settings.fixed_delta_seconds = None
                self._world.apply_settings(settings)
                self._tm.set_synchronous_mode(False)
            except RuntimeError as exc:
                log.warning("CARLA env close: server did not answer (%s); stopping it anyway", exc)
        self._forget_world()
        self.server.close()
