"""`convoy bench learning` end to end with a tiny budget: a real run (Ray, collectors, a Redis
shard, the learner, the evaluator actor) produces the JSON the issue specifies; the same run
shows the rate limiter holding the replay ratio within its tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.bench.learning import _median, summarize_run

REPO = Path(__file__).resolve().parents[1]

BATCH = 32
SPI = 16.0  # half an update of BATCH per env step
TOLERANCE = 64.0  # sampled transitions either side of the ratio (two batches)
START = 200
SEGMENT = 16


def summary_skipped(out: Path) -> float:
    return float(json.loads((out / "c2-s1" / "summary.json").read_text())["eval"]["eval/skipped_total"])


def test_summaries_and_medians() -> None:
    history = [
        {
            "env_steps": 100,
            "elapsed_s": 1.0,
            "eval/route_completion": 0.5,
            "eval/success_rate": 0.0,
            "eval/return": 1.0,
            "eval/collision_rate": 0.0,
        },
        {
            "env_steps": 200,
            "elapsed_s": 2.0,
            "eval/route_completion": 0.95,
            "eval/success_rate": 0.5,
            "eval/return": 2.0,
            "eval/collision_rate": 0.0,
        },
        {
            "env_steps": 300,
            "elapsed_s": 3.0,
            "eval/route_completion": 0.8,
            "eval/success_rate": 0.0,
            "eval/return": 1.5,
            "eval/collision_rate": 0.5,
        },
    ]
    s = summarize_run(history)
    assert s["steps_to_target"] == 200 and s["seconds_to_target"] == 2.0
    assert s["final_route_completion"] == 0.8 and s["final_return"] == 1.5
    assert summarize_run(history[:1])["steps_to_target"] is None
    # A run that never reached the target counts as the slowest.
    assert _median([100, None, 300]) == 300 and _median([100, None, None]) is None


@pytest.mark.timeout(900)
def test_bench_learning_tiny_run_json_and_replay_ratio(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "bench",
        "learning",
        "--config",
        "deploy/configs/local.yaml",
        "--env-steps",
        "900",
        "--seeds",
        "1",
        "--first-seed",
        "1",
        "--eval-every",
        "300",
        "--eval-episodes",
        "1",
        "--out-dir",
        str(out),
        "--json",
        "learner.encoder=none",
        "learner.hidden_dim=16",
        f"learner.batch_size={BATCH}",
        "learner.updates_per_call=2",
        f"replay.samples_per_insert={SPI}",
        f"replay.spi_tolerance={TOLERANCE}",
        f"collector.start_steps={START}",
        f"collector.segment_length={SEGMENT}",
        "collector.steps_per_call=16",
        "env.max_episode_steps=40",
        "run.progress_every_s=5",
    ]
    env = {**os.environ, "SDL_VIDEODRIVER": "offscreen", "CONVOY_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    for key in (
        "runs",
        "median_final_route_completion",
        "median_final_success_rate",
        "median_steps_to_target",
        "device",
        "encoder",
    ):
        assert key in result, key
    assert result["encoder"] == "none" and result["device"] in ("cpu", "cuda")
    (run,) = result["runs"]
    for key in (
        "collectors",
        "seed",
        "steps_to_target",
        "seconds_to_target",
        "final_route_completion",
        "final_success_rate",
        "final_return",
    ):
        assert key in run, key
    assert run["collectors"] == 2 and run["seed"] == 1 and result["first_seed"] == 1
    assert 0.0 <= run["final_route_completion"] <= 1.0
    assert result["median_final_route_completion"] == run["final_route_completion"]
    # Evaluations ran during training (every 300 env steps after the warm-up) and at the end.
    evals = run["evaluations"]
    assert len(evals) >= 2 and evals[-1]["env_steps"] >= 900
    history = [json.loads(x) for x in (out / "c2-s1" / "eval.jsonl").read_text().splitlines()]
    assert [h["env_steps"] for h in history] == [e["env_steps"] for e in evals]
    # At the exact cadence (run.eval_hold): every 150 updates (300 env steps * SPI / BATCH),
    # none skipped, each within one train call (updates_per_call=2) of its due point.
    every = 300 * SPI / BATCH
    during = history[:-1]
    assert [int(h["updates"] // every) for h in during] == list(range(1, len(during) + 1)), history
    assert all(h["updates"] - every * (h["updates"] // every) < 2 for h in during), history
    assert summary_skipped(out) == 0

    # The rate limiter held the ratio: sampled transitions stay within the tolerance of
    # SPI * (inserted - warm-up). Sampled = updates * BATCH plus batches prefetched but not yet
    # trained on; inserted trails env steps by the collectors' unfinished segments.
    summary = json.loads((out / "c2-s1" / "summary.json").read_text())
    sampled = summary["updates"] * BATCH
    inserted = summary["env_steps"]
    slack = TOLERANCE + 6 * BATCH + SPI * 2 * SEGMENT
    assert abs(sampled - SPI * (inserted - START)) <= slack, (sampled, inserted)
