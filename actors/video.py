"""Videos of evaluation episodes: what the simulator showed beside what the policy saw.

Every video frame is ``FRAME_HEIGHT x FRAME_WIDTH`` = 384 x 672 RGB (uint8)::

    +-------------------------+------------+------------+
    |                         | frame t-3  | frame t-2  |
    |  simulator render       |  168x168   |  168x168   |
    |  336 x 336              +------------+------------+
    |  (black if it has none) | frame t-1  | frame t    |
    |                         |  168x168   |  168x168   |
    +-------------------------+------------+------------+
    | step, speed, steering, throttle/brake    48 px    |
    | reward, return, termination reason                |
    +---------------------------------------------------+

The right half is the policy's observation: its 4 stacked 84x84 grayscale frames, oldest
top-left, each shown at 2x (nearest neighbour). The simulator render (``env.render()`` with
``render_mode="rgb_array"``: highway-env's colour top-down view for the embedded env) is
fitted into the left square keeping its aspect ratio. An episode of ``T`` steps gives
``T + 1`` frames: the reset observation, then one per step.

Files are MP4 (H.264, yuv420p: plays in browsers and common players), encoded by ffmpeg
through imageio-ffmpeg, whose wheel ships the ffmpeg binary. TensorBoard gets an animated
GIF in an image summary, which is what ``SummaryWriter.add_video`` writes, without the
moviepy dependency ``add_video`` needs; TensorBoard's Images tab plays it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import storage
from common.schema import IMAGE_SHAPE

log = logging.getLogger(__name__)

PANEL = 336  # px: the render's square and the policy frames' 2x2 grid
TEXT_HEIGHT = 48  # px: two lines of text under the images
FRAME_HEIGHT = PANEL + TEXT_HEIGHT  # 384
FRAME_WIDTH = 2 * PANEL  # 672
# Both sides are multiples of 16, so ffmpeg's macroblocks fit and imageio never rescales.
POLICY_SCALE = PANEL // (2 * IMAGE_SHAPE[1])  # 2: 84 px frames shown at 168 px
VIDEOS_DIR = "videos"  # <run>/videos/
TB_VIDEO_DIR = "tensorboard/eval_video"  # its own TensorBoard run next to the curves
TB_VIDEO_TAG = "eval/video"
TB_SCALE = 2  # the TensorBoard GIF is the video at half size (336 x 192): a few MB at most


@dataclass(frozen=True)
class Overlay:
    """The numbers drawn on one frame. ``action`` is the contract's (steering, throttle/brake)
    that led to this frame (None on the reset frame)."""

    step: int
    speed: float | None = None
    action: tuple[float, float] | None = None
    reward: float | None = None
    episode_return: float = 0.0
    reason: str | None = None

    def lines(self) -> tuple[str, str]:
        speed = "-" if self.speed is None else f"{self.speed:5.2f} m/s"
        if self.action is None:
            controls = "steering -  throttle -"
        else:
            steer, pedal = self.action
            pedal_text = f"throttle {pedal:4.2f}" if pedal >= 0 else f"brake {-pedal:4.2f}"
            controls = f"steering {steer:+5.2f}  {pedal_text}"
        reward = "-" if self.reward is None else f"{self.reward:+6.3f}"
        return (
            f"step {self.step:4d}  speed {speed}  {controls}",
            f"reward {reward}  return {self.episode_return:+8.2f}  end {self.reason or '-'}",
        )


_FONT: Any = None


def _font() -> Any:
    global _FONT
    if _FONT is None:
        from PIL import ImageFont

        try:
            _FONT = ImageFont.load_default(size=15)
        except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font
            _FONT = ImageFont.load_default()
    return _FONT


def _fit(render: np.ndarray, size: int) -> np.ndarray:
    """``render`` (H, W, 3 or H, W) scaled to fit a ``size`` square, centred on black."""
    from PIL import Image

    rgb = render if render.ndim == 3 else np.repeat(render[..., None], 3, axis=-1)
    image = Image.fromarray(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8))
    scale = size / max(image.width, image.height)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    out = np.zeros((size, size, 3), np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = np.asarray(image)
    return out


def policy_grid(stack: np.ndarray) -> np.ndarray:
    """The 4 stacked frames (4, 84, 84) as a (PANEL, PANEL, 3) 2x2 grid, oldest top-left."""
    if stack.shape != IMAGE_SHAPE:
        raise ValueError(f"policy frames: expected shape {IMAGE_SHAPE}, got {stack.shape}")
    big = stack.repeat(POLICY_SCALE, axis=1).repeat(POLICY_SCALE, axis=2)
    grid = np.concatenate([np.concatenate(big[0:2], axis=1), np.concatenate(big[2:4], axis=1)], axis=0)
    return np.repeat(grid[..., None], 3, axis=-1)


def compose(stack: np.ndarray, render: np.ndarray | None, overlay: Overlay) -> np.ndarray:
    """One (FRAME_HEIGHT, FRAME_WIDTH, 3) uint8 video frame: render | policy frames, text below."""
    from PIL import Image, ImageDraw

    frame = np.zeros((FRAME_HEIGHT, FRAME_WIDTH, 3), np.uint8)
    if render is not None:
        frame[:PANEL, :PANEL] = _fit(render, PANEL)
    frame[:PANEL, PANEL:] = policy_grid(stack)
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    if render is None:
        draw.text((8, 8), "no simulator render", fill=(160, 160, 160), font=_font())
    for k, line in enumerate(overlay.lines()):
        draw.text((8, PANEL + 4 + 22 * k), line, fill=(255, 255, 255), font=_font())
    return np.asarray(image)


def _render(env: Any) -> np.ndarray | None:
    if getattr(env, "render_mode", None) != "rgb_array":
        return None
    frame = env.render()
    return None if frame is None else np.asarray(frame)


class EpisodeRecorder:
    """Composed frames of one or more episodes, in order: :meth:`reset` after ``env.reset``,
    :meth:`step` after every ``env.step``."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self._return = 0.0
        self._steps = 0

    def reset(self, env: Any, obs: dict[str, np.ndarray]) -> None:
        self._return, self._steps = 0.0, 0
        self.frames.append(compose(obs["image"], _render(env), Overlay(step=0)))

    def step(
        self, env: Any, obs: dict[str, np.ndarray], action: np.ndarray, reward: float, info: dict[str, Any]
    ) -> None:
        self._return += float(reward)
        self._steps += 1
        speed = info.get("speed")
        overlay = Overlay(
            step=self._steps,
            speed=None if speed is None else float(speed),
            action=(float(action[0]), float(action[1])),
            reward=float(reward),
            episode_return=self._return,
            reason=info.get("termination_reason"),
        )
        self.frames.append(compose(obs["image"], _render(env), overlay))


def encode_mp4(frames: Sequence[np.ndarray], fps: float) -> bytes:
    """H.264 MP4 bytes of ``frames`` (each H x W x 3 uint8, sides multiples of 16)."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("no frames to encode")
    with tempfile.TemporaryDirectory(prefix="convoy-video-") as tmp:
        path = Path(tmp) / "video.mp4"
        writer = imageio.get_writer(
            str(path), format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=7
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        return path.read_bytes()


def write_mp4(uri: str | Path, frames: Sequence[np.ndarray], fps: float) -> str:
    """Encode ``frames`` and write them to ``uri`` (a local path or fsspec URI); returns ``uri``."""
    storage.write_bytes(uri, encode_mp4(frames, fps))
    return str(uri)


def encode_gif(frames: Sequence[np.ndarray], fps: float, shrink: int = TB_SCALE) -> bytes:
    """An animated GIF (Pillow's encoder) of ``frames`` shrunk ``shrink`` times, looping."""
    from PIL import Image

    images = [Image.fromarray(f).reduce(shrink) if shrink > 1 else Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    duration_ms = max(20, round(1000.0 / fps))
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buf.getvalue()


def write_tensorboard_video(
    logdir_uri: str | Path, frames: Sequence[np.ndarray], fps: float, step: int, tag: str = TB_VIDEO_TAG
) -> str:
    """One image summary holding an animated GIF of ``frames`` at ``step``, in a new event file
    under ``logdir_uri`` (any storage URI); returns the file's URI.

    A new, complete file per video: object stores cannot append, and TensorBoard reads a
    directory's event files in name order, which time-stamped names keep."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    gif = encode_gif(frames, fps)
    height, width = math.ceil(frames[0].shape[0] / TB_SCALE), math.ceil(frames[0].shape[1] / TB_SCALE)
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    with tempfile.TemporaryDirectory(prefix="convoy-tb-video-") as tmp:
        writer = EventFileWriter(tmp, filename_suffix=f".{os.getpid()}.video")
        writer.add_event(Event(wall_time=time.time(), step=int(step), summary=summary))
        writer.close()
        (path,) = Path(tmp).iterdir()
        uri = storage.join(str(logdir_uri), path.name)
        storage.write_bytes(uri, path.read_bytes())
    return uri


def publish_run_video(run_uri: str | Path, frames: Sequence[np.ndarray], fps: float, env_steps: int) -> str:
    """An evaluation's video into the run: ``<run>/videos/eval-<env steps>.mp4`` and a GIF summary
    at step ``env_steps`` under ``<run>/tensorboard/eval_video/``. Returns the MP4's URI."""
    uri = write_mp4(storage.join(str(run_uri), VIDEOS_DIR, f"eval-{env_steps:010d}.mp4"), frames, fps)
    write_tensorboard_video(storage.join(str(run_uri), TB_VIDEO_DIR), frames, fps, env_steps)
    return uri
