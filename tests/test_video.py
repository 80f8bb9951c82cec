"""Evaluation videos: ``convoy evaluate --video`` writes a playable MP4 of every episode, the
frame layout is the documented one, and the run's evaluator writes its first episode to
``<run>/videos/`` and to TensorBoard (or nothing with ``run.video_every_evals=0``)."""

from __future__ import annotations

import io
import json
import re
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from actors.envs import make_env
from actors.evaluator import Evaluator
from actors.video import FRAME_HEIGHT, FRAME_WIDTH, PANEL, TB_VIDEO_DIR, TB_VIDEO_TAG, VIDEOS_DIR, Overlay, compose
from common import storage
from common.config import ConfigError, ConvoyConfig, load_config
from common.networks import Actor
from common.weights import message_to_bytes, pack_weights
from deploy.run.curves import read_curves
from learner.checkpoint import CheckpointData, save_checkpoint


def _cfg(*over: str) -> ConvoyConfig:
    return load_config(
        None,
        ["learner.encoder=none", "learner.hidden_dim=16", "env.max_episode_steps=12", "run.eval_episodes=2", *over],
    )


def _decode(path: str | Path) -> list[np.ndarray]:
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return [np.asarray(frame) for frame in reader]
    finally:
        reader.close()


def _message(version: int = 3) -> bytes:
    torch.manual_seed(0)
    return message_to_bytes(pack_weights(version, Actor("none", 16)))


def _evaluator(cfg: ConvoyConfig, publish: bool = True) -> Evaluator:
    return Evaluator(cfg, lambda: make_env(cfg.env, render_mode="rgb_array"), publish_videos=publish)


def test_frame_puts_the_render_beside_the_policy_frames_at_the_documented_size() -> None:
    assert (FRAME_HEIGHT, FRAME_WIDTH) == (384, 672)
    stack = np.stack([np.full((84, 84), v, np.uint8) for v in (10, 60, 110, 160)])
    stack[3, 0, 0] = 255  # one pixel marks the newest frame's top-left corner
    render = np.zeros((100, 200, 3), np.uint8)
    render[..., 0] = 200  # red, wider than tall: fitted by width, black bars above and below
    frame = compose(stack, render, Overlay(step=3, speed=7.5, action=(0.25, -0.5), reward=1.0, reason="collision"))
    assert frame.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3) and frame.dtype == np.uint8
    # Left: the render, scaled to PANEL wide and centred vertically.
    assert tuple(frame[PANEL // 2, PANEL // 2]) == (200, 0, 0)
    assert tuple(frame[10, PANEL // 2]) == (0, 0, 0) and tuple(frame[PANEL - 10, PANEL // 2]) == (0, 0, 0)
    # Right: the 4 frames at 2x in a 2x2 grid, oldest top-left, grayscale.
    h = PANEL // 2
    quads = [frame[:h, PANEL : PANEL + h], frame[:h, PANEL + h :], frame[h:PANEL, PANEL : PANEL + h]]
    assert [int(np.median(q[..., 0])) for q in quads] == [10, 60, 110]
    newest = frame[h:PANEL, PANEL + h :]
    assert newest[:2, :2].min() == 255 and newest[2, 2, 0] == 160  # a pixel becomes 2x2
    assert (newest[..., 0] == newest[..., 2]).all()
    # Below: the text strip carries drawn text.
    strip = frame[PANEL:]
    assert strip.max() == 255 and (strip == 0).mean() > 0.5
    assert Overlay(step=3, action=(0.1, -0.5)).lines()[0].endswith("brake 0.50")


def test_frame_without_a_simulator_render_keeps_its_size() -> None:
    frame = compose(np.zeros((4, 84, 84), np.uint8), None, Overlay(step=0))
    assert frame.shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    with pytest.raises(ValueError, match="policy frames"):
        compose(np.zeros((3, 84, 84), np.uint8), None, Overlay(step=0))


def test_convoy_evaluate_video_writes_a_playable_mp4(tmp_path: Path) -> None:
    from deploy.cli import main

    cfg = _cfg()
    torch.manual_seed(0)
    data = CheckpointData(
        networks={"actor": Actor("none", 16).state_dict()},
        state={"env_steps": 0, "weights_version": 1},
        config_yaml=cfg.to_yaml(),
    )
    ckpt = save_checkpoint(str(tmp_path / "checkpoints"), 10, data, keep=1)
    video = tmp_path / "out" / "watch.mp4"
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["evaluate", "--checkpoint", ckpt, "--episodes", "2", "--video", str(video), "--json"])
    assert rc == 0, err.getvalue()
    result = json.loads(out.getvalue())
    assert result["video"] == str(video)
    steps = [int(s) for s in re.findall(r"steps (\d+)", err.getvalue())]
    assert len(steps) == 2 and result["mean_episode_steps"] == pytest.approx(sum(steps) / 2)
    frames = _decode(video)
    assert len(frames) == sum(s + 1 for s in steps), "every episode: its reset frame and one per step"
    assert frames[0].shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    # The simulator's render is there (highway-env draws a grey track, not a blank frame).
    assert frames[0][:PANEL, :PANEL].mean() > 30


def test_evaluator_writes_its_first_episode_to_the_run_and_tensorboard(tmp_path: Path) -> None:
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    evaluator = _evaluator(_cfg(f"run.out_dir={run}", "run.video_every_evals=2"))
    try:
        steps: list[int] = []
        evaluator.evaluate(_message(), on_episode=lambda ep, ret, n, info: steps.append(n), env_steps=500)
        evaluator.evaluate(env_steps=600)  # not due: every 2nd evaluation
        evaluator.evaluate(env_steps=700)
    finally:
        evaluator.close()
    assert sorted(p.name for p in (run / VIDEOS_DIR).iterdir()) == ["eval-0000000500.mp4", "eval-0000000700.mp4"]
    frames = _decode(run / VIDEOS_DIR / "eval-0000000500.mp4")
    assert len(frames) == steps[0] + 1, "the first episode only"
    assert frames[0].shape == (FRAME_HEIGHT, FRAME_WIDTH, 3)
    assert evaluator.metrics()["evaluator/videos_total"] == 2

    acc = EventAccumulator(str(run / TB_VIDEO_DIR), size_guidance={"images": 0})
    acc.Reload()
    assert TB_VIDEO_TAG in acc.Tags()["images"]
    events = acc.Images(TB_VIDEO_TAG)
    assert [e.step for e in events] == [500, 700]
    gif = Image.open(io.BytesIO(events[0].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == steps[0] + 1
    assert (events[0].width, events[0].height) == gif.size == (FRAME_WIDTH // 2, FRAME_HEIGHT // 2)


def test_evaluator_videos_go_through_run_storage() -> None:
    run = f"memory://video-{uuid.uuid4().hex[:8]}"
    evaluator = _evaluator(_cfg(f"run.out_dir={run}", "run.eval_episodes=1"))
    try:
        evaluator.evaluate(_message(), env_steps=42)
    finally:
        evaluator.close()
    assert storage.exists(storage.join(run, VIDEOS_DIR, "eval-0000000042.mp4"))
    assert len(storage.open_store(storage.join(run, TB_VIDEO_DIR)).list()) == 1
    assert read_curves(run) == {}, "the curves' reader skips the video's folder"


def test_video_every_evals_0_writes_no_video(tmp_path: Path) -> None:
    run = tmp_path / "run"
    evaluator = _evaluator(_cfg(f"run.out_dir={run}", "run.video_every_evals=0", "run.eval_episodes=1"))
    try:
        evaluator.evaluate(_message(), env_steps=10)
    finally:
        evaluator.close()
    assert not (run / VIDEOS_DIR).exists() and not (run / "tensorboard").exists()
    assert evaluator.metrics()["evaluator/videos_total"] == 0
    with pytest.raises(ConfigError, match="video_every_evals"):
        _cfg("run.video_every_evals=-1")
