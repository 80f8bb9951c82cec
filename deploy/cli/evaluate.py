"""``convoy evaluate``: run the deterministic policy of a checkpoint on the run's simulator
(the same episode loop and seeds as evaluation during training, actors/evaluator.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from actors.metric_keys import EVAL_EPISODE_STEPS, EVAL_RETURN, EVAL_RETURN_MIN, EVAL_ROUTE_COMPLETION
from deploy.cli.base import Subparsers, positive_int, print_result


def register(sub: Subparsers) -> None:
    e = sub.add_parser("evaluate", help="run a checkpoint's deterministic policy")
    e.add_argument(
        "--checkpoint",
        required=True,
        metavar="URI",
        help="a checkpoint, or a run (then --name picks one); a local path or a URI (s3://, gs://, file://)",
    )
    e.add_argument("--name", default="latest", help="in a run: latest (default), best, or ckpt-<updates>")
    e.add_argument("--episodes", type=positive_int, default=5, help="evaluation episodes (>= 1)")
    e.add_argument("--seed", type=int, default=1_000_003, help="seed of the first evaluation episode")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument(
        "--video", default=None, metavar="PATH.mp4", help="record every episode to this MP4 (local path or URI)"
    )
    e.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    result = evaluate(args.checkpoint, args.episodes, seed=args.seed, name=args.name, video=args.video)
    print_result(result, args.json)
    return 0


def evaluate(
    checkpoint: str | Path,
    episodes: int,
    seed: int = 1_000_003,
    log: TextIO | None = None,
    name: str = "latest",
    video: str | Path | None = None,
) -> dict[str, Any]:
    """Mean return, route completion and success rate over ``episodes`` episodes (no noise).

    ``checkpoint`` is a checkpoint URI, or a run URI in which ``name`` (``latest``, ``best``
    or ``ckpt-<updates>``) picks one; any local path or fsspec URI (learner.checkpoint).
    Episode ``k`` resets with seed ``seed + k``. ``video``: an MP4 path or URI to record every
    episode to, one after another (actors/video.py: the simulator's view beside the policy's
    frames, FRAME_WIDTH x FRAME_HEIGHT, one frame per step plus the reset frame per episode).
    With ``latest``, a checkpoint that fails verification is skipped (and named on ``log``)
    for the next older one.
    """
    # Imported here: torch and the simulators would slow every other command's start.
    import torch
    import yaml

    from actors.envs import make_env
    from actors.evaluator import Evaluator
    from common.config import from_dict
    from deploy.run.evaluation import load_actor_checkpoint
    from learner.checkpoint import newest_verified

    if episodes < 1:
        raise ValueError(f"--episodes={episodes}: must be >= 1")
    # Looked up at call time, not bound at import: a caller's redirect_stderr must take effect.
    out_log = log if log is not None else sys.stderr
    # ``latest`` of a run is its newest checkpoint that verifies; newer corrupt ones are named.
    path, skipped = newest_verified(checkpoint, name)
    for reason in skipped:
        print(f"evaluate: {reason}", file=out_log, flush=True)
    # The same reader as the evaluator actor of a training run (verified against the manifest).
    data = load_actor_checkpoint(path)
    cfg = from_dict(yaml.safe_load(data.config_yaml))
    torch.set_num_threads(1)
    render_mode = "rgb_array" if video else None
    evaluator = Evaluator(
        cfg, lambda: make_env(cfg.env, cfg.carla, render_mode=render_mode), episodes=episodes, seed=seed
    )
    version = data.weights_version
    evaluator.load_actor_state(data.actor, version)

    out = _run_episodes(evaluator, episodes, video, out_log)
    return _summary(out, episodes, path, data.updates, version, video)


def _run_episodes(evaluator: Any, episodes: int, video: str | Path | None, out_log: TextIO) -> dict[str, float]:
    """The evaluator's metrics over its episodes, each episode reported on ``out_log``; the
    episodes recorded to ``video`` when one is given. Closes the evaluator."""
    from actors.video import FRAME_HEIGHT, FRAME_WIDTH, EpisodeRecorder

    def say(ep: int, ep_return: float, steps: int, info: dict[str, Any]) -> None:
        print(
            f"episode {ep + 1}/{episodes}: return {ep_return:.2f}, steps {steps}, "
            f"route completion {float(info.get('route_completion', 0.0)):.2f}, end {info.get('termination_reason')}",
            file=out_log,
            flush=True,
        )

    recorder = EpisodeRecorder(evaluator.fps) if video else None
    try:
        out: dict[str, float] = evaluator.evaluate(on_episode=say, recorder=recorder)
        if video and recorder is not None:
            recorder.save(video)
            print(f"video: {video} ({recorder.frames_total} frames, {FRAME_WIDTH}x{FRAME_HEIGHT})", file=out_log)
    finally:
        if recorder is not None:
            recorder.close()
        evaluator.close()
    return out


def _summary(
    out: dict[str, float], episodes: int, path: str, updates: int, version: int, video: str | Path | None
) -> dict[str, Any]:
    """`convoy evaluate`'s result from the evaluator's metrics: means, rates, the checkpoint."""
    from actors.evaluator import EVAL_DRIVING_PREFIX  # loaded already: evaluate() ran the evaluator

    rates = {k.split("/", 1)[1]: v for k, v in out.items() if k.endswith("_rate") or k.startswith(EVAL_DRIVING_PREFIX)}
    return {
        "episodes": episodes,
        "mean_return": out[EVAL_RETURN],
        "min_return": out[EVAL_RETURN_MIN],
        "route_completion": out[EVAL_ROUTE_COMPLETION],
        "mean_episode_steps": out[EVAL_EPISODE_STEPS],
        **rates,
        "checkpoint": path,
        "updates": updates,
        "weights_version": version,
        **({"video": str(video)} if video else {}),
    }
