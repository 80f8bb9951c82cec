"""``convoy bench learning``: does the policy learn to drive, in how many env steps and seconds?

Each run is a real ``convoy train`` (deploy.run.driver.train: Ray, collectors on the embedded
simulator, a Redis shard, the learner) with a fixed env-step budget and seed, evaluating
the newest weights every ``--eval-every`` env steps on the fixed evaluation seeds
(deploy/run/evaluation.py) and once more at the end of the budget. From each run's
``eval.jsonl`` it reports the env steps and wall seconds at which evaluation route
completion first reached ``--target`` (0.9), and the final route completion, success rate
and return; then the medians over seeds. ``--collectors 2,4,8`` repeats every seed for each
collector count (wall time should fall as collectors are added; env steps to the target
should not change much, since the replay ratio is held by the rate limiter).

Evaluations are scheduled in learner updates (``run.eval_every_updates``); with the rate
limiter on, ``--eval-every`` env steps is ``eval_every * samples_per_insert / batch_size``
updates, counted from the end of the random warm-up (``collector.start_steps``). The bench
sets ``run.eval_hold``: collectors and the learner wait while an evaluation is due or runs,
so evaluations come at exactly that cadence instead of being skipped while the evaluator is
busy; the seconds reported leave the time held out.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO, cast

from actors.metric_keys import EVAL_COLLISION_RATE, EVAL_RETURN, EVAL_ROUTE_COMPLETION, EVAL_SUCCESS_RATE
from common.config import ConfigError, ConvoyConfig, load_config
from deploy.cli.base import print_json

TARGET_ROUTE_COMPLETION = 0.9


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _collector_counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--collectors {text!r}: expected a comma-separated list like 2,4,8") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--collectors {text!r}: every count must be >= 1")
    return counts


def eval_every_updates(cfg: ConvoyConfig, eval_every_env_steps: int) -> int:
    spi = cfg.replay.samples_per_insert
    if spi <= 0:
        raise ConfigError(
            "replay.samples_per_insert=0: convoy bench learning needs the rate limiter on, so that "
            "evaluations every N env steps are every N * samples_per_insert / batch_size updates"
        )
    return max(1, round(eval_every_env_steps * spi / cfg.learner.batch_size))


def summarize_run(history: list[dict[str, Any]], target: float = TARGET_ROUTE_COMPLETION) -> dict[str, Any]:
    """Per-run figures from a run's evaluation records (oldest first)."""
    if not history:
        raise RuntimeError("the run wrote no evaluation records (eval.jsonl is empty)")
    reached = next((r for r in history if r[EVAL_ROUTE_COMPLETION] >= target), None)
    final = history[-1]
    return {
        "steps_to_target": int(reached["env_steps"]) if reached else None,
        "seconds_to_target": round(_seconds(reached), 1) if reached else None,
        "final_env_steps": int(final["env_steps"]),
        "final_route_completion": float(final[EVAL_ROUTE_COMPLETION]),
        "final_success_rate": float(final[EVAL_SUCCESS_RATE]),
        "final_return": float(final[EVAL_RETURN]),
        "final_collision_rate": float(final[EVAL_COLLISION_RATE]),
        "evaluations": [
            {
                "env_steps": int(r["env_steps"]),
                "seconds": round(_seconds(r), 1),
                "route_completion": round(float(r[EVAL_ROUTE_COMPLETION]), 4),
                "success_rate": float(r[EVAL_SUCCESS_RATE]),
                "return": round(float(r[EVAL_RETURN]), 3),
            }
            for r in history
        ],
    }


def _seconds(record: dict[str, Any]) -> float:
    """Wall seconds of training up to an evaluation, the time held for evaluations left out."""
    return float(record["elapsed_s"]) - float(record.get("held_s", 0.0))


def _median(values: list[float | int | None]) -> float | None:
    """Median over runs; a run that never reached the target counts as worse than any that did
    (infinity), so the median is None when half or more never reached it."""
    if not values:
        return None
    keyed = sorted(float("inf") if v is None else float(v) for v in values)
    m = statistics.median(keyed)
    return None if m == float("inf") else m


def learning_run_config(
    config_path: str,
    overrides: Sequence[str],
    seed: int,
    env_steps: int,
    max_seconds: float,
    eval_every: int,
    run_dir: Path,
    collectors: int | None = None,
) -> ConvoyConfig:
    """The config of one benchmark run: ``overrides`` on ``config_path``, then the run's seed,
    budget and directory, evaluations every ``eval_every`` env steps (and ``collectors``
    collectors when given; otherwise the config's)."""
    forced = [f"collector.num_collectors={collectors}"] if collectors is not None else []
    cfg = load_config(
        config_path,
        [
            "run.metrics=false",
            *overrides,
            *forced,
            f"run.seed={seed}",
            f"run.total_env_steps={env_steps}",
            f"run.max_seconds={max_seconds}",
            f"run.out_dir={run_dir}",
            # Evaluations at their exact cadence: collection and learning wait while one is due.
            "run.eval_hold=true",
        ],
    )
    return cfg.replace(f"run.eval_every_updates={eval_every_updates(cfg, eval_every)}")


def run_one(cfg: ConvoyConfig, log_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One training run; (its summary, its evaluation records)."""
    from deploy.run.driver import train
    from deploy.run.evaluation import read_history

    with open(log_path, "w") as log:
        start = time.monotonic()
        summary = train(cfg, out=cast(TextIO, _Tee(log)))
        summary["bench_wall_seconds"] = round(time.monotonic() - start, 1)
    return summary, read_history(cfg.run.out_dir)


class _Tee(io.TextIOBase):
    """The driver's output to the run's log file; progress and eval lines also to stderr."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._line = ""

    def write(self, s: str) -> int:
        self.log.write(s)
        self._line += s
        *lines, self._line = self._line.split("\n")
        for line in lines:
            if line.startswith(("[", "eval", "done", "final", "no CUDA")):
                sys.stderr.write(f"  {line}\n")
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        sys.stderr.flush()


def _run_record(
    collectors: int, seed: int, summary: dict[str, Any], history: list[dict[str, Any]], target: float
) -> dict[str, Any]:
    """One run's line of the report: its figures from the evaluations, and the driver's summary."""
    figures = summarize_run(history, target)
    _say(
        f"  -> steps_to_target {figures['steps_to_target']}, seconds_to_target {figures['seconds_to_target']}, "
        f"final route_completion {figures['final_route_completion']:.3f}, "
        f"success {figures['final_success_rate']:.2f}, return {figures['final_return']:.2f}"
    )
    return {
        "collectors": collectors,
        "seed": seed,
        **figures,
        "exit_reason": summary.get("exit_reason"),
        "wall_seconds": summary.get("bench_wall_seconds"),
        "env_steps_per_s": summary.get("env_steps_per_s"),
        "updates": summary.get("updates"),
        "samples_per_insert": summary.get("samples_per_insert"),
    }


def _by_collectors(runs: list[dict[str, Any]], collectors: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """Wall-clock scaling with collectors: per count, the median seconds to the target (or to
    the end of the budget), wall seconds and final route completion."""
    by_count = {}
    for n in collectors:
        rs = [r for r in runs if r["collectors"] == n]
        by_count[str(n)] = {
            "median_seconds_to_target": _median([r["seconds_to_target"] for r in rs]),
            "median_wall_seconds": _median([r["wall_seconds"] for r in rs]),
            "median_final_route_completion": _median([r["final_route_completion"] for r in rs]),
        }
    return by_count


def _run_all(
    config_path: str,
    overrides: Sequence[str],
    env_steps: int,
    seeds: int,
    collectors: Sequence[int],
    eval_every: int,
    eval_episodes: int,
    root: Path,
    target: float,
    max_seconds: float,
    first_seed: int = 0,
) -> list[dict[str, Any]]:
    """One ``convoy train`` per collector count and seed, one after another, each logging to
    ``root/c<collectors>-s<seed>.log``; their records in that order."""
    runs: list[dict[str, Any]] = []
    for n in collectors:
        for seed in range(first_seed, first_seed + seeds):
            run_dir = root / f"c{n}-s{seed}"
            cfg = learning_run_config(
                config_path,
                [f"run.eval_episodes={eval_episodes}", *overrides],
                seed,
                env_steps,
                max_seconds,
                eval_every,
                run_dir,
                collectors=n,
            )
            limit = f" or {max_seconds:g} s" if max_seconds else ""
            _say(f"run collectors={n} seed={seed}: {env_steps} env steps{limit}, log {run_dir}.log")
            summary, history = run_one(cfg, Path(f"{run_dir}.log"))
            runs.append(_run_record(n, seed, summary, history, target))
    return runs


def run(
    config: str | None,
    overrides: Sequence[str],
    env_steps: int,
    seeds: int,
    collectors: Sequence[int],
    eval_every: int,
    eval_episodes: int,
    out_dir: str | None,
    target: float = TARGET_ROUTE_COMPLETION,
    max_seconds: float = 0.0,
    first_seed: int = 0,
) -> dict[str, Any]:
    from deploy.cli import default_config_path
    from learner.agent import resolve_device

    root = Path(out_dir or tempfile.mkdtemp(prefix="convoy-bench-learning-"))
    root.mkdir(parents=True, exist_ok=True)
    config_path = config or default_config_path()
    base = load_config(config_path, overrides)
    runs = _run_all(
        config_path,
        overrides,
        env_steps,
        seeds,
        collectors,
        eval_every,
        eval_episodes,
        root,
        target,
        max_seconds,
        first_seed,
    )
    first = [r for r in runs if r["collectors"] == collectors[0]]
    result: dict[str, Any] = {
        "runs": runs,
        "median_final_route_completion": _median([r["final_route_completion"] for r in first]),
        "median_final_success_rate": _median([r["final_success_rate"] for r in first]),
        "median_steps_to_target": _median([r["steps_to_target"] for r in first]),
        "median_seconds_to_target": _median([r["seconds_to_target"] for r in first]),
        "target_route_completion": target,
        "env_steps": env_steps,
        "max_seconds": max_seconds,
        "seeds": seeds,
        "first_seed": first_seed,
        "eval_every_env_steps": eval_every,
        "eval_episodes": eval_episodes,
        "samples_per_insert": base.replay.samples_per_insert,
        "batch_size": base.learner.batch_size,
        "other_vehicles": base.env.other_vehicles,
        "device": str(resolve_device(base.learner.device)),
        "encoder": base.learner.encoder,
        "config": config_path,
        "overrides": list(overrides),
        "out_dir": str(root),
    }
    if len(collectors) > 1:
        result["by_collectors"] = _by_collectors(runs, collectors)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convoy bench learning", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="run config (default: the one `convoy train` picks)")
    p.add_argument("--env-steps", type=int, default=40_000, help="env-step budget of each run")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="also end each run after this many wall seconds (run.max_seconds; 0 = only the env-step budget)",
    )
    p.add_argument("--seeds", type=int, default=3, help="runs per collector count, seeds F..F+K-1")
    p.add_argument("--first-seed", type=int, default=0, help="F, the first seed (to add seeds to an earlier run)")
    p.add_argument("--collectors", type=_collector_counts, default=[2], help="collector counts, e.g. 2,4,8")
    p.add_argument("--eval-every", type=int, default=4_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation (fixed seeds)")
    p.add_argument("--target", type=float, default=TARGET_ROUTE_COMPLETION, help="route completion to reach")
    p.add_argument("--out-dir", default=None, help="where the runs go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. learner.encoder=none env.other_vehicles=0")
    args = p.parse_args(argv)
    for name in ("env_steps", "seeds", "eval_every", "eval_episodes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.first_seed < 0:
        p.error(f"--first-seed={args.first_seed}: must be >= 0")
    if args.max_seconds < 0:
        p.error(f"--max-seconds={args.max_seconds}: must be >= 0 (0 = no time limit)")
    result = run(
        args.config,
        args.overrides,
        args.env_steps,
        args.seeds,
        args.collectors,
        args.eval_every,
        args.eval_episodes,
        args.out_dir,
        args.target,
        args.max_seconds,
        args.first_seed,
    )
    if args.json:
        print_json(result)
    else:
        for k, v in result.items():
            if k != "runs":
                print(f"{k}: {v}")
        for r in result["runs"]:
            print({k: v for k, v in r.items() if k != "evaluations"})
    return 0
