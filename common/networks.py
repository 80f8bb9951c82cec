"""Actor and critic networks; shared by the learner (training) and collectors (acting).

Each of actor and critic owns a separate NatureCNN (Mnih et al. 2015: three conv layers and
a 512-unit fc) fed ``image / 255``; the 23-float vector is concatenated after the CNN
(512 + 23) and an MLP head follows. The critic's CNN is shared by its twin Q heads, as in
DrQ (Yarats et al. 2021), so a critic update steps one CNN.
"""

from __future__ import annotations

import torch
from torch import nn

from common.schema import ACTION_DIM, IMAGE_SHAPE, VECTOR_DIM

FEATURE_DIM = 512


class NatureCNN(nn.Module):
    """uint8 or float image (B, 4, 84, 84) -> features (B, 512)."""

    def __init__(self, in_channels: int = IMAGE_SHAPE[0], image_size: int = IMAGE_SHAPE[1]) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(n_flat, FEATURE_DIM), nn.ReLU())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # uint8 travels to the device; the float conversion happens here, on the device.
        x = image.float() / 255.0 if image.dtype == torch.uint8 else image
        return self.fc(self.convs(x))


def make_encoder(name: str) -> nn.Module:
    if name == "nature":
        return NatureCNN()
    raise ValueError(f"learner.encoder={name!r}: allowed: 'nature'")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
    )


class Actor(nn.Module):
    """(image, vector) -> deterministic action in [-1, 1]^2."""

    def __init__(self, encoder: str = "nature", hidden_dim: int = 256) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder)
        self.head = _mlp(FEATURE_DIM + VECTOR_DIM, hidden_dim, ACTION_DIM)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        features = self.encoder(image)
        return torch.tanh(self.head(torch.cat([features, vector], dim=-1)))


class Critic(nn.Module):
    """(image, vector, action) -> (Q1, Q2), each (B,); one CNN shared by the twin heads."""

    def __init__(self, encoder: str = "nature", hidden_dim: int = 256) -> None:
        super().__init__()
        self.encoder = make_encoder(encoder)
        self.q1 = _mlp(FEATURE_DIM + VECTOR_DIM + ACTION_DIM, hidden_dim, 1)
        self.q2 = _mlp(FEATURE_DIM + VECTOR_DIM + ACTION_DIM, hidden_dim, 1)

    def forward(
        self, image: torch.Tensor, vector: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.encoder(image), vector, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def q1_only(self, image: torch.Tensor, vector: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.encoder(image), vector, action], dim=-1)
        return self.q1(x).squeeze(-1)
