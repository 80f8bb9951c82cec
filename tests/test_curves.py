"""Learning curves: TensorBoard events under <run>/tensorboard indexed by env steps, local and
on an fsspec URI, and `convoy report`'s PNG."""

from __future__ import annotations

import math
import time
from pathlib import Path

import fsspec
import pytest

from common import storage
from common.config import load_config
from deploy.cli import main
from deploy.cli.report import write_report
from deploy.run.curves import WALL_TAG, CurveWriter, read_curves
from deploy.run.progress import Progress
from deploy.run.telemetry import RunTelemetry

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_scalars_are_indexed_by_env_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    w = CurveWriter(run)
    w.add({"loss/critic": 1.0, "return/train": math.nan}, env_steps=100, wall_seconds=1.5)
    w.add({"loss/critic": 0.5, "return/train": 3.0}, env_steps=250, wall_seconds=4.0)
    w.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    curves = read_curves(run)
    assert curves["loss/critic"] == [(100, 1.0), (250, 0.5)]
    assert curves["return/train"] == [(250, 3.0)], "NaN (no episode finished yet) is not a point"
    assert curves[WALL_TAG] == [(100, 1.5), (250, 4.0)]


def test_events_reach_an_object_store_uri() -> None:
    uri = f"memory://curves-{time.monotonic_ns()}"
    try:
        w = CurveWriter(uri, upload_every_s=0.0)
        w.add({"loss/actor": -2.0}, env_steps=10, wall_seconds=0.1)  # uploaded at once (upload_every_s=0)
        assert storage.open_store(storage.join(uri, "tensorboard")).list(), "uploaded before close"
        w.add({"loss/actor": -3.0, "return/train": 1.0}, env_steps=20, wall_seconds=0.2)
        w.close()
        assert read_curves(uri)["loss/actor"] == [(10, -2.0), (20, -3.0)]
        assert write_report(uri) == storage.join(uri, "curves.png")
        assert storage.read_bytes(storage.join(uri, "curves.png")).startswith(PNG_MAGIC)
    finally:
        fsspec.filesystem("memory").rm(uri, recursive=True)


def _progress(steps: int, updates: int, ret: float, evaluation: bool) -> tuple[Progress, dict[str, float]]:
    p = Progress()
    p.collector = {
        0: {
            "collector/env_steps_total": steps / 2,
            "collector/mean_return": ret,
            "collector/route_completion": 0.2,
            "collector/success_rate": 0.0,
        },
        1: {
            "collector/env_steps_total": steps / 2,
            "collector/mean_return": ret + 2,
            "collector/route_completion": 0.4,
            "collector/success_rate": 1.0,
        },
    }
    p.learner = {
        "learner/updates_total": updates,
        "learner/critic_loss": 0.3,
        "learner/actor_loss": -1.0,
        "learner/critic_q_mean": 1.0,
        "learner/critic_grad_norm": 5.0,
        "learner/critic_grad_norm_clipped": 1.0,
    }
    ev = {"eval/return": 7.0, "eval/route_completion": 0.9, "eval/success_rate": 0.5, "eval/weights_version": 3.0}
    return p, (ev if evaluation else {})


def test_run_telemetry_curves_and_report_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "myrun"
    cfg = load_config(None, [f"run.out_dir={run}", "run.metrics=false"])
    tele = RunTelemetry(cfg, "myrun")
    assert tele.exporter is None, "run.metrics=false: curves only"
    for i, (steps, updates) in enumerate([(0, 0), (400, 10), (900, 40)]):
        p, ev = _progress(steps, updates, ret=float(i), evaluation=i == 2)
        p.start = time.monotonic() - (i + 1) * 2.0  # elapsed 2, 4, 6 s
        tele.tick(p, ev, force=True)
    tele.close()
    curves = read_curves(run)
    assert curves["return/train"] == [(0, 1.0), (400, 2.0), (900, 3.0)], "mean over collectors"
    assert curves["route_completion/train"][-1] == (900, pytest.approx(0.3))
    assert curves["success_rate/train"][-1] == (900, 0.5)
    assert curves["return/eval"] == [(900, 7.0)] and curves["route_completion/eval"] == [(900, pytest.approx(0.9))]
    sps = dict(curves["throughput/env_steps_per_s"])
    assert sps[400] == pytest.approx(200.0, rel=0.05) and sps[900] == pytest.approx(250.0, rel=0.05)
    assert dict(curves["throughput/updates_per_s"])[900] == pytest.approx(15.0, rel=0.05)
    for tag in ("loss/critic", "loss/actor", "q/mean", "grad_norm/critic", "grad_norm/critic_clipped"):
        assert [s for s, _ in curves[tag]] == [0, 400, 900], tag

    assert main(["report", str(run)]) == 0
    png = run / "curves.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert str(png) in capsys.readouterr().out


def test_report_on_a_directory_without_curves_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "no TensorBoard events" in capsys.readouterr().err
