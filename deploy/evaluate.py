"""``convoy evaluate``: run the deterministic policy of a checkpoint on the run's simulator."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import yaml

from actors.envs import make_env
from common.config import from_dict
from common.networks import Actor
from learner.checkpoint import load_checkpoint, resolve_checkpoint


def evaluate(
    checkpoint: str | Path,
    episodes: int,
    seed: int = 1_000_003,
    log: TextIO = sys.stderr,
    name: str = "latest",
) -> dict[str, Any]:
    """Mean return, route completion and success rate over ``episodes`` episodes (no noise).

    ``checkpoint`` is a checkpoint URI, or a run URI in which ``name`` (``latest``, ``best``
    or ``ckpt-<updates>``) picks one; any local path or fsspec URI (learner.checkpoint).
    """
    if episodes < 1:
        raise ValueError(f"--episodes={episodes}: must be >= 1")
    path = resolve_checkpoint(checkpoint, name)
    data = load_checkpoint(path, networks=("actor",), full=False)
    cfg = from_dict(yaml.safe_load(data.config_yaml))
    torch.set_num_threads(1)
    actor = Actor(cfg.learner.encoder, cfg.learner.hidden_dim).eval()
    actor.load_state_dict(data.networks["actor"])
    env = make_env(cfg.env, cfg.carla)
    returns, completion, success, lengths = [], [], [], []
    # Leaderboard-style driving metrics ("driving/..." info keys) where the env reports them (CARLA).
    driving: dict[str, list[float]] = {}
    try:
        for ep in range(episodes):
            obs, info = env.reset(seed=seed + ep)
            ep_return, steps, done = 0.0, 0, False
            while not done:
                with torch.no_grad():
                    action = actor(torch.from_numpy(obs["image"])[None], torch.from_numpy(obs["vector"])[None])[
                        0
                    ].numpy()
                obs, reward, terminated, truncated, info = env.step(action)
                ep_return += float(reward)
                steps += 1
                done = terminated or truncated
            returns.append(ep_return)
            completion.append(float(info.get("route_completion", 0.0)))
            success.append(1.0 if info.get("termination_reason") == "route_completed" else 0.0)
            lengths.append(steps)
            for key, value in info.items():
                if key.startswith("driving/"):
                    driving.setdefault(key, []).append(float(value))
            print(
                f"episode {ep + 1}/{episodes}: return {ep_return:.2f}, steps {steps}, "
                f"route completion {completion[-1]:.2f}, end {info.get('termination_reason')}",
                file=log,
                flush=True,
            )
    finally:
        env.close()
    return {
        "episodes": episodes,
        "mean_return": float(np.mean(returns)),
        "route_completion": float(np.mean(completion)),
        "success_rate": float(np.mean(success)),
        "mean_episode_steps": float(np.mean(lengths)),
        "checkpoint": path,
        "updates": int(data.state.get("updates", 0)),
        "weights_version": int(data.state.get("weights_version", 0)),
        **{key: float(np.mean(values)) for key, values in driving.items()},
    }
