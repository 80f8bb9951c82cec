"""The learner's training state as plain data: what TD3Agent.state() and Learner.state()
return and their load_state() accept (the idea of Acme's TrainingState and RLlib's
get_state/set_state). No torch import at run time, so checkpoint listing stays light."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class AgentState:
    """Everything a TD3Agent needs to continue bit-identically, as CPU copies that never alias
    its live tensors.

    ``networks`` maps actor, critic, actor_target and critic_target to state dicts;
    ``optimizers`` maps actor and critic to Adam state dicts; ``rng`` holds the torch RNG
    states (``torch``, and ``cuda`` on a CUDA device) that draw the target smoothing noise.
    The count of consecutive non-finite updates is left out: it describes the updates since
    the last good one, and a restored agent keeps its own.
    """

    networks: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    updates: int = 0
    nonfinite_total: int = 0


@dataclass
class LearnerState:
    """The agent's state plus the learner loop's own counters and numpy RNG.

    ``numpy_rng`` is a numpy bit generator state; None leaves the loop's generator as it is
    (checkpoints written before it was saved have none).
    """

    agent: AgentState
    env_steps: int = 0
    weights_version: int = 0
    numpy_rng: Mapping[str, Any] | None = None
