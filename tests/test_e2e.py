"""End to end through the CLI: real Ray, real redis-server, real env, tiny budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from learner.checkpoint import resolve_checkpoint, verify

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]


def _pids(pattern: str) -> set[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def _convoy(*args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "SDL_VIDEODRIVER": "offscreen"},
    )


def test_train_then_evaluate(tmp_path: Path) -> None:
    before = _pids("redis-server") | _pids("raylet") | _pids("gcs_server")
    out = tmp_path / "run"
    train = _convoy(
        "train",
        "--config",
        "deploy/configs/local.yaml",
        "run.total_env_steps=600",
        "collector.start_steps=200",
        "collector.steps_per_call=50",
        "learner.batch_size=32",
        "learner.publish_every=2",
        "learner.updates_per_call=2",
        # The replay ratio limiter (tested on its own) would hold a tiny CPU run to the learner's pace.
        "replay.samples_per_insert=0",
        "learner.hidden_dim=32",
        "run.progress_every_s=1",
        f"run.out_dir={out}",
        timeout=600,
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    text = train.stdout
    assert "resolved config:" in text and "placement: learner -> node" in text and "placement: collector 1" in text
    done = re.search(
        r"done \(budget\): env_steps (\d+) .* updates (\d+) .* weights v(\d+), collectors acted with up to v(\d+)", text
    )
    assert done, text[-2000:]
    env_steps, updates, version, acting = map(int, done.groups())
    assert env_steps == 600
    assert updates > 0 and version > 0 and acting > 0
    assert "final checkpoint:" in text
    assert (out / "config.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_reason"] == "budget" and summary["env_steps"] == 600
    assert summary["updates"] == updates and summary["collector_restarts"] == 0 and summary["corrupt_segments"] == 0
    assert summary["checkpoint_failures"] == 0
    # The final checkpoint the summary names exists, verifies, and is the run's latest.
    verify(summary["final_checkpoint"])
    assert resolve_checkpoint(out) == summary["final_checkpoint"]

    ev = _convoy("evaluate", "--checkpoint", str(out), "--episodes", "2", "--json", timeout=300)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout)
    assert {"episodes", "mean_return", "route_completion", "success_rate"} <= set(result)
    assert result["episodes"] == 2 and 0.0 <= result["route_completion"] <= 1.0
    assert result["updates"] == updates

    after = _pids("redis-server") | _pids("raylet") | _pids("gcs_server")
    assert not (after - before), f"processes left behind: {after - before}"


def test_bad_config_fails_fast_with_the_key() -> None:
    result = _convoy("train", "learner.batch_size=-3", timeout=60)
    assert result.returncode == 2
    assert "learner.batch_size=-3: must be >= 1" in result.stderr


def test_evaluate_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    result = _convoy("evaluate", "--checkpoint", str(tmp_path), "--episodes", "1", timeout=120)
    assert result.returncode == 1
    assert "no checkpoint" in result.stderr
