"""Actor and critic networks; shared by the learner (training) and collectors (acting).

Each of actor and critic owns a separate CNN fed ``image / 255``; the 23-float vector is
concatenated after the CNN (512 + 23) and an MLP head follows. The critic's CNN is shared by
its twin Q heads, as in DrQ (Yarats et al. 2021), so a critic update steps one CNN.

Encoders (``learner.encoder``):

``nature``          NatureCNN (Mnih et al. 2015): conv 8x8/4 (32), 4x4/2 (64), 3x3/1 (64), fc 512,
                    then LayerNorm and tanh (DrQ-v2's trunk) so features stay in [-1, 1].
``nature_maxpool``  the same three convs, each followed by 2x2 max-pooling; strides are
                    reduced (2, 1, 1) so 84x84 still leaves a 3x3 map, then fc 512, LayerNorm, tanh.
``none``            no image: features are empty and the heads see only the vector (for
                    vector-only tasks such as the Pendulum learning test).

Precision: only the CNN encoders may run in reduced precision. ``ConvEncoder.autocast_dtype``
(set by the learner from ``learner.precision``) runs the convolutions and the fc layer under
autocast and returns fp32 features; the MLP heads, the vector, the action and every Q value
are always fp32 (autocast is switched off around them, so an outer autocast cannot reach
them). Q values and TD targets here are of order 10-100; bf16 keeps 8 significant bits, so
between 64 and 128 its grid has steps of 0.5, as large as one step's reward.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.schema import ACTION_DIM, IMAGE_SHAPE, VECTOR_DIM

FEATURE_DIM = 512
ENCODERS = ("nature", "nature_maxpool", "none")


def image_to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 frames as ``image / 255`` in fp32; float input is taken as already converted.
    uint8 travels to the device; the conversion happens there."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


class ConvEncoder(nn.Module):
    """uint8 or float image (B, C, H, W) -> fp32 features (B, 512).

    With ``autocast_dtype`` set (bf16), the CNN runs under autocast; the features it returns
    are cast back to fp32 so nothing after the encoder sees a reduced-precision tensor."""

    autocast_dtype: torch.dtype | None = None

    def __init__(self, convs: nn.Sequential, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.convs = convs
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, in_channels, image_size, image_size)).flatten(1).shape[1]
        # LayerNorm + tanh bound the features, as DrQ-v2's trunk (Yarats et al. 2021). With a
        # plain ReLU here the actor's CNN, trained through dQ/da, grew its features from norm
        # ~0.4 to ~300 within 50 updates, saturated the policy's tanh and froze it (measured:
        # tests/test_precision.py::test_actor_features_stay_bounded_while_training).
        self.fc = nn.Sequential(nn.Linear(n_flat, FEATURE_DIM), nn.LayerNorm(FEATURE_DIM), nn.Tanh())
        self.out_dim: int = FEATURE_DIM

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image_to_float(image)
        if self.autocast_dtype is None:
            return self.fc(self.convs(x).flatten(1))
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            features = self.fc(self.convs(x).flatten(1))
        return features.float()


def nature_cnn(in_channels: int = IMAGE_SHAPE[0], image_size: int = IMAGE_SHAPE[1]) -> ConvEncoder:
    convs = nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=8, stride=4),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=4, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 64, kernel_size=3, stride=1),
        nn.ReLU(),
    )
    return ConvEncoder(convs, in_channels, image_size)


def nature_maxpool_cnn(in_channels: int = IMAGE_SHAPE[0], image_size: int = IMAGE_SHAPE[1]) -> ConvEncoder:
    # 84 -conv8/2-> 39 -pool-> 19 -conv4/1-> 16 -pool-> 8 -conv3/1-> 6 -pool-> 3: 64*3*3 = 576.
    convs = nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=8, stride=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=4, stride=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, kernel_size=3, stride=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )
    return ConvEncoder(convs, in_channels, image_size)


class NoImage(nn.Module):
    """No CNN: empty features, so the heads see only the vector."""

    out_dim: int = 0
    autocast_dtype: torch.dtype | None = None  # nothing to run in reduced precision

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.new_zeros((image.shape[0], 0), dtype=torch.float32)


def make_encoder(name: str) -> ConvEncoder | NoImage:
    if name == "nature":
        return nature_cnn()
    if name == "nature_maxpool":
        return nature_maxpool_cnn()
    if name == "none":
        return NoImage()
    raise ValueError(f"learner.encoder={name!r}: allowed: {', '.join(map(repr, ENCODERS))}")


def set_encoder_precision(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every CNN encoder inside ``module`` under autocast ``dtype`` (None: fp32)."""
    for m in module.modules():
        if isinstance(m, ConvEncoder):
            m.autocast_dtype = dtype


def _fp32(*tensors: torch.Tensor) -> torch.Tensor:
    """The heads' input: features, vector (and action) concatenated in fp32."""
    return torch.cat([t.float() for t in tensors], dim=-1)


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(t.device.type, enabled=False)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class Actor(nn.Module):
    """(image, vector) -> deterministic action in [-1, 1]^action_dim."""

    def __init__(
        self, encoder: str = "nature", hidden_dim: int = 256, vector_dim: int = VECTOR_DIM, action_dim: int = ACTION_DIM
    ) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder)
        self.head = _mlp(self.encoder.out_dim + vector_dim, hidden_dim, action_dim)

    def act(self, features: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        with _no_autocast(features):
            return torch.tanh(self.head(_fp32(features, vector)))

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        return self.act(self.encoder(image), vector)


class NumpyVectorPolicy:
    """An :class:`Actor` without an image encoder (``learner.encoder=none``) as numpy arrays,
    for acting one step at a time: the same layers in fp32, tanh(head(vector)).

    A collector evaluates its policy once per env step on one observation. For this MLP the
    torch call costs ~200 us of framework dispatch (module calls, autocast and grad-mode
    contexts) for ~20 us of arithmetic; with 32 collectors on a few cores that overhead is a
    large share of each step's CPU. :meth:`load` copies the weights again after each update.
    """

    def __init__(self, actor: Actor) -> None:
        if actor.encoder.out_dim != 0:
            raise ValueError("NumpyVectorPolicy: the actor has an image encoder (only learner.encoder=none)")
        self.layers: list[tuple[np.ndarray, np.ndarray] | None] = []  # (W^T, b) per Linear, None per ReLU
        self.load(actor)

    def load(self, actor: Actor) -> None:
        layers: list[tuple[np.ndarray, np.ndarray] | None] = []
        for m in actor.head:
            if isinstance(m, nn.Linear):
                w = m.weight.detach().to("cpu", torch.float32).numpy()
                b = m.bias.detach().to("cpu", torch.float32).numpy()
                layers.append((np.ascontiguousarray(w.T), b.copy()))
            elif isinstance(m, nn.ReLU):
                layers.append(None)
            else:
                raise TypeError(f"NumpyVectorPolicy: unexpected layer {type(m).__name__} in the actor's head")
        self.layers = layers

    def __call__(self, vector: np.ndarray) -> np.ndarray:
        """Actions for a (B, vector_dim) or (vector_dim,) float32 array, shaped alike."""
        x = np.asarray(vector, dtype=np.float32)
        for layer in self.layers:
            x = np.maximum(x, 0.0) if layer is None else x @ layer[0] + layer[1]
        return np.tanh(x)


class Critic(nn.Module):
    """(image, vector, action) -> (Q1, Q2), each (B,); one CNN shared by the twin heads."""

    def __init__(
        self, encoder: str = "nature", hidden_dim: int = 256, vector_dim: int = VECTOR_DIM, action_dim: int = ACTION_DIM
    ) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder)
        in_dim = self.encoder.out_dim + vector_dim + action_dim
        self.q1 = _mlp(in_dim, hidden_dim, 1)
        self.q2 = _mlp(in_dim, hidden_dim, 1)

    def heads(
        self, features: torch.Tensor, vector: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with _no_autocast(features):
            x = _fp32(features, vector, action)
            return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q1_head(self, features: torch.Tensor, vector: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        with _no_autocast(features):
            return self.q1(_fp32(features, vector, action)).squeeze(-1)

    def forward(
        self, image: torch.Tensor, vector: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.encoder(image), vector, action)

    def q1_only(self, image: torch.Tensor, vector: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.q1_head(self.encoder(image), vector, action)
