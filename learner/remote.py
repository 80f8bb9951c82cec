"""The thin Ray wrapper around :class:`learner.loop.Learner`; nothing else here uses Ray."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from common.config import from_dict
from common.protocols import BatchSource


@ray.remote(max_restarts=0)
class LearnerActor:
    """A Learner in its own process; ``source_factory`` builds its batch source in-process."""

    def __init__(self, config: dict[str, Any], source_factory: Callable[[], BatchSource], run_dir: str) -> None:
        from common.sysutil import tune_malloc_for_bulk_buffers
        from learner.loop import Learner

        tune_malloc_for_bulk_buffers()  # the sampler allocates and frees ~10 MB per batch
        cfg = from_dict(config)
        self.learner = Learner(cfg, source_factory(), run_dir)
        self._sent_version = 0

    def train(self, num_updates: int, env_steps: int) -> tuple[dict[str, float], tuple[int, ray.ObjectRef] | None]:
        """Updates, then (version, reference) of the newest weights if newer than the last returned.

        The message goes into Ray's object store once, here; the driver gets only the reference
        (nested in the result, so its ``ray.get`` never fetches the bytes) and forwards it, and
        the collectors of one node share the one copy their node's store pulls.
        """
        metrics = self.learner.train(num_updates, env_steps)  # exported by the driver, with every result
        published = self.learner.weights(newer_than=self._sent_version)
        if published is None:
            return metrics, None
        version, message = published
        self._sent_version = version
        return metrics, (version, ray.put(message))

    def node(self) -> dict[str, Any]:
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),
            "device": str(self.learner.device),
        }

    def restore(self, path: str, min_version: int = 0) -> dict[str, Any]:
        """Resume from a checkpoint; Learner.restore says what ``min_version`` does."""
        restored = self.learner.restore(path, min_version)
        return {"checkpoint": str(restored), "updates": self.learner.updates, "env_steps": self.learner.env_steps}

    def start_fresh(self, min_version: int) -> dict[str, Any]:
        """A replacement learner with no checkpoint to restore: its weight versions continue
        above ``min_version``, the newest version collectors may hold (they only load newer
        ones, so versions from 1 again would never reach them)."""
        self.learner.weights_version = max(self.learner.weights_version, min_version)
        return {}

    def checkpoint(self, env_steps: int) -> str:
        return str(self.learner.checkpoint(env_steps=env_steps))

    def close(self) -> None:
        self.learner.close()
