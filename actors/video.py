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

import contextlib
import io
import logging
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
    """Composed frames of one or more episodes, in order (:meth:`reset` after ``env.reset``,
    :meth:`step` after every ``env.step``), streamed to ffmpeg as they come: an episode of
    400 frames is 300 MB as arrays, so none are kept, except, with ``thumbnails``, a half-size
    256-colour copy for the TensorBoard GIF (64 KB a frame). :meth:`save` writes the MP4;
    :meth:`close` discards it."""

    def __init__(self, fps: float, thumbnails: bool = False) -> None:
        self.fps = fps
        self.frames_total = 0
        self.thumbnails: list[Any] | None = [] if thumbnails else None  # PIL images, palette mode
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._writer: Any = None
        self._return = 0.0
        self._steps = 0

    def reset(self, env: Any, obs: dict[str, np.ndarray]) -> None:
        self._return, self._steps = 0.0, 0
        self._add(compose(obs["image"], _render(env), Overlay(step=0)))

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
        self._add(compose(obs["image"], _render(env), overlay))

    def _add(self, frame: np.ndarray) -> None:
        if self._writer is None:
            import imageio.v2 as imageio

            self._tmp = tempfile.TemporaryDirectory(prefix="convoy-video-")
            # H.264 in yuv420p: what browsers and common players decode.
            self._writer = imageio.get_writer(
                str(Path(self._tmp.name) / "video.mp4"),
                format="FFMPEG",
                fps=self.fps,
                codec="libx264",
                pixelformat="yuv420p",
                quality=7,
            )
        self._writer.append_data(frame)
        self.frames_total += 1
        if self.thumbnails is not None:
            from PIL import Image

            self.thumbnails.append(Image.fromarray(frame).reduce(TB_SCALE).quantize(256))

    def save(self, uri: str | Path) -> str:
        """Finish the MP4 and write it to ``uri`` (a local path or fsspec URI); returns ``uri``."""
        if self._writer is None or self._tmp is None:
            raise ValueError("no frames to encode")
        self._writer.close()
        self._writer = None
        try:
            storage.write_bytes(uri, (Path(self._tmp.name) / "video.mp4").read_bytes())
        finally:
            self.close()
        return str(uri)

    def close(self) -> None:
        """Drop the encoder and its temporary file (after :meth:`save`, or to discard)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):  # a broken ffmpeg pipe: the file is discarded anyway
                self._writer.close()
            self._writer = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def encode_gif(images: Sequence[Any], fps: float) -> bytes:
    """An animated, looping GIF (Pillow's encoder) of PIL ``images``."""
    if not images:
        raise ValueError("no frames to encode")
    buf = io.BytesIO()
    duration_ms = max(20, round(1000.0 / fps))
    images[0].save(buf, format="GIF", save_all=True, append_images=list(images[1:]), duration=duration_ms, loop=0)
    return buf.getvalue()


def write_tensorboard_video(
    logdir_uri: str | Path, images: Sequence[Any], fps: float, step: int, tag: str = TB_VIDEO_TAG
) -> str:
    """One image summary holding an animated GIF of PIL ``images`` at ``step``, in a new event
    file under ``logdir_uri`` (any storage URI); returns the file's URI.

    A new, complete file per video: object stores cannot append, and TensorBoard reads a
    directory's event files in name order, which time-stamped names keep."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    gif = encode_gif(images, fps)
    width, height = images[0].size
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


def publish_run_video(run_uri: str | Path, recorder: EpisodeRecorder, env_steps: int) -> str:
    """An evaluation's video (``recorder`` made with ``thumbnails``) into the run:
    ``<run>/videos/eval-<env steps>.mp4`` and a GIF summary at step ``env_steps`` under
    ``<run>/tensorboard/eval_video/``. Returns the MP4's URI."""
    uri = recorder.save(storage.join(str(run_uri), VIDEOS_DIR, f"eval-{env_steps:010d}.mp4"))
    if recorder.thumbnails:
        write_tensorboard_video(storage.join(str(run_uri), TB_VIDEO_DIR), recorder.thumbnails, recorder.fps, env_steps)
    return uri
