"""TD3 networks, optimizers and the update step, built from the pure functions in td3.py."""

from __future__ import annotations

import copy
import logging

import torch

from common.config import LearnerConfig
from common.networks import Actor, Critic
from common.schema import Batch
from learner import td3

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"learner.device={name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    return dev


class TD3Agent:
    """Actor and critic, each with its own CNN, their Polyak targets and one Adam per network.

    Each optimizer holds exactly its own network's parameters (CNN and head in separate
    groups with their own learning rates), so the actor loss can never step the critic's CNN
    and vice versa.
    """

    def __init__(self, cfg: LearnerConfig, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.actor = Actor(cfg.encoder, cfg.hidden_dim).to(self.device)
        self.critic = Critic(cfg.encoder, cfg.hidden_dim).to(self.device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_opt = torch.optim.Adam(
            [
                {"params": list(self.actor.encoder.parameters()), "lr": cfg.actor_encoder_lr, "name": "encoder"},
                {"params": list(self.actor.head.parameters()), "lr": cfg.actor_lr, "name": "head"},
            ]
        )
        self.critic_opt = torch.optim.Adam(
            [
                {"params": list(self.critic.encoder.parameters()), "lr": cfg.critic_encoder_lr, "name": "encoder"},
                {
                    "params": [*self.critic.q1.parameters(), *self.critic.q2.parameters()],
                    "lr": cfg.critic_lr,
                    "name": "heads",
                },
            ]
        )
        self.actor_params = list(self.actor.parameters())
        self.critic_params = list(self.critic.parameters())
        self._actor_pairs = (self.actor_params, list(self.actor_target.parameters()))
        self._critic_pairs = (self.critic_params, list(self.critic_target.parameters()))
        self.updates = 0
        self.nonfinite_total = 0

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One TD3 step on a batch already on ``self.device``; returns tensor metrics."""
        cfg = self.cfg
        metrics: dict[str, torch.Tensor] = {}

        with torch.no_grad():
            next_action = self.actor_target(batch.next_image, batch.next_vector)
            noise = td3.smoothing_noise(
                next_action.shape, cfg.target_noise, cfg.target_noise_clip, next_action.device, next_action.dtype
            )
            next_q1, next_q2 = self.critic_target(
                batch.next_image, batch.next_vector, td3.smoothed_target_action(next_action, noise)
            )
            target = td3.td_target(batch.reward, batch.terminated, next_q1, next_q2, cfg.gamma)

        q1, q2 = self.critic(batch.image, batch.vector, batch.action)
        loss, m = td3.critic_loss(q1, q2, target)
        metrics.update(m)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        before, after = td3.clip_grad_norm(self.critic_params, cfg.critic_grad_clip)
        metrics["critic/grad_norm"] = before
        metrics["critic/grad_norm_clipped"] = after
        if not bool(td3.all_finite(loss, before)):
            return self._skip("critic", metrics)
        self.critic_opt.step()

        # Actor and targets on every policy_delay-th critic update (2nd, 4th, ... as in TD3's
        # reference code, which increments its counter before testing it).
        if (self.updates + 1) % cfg.policy_delay == 0:
            pi = self.actor(batch.image, batch.vector)
            a_loss, m = td3.actor_loss(self.critic.q1_only(batch.image, batch.vector, pi))
            metrics.update(m)
            self.actor_opt.zero_grad(set_to_none=True)
            # Only the actor's parameters accumulate gradients from the actor loss.
            a_loss.backward(inputs=self.actor_params)
            before, after = td3.clip_grad_norm(self.actor_params, cfg.actor_grad_clip)
            metrics["actor/grad_norm"] = before
            metrics["actor/grad_norm_clipped"] = after
            if not bool(td3.all_finite(a_loss, before)):
                return self._skip("actor", metrics)
            self.actor_opt.step()
            td3.polyak_update(*self._actor_pairs, cfg.tau)
            td3.polyak_update(*self._critic_pairs, cfg.tau)
        self.updates += 1
        return metrics

    def _skip(self, network: str, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.nonfinite_total += 1
        log.warning("non-finite %s loss or gradient at update %d; update skipped", network, self.updates)
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        metrics[f"{network}/nonfinite"] = torch.ones(())
        return metrics

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
        }

    def load_state_dicts(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        self.actor.load_state_dict(states["actor"])
        self.critic.load_state_dict(states["critic"])
        self.actor_target.load_state_dict(states["actor_target"])
        self.critic_target.load_state_dict(states["critic_target"])
