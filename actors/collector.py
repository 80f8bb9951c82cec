"""The collector: one simulator, one copy of the actor network, one segment sink.

Plain Python; ``actors.remote.CollectorActor`` is the thin Ray wrapper around it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from actors.carla.errors import RecoverableEnv, SimulatorCrashed, SimulatorUnavailable
from actors.envs.driving import DRIVING_PREFIX
from actors.metric_keys import (
    COLLECTOR_ACTING_SINCE,
    COLLECTOR_ENV_STEPS_TOTAL,
    COLLECTOR_EPISODES_TOTAL,
    COLLECTOR_LAST_ACTING_VERSION,
    COLLECTOR_LAST_EPISODE_RETURN,
    COLLECTOR_MEAN_RETURN,
    COLLECTOR_ROUTE_COMPLETION,
    COLLECTOR_SUCCESS_RATE,
    COLLECTOR_WEIGHTS_VERSION,
)
from actors.segments import SegmentBuilder
from common.config import ConvoyConfig
from common.metrics import Latency
from common.networks import Actor, NumpyVectorPolicy
from common.protocols import SegmentSink
from common.schema import Observation, SchemaError, check_observation
from common.weights import WeightsError, WeightsMessage, load_into, message_from_bytes

log = logging.getLogger(__name__)

# Crashes in a row (no successful step between) before the collector gives up and lets Ray
# restart it; a server manager usually gives up first (carla.max_restarts).
MAX_CONSECUTIVE_CRASHES = 10


def collector_noise_std(cfg: ConvoyConfig, collector_id: int) -> float:
    """Per-collector exploration noise spread linearly from noise_std to noise_std_max
    (Ape-X gives each actor its own exploration rate; Horgan et al. 2018, sec. 4.1)."""
    n = cfg.collector.num_collectors
    lo, hi = cfg.collector.noise_std, cfg.collector.noise_std_max
    # Collectors added by `convoy scale` beyond num_collectors reuse the spread cyclically.
    return lo if n <= 1 else lo + (hi - lo) * (collector_id % n) / (n - 1)


class Collector:
    """Steps its env with random actions until the run has ``collector.start_steps``
    transitions and it holds published weights, then with the newest actor plus Gaussian
    noise. Every transition carries the weight version that chose it (0 = random).

    ``stop``, once set (from another thread: the run is ending), makes :meth:`collect` return
    after the step in progress; the sink gets the same event so that it stops waiting too.
    """

    def __init__(
        self,
        cfg: ConvoyConfig,
        collector_id: int,
        sink: SegmentSink,
        env_factory: Callable[[], gym.Env],
        incarnation: int = 0,
        stop: threading.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop if stop is not None else threading.Event()
        self.collector_id = collector_id
        self.sink = sink
        self.env_factory = env_factory
        self.env = env_factory()
        self.noise_std = collector_noise_std(cfg, collector_id)
        self.seed = cfg.run.seed + 1000 * (collector_id + 1)
        # A replacement (incarnation k > 0) continues its index's seed stream with a new
        # substream, so it does not replay the episodes its predecessor already collected.
        self.incarnation = incarnation
        self.rng = np.random.default_rng(self.seed if incarnation == 0 else (self.seed, incarnation))
        self.policy = Actor(cfg.learner.encoder, cfg.learner.hidden_dim).eval()
        self.policy.requires_grad_(False)
        # Without a CNN the per-step forward runs in numpy (same fp32 layers, a tenth of the
        # CPU of a torch call on one observation); it follows every weight load.
        self.vector_policy = NumpyVectorPolicy(self.policy) if cfg.learner.encoder == "none" else None
        self.weights_version = 0
        self.run_env_steps = 0
        self.builder = SegmentBuilder(collector_id, cfg.collector.segment_length)
        # Episode ids are unique across collectors and their replacements: the collector id
        # in the high bits, then the incarnation.
        self._episode_counter = 0
        self.env_steps_total = 0
        self.episodes_total = 0
        self.policy_steps_total = 0
        self.bad_observations_total = 0
        self.dropped_steps_total = 0
        self.last_episode_return = float("nan")
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.recent_completion: deque[float] = deque(maxlen=20)
        self.recent_success: deque[float] = deque(maxlen=20)
        # Per-episode driving metrics ("driving/..." info keys) of envs that report them (CARLA).
        self.recent_driving: dict[str, deque[float]] = {}
        self.simulator_restarts_total = 0
        self.env_step_latency = Latency("collector/env_step_seconds")  # a simulator step (CARLA: one tick)
        self._consecutive_crashes = 0
        self.last_acting_version = 0
        self.acting_since = 0.0
        # Weights offered from another thread while collect() runs (:meth:`offer`): the newest
        # waits here and is loaded by collect()'s thread before its next step; the condition
        # also wakes an offer waiting for the collector to act with its version.
        self._offered: WeightsMessage | None = None
        self._acting = threading.Condition()
        self._episode_return = 0.0
        self._obs = self._reset()

    # ----- control from the driver --------------------------------------------------------

    def set_weights(self, message: bytes) -> int:
        """Load a weight message if it is newer than what we hold; returns the version held."""
        return self._load(message_from_bytes(message))

    def offer(self, message: bytes, timeout: float = 5.0) -> dict[str, float]:
        """Weights for a collector in the middle of :meth:`collect`, from another thread (the
        actor's weights thread): loaded by collect()'s own thread before its next step, so a
        long call does not delay new weights by its length. Waits until the collector acts
        with this version or a newer one (or ``timeout``, or ``stop``) and returns what it acts
        with, and since when, as :meth:`metrics` names them: the driver's fan-out clock."""
        msg = message_from_bytes(message)
        deadline = time.monotonic() + timeout
        with self._acting:
            held = self._offered.version if self._offered is not None else self.weights_version
            if msg.version > held:
                self._offered = msg
            # In slices: ``stop`` is an Event that does not notify this condition.
            while self.last_acting_version < msg.version and not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._acting.wait(min(left, 0.25))
            return {COLLECTOR_LAST_ACTING_VERSION: self.last_acting_version, COLLECTOR_ACTING_SINCE: self.acting_since}

    def _load_offered(self) -> None:
        with self._acting:
            msg, self._offered = self._offered, None
        if msg is not None:
            self._load(msg)

    def _load(self, msg: WeightsMessage) -> int:
        if msg.version > self.weights_version:
            try:
                load_into(self.policy, msg.payload)
            except WeightsError:
                log.exception("collector %d: rejected weights version %d", self.collector_id, msg.version)
                raise
            if self.vector_policy is not None:
                self.vector_policy.load(self.policy)
            self.weights_version = msg.version
        return self.weights_version

    def set_run_env_steps(self, n: int) -> None:
        self.run_env_steps = max(self.run_env_steps, int(n))

    # ----- stepping ----------------------------------------------------------------------

    def _reset(self) -> Observation:
        seed = int(self.rng.integers(2**31))
        for _attempt in range(3):
            obs = self._env_reset(seed)
            try:
                check_observation(obs)
            except SchemaError as exc:
                self.bad_observations_total += 1
                log.warning("collector %d: bad observation at reset (%s); resetting again", self.collector_id, exc)
                seed += 1
                continue
            self._episode_counter += 1
            self.builder.start_episode(
                (self.collector_id << 40) | ((self.incarnation & 0xFFF) << 28) | self._episode_counter, obs
            )
            self._episode_return = 0.0
            return obs
        raise RuntimeError(f"collector {self.collector_id}: env produced invalid observations on 3 resets")

    def _env_reset(self, seed: int) -> Observation:
        while True:
            try:
                obs, _ = self.env.reset(seed=seed)
                return obs
            except SimulatorCrashed as exc:
                self._recover_simulator(exc, "reset")

    def _recover_simulator(self, exc: SimulatorCrashed, during: str) -> None:
        """A dead or hung simulator: drop the unfinished segment (nothing half-written enters
        replay) and bring the simulator back; the caller starts a new episode."""
        self.simulator_restarts_total += 1
        self._consecutive_crashes += 1
        self.dropped_steps_total += self.builder.drop()
        log.warning("collector %d: simulator crashed during %s (%s); restarting it", self.collector_id, during, exc)
        if self._consecutive_crashes > MAX_CONSECUTIVE_CRASHES:
            raise SimulatorUnavailable(
                f"collector {self.collector_id}: {self._consecutive_crashes} simulator crashes in a row; last: {exc}"
            ) from exc
        if isinstance(self.env, RecoverableEnv):
            self.env.recover()
        else:
            try:
                self.env.close()
            except Exception as close_exc:  # the old env's simulator is gone; report, replace it
                log.warning("collector %d: closing the crashed env failed: %s", self.collector_id, close_exc)
            self.env = self.env_factory()

    @property
    def acting_randomly(self) -> bool:
        return self.run_env_steps < self.cfg.collector.start_steps or self.weights_version == 0

    def act(self, obs: Observation) -> np.ndarray:
        if self.acting_randomly:
            return self.rng.uniform(-1.0, 1.0, size=2).astype(np.float32)
        if self.vector_policy is not None:
            a = self.vector_policy(obs["vector"])
        else:
            with torch.no_grad():
                a = self.policy(torch.from_numpy(obs["image"])[None], torch.from_numpy(obs["vector"])[None])[0].numpy()
        noise = self.rng.normal(0.0, self.noise_std, size=a.shape)
        return np.clip(a + noise, -1.0, 1.0).astype(np.float32)

    def collect(self, num_steps: int) -> dict[str, float]:
        """Run ``num_steps`` env steps (fewer once ``stop`` is set); returns this collector's
        flat metric dict."""
        for _ in range(num_steps):
            if self.stop.is_set():
                break
            if self._offered is not None:
                self._load_offered()
            version = 0 if self.acting_randomly else self.weights_version
            if version > self.last_acting_version:
                self.acting_since = time.time()
            action = self.act(self._obs)
            try:
                t0 = time.perf_counter()
                next_obs, reward, terminated, truncated, info = self.env.step(action)
                self.env_step_latency.observe(time.perf_counter() - t0)
            except SimulatorCrashed as exc:
                self._recover_simulator(exc, "step")
                self._obs = self._reset()
                continue
            self._consecutive_crashes = 0
            self.env_steps_total += 1
            self.run_env_steps += 1
            if version > 0:
                self.policy_steps_total += 1
                if version != self.last_acting_version:
                    with self._acting:
                        self.last_acting_version = version
                        self._acting.notify_all()
            try:
                check_observation(next_obs)
                if not math.isfinite(float(reward)):
                    raise SchemaError(f"reward: non-finite value {reward!r}")
            except SchemaError as exc:
                # Caught where it appears: the unfinished segment is dropped, never stored.
                self.bad_observations_total += 1
                self.dropped_steps_total += self.builder.drop()
                log.warning("collector %d: %s; dropping the episode's unfinished segment", self.collector_id, exc)
                self._obs = self._reset()
                continue
            self._episode_return += float(reward)
            segment = self.builder.add(action, float(reward), next_obs, terminated, truncated, version)
            if segment is not None:
                self.sink.write(segment)
            if terminated or truncated:
                self._finish_episode(info)
                self._obs = self._reset()
            else:
                self._obs = next_obs
        return self.metrics()

    def _finish_episode(self, info: dict[str, Any]) -> None:
        self.episodes_total += 1
        self.last_episode_return = self._episode_return
        self.recent_returns.append(self._episode_return)
        self.recent_completion.append(float(info.get("route_completion", 0.0)))
        self.recent_success.append(1.0 if info.get("termination_reason") == "route_completed" else 0.0)
        for key, value in info.items():
            if key.startswith(DRIVING_PREFIX):
                self.recent_driving.setdefault(key, deque(maxlen=20)).append(float(value))

    def metrics(self) -> dict[str, float]:
        def mean(d: deque[float]) -> float:
            return float(np.mean(d)) if d else float("nan")

        env_metrics = getattr(self.env, "metrics", None)
        return {
            COLLECTOR_ENV_STEPS_TOTAL: self.env_steps_total,
            "collector/policy_steps_total": self.policy_steps_total,
            COLLECTOR_EPISODES_TOTAL: self.episodes_total,
            "collector/bad_observations_total": self.bad_observations_total,
            "collector/dropped_steps_total": self.dropped_steps_total,
            COLLECTOR_WEIGHTS_VERSION: self.weights_version,
            COLLECTOR_LAST_ACTING_VERSION: self.last_acting_version,
            COLLECTOR_ACTING_SINCE: self.acting_since,
            COLLECTOR_LAST_EPISODE_RETURN: self.last_episode_return,
            COLLECTOR_MEAN_RETURN: mean(self.recent_returns),
            COLLECTOR_ROUTE_COMPLETION: mean(self.recent_completion),
            COLLECTOR_SUCCESS_RATE: mean(self.recent_success),
            "collector/noise_std": self.noise_std,
            "collector/simulator_restarts_total": self.simulator_restarts_total,
            **self.env_step_latency.metrics(),
            **{f"collector/{key}": mean(values) for key, values in self.recent_driving.items()},
            **(env_metrics() if callable(env_metrics) else {}),
            **self.sink.metrics(),
        }

    def close(self) -> None:
        self.sink.close()
        self.env.close()
