"""`convoy bench collector`: a tiny run prints one JSON object with sane values per encoder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_collector_bench_prints_sane_json() -> None:
    cmd = [sys.executable, "-m", "deploy.cli", "bench", "collector", "--seconds", "1", "--rounds", "1", "--json"]
    cmd += ["env.other_vehicles=0", "learner.hidden_dim=32", "collector.segment_length=16"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "SDL_VIDEODRIVER": "offscreen"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert [r["encoder"] for r in result["runs"]] == ["none", "nature"]
    for r in result["runs"]:
        assert r["bare_steps_per_s"] > 0 and r["collector_steps_per_s"] > 0
        assert 0 < r["overhead_ratio"] < 2.0
        assert set(r["cpu_us_per_step"]) == {"policy", "encode", "write"}
        assert all(v >= 0 for v in r["cpu_us_per_step"].values())
        assert r["cpu_us_per_step"]["policy"] > 0 and r["cpu_us_per_step"]["encode"] > 0
    nature, none = result["runs"][1], result["runs"][0]
    assert nature["cpu_us_per_step"]["policy"] > none["cpu_us_per_step"]["policy"], "a CNN forward costs more"
