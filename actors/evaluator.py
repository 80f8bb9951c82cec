"""The evaluator: the deterministic policy (no exploration noise) on fixed seeds.

Plain Python; ``actors.remote.EvaluatorActor`` is the thin Ray wrapper the driver runs next to
the collectors, in its own process with its own simulator, so evaluating never takes a
collector's simulator or steps. It receives weights in the same message format as the
collectors (common/weights.py: msgpack + safetensors, never pickle), or loads the checkpoint
it is told to evaluate from run storage itself (``evaluate_checkpoint``, with the checkpoint
reader it was given), so checkpoint bytes never pass through the driver.

Every evaluation plays the same episodes: episode ``k`` resets with seed ``run.eval_seed + k``,
so two evaluations differ only by the weights, and "best" compares like with like.

Videos (actors/video.py): with ``publish_videos`` (the evaluator actor of a run) the first
episode of every ``run.video_every_evals``-th evaluation is recorded and written by this
process to ``<run>/videos/`` and the run's TensorBoard directory, so frames never travel to
the driver; ``convoy evaluate --video`` passes its own recorder to record every episode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from actors.envs.driving import DRIVING_PREFIX
from actors.metric_keys import (
    EVAL_COLLISION_RATE,
    EVAL_EPISODE_STEPS,
    EVAL_OFF_ROAD_RATE,
    EVAL_PREFIX,
    EVAL_RETURN,
    EVAL_RETURN_MIN,
    EVAL_ROUTE_COMPLETION,
    EVAL_SUCCESS_RATE,
    EVAL_WEIGHTS_VERSION,
)
from actors.video import EpisodeRecorder, publish_run_video
from common.config import ConvoyConfig
from common.networks import Actor
from common.schema import check_observation
from common.weights import CheckpointLoader, load_into, message_from_bytes

log = logging.getLogger(__name__)

# Episode endings counted as rates over the evaluation's episodes (infractions of the
# embedded env; CARLA's leaderboard-style "driving/*" metrics are averaged as well).
ENDINGS = ("route_completed", "collision", "off_road", "time_limit")

# The env's "driving/*" episode metrics, averaged (the other keys: actors/metric_keys.py).
EVAL_DRIVING_PREFIX = EVAL_PREFIX + DRIVING_PREFIX


class EvaluationStopped(RuntimeError):
    """:meth:`Evaluator.evaluate` ended early because ``stopping`` was set (the run is ending)."""


class Evaluator:
    """Runs ``episodes`` deterministic episodes of the newest weights it was given.

    ``stopping`` (a thread-safe Event) ends an evaluation in flight after its current step
    with :class:`EvaluationStopped`, so a run that is ending need not wait for its episodes."""

    def __init__(
        self,
        cfg: ConvoyConfig,
        env_factory: Callable[[], gym.Env],
        episodes: int | None = None,
        seed: int | None = None,
        publish_videos: bool = False,
        load_checkpoint: CheckpointLoader | None = None,
    ) -> None:
        """``publish_videos``: write the run's evaluation videos (needs an env made with
        ``render_mode="rgb_array"`` for the simulator's view; without it only the policy's
        frames are shown)."""
        self.cfg = cfg
        self.load_checkpoint = load_checkpoint
        self.episodes = cfg.run.eval_episodes if episodes is None else episodes
        if self.episodes < 1:
            raise ValueError(f"run.eval_episodes={self.episodes}: must be >= 1")
        self.seed = cfg.run.eval_seed if seed is None else seed
        self.env = env_factory()
        self.policy = Actor(cfg.learner.encoder, cfg.learner.hidden_dim).eval()
        self.policy.requires_grad_(False)
        self.weights_version = -1  # nothing loaded yet
        self.evaluations_total = 0
        self.publish_videos = publish_videos and cfg.run.video_every_evals > 0
        self.videos_total = 0
        self.last_video = ""
        self.stopping = threading.Event()

    def set_weights(self, message: bytes) -> int:
        """Load a weight message (any version: the driver may evaluate an older checkpoint)."""
        msg = message_from_bytes(message)
        load_into(self.policy, msg.payload)
        self.weights_version = msg.version
        return msg.version

    def load_actor_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load an actor state dict (a checkpoint's ``actor`` network) as weights ``version``."""
        self.policy.load_state_dict(state)
        self.weights_version = version

    def evaluate_checkpoint(self, uri: str) -> tuple[dict[str, float], dict[str, int]]:
        """Load the checkpoint at ``uri`` (verified by the reader) and evaluate its actor:
        (the ``eval/...`` metrics, the checkpoint's ``updates`` and ``env_steps``)."""
        if self.load_checkpoint is None:
            raise RuntimeError("evaluator: built without a checkpoint reader; pass load_checkpoint")
        checkpoint = self.load_checkpoint(uri)
        self.load_actor_state(checkpoint.actor, checkpoint.weights_version)
        return self.evaluate(env_steps=checkpoint.env_steps), {
            "updates": checkpoint.updates,
            "env_steps": checkpoint.env_steps,
        }

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            image = torch.from_numpy(obs["image"])[None]
            return self.policy(image, torch.from_numpy(obs["vector"])[None])[0].numpy()

    def play(self, ep: int, recorder: EpisodeRecorder | None = None) -> tuple[float, int, dict[str, Any]]:
        """Episode ``ep`` (seed ``seed + ep``): (return, steps, final info); frames go to ``recorder``."""
        obs, info = self.env.reset(seed=self.seed + ep)
        check_observation(obs)
        if recorder is not None:
            recorder.reset(self.env, obs)
        total, n, done = 0.0, 0, False
        while not done:
            if self.stopping.is_set():
                raise EvaluationStopped(f"evaluation stopped in episode {ep} after {n} steps")
            action = self.act(obs)
            obs, reward, terminated, truncated, info = self.env.step(action)
            if recorder is not None:
                recorder.step(self.env, obs, action, float(reward), info)
            total += float(reward)
            n += 1
            done = terminated or truncated
        return total, n, info

    def video_due(self) -> bool:
        """Whether the evaluation about to run records the run's video (every
        ``run.video_every_evals``-th, starting with the first)."""
        return self.publish_videos and self.evaluations_total % self.cfg.run.video_every_evals == 0

    def evaluate(
        self,
        message: bytes | None = None,
        on_episode: Callable[[int, float, int, dict[str, Any]], None] | None = None,
        recorder: EpisodeRecorder | None = None,
        env_steps: int | None = None,
    ) -> dict[str, float]:
        """Play the fixed episodes; returns a flat dict of ``eval/...`` means over episodes.

        ``on_episode(index, return, steps, final info)`` is called after each episode (progress
        output for ``convoy evaluate``); ``recorder`` gets the frames of every episode.
        ``env_steps`` is the run's env step count of the weights (the step of the run's video)."""
        if message is not None:
            self.set_weights(message)
        if self.weights_version < 0:
            raise RuntimeError("evaluator: no weights loaded; pass a weight message")
        start = time.perf_counter()
        returns, completion, steps = [], [], []
        endings = dict.fromkeys(ENDINGS, 0)
        driving: dict[str, list[float]] = {}
        record_first = recorder is None and self.video_due()
        for ep in range(self.episodes):
            run_video = EpisodeRecorder(self.fps, thumbnails=True) if record_first and ep == 0 else None
            try:
                total, n, info = self.play(ep, recorder or run_video)
                if run_video is not None:
                    self._publish(run_video, self.weights_version if env_steps is None else env_steps)
            finally:
                if run_video is not None:
                    run_video.close()
            if on_episode is not None:
                on_episode(ep, total, n, info)
            returns.append(total)
            completion.append(float(info.get("route_completion", 0.0)))
            steps.append(n)
            reason = info.get("termination_reason")
            if reason in endings:
                endings[reason] += 1
            for key, value in info.items():
                if key.startswith(DRIVING_PREFIX):
                    driving.setdefault(key, []).append(float(value))
        self.evaluations_total += 1
        out = {
            EVAL_RETURN: float(np.mean(returns)),
            EVAL_RETURN_MIN: float(np.min(returns)),
            EVAL_ROUTE_COMPLETION: float(np.mean(completion)),
            EVAL_SUCCESS_RATE: endings["route_completed"] / self.episodes,
            EVAL_COLLISION_RATE: endings["collision"] / self.episodes,
            EVAL_OFF_ROAD_RATE: endings["off_road"] / self.episodes,
            "eval/time_limit_rate": endings["time_limit"] / self.episodes,
            EVAL_EPISODE_STEPS: float(np.mean(steps)),
            "eval/episodes": float(self.episodes),
            EVAL_WEIGHTS_VERSION: float(self.weights_version),
            "eval/seconds": time.perf_counter() - start,
            **{f"{EVAL_PREFIX}{key}": float(np.mean(values)) for key, values in driving.items()},
        }
        log.info(
            "evaluation of weights v%d: route completion %.3f, success %.2f, return %.2f",
            self.weights_version,
            out[EVAL_ROUTE_COMPLETION],
            out[EVAL_SUCCESS_RATE],
            out[EVAL_RETURN],
        )
        return out

    @property
    def fps(self) -> float:
        """Frames per second of videos: the simulator's real time (its ``render_fps``)."""
        return float(getattr(self.env, "metadata", {}).get("render_fps", 10))

    def _publish(self, recorder: EpisodeRecorder, env_steps: int) -> None:
        try:
            self.last_video = publish_run_video(self.cfg.run.out_dir, recorder, env_steps)
            self.videos_total += 1
            log.info("evaluation video: %s", self.last_video)
        except Exception as exc:  # a video is a by-product: the evaluation's result still counts
            log.warning("writing the evaluation video failed: %s", exc)

    def metrics(self) -> dict[str, Any]:
        return {"evaluator/evaluations_total": self.evaluations_total, "evaluator/videos_total": self.videos_total}

    def close(self) -> None:
        self.env.close()
