"""`convoy bench scale`: a short run with paced collectors prints one JSON object with sane values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_short_scale_bench_prints_sane_json(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "scale", "--collectors", "2,4", "--seconds", "10"]
    cmd += ["--step-hz", "15", "--warmup", "3", "--out-dir", str(tmp_path), "--json"]
    # Light: a small learner batch, and calls of 16 steps (about 1 s) so that each collector
    # reports often within the window.
    cmd += ["learner.batch_size=64", "collector.steps_per_call=16", "learner.publish_every=10"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SDL_VIDEODRIVER": "offscreen"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert [r["collectors"] for r in result["runs"]] == [2, 4]
    assert result["device"] and "avx2" in result["cpu"] and result["resolved"]["env.backend"] == "carla"
    for r in result["runs"]:
        n = r["collectors"]
        assert r["ideal_env_steps_per_s"] == 15.0 * n
        assert 0 < r["efficiency"] <= 1.05, r
        assert r["env_steps_per_s"] == pytest.approx(r["efficiency"] * 15.0 * n, rel=0.01)
        assert r["inserted_transitions_per_s"] > 0 and r["inserted_bytes_per_s"] > r["inserted_transitions_per_s"]
        assert r["updates_per_s"] > 0 and 0 <= r["fed_ratio"] <= 1
        assert r["fanouts"] > 0 and 0 <= r["fanout_p50_s"] <= r["fanout_max_s"] < 20
        assert 0 < r["driver_loop_p99_s"] < 5
        assert len(r["collector_rss_mb"]) == n and all(v > 50 for v in r["collector_rss_mb"].values())
        assert r["collector_rss_mb_total"] == pytest.approx(sum(r["collector_rss_mb"].values()), abs=1)
        assert r["collector_cpu_us_per_step"] > 0
