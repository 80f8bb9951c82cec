"""Replay-ratio harness: env steps to learn lane following at a given replay ratio.

The figures in docs/design/replay-ratio.md come from this setting: vector-only lane following
(``learner.encoder=none env.other_vehicles=0``), batch 256, 5,000 uniform random warm-up
steps, one seed, in one process with the real ``Learner`` (learner/loop.py) and the real
``Evaluator`` (actors/evaluator.py), and the ratio held exactly rather than by the rate
limiter: after the warm-up every env step adds ``samples_per_insert / batch_size`` updates
(64 / 256 is one update every fourth step). No Ray and no Redis: one embedded simulator steps,
an in-memory uniform replay of vector transitions feeds the learner, and the acting policy is
refreshed from the learner every ``learner.publish_every`` updates, as collectors are.

Every ``--eval-every`` env steps the evaluator plays ``--eval-episodes`` deterministic
episodes on the fixed seeds ``run.eval_seed + k`` and reports route completion and success.

    PYTHONPATH=. python docs/harness/replay_ratio.py --samples-per-insert 256,64 \\
        --env-steps 20000 --eval-every 2500 --eval-episodes 10 [section.key=value ...]

A run of both ratios to 20,000 env steps takes tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

# The setting of the published table; command-line overrides come after and win.
BASE_OVERRIDES = (
    "learner.encoder=none",
    "env.other_vehicles=0",
    "learner.batch_size=256",
    "collector.start_steps=5000",
    "run.checkpoint_every_updates=100000000",
)


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list like 256,64") from None
    if not ratios or any(r <= 0 for r in ratios):
        raise argparse.ArgumentTypeError(f"{text!r}: every ratio must be > 0")
    return ratios


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="replay_ratio.py",
        description="Env steps to learn vector-only lane following, per replay ratio (in-process, exact ratio).",
    )
    p.add_argument(
        "--samples-per-insert",
        type=_ratios,
        default=[256.0, 64.0],
        help="comma-separated replay ratios to compare, in sampled transitions per inserted transition "
        "(default: 256,64)",
    )
    p.add_argument("--env-steps", type=int, default=20_000, help="env steps per run (default: 20000)")
    p.add_argument("--eval-every", type=int, default=2_500, help="evaluate every this many env steps (default: 2500)")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="run.seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("overrides", nargs="*", help="config overrides section.key=value, applied last")
    return p.parse_args(argv)


def run_one(spi: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train at replay ratio ``spi`` and return the evaluation records, oldest first."""
    import numpy as np
    import torch

    from actors.envs import make_env
    from actors.evaluator import Evaluator
    from common.config import load_config
    from common.networks import Actor
    from common.schema import ACTION_DIM, VECTOR_DIM, Batch
    from learner.loop import Learner

    cfg = load_config(None, [*BASE_OVERRIDES, f"run.seed={args.seed}", *args.overrides])
    batch_size, capacity = cfg.learner.batch_size, cfg.replay.capacity
    env = make_env(cfg.env)
    vector_dim, action_dim = VECTOR_DIM, ACTION_DIM  # the observation and action contract

    class VectorReplay:
        """Uniform in-memory replay of vector transitions (a BatchSource for the Learner)."""

        def __init__(self) -> None:
            self.obs = np.zeros((capacity, vector_dim), np.float32)
            self.next_obs = np.zeros((capacity, vector_dim), np.float32)
            self.act = np.zeros((capacity, action_dim), np.float32)
            self.rew = np.zeros(capacity, np.float32)
            self.term = np.zeros(capacity, np.float32)
            self.version = np.zeros(capacity, np.int64)
            self.n = 0
            self.rng = np.random.default_rng(args.seed)
            self.no_image = torch.zeros((batch_size, 1, 1, 1), dtype=torch.uint8)

        @property
        def size(self) -> int:
            return min(self.n, capacity)

        def add(self, o: np.ndarray, a: np.ndarray, r: float, o2: np.ndarray, term: bool, version: int) -> None:
            i = self.n % capacity
            self.obs[i], self.act[i], self.rew[i], self.next_obs[i] = o, a, r, o2
            self.term[i], self.version[i] = float(term), version
            self.n += 1

        def __next__(self) -> Batch:
            idx = self.rng.integers(0, self.size, batch_size)
            return Batch(
                image=self.no_image,
                vector=torch.from_numpy(self.obs[idx]),
                action=torch.from_numpy(self.act[idx]),
                reward=torch.from_numpy(self.rew[idx]),
                next_image=self.no_image,
                next_vector=torch.from_numpy(self.next_obs[idx]),
                terminated=torch.from_numpy(self.term[idx]),
                policy_version=torch.from_numpy(self.version[idx]),
            )

        def metrics(self) -> dict[str, float]:
            return {"replay/size": float(self.size)}

        def close(self) -> None:
            pass

    replay = VectorReplay()
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="convoy-replay-ratio-") as run_dir:
        learner = Learner(cfg, replay, run_dir, vector_dim=vector_dim, action_dim=action_dim)
        evaluator = Evaluator(cfg, lambda: make_env(cfg.env), episodes=args.eval_episodes)
        policy = Actor(cfg.learner.encoder, cfg.learner.hidden_dim).eval()
        policy.requires_grad_(False)
        policy_version = 0
        rng = np.random.default_rng(args.seed)
        obs, _ = env.reset(seed=cfg.run.seed)
        credit = 0.0
        for step in range(1, args.env_steps + 1):
            if replay.n < cfg.collector.start_steps:
                action = rng.uniform(-1.0, 1.0, action_dim).astype(np.float32)
                version = 0
            else:
                with torch.no_grad():
                    mean = policy(torch.from_numpy(obs["image"])[None], torch.from_numpy(obs["vector"])[None])[0]
                noise = rng.normal(0.0, cfg.collector.noise_std, action_dim)
                action = np.clip(mean.numpy() + noise, -1.0, 1.0).astype(np.float32)
                version = policy_version
            next_obs, reward, terminated, truncated, _ = env.step(action)
            replay.add(obs["vector"], action, float(reward), next_obs["vector"], terminated, version)
            obs = env.reset()[0] if terminated or truncated else next_obs
            if learner.ready():
                credit += spi / batch_size
                n = int(credit)
                credit -= n
                if n:
                    learner.train(n, env_steps=step)
                # The learner publishes every learner.publish_every updates (and after its
                # first); act with what it published, as collectors do.
                if learner.weights_version != policy_version:
                    policy.load_state_dict(learner.agent.state_dicts()["actor"])
                    policy_version = learner.weights_version
            if step % args.eval_every == 0 or step == args.env_steps:
                evaluator.load_actor_state(learner.agent.state_dicts()["actor"], learner.updates)
                result = evaluator.evaluate()
                record = {
                    "samples_per_insert": spi,
                    "env_steps": step,
                    "updates": learner.updates,
                    "route_completion": round(result["eval/route_completion"], 4),
                    "success_rate": result["eval/success_rate"],
                    "return": round(result["eval/return"], 3),
                }
                records.append(record)
                print(json.dumps(record), file=sys.stderr, flush=True)
        evaluator.close()
        learner.close()
    env.close()
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = {spi: run_one(spi, args) for spi in args.samples_per_insert}
    if args.json:
        print(json.dumps({"runs": {str(spi): recs for spi, recs in results.items()}}))
        return 0
    header = " | ".join(f"spi {spi:g}" for spi in results)
    print(f"| env steps | {header} |")
    print("|---:|" + "---|" * len(results))
    for i, first in enumerate(next(iter(results.values()))):
        rows = [recs[i] for recs in results.values()]
        cells = " | ".join(f"{r['route_completion']:.2f} / {r['success_rate']:.1f}" for r in rows)
        print(f"| {first['env_steps']:,} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
