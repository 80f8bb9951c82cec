"""Under learner.precision=bf16 only the CNN encoders run in bf16: features come back fp32 (on
bf16's grid), while heads, Q values and TD targets are fp32 and not on bf16's grid."""

from __future__ import annotations

import pytest
import torch

from common.config import LearnerConfig
from common.networks import Actor, Critic, set_encoder_precision
from common.schema import Batch
from learner.agent import TD3Agent
from learner.augment import augment_batch, draw_corners, gather_shift, random_shift, shift
from tests.fakes import random_batch


def _on_bf16_grid(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float() == t


@pytest.fixture
def agent() -> TD3Agent:
    torch.manual_seed(0)
    return TD3Agent(LearnerConfig(encoder="nature", hidden_dim=64, precision="bf16"))


def test_encoders_bf16_heads_q_and_targets_fp32(agent: TD3Agent) -> None:
    assert agent.autocast_dtype == torch.bfloat16
    batch = agent.prepare(random_batch(64, torch.Generator().manual_seed(1)))
    # Reward magnitude pushes targets into ranges where the bf16 grid is coarse (steps of 0.5
    # between 64 and 128): a target computed in bf16 anywhere would land on it.
    batch.reward = batch.reward * 10 + 90
    features, q1, q2 = agent.q_values(batch)
    target = agent.td_target(batch)
    assert features.dtype == torch.float32
    assert _on_bf16_grid(features).all(), "the CNN must have run under bf16 autocast"
    for name, t in (("q1", q1), ("q2", q2), ("target", target)):
        assert t.dtype == torch.float32, name
        # Continuous fp32 values hit bf16's 8-bit grid with probability ~2^-16 each.
        assert _on_bf16_grid(t).float().mean() < 0.05, f"{name} looks computed in bf16"
    actor_features = agent.actor.encoder(batch.image)
    pi = agent.actor.act(actor_features, batch.vector)
    assert pi.dtype == torch.float32 and _on_bf16_grid(pi).float().mean() < 0.05
    metrics = agent.update(batch)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert not _on_bf16_grid(metrics["critic/q_max"].reshape(1)).all()


def test_heads_ignore_an_outer_autocast_and_vector_stays_fp32() -> None:
    torch.manual_seed(0)
    critic = Critic("nature", hidden_dim=32)
    set_encoder_precision(critic, torch.bfloat16)
    image = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    # A vector value that bf16 cannot hold exactly: it must reach the heads unchanged.
    vector = torch.full((8, 23), 1.0 + 2**-12)
    action = torch.zeros(8, 2)
    seen: list[torch.Tensor] = []
    critic.q1[0].register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q1, q2 = critic(image, vector, action)
    assert q1.dtype == torch.float32 and q2.dtype == torch.float32
    x = seen[0]
    assert x.dtype == torch.float32
    assert torch.equal(x[:, 512 : 512 + 23], vector)


def test_fp32_precision_leaves_encoders_in_fp32() -> None:
    torch.manual_seed(0)
    actor = Actor("nature", hidden_dim=16)
    features = actor.encoder(torch.randint(0, 256, (16, 4, 84, 84), dtype=torch.uint8))
    assert features.dtype == torch.float32 and _on_bf16_grid(features[features != 0]).float().mean() < 0.05


def test_random_shift_moves_obs_and_next_obs_together() -> None:
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (32, 5, 84, 84), dtype=torch.uint8, generator=g)
    rest = random_batch(32, g)
    batch = Batch.from_frames(
        frames,
        **{k: getattr(rest, k) for k in ("vector", "action", "reward", "next_vector", "terminated", "policy_version")},
    )
    out = augment_batch(batch, "shift", generator=torch.Generator().manual_seed(3))
    assert out.image.dtype == torch.uint8 and out.image.shape == (32, 4, 84, 84)
    # The stacks share frames 1..3 after the shift as before it: the same shift for both.
    assert torch.equal(out.image[:, 1:], out.next_image[:, :3])
    assert not torch.equal(out.image, batch.image)
    # Each sample is a translation by at most 4 pixels with the border replicated.
    x = torch.arange(84 * 84, dtype=torch.float32).reshape(1, 1, 84, 84).expand(200, 1, 84, 84)
    shifted = random_shift(x, generator=torch.Generator().manual_seed(1))
    dy = shifted[:, 0, 42, 42] // 84 - 42
    dx = shifted[:, 0, 42, 42] % 84 - 42
    assert dy.abs().max() == 4 and dx.abs().max() == 4 and len(torch.unique(dy)) == 9
    assert (shifted[:, 0, 0, 0] >= 0).all()
    # Separate stacks get the same per-sample shift too.
    sep = random_batch(16, torch.Generator().manual_seed(5))
    sep.next_image = sep.image.clone()
    out2 = augment_batch(sep, "shift", generator=torch.Generator().manual_seed(2))
    assert torch.equal(out2.image, out2.next_image)


def test_fast_cpu_shift_equals_the_gather_shift() -> None:
    """The CPU path (a padded copy and a strided crop) gives exactly what the element-wise
    gathers give, for uint8 and float frames, contiguous or not, at every corner."""
    g = torch.Generator().manual_seed(7)
    frames = torch.randint(0, 256, (64, 8, 84, 84), dtype=torch.uint8, generator=g)
    for x in (frames, frames[:, :4], frames[:, 4:].float(), frames.transpose(2, 3)):
        for pad in (1, 4):
            corners = draw_corners(x.shape[0], pad, generator=g)
            reference = gather_shift(x, corners, pad)
            fast = shift(x, corners, pad)
            assert fast.shape == x.shape and fast.dtype == x.dtype
            assert torch.equal(fast, reference)
    # Every corner of the (2 * pad + 1)^2 grid, including the replicated border rows.
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5).expand(25, 2, 3, 5)
    corners = torch.stack(torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")).reshape(2, 25)
    assert torch.equal(shift(x, corners, 2), gather_shift(x, corners, 2))


def test_actor_features_stay_bounded_while_training() -> None:
    """The actor's CNN is trained through dQ/da; unbounded (ReLU) features grew from norm ~0.4
    to ~300 within 50 updates, saturated the policy's tanh (pre-activations ~60) and froze it.
    Bounded features (LayerNorm + tanh) keep the policy responsive."""
    torch.manual_seed(0)
    agent = TD3Agent(LearnerConfig(hidden_dim=64, precision="fp32", channels_last=False))
    g = torch.Generator().manual_seed(0)
    batches = [agent.prepare(random_batch(32, g)) for _ in range(4)]
    for b in batches:
        b.reward = b.reward.abs()
    for i in range(50):
        agent.update(batches[i % 4])
    with torch.no_grad():
        features = agent.actor.encoder(batches[0].image)
        pre_tanh = agent.actor.head(torch.cat([features, batches[0].vector], dim=-1))
    assert features.abs().max() <= 1.0
    assert pre_tanh.abs().max() < 20.0, f"policy saturating: |pre-tanh| up to {float(pre_tanh.abs().max()):.1f}"
