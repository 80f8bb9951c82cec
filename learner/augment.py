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

import torch

from common.schema import Batch

AUGMENTS = ("none", "shift")
SHIFT_PAD = 4


def random_shift(frames: torch.Tensor, pad: int = SHIFT_PAD, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each sample of ``frames`` (B, C, H, W), any dtype, by its own random integer
    offset in [-pad, pad] per axis, replicating the border; every channel of a sample moves
    the same way."""
    if frames.dim() != 4:
        raise ValueError(f"random_shift: expected (B, C, H, W), got shape {tuple(frames.shape)}")
    b, c, h, w = frames.shape
    dev = frames.device
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device="cpu").to(dev) - pad
    rows = (torch.arange(h, device=dev)[None, :] + offsets[0][:, None]).clamp_(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=dev)[None, :] + offsets[1][:, None]).clamp_(0, w - 1)  # (B, W)
    # Two gathers (rows, then columns) are about 2x faster than one 4-d advanced index.
    shifted = frames.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return shifted.gather(3, cols[:, None, None, :].expand(b, c, h, w))


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
    # Separate stacks: shift them as one (B, 2C, H, W) tensor so both get the same offsets.
    c = batch.image.shape[1]
    both = random_shift(torch.cat([batch.image, batch.next_image], dim=1), generator=generator)
    return Batch(image=both[:, :c], next_image=both[:, c:], **rest)
