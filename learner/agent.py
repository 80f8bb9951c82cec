"""TD3 networks, optimizers and the update step, built from the pure functions in td3.py."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from common.config import LearnerConfig
from common.networks import Actor, Critic, image_to_float, set_encoder_precision
from common.schema import ACTION_DIM, VECTOR_DIM, Batch
from common.sysutil import cpu_flags
from learner import metric_keys as keys
from learner import td3
from learner.augment import augment_batch
from learner.state import AgentState

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"learner.device={name!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
    return dev


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True on CPUs that run bf16 natively (the AVX512-BF16 or AMX-BF16 flag); elsewhere oneDNN
    emulates bf16 and it is slower than fp32: measured on an AVX2-only CPU (``convoy bench
    learner --variants``), the batch-128 pixel update ran 3.7x slower in bf16. Without
    /proc/cpuinfo, oneDNN's own check decides."""
    flags = cpu_flags() if flags is None else flags
    if flags:
        return bool(flags & NATIVE_BF16_FLAGS)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``learner.precision`` on ``device`` (None = fp32, no autocast)."""
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("learner.precision=bf16 on a CPU without native bf16: expect it to be slower than fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else None


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict's tensors on the CPU, detached from the live ones."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def snapshot_tree(obj: Any) -> Any:
    """Deep copy of an optimizer state dict with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot_tree(v) for v in obj]
    return obj


class TD3Agent:
    """Actor and critic, each with its own CNN, their Polyak targets and one Adam per network.

    Each optimizer holds exactly its own network's parameters (CNN and head in separate
    groups with their own learning rates), so the actor loss can never step the critic's CNN
    and vice versa. When ``learner.precision`` resolves to bf16, only the four CNN encoders
    (online and target) run under bf16 autocast; their features come back as fp32 and the
    heads, Q values, targets, losses, parameters and optimizer state are fp32
    (common/networks.py says why).
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        device: torch.device | str = "cpu",
        vector_dim: int = VECTOR_DIM,
        action_dim: int = ACTION_DIM,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        self.channels_last = cfg.channels_last and cfg.encoder != "none"
        self.actor = Actor(cfg.encoder, cfg.hidden_dim, vector_dim, action_dim).to(self.device)
        self.critic = Critic(cfg.encoder, cfg.hidden_dim, vector_dim, action_dim).to(self.device)
        if self.channels_last:
            self.actor.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            self.critic.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        set_encoder_precision(self.actor, self.autocast_dtype)
        set_encoder_precision(self.critic, self.autocast_dtype)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # Fused Adam on CUDA is one kernel for all parameters; on CPU the foreach path is the fast one.
        cuda = self.device.type == "cuda"
        self.actor_opt = torch.optim.Adam(
            [
                {"params": list(self.actor.encoder.parameters()), "lr": cfg.actor_encoder_lr, "name": "encoder"},
                {"params": list(self.actor.head.parameters()), "lr": cfg.actor_lr, "name": "head"},
            ],
            fused=cuda or None,
            foreach=None if cuda else True,
        )
        self.critic_opt = torch.optim.Adam(
            [
                {"params": list(self.critic.encoder.parameters()), "lr": cfg.critic_encoder_lr, "name": "encoder"},
                {
                    "params": [*self.critic.q1.parameters(), *self.critic.q2.parameters()],
                    "lr": cfg.critic_lr,
                    "name": "heads",
                },
            ],
            fused=cuda or None,
            foreach=None if cuda else True,
        )
        self.actor_params = list(self.actor.parameters())
        self.critic_params = list(self.critic.parameters())
        self._actor_pairs = (self.actor_params, list(self.actor_target.parameters()))
        self._critic_pairs = (self.critic_params, list(self.critic_target.parameters()))
        # Callables used by update(); torch.compile wraps them when learner.compile is set.
        self._actor_encoder: Callable[..., Any] = self.actor.encoder
        self._critic_encoder: Callable[..., Any] = self.critic.encoder
        self._actor_target_fwd: Callable[..., Any] = self.actor_target
        self._critic_target_fwd: Callable[..., Any] = self.critic_target
        if cfg.compile:
            self._compile()
        self.updates = 0
        self.nonfinite_total = 0
        self.consecutive_nonfinite = 0

    def _compile(self) -> None:
        # CUDA graphs ("reduce-overhead") remove per-kernel launch cost, which dominates a
        # small-batch RL update on a fast GPU; on CPU the default mode fuses pointwise ops.
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._actor_encoder = torch.compile(self.actor.encoder, mode=mode, dynamic=False)
        self._critic_encoder = torch.compile(self.critic.encoder, mode=mode, dynamic=False)
        self._actor_target_fwd = torch.compile(self.actor_target, mode=mode, dynamic=False)
        self._critic_target_fwd = torch.compile(self.critic_target, mode=mode, dynamic=False)

    def prepare(self, batch: Batch) -> Batch:
        """Move a batch to the device (non-blocking from pinned memory), apply
        ``learner.augment`` there, and lay it out as the networks want."""
        batch = batch.to(self.device, non_blocking=self.device.type == "cuda")
        if self.cfg.encoder == "none":
            return batch
        if self.cfg.augment != "none":
            batch = augment_batch(batch, self.cfg.augment)
        image, next_image = batch.image, batch.next_image
        if self.channels_last and image.dim() == 4:
            image = image.contiguous(memory_format=torch.channels_last)
            next_image = next_image.contiguous(memory_format=torch.channels_last)
        # An update reads the observation in up to three encoder passes and the next one in
        # two; each pass would convert uint8 to image / 255 again. Converted once here, the
        # values are the same (the encoders pass float input through): 4-8 ms saved per
        # batch-128 update on a 2-core CPU.
        return dataclasses.replace(
            batch, image=image_to_float(image), next_image=image_to_float(next_image), frames=None
        )

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """The clipped double-Q target of a prepared batch (fp32; draws smoothing noise)."""
        cfg = self.cfg
        next_action = self._actor_target_fwd(batch.next_image, batch.next_vector)
        noise = td3.smoothing_noise(
            next_action.shape, cfg.target_noise, cfg.target_noise_clip, next_action.device, next_action.dtype
        )
        next_q1, next_q2 = self._critic_target_fwd(
            batch.next_image, batch.next_vector, td3.smoothed_target_action(next_action, noise)
        )
        if batch.discount is not None:  # an n-step batch (learner.n_step > 1)
            return td3.nstep_td_target(batch.reward, batch.discount, next_q1, next_q2)
        return td3.td_target(batch.reward, batch.terminated, next_q1, next_q2, cfg.gamma)

    def q_values(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(critic features, Q1, Q2) of a prepared batch's (obs, action), with gradients."""
        critic_features = self._critic_encoder(batch.image)
        q1, q2 = self.critic.heads(critic_features, batch.vector, batch.action)
        return critic_features, q1, q2

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One TD3 step on a prepared batch (see :meth:`prepare`); returns tensor metrics."""
        cfg = self.cfg
        metrics: dict[str, torch.Tensor] = {}

        target = self.td_target(batch)
        critic_features, q1, q2 = self.q_values(batch)
        loss, m = td3.critic_loss(q1, q2, target)
        metrics.update(m)
        metrics["critic/feature_norm"] = critic_features.detach().norm(dim=-1).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        before, after = td3.clip_grad_norm(self.critic_params, cfg.critic_grad_clip)
        metrics[keys.CRITIC_GRAD_NORM] = before
        metrics[keys.CRITIC_GRAD_NORM_CLIPPED] = after
        if not bool(td3.all_finite(loss, before)):
            return self._skip("critic", metrics)
        self.critic_opt.step()

        # Actor and targets on every policy_delay-th critic update (2nd, 4th, ... as in TD3's
        # reference code, which increments its counter before testing it).
        if (self.updates + 1) % cfg.policy_delay == 0:
            actor_features = self._actor_encoder(batch.image)
            pi = self.actor.act(actor_features, batch.vector)
            # The critic's CNN features do not depend on the actor's parameters, so the
            # actor's gradient is the same without a graph through the critic's CNN.
            with torch.no_grad():
                critic_features = self._critic_encoder(batch.image)
            q_pi = self.critic.q1_head(critic_features, batch.vector, pi)
            a_loss, m = td3.actor_loss(q_pi)
            metrics.update(m)
            metrics["actor/feature_norm"] = actor_features.detach().norm(dim=-1).mean()
            self.actor_opt.zero_grad(set_to_none=True)
            # Only the actor's parameters accumulate gradients from the actor loss.
            a_loss.backward(inputs=self.actor_params)
            before, after = td3.clip_grad_norm(self.actor_params, cfg.actor_grad_clip)
            metrics[keys.ACTOR_GRAD_NORM] = before
            metrics[keys.ACTOR_GRAD_NORM_CLIPPED] = after
            if not bool(td3.all_finite(a_loss, before)):
                return self._skip("actor", metrics)
            self.actor_opt.step()
            td3.polyak_update(*self._actor_pairs, cfg.tau)
            td3.polyak_update(*self._critic_pairs, cfg.tau)
        self.updates += 1
        self.consecutive_nonfinite = 0
        return metrics

    def _skip(self, network: str, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.nonfinite_total += 1
        self.consecutive_nonfinite += 1
        log.warning(
            "non-finite %s loss or gradient at update %d (%d in a row); update skipped",
            network,
            self.updates,
            self.consecutive_nonfinite,
        )
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        metrics[f"{network}/nonfinite"] = torch.ones(())
        return metrics

    def encoders(self) -> Iterator[tuple[str, torch.nn.Module]]:
        yield "actor", self.actor.encoder
        yield "critic", self.critic.encoder

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

    def state(self) -> AgentState:
        """A CPU snapshot of networks, targets, optimizers, counters and the torch RNG."""
        rng: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return AgentState(
            networks={k: snapshot(v) for k, v in self.state_dicts().items()},
            optimizers=snapshot_tree({"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict()}),
            rng=rng,
            updates=self.updates,
            nonfinite_total=self.nonfinite_total,
        )

    def load_state(self, state: AgentState) -> None:
        """Continue from ``state`` (as :meth:`state` returns it, possibly from another device)."""
        self.load_state_dicts({k: {n: t.to(self.device) for n, t in v.items()} for k, v in state.networks.items()})
        self.actor_opt.load_state_dict(state.optimizers["actor"])
        self.critic_opt.load_state_dict(state.optimizers["critic"])
        self.updates = state.updates
        self.nonfinite_total = state.nonfinite_total
        torch.set_rng_state(state.rng["torch"])
        if "cuda" in state.rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(state.rng["cuda"], self.device)
