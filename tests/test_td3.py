"""TD3 math on tiny tensors with hand-computed values, and the agent's wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.config import LearnerConfig
from common.schema import Batch
from learner import td3
from learner.agent import TD3Agent
from replay_service.window import nstep_window, window_steps
from tests.fakes import random_batch


def test_td_target_by_hand() -> None:
    reward = torch.tensor([1.0, 2.0, -1.0])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    q1 = torch.tensor([3.0, 5.0, 2.0])
    q2 = torch.tensor([4.0, 1.0, -2.0])
    y = td3.td_target(reward, terminated, q1, q2, gamma=0.9)
    # min(3,4)=3 -> 1+0.9*3; terminated -> 2; min(2,-2)=-2 -> -1+0.9*-2
    torch.testing.assert_close(y, torch.tensor([3.7, 2.0, -2.8]))


def test_td_target_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="next_q1 shape"):
        td3.td_target(torch.zeros(3), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3), 0.9)


def test_smoothing_noise_shape_clip_and_independence() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = td3.smoothing_noise((4096, 2), std=0.2, clip=0.5, generator=gen)
    assert noise.shape == (4096, 2)
    assert noise.abs().max() <= 0.5
    assert (noise.abs() == 0.5).any(), "with 8192 draws at std 0.2 some must hit the clip"
    # Per sample and per action dimension: columns and rows differ, correlation ~ 0.
    assert not torch.equal(noise[:, 0], noise[:, 1])
    assert not torch.equal(noise[0], noise[1])
    corr = torch.corrcoef(noise.T)[0, 1]
    assert abs(float(corr)) < 0.05
    assert 0.17 < float(noise.std()) < 0.21


def test_smoothed_target_action_clamps_and_checks_shape() -> None:
    a = torch.tensor([[0.9, -0.9], [0.0, 0.0]])
    n = torch.tensor([[0.5, -0.5], [0.1, -0.2]])
    torch.testing.assert_close(td3.smoothed_target_action(a, n), torch.tensor([[1.0, -1.0], [0.1, -0.2]]))
    with pytest.raises(ValueError, match="noise shape"):
        td3.smoothed_target_action(a, torch.zeros(2))


def test_critic_loss_by_hand() -> None:
    q1 = torch.tensor([1.0, 2.0])
    q2 = torch.tensor([0.0, 4.0])
    y = torch.tensor([1.0, 1.0])
    loss, metrics = td3.critic_loss(q1, q2, y)
    # mse(q1)=(0+1)/2=0.5 ; mse(q2)=(1+9)/2=5
    assert float(loss) == pytest.approx(5.5)
    assert float(metrics["critic/td_error"]) == pytest.approx(0.5)
    assert float(metrics["critic/q_max"]) == pytest.approx(2.0)


def test_actor_loss_is_negative_mean_q() -> None:
    loss, metrics = td3.actor_loss(torch.tensor([1.0, 3.0]))
    assert float(loss) == -2.0 and float(metrics["actor/loss"]) == -2.0


def test_clip_grad_norm_really_bounds_the_norm() -> None:
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    a.grad = torch.tensor([12.0, 0.0, 0.0])
    b.grad = torch.tensor([0.0, 16.0, 0.0, 0.0])  # total norm 20
    before, after = td3.clip_grad_norm([a, b], max_norm=1.0)
    assert float(before) == pytest.approx(20.0)
    assert float(after) == pytest.approx(1.0, abs=1e-5)
    assert float(torch.cat([a.grad, b.grad]).norm()) <= 1.0 + 1e-5
    # Direction is preserved.
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_clip_grad_norm_leaves_small_gradients_alone() -> None:
    a = torch.zeros(2, requires_grad=True)
    a.grad = torch.tensor([0.3, 0.4])
    before, after = td3.clip_grad_norm([a], max_norm=10.0)
    assert float(before) == pytest.approx(0.5) and float(after) == pytest.approx(0.5)


def test_polyak_moves_every_target_by_exactly_tau() -> None:
    online = [torch.tensor([1.0, 2.0]), torch.tensor([[4.0]])]
    target = [torch.tensor([0.0, 0.0]), torch.tensor([[2.0]])]
    td3.polyak_update(online, target, tau=0.25)
    torch.testing.assert_close(target[0], torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(target[1], torch.tensor([[2.5]]))


def _batch(n: int = 4, seed: int = 0) -> Batch:
    return random_batch(n, torch.Generator().manual_seed(seed), terminated=torch.tensor([0.0, 1.0, 0.0, 0.0])[:n])


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str = "") -> set[str]:
    return {k for k, v in module.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])}


@pytest.fixture
def agent() -> TD3Agent:
    torch.manual_seed(0)
    return TD3Agent(
        LearnerConfig(hidden_dim=16, actor_lr=1e-2, critic_lr=1e-2, actor_encoder_lr=1e-2, critic_encoder_lr=1e-2)
    )


def test_each_cnn_parameter_is_in_exactly_one_optimizer(agent: TD3Agent) -> None:
    def ids(opt: torch.optim.Optimizer) -> list[int]:
        return [id(p) for g in opt.param_groups for p in g["params"]]

    actor_ids, critic_ids = ids(agent.actor_opt), ids(agent.critic_opt)
    assert len(actor_ids) == len(set(actor_ids)) and len(critic_ids) == len(set(critic_ids))
    assert set(actor_ids) == {id(p) for p in agent.actor.parameters()}
    assert set(critic_ids) == {id(p) for p in agent.critic.parameters()}
    assert not set(actor_ids) & set(critic_ids)
    assert {id(p) for p in agent.actor.encoder.parameters()} <= set(actor_ids)
    assert {id(p) for p in agent.critic.encoder.parameters()} <= set(critic_ids)
    assert agent.actor.encoder is not agent.critic.encoder


def test_first_update_steps_only_the_critic_and_its_cnn(agent: TD3Agent) -> None:
    actor0, critic0 = _snapshot(agent.actor), _snapshot(agent.critic)
    actor_t0, critic_t0 = _snapshot(agent.actor_target), _snapshot(agent.critic_target)
    metrics = agent.update(_batch())
    assert "actor/loss" not in metrics  # delayed: the actor steps on the 2nd update
    assert not _changed(actor0, agent.actor)
    assert _changed(critic0, agent.critic, "encoder."), "critic CNN must receive gradients"
    assert not _changed(actor_t0, agent.actor_target) and not _changed(critic_t0, agent.critic_target)
    # The critic loss must not leave gradients on the actor.
    assert all(p.grad is None for p in agent.actor.parameters())


def test_second_update_steps_actor_cnn_and_moves_every_target_by_tau(agent: TD3Agent) -> None:
    agent.update(_batch(seed=1))
    actor_t0, critic_t0 = _snapshot(agent.actor_target), _snapshot(agent.critic_target)
    actor0 = _snapshot(agent.actor)
    metrics = agent.update(_batch(seed=2))
    assert "actor/loss" in metrics
    assert _changed(actor0, agent.actor, "encoder."), "actor CNN must receive gradients from the actor loss"
    tau = agent.cfg.tau
    for online, target, before in (
        (agent.actor, agent.actor_target, actor_t0),
        (agent.critic, agent.critic_target, critic_t0),
    ):
        for name, value in target.state_dict().items():
            expected = before[name] + tau * (online.state_dict()[name] - before[name])
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    # Both CNNs' targets moved.
    assert _changed(actor_t0, agent.actor_target, "encoder.") and _changed(critic_t0, agent.critic_target, "encoder.")


def test_actor_loss_never_steps_the_critic(agent: TD3Agent) -> None:
    agent.update(_batch(seed=3))
    critic_after_first = _snapshot(agent.critic)
    critic_opt_lr = [g["lr"] for g in agent.critic_opt.param_groups]
    # Freeze the critic optimizer: any critic change in the 2nd update could only come from
    # the actor's optimizer stepping critic parameters.
    for g in agent.critic_opt.param_groups:
        g["lr"] = 0.0
    agent.update(_batch(seed=4))
    assert not _changed(critic_after_first, agent.critic)
    for g, lr in zip(agent.critic_opt.param_groups, critic_opt_lr, strict=True):
        g["lr"] = lr


def test_gradient_clipping_is_reported_and_bounds(agent: TD3Agent) -> None:
    b = _batch()
    b.reward = b.reward * 1e4  # huge TD errors -> huge critic gradients
    metrics = agent.update(b)
    assert float(metrics["critic/grad_norm"]) > agent.cfg.critic_grad_clip
    assert float(metrics["critic/grad_norm_clipped"]) <= agent.cfg.critic_grad_clip * (1 + 1e-4)


def test_nonfinite_loss_skips_the_update(agent: TD3Agent) -> None:
    b = _batch()
    b.reward[0] = math.nan
    critic0 = _snapshot(agent.critic)
    metrics = agent.update(b)
    assert agent.nonfinite_total == 1
    assert float(metrics["critic/nonfinite"]) == 1.0
    assert not _changed(critic0, agent.critic)
    assert agent.updates == 0


@pytest.mark.parametrize("encoder", ["nature", "nature_maxpool"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_each_encoder_trains_and_keeps_its_512_features(encoder: str, precision: str) -> None:
    torch.manual_seed(0)
    agent = TD3Agent(LearnerConfig(encoder=encoder, hidden_dim=16, precision=precision))
    assert agent.actor.encoder.out_dim == 512
    feats = agent.actor.encoder(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert feats.shape == (2, 512)
    before = _snapshot(agent.critic)
    batch = agent.prepare(_batch())
    metrics = {}
    for _ in range(2):
        metrics.update(agent.update(batch))
    assert agent.updates == 2
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert _changed(before, agent.critic, "encoder.")
    # Parameters stay fp32 under autocast.
    assert all(p.dtype == torch.float32 for p in agent.critic.parameters())


def test_channels_last_layout_and_uint8_until_the_device() -> None:
    agent = TD3Agent(LearnerConfig(hidden_dim=16, channels_last=True))
    raw = _batch()
    assert raw.image.dtype == torch.uint8  # what travels
    batch = agent.prepare(raw)
    # Converted once on the device (image / 255), not in each encoder pass.
    assert batch.image.dtype == batch.next_image.dtype == torch.float32
    assert torch.equal(batch.image, raw.image.float() / 255)
    assert batch.image.is_contiguous(memory_format=torch.channels_last)
    conv = agent.critic.encoder.convs[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("frames", [False, True], ids=["two-stacks", "shared-frames"])
def test_images_converted_once_train_exactly_as_uint8_images(frames: bool) -> None:
    """prepare() converts the stacks to float once; the update is bit-for-bit the one the
    encoders' own conversion of uint8 input gives."""
    raw = _batch(4, seed=3)
    if frames:
        stack = torch.cat([raw.image, raw.next_image[:, -1:]], dim=1)
        rest = {
            k: getattr(raw, k) for k in ("vector", "action", "reward", "next_vector", "terminated", "policy_version")
        }
        raw = Batch.from_frames(stack, **rest)
    agents = []
    for convert_once in (True, False):
        torch.manual_seed(0)
        agent = TD3Agent(LearnerConfig(hidden_dim=16, augment="none"))
        batch = agent.prepare(raw)
        if not convert_once:  # the uint8 stacks, laid out the same, converted inside each encoder
            batch.image = (batch.image * 255).round().to(torch.uint8)
            batch.next_image = (batch.next_image * 255).round().to(torch.uint8)
        torch.manual_seed(1)  # the same target smoothing noise
        for _ in range(2):  # a critic-only update, then one with the actor and the targets
            agent.update(batch)
        agents.append(agent)
    once, each = (a.state_dicts() for a in agents)
    for net in once:
        for name, tensor in once[net].items():
            assert torch.equal(tensor, each[net][name]), f"{net}.{name}"


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_path_bf16_fused_pinned(compile_: bool) -> None:
    agent = TD3Agent(LearnerConfig(hidden_dim=64, compile=compile_), device="cuda")
    assert agent.autocast_dtype == torch.bfloat16
    assert all(g.get("fused") for g in agent.critic_opt.param_groups) or agent.critic_opt.defaults.get("fused")
    batch = _batch(4).pin_memory()
    assert batch.image.is_pinned()
    cuda_batch = agent.prepare(batch)
    assert cuda_batch.image.device.type == "cuda" and cuda_batch.image.dtype == torch.float32
    for _ in range(4):
        metrics = agent.update(cuda_batch)
    torch.cuda.synchronize()
    assert agent.updates == 4
    assert all(torch.isfinite(v).all() for v in metrics.values())


# ----- n-step returns (learner.n_step) -----------------------------------------------------

# gamma 0.5 and rewards 1, 2, 4: the full 3-step sum is 1 + 0.5 * 2 + 0.25 * 4 = 3.
_GAMMA = 0.5
_REWARDS = [1.0, 2.0, 4.0]
_TERM, _TRUNC = 1, 2


def _window(flags: list[int], steps: int) -> tuple[float, float, int]:
    s, d, k = nstep_window(np.array([_REWARDS]), np.array([flags], np.uint8), np.array([steps]), _GAMMA)
    return float(s[0]), float(d[0]), int(k[0])


def test_nstep_window_without_an_end_sums_n_rewards_and_bootstraps_gamma_n() -> None:
    assert _window([0, 0, 0], 3) == (3.0, 0.125, 3)


@pytest.mark.parametrize(("position", "expected"), [(0, (1.0, 0.0, 1)), (1, (2.0, 0.0, 2)), (2, (3.0, 0.0, 3))])
def test_nstep_window_termination_stops_the_sum_and_never_bootstraps(
    position: int, expected: tuple[float, float, int]
) -> None:
    flags = [0, 0, 0]
    flags[position] = _TERM
    assert _window(flags, 3) == expected


@pytest.mark.parametrize(("position", "expected"), [(0, (1.0, 0.5, 1)), (1, (2.0, 0.25, 2)), (2, (3.0, 0.125, 3))])
def test_nstep_window_truncation_stops_the_sum_and_bootstraps_there(
    position: int, expected: tuple[float, float, int]
) -> None:
    flags = [0, 0, 0]
    flags[position] = _TRUNC
    assert _window(flags, 3) == expected


@pytest.mark.parametrize(("steps", "expected"), [(1, (1.0, 0.5, 1)), (2, (2.0, 0.25, 2))])
def test_nstep_window_cut_by_the_segment_end_bootstraps_like_a_truncation(
    steps: int, expected: tuple[float, float, int]
) -> None:
    # Records past the segment's end hold whatever the buffer held: never read.
    rewards = np.array([[1.0, 2.0, np.nan]])
    rewards[0, steps:] = np.nan
    flags = np.array([[0, 0, _TERM]], np.uint8)
    s, d, k = nstep_window(rewards, flags, np.array([steps]), _GAMMA)
    assert (float(s[0]), float(d[0]), int(k[0])) == expected


def test_window_steps_is_what_the_segment_holds() -> None:
    # A segment of 5 steps, n = 3: t = 0..2 full windows, t = 3 and 4 cut to 2 and 1.
    assert window_steps(3, np.full(5, 5), np.arange(5)).tolist() == [3, 3, 3, 2, 1]


def test_nstep_window_rejects_bad_shapes_and_steps() -> None:
    with pytest.raises(ValueError, match="steps"):
        nstep_window(np.zeros((2, 3)), np.zeros((2, 3), np.uint8), np.array([0, 3]), 0.9)
    with pytest.raises(ValueError, match="flags"):
        nstep_window(np.zeros((2, 3)), np.zeros((2, 2), np.uint8), np.array([1, 3]), 0.9)


def test_nstep_td_target_by_hand() -> None:
    # Windows from above: no end (3.0, 0.125), termination (2.0, 0), truncation at 1 (2.0, 0.25).
    reward = torch.tensor([3.0, 2.0, 2.0])
    discount = torch.tensor([0.125, 0.0, 0.25])
    q1 = torch.tensor([8.0, 5.0, 4.0])
    q2 = torch.tensor([16.0, 1.0, -4.0])
    y = td3.nstep_td_target(reward, discount, q1, q2)
    torch.testing.assert_close(y, torch.tensor([4.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="discount shape"):
        td3.nstep_td_target(reward, torch.zeros(2), q1, q2)


def test_one_step_window_reproduces_the_one_step_target_exactly() -> None:
    gen = torch.Generator().manual_seed(3)
    reward = torch.randn(64, generator=gen)
    terminated = (torch.rand(64, generator=gen) < 0.3).float()
    q1, q2 = torch.randn(64, generator=gen) * 10, torch.randn(64, generator=gen) * 10
    flags = (terminated.numpy().astype(np.uint8) * _TERM)[:, None]
    s, d, k = nstep_window(reward.numpy()[:, None], flags, np.ones(64, np.int64), 0.99)
    assert (k == 1).all()
    one = td3.td_target(reward, terminated, q1, q2, 0.99)
    nstep = td3.nstep_td_target(torch.from_numpy(s), torch.from_numpy(d), q1, q2)
    torch.testing.assert_close(nstep, one, rtol=0, atol=0)


def test_agent_uses_the_batch_discount_of_an_nstep_batch() -> None:
    agent = TD3Agent(LearnerConfig(encoder="none", hidden_dim=16))
    gen = torch.Generator().manual_seed(0)
    batch = agent.prepare(random_batch(8, gen))
    batch.discount = torch.zeros(8)  # every window terminated: the target is its reward sum
    torch.testing.assert_close(agent.td_target(batch), batch.reward)
    batch.discount = None
    batch.terminated = torch.zeros(8)
    assert not torch.allclose(agent.td_target(batch), batch.reward)
