"""TD3 math as small pure functions (Fujimoto et al. 2018, "Addressing Function Approximation
Error in Actor-Critic Methods", Algorithm 1).

Each takes tensors and returns tensors or ``(loss, metrics)``; metrics stay tensors so a GPU
update never synchronises for logging; the caller converts them at the edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from learner import metric_keys as keys

Metrics = dict[str, torch.Tensor]


def smoothing_noise(
    shape: torch.Size | Sequence[int],
    std: float,
    clip: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Target policy smoothing noise: clip(N(0, std), -clip, clip), drawn independently per
    sample and per action dimension (``shape`` is the full (B, action_dim))."""
    noise = torch.randn(tuple(shape), device=device, dtype=dtype, generator=generator) * std
    return noise.clamp(-clip, clip)


def smoothed_target_action(next_action: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """a' = clip(pi_target(s') + noise, -1, 1)."""
    if noise.shape != next_action.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != action shape {tuple(next_action.shape)}")
    return (next_action + noise).clamp(-1.0, 1.0)


def td_target(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Clipped double-Q target y = r + gamma * (1 - terminated) * min(Q1', Q2').

    Only termination stops bootstrapping; a time-limit truncation still bootstraps (Pardo et
    al. 2018, "Time Limits in Reinforcement Learning")."""
    for name, t in (("terminated", terminated), ("next_q1", next_q1), ("next_q2", next_q2)):
        if t.shape != reward.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != reward shape {tuple(reward.shape)}")
    return reward + gamma * (1.0 - terminated) * torch.minimum(next_q1, next_q2)


def nstep_td_target(
    reward_sum: torch.Tensor,
    discount: torch.Tensor,
    next_q1: torch.Tensor,
    next_q2: torch.Tensor,
) -> torch.Tensor:
    """Clipped double-Q n-step target y = sum_j gamma^j r_{t+j} + discount * min(Q1', Q2').

    ``discount`` is gamma^k for a window of k steps, 0 where it ended in a termination; the
    window rule (termination, truncation, segment end) is replay_service/window.py."""
    for name, t in (("discount", discount), ("next_q1", next_q1), ("next_q2", next_q2)):
        if t.shape != reward_sum.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != reward shape {tuple(reward_sum.shape)}")
    return reward_sum + discount * torch.minimum(next_q1, next_q2)


def critic_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """MSE of both Q heads against the (detached) target."""
    target = target.detach()
    if q1.shape != target.shape or q2.shape != target.shape:
        raise ValueError(f"q shapes {tuple(q1.shape)}, {tuple(q2.shape)} != target shape {tuple(target.shape)}")
    loss = F.mse_loss(q1, target) + F.mse_loss(q2, target)
    with torch.no_grad():
        metrics = {
            keys.CRITIC_LOSS: loss.detach(),
            keys.CRITIC_Q_MEAN: q1.mean(),
            keys.CRITIC_Q_MAX: q1.max(),
            keys.CRITIC_TARGET_MEAN: target.mean(),
            "critic/td_error": (q1 - target).abs().mean(),
        }
    return loss, metrics


def actor_loss(q_of_policy: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """Deterministic policy gradient: maximise Q1(s, pi(s))."""
    loss = -q_of_policy.mean()
    return loss, {keys.ACTOR_LOSS: loss.detach()}


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the total gradient norm of ``params`` to ``max_norm`` in place.

    Returns (norm before, norm after) so the caller can report that clipping did bound it.
    The 1e-6 in torch's clip coefficient can leave the result a hair above ``max_norm``;
    that is inside float tolerance."""
    before = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return before, grad_norm(params)


@torch.no_grad()
def polyak_update(online: Sequence[torch.Tensor], target: Sequence[torch.Tensor], tau: float) -> None:
    """target <- (1 - tau) * target + tau * online, for every pair."""
    if len(online) != len(target):
        raise ValueError(f"{len(online)} online tensors vs {len(target)} target tensors")
    torch._foreach_lerp_(list(target), list(online), tau)


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """One boolean tensor: every value of every tensor is finite."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()
