"""Image augmentation of sampled batches (``learner.augment``).

``shift``: DrQ's random shift (Kostrikov, Yarats and Fergus 2020, "Image Augmentation Is All
You Need: Regularizing Deep Reinforcement Learning from Pixels"): pad the 84x84 frames by 4
pixels replicating the border, then crop 84x84 at a random offset, i.e. translate each sample
by a random integer in [-4, 4] pixels per axis. The shift is drawn per sample and applied to
every frame of that sample, so the observation stack and the next-observation stack of one
transition move together (they share three frames, and a TD target must see the same scene
the Q value saw). Replicate padding is done by clamping indices, so frames stay uint8.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from common.schema import Batch

AUGMENTS = ("none", "shift")
SHIFT_PAD = 4


def random_shift(frames: torch.Tensor, pad: int = SHIFT_PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each sample of ``frames`` (B, C, H, W), any dtype, by its own random integer
    offset in [-pad, pad] per axis, replicating the border; every channel of a sample moves
    the same way."""
    _check_frames(frames)
    return shift(frames, draw_corners(frames.shape[0], pad, generator), pad)


def draw_corners(batch: int, pad: int = SHIFT_PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample's crop corner (2, B) in the padded frame: row and column in [0, 2 * pad]."""
    return torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device="cpu")


def shift(frames: torch.Tensor, corners: torch.Tensor, pad: int = SHIFT_PAD) -> torch.Tensor:
    """``frames`` (B, C, H, W) padded by ``pad`` (border replicated) and cropped back to H x W at
    each sample's corner (:func:`draw_corners`)."""
    _check_frames(frames)
    if frames.device.type == "cpu" and not frames.requires_grad and frames.dtype in _NUMPY_DTYPES:
        # A padded copy and one strided gather of whole rows: 4-6x faster than the two
        # element-wise gathers of gather_shift on a 2-core CPU (batch 128 of 4-8 uint8 84x84 frames).
        return torch.from_numpy(_shift_numpy(frames.numpy(), corners.numpy(), pad))
    return gather_shift(frames, corners, pad)


def gather_shift(frames: torch.Tensor, corners: torch.Tensor, pad: int = SHIFT_PAD) -> torch.Tensor:
    """:func:`shift` by element-wise gathers with clamped indices: any device, dtype or autograd."""
    b, c, h, w = frames.shape
    dev = frames.device
    offsets = corners.to(dev) - pad
    rows = (torch.arange(h, device=dev)[None, :] + offsets[0][:, None]).clamp_(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=dev)[None, :] + offsets[1][:, None]).clamp_(0, w - 1)  # (B, W)
    # Two gathers (rows, then columns) are about 2x faster than one 4-d advanced index.
    shifted = frames.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return shifted.gather(3, cols[:, None, None, :].expand(b, c, h, w))


_NUMPY_DTYPES = (torch.uint8, torch.float32, torch.float64, torch.int32, torch.int64)


def _check_frames(frames: torch.Tensor) -> None:
    if frames.dim() != 4:
        raise ValueError(f"random_shift: expected (B, C, H, W), got shape {tuple(frames.shape)}")


def _shift_numpy(x: np.ndarray, corners: np.ndarray, pad: int) -> np.ndarray:
    b, c, h, w = x.shape
    padded = np.empty((b, c, h + 2 * pad, w + 2 * pad), x.dtype)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    padded[:, :, pad : pad + h, :pad] = x[:, :, :, :1]  # replicate the border (np.pad's "edge" is ~2x slower)
    padded[:, :, pad : pad + h, pad + w :] = x[:, :, :, -1:]
    padded[:, :, :pad] = padded[:, :, pad : pad + 1]
    padded[:, :, pad + h :] = padded[:, :, pad + h - 1 : pad + h]
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (B, C, 2p+1, 2p+1, H, W), no copy
    return windows[np.arange(b), :, corners[0], corners[1]]  # (B, C, H, W), a fresh contiguous array


def augment_batch(batch: Batch, name: str, generator: torch.Generator | None = None) -> Batch:
    """``batch`` with ``learner.augment`` applied to its images (the same shift for the
    observation and the next observation of each transition)."""
    if name == "none":
        return batch
    if name != "shift":
        raise ValueError(f"learner.augment={name!r}: allowed: {', '.join(map(repr, AUGMENTS))}")
    rest = {k: v for k, v in batch.__dict__.items() if k not in ("image", "next_image", "frames")}
    if batch.frames is not None:
        return Batch.from_frames(random_shift(batch.frames, generator=generator), **rest)
    # Separate stacks: one corner per sample for both, so they move together.
    corners = draw_corners(batch.image.shape[0], generator=generator)
    return Batch(image=shift(batch.image, corners), next_image=shift(batch.next_image, corners), **rest)
