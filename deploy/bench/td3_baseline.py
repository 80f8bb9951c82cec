"""The baseline of ``convoy bench learner``: TD3 as a single-process implementation usually
writes it, with convoy's networks and math (deploy/bench/learner.py compares against it)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ConvoyConfig
from common.networks import Actor, Critic


class StraightforwardTD3:
    """Reference single-process TD3 with convoy's networks and math, written the usual way.

    Replay is a dict of float32 arrays in memory (images scaled to [0, 1] at insert time),
    sampled by fancy indexing on the update thread. No prefetch, no autocast, NCHW, no
    compile; the actor loss backpropagates through the whole critic, as most TD3
    implementations do, and the critic optimizer clears those gradients next step.
    """

    def __init__(self, cfg: ConvoyConfig, data: dict[str, np.ndarray], device: torch.device, seed: int = 0) -> None:
        lc = cfg.learner
        self.cfg, self.device = lc, device
        self.buffer = {
            "obs_image": data["image"].astype(np.float32) / 255.0,
            "obs_vector": data["vector"].astype(np.float32),
            "action": data["action"].astype(np.float32),
            "reward": data["reward"].astype(np.float32),
            "next_obs_image": data["next_image"].astype(np.float32) / 255.0,
            "next_obs_vector": data["next_vector"].astype(np.float32),
            "done": data["terminated"].astype(np.float32),
        }
        self.size = len(self.buffer["reward"])
        self.rng = np.random.default_rng(seed)
        self.actor = Actor(lc.encoder, lc.hidden_dim).to(device)
        self.critic = Critic(lc.encoder, lc.hidden_dim).to(device)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(
            [
                {"params": self.actor.encoder.parameters(), "lr": lc.actor_encoder_lr},
                {"params": self.actor.head.parameters(), "lr": lc.actor_lr},
            ]
        )
        self.critic_opt = torch.optim.Adam(
            [
                {"params": self.critic.encoder.parameters(), "lr": lc.critic_encoder_lr},
                {"params": [*self.critic.q1.parameters(), *self.critic.q2.parameters()], "lr": lc.critic_lr},
            ]
        )
        self.it = 0

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = self.rng.integers(0, self.size, size=batch_size)
        return {k: torch.as_tensor(v[idx], device=self.device) for k, v in self.buffer.items()}

    def train_step(self, batch_size: int) -> None:
        lc = self.cfg
        self.it += 1
        b = self.sample(batch_size)
        with torch.no_grad():
            noise = (torch.randn_like(b["action"]) * lc.target_noise).clamp(-lc.target_noise_clip, lc.target_noise_clip)
            next_action = (self.actor_target(b["next_obs_image"], b["next_obs_vector"]) + noise).clamp(-1.0, 1.0)
            tq1, tq2 = self.critic_target(b["next_obs_image"], b["next_obs_vector"], next_action)
            target_q = b["reward"] + lc.gamma * (1.0 - b["done"]) * torch.min(tq1, tq2)
        q1, q2 = self.critic(b["obs_image"], b["obs_vector"], b["action"])
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic.parameters(), lc.critic_grad_clip)
        self.critic_opt.step()
        if self.it % lc.policy_delay == 0:
            actor_loss = -self.critic.q1_only(
                b["obs_image"], b["obs_vector"], self.actor(b["obs_image"], b["obs_vector"])
            ).mean()
            self.actor_opt.zero_grad()
            actor_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.actor.parameters(), lc.actor_grad_clip)
            self.actor_opt.step()
            for net, target in ((self.critic, self.critic_target), (self.actor, self.actor_target)):
                for p, tp in zip(net.parameters(), target.parameters(), strict=True):
                    tp.data.copy_(lc.tau * p.data + (1 - lc.tau) * tp.data)
