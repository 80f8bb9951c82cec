"""The learner: pulls batches from a BatchSource, runs TD3 updates, publishes versioned actor
weights and writes checkpoints. Plain Python; learner.remote.LearnerActor wraps it for Ray.

Nothing slow runs on the update path: publishing and checkpointing take a snapshot (a copy
of the tensors) there and hand the encoding and file writing to one background thread.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ConvoyConfig
from common.metrics import Latency
from common.protocols import BatchSource
from common.schema import ACTION_DIM, VECTOR_DIM, Batch, WeightsMessage
from common.storage import join, redact
from common.weights import encode_state_dict, message_to_bytes
from learner import metric_keys as keys
from learner.agent import TD3Agent, resolve_device, snapshot
from learner.checkpoint import (
    CheckpointError,
    from_checkpoint,
    load_checkpoint,
    newest_verified,
    save_checkpoint,
    to_checkpoint,
)
from learner.state import LearnerState
from learner.threads import CpuThreads, usable_cores

log = logging.getLogger(__name__)

# How long one train() call waits for a batch before returning with the updates it has done.
DATA_WAIT_S = 1.0


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; a checkpoint of the last good state was written."""


class CheckpointWriteError(CheckpointError):
    """More than ``run.max_checkpoint_failures`` checkpoint writes in a row failed."""


def policy_lag(policy_version: torch.Tensor, current_version: int) -> tuple[float, float, float]:
    """(mean lag, max lag, random fraction) of one batch: how many weight versions behind the
    learner's newest ``current_version`` the actor that chose each action was. Actions with
    version 0 were uniform random (no policy), so they count in the random fraction only;
    lags are 0 when every action was random."""
    v = policy_version.reshape(-1)
    acted = v[v > 0]
    random_fraction = 1.0 - acted.numel() / max(v.numel(), 1)
    if acted.numel() == 0:
        return 0.0, 0.0, random_fraction
    lag = current_version - acted
    return float(lag.double().mean()), float(lag.max()), random_fraction


class Learner:
    def __init__(
        self,
        cfg: ConvoyConfig,
        source: BatchSource,
        run_dir: str | Path,
        vector_dim: int = VECTOR_DIM,
        action_dim: int = ACTION_DIM,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.learner.device)
        # Torch's threads on a CPU learner: learner.num_threads, or tuned from the updates' times.
        self.threads = CpuThreads(cfg.learner.num_threads, usable_cores()) if self.device.type == "cpu" else None
        torch.manual_seed(cfg.run.seed)
        self.np_rng = np.random.default_rng(cfg.run.seed)
        self.agent = TD3Agent(cfg.learner, self.device, vector_dim, action_dim)
        self.source = source
        # A local path or an fsspec URI (s3://, gs://, file://, memory://): common.storage.
        self.run_dir = str(run_dir)
        self.checkpoint_dir = join(self.run_dir, "checkpoints")
        self.weights_version = 0
        self._weights: bytes | None = None
        self._published_version = 0
        self._weights_lock = threading.Lock()
        self.env_steps = 0
        self.last_checkpoint: str | None = None
        # Every failed write is logged and counted here; a run of them stops train().
        self.checkpoint_failures_total = 0
        self.consecutive_checkpoint_failures = 0
        self._last_checkpoint_error = ""
        self.train_seconds_total = 0.0
        self.data_wait_seconds_total = 0.0
        self.checkpoint_seconds_total = 0.0
        self.batch_wait_latency = Latency("learner/batch_wait_seconds")  # source.next_batch: 0 when prefetch keeps up
        self.update_latency = Latency("learner/update_seconds")  # prepare (host to device) + one TD3 step
        self.publish_latency = Latency("learner/publish_seconds")  # snapshot to encoded message, ready to send
        self._initial_encoders = {name: snapshot(enc.state_dict()) for name, enc in self.agent.encoders()}
        # Weight encoding runs on one background thread, off the update path. Checkpoint
        # writes get their own: an upload to object storage takes seconds and must not hold
        # back the weight publishing that collectors wait for.
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-io")
        self._checkpoint_io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="learner-ckpt")
        self._weight_change_at = 0.0
        self._weight_change: dict[str, float] = {}
        log.info(
            "learner on %s (autocast %s, channels_last %s, compile %s); config:\n%s",
            self.device,
            self.agent.autocast_dtype,
            self.agent.channels_last,
            cfg.learner.compile,
            "\n".join(f"  learner.{k}: {v}" for k, v in cfg.to_dict()["learner"].items()),
        )

    @property
    def updates(self) -> int:
        return self.agent.updates

    @property
    def min_replay_size(self) -> int:
        return max(self.cfg.collector.start_steps, self.cfg.learner.batch_size)

    def ready(self) -> bool:
        """No updates before the run has ``collector.start_steps`` transitions in replay."""
        return self.source.size >= self.min_replay_size

    # ----- training ----------------------------------------------------------------------

    def train(self, num_updates: int, env_steps: int | None = None) -> dict[str, float]:
        """Run up to ``num_updates`` updates (none while replay is below the minimum size)."""
        if env_steps is not None:
            self.env_steps = max(self.env_steps, env_steps)
        self._check_checkpoint_failures()
        if not self.ready():
            time.sleep(0.05)
            return self.metrics({})
        if self.threads is not None:
            self.threads.apply()
        sums: dict[str, torch.Tensor] = {}
        lag_sum, lag_peak, random_sum, batches = 0.0, 0.0, 0.0, 0
        counts: dict[str, int] = defaultdict(int)
        start = time.perf_counter()
        for _ in range(num_updates):
            t0 = time.perf_counter()
            raw = self._next_batch()
            t1 = time.perf_counter()
            self.data_wait_seconds_total += t1 - t0
            if raw is None:
                break  # rate-limited with no new data: return, so checkpoint/restore calls get through
            self.batch_wait_latency.observe(t1 - t0)
            lag_mean, lag_max, random_fraction = policy_lag(raw.policy_version, self.weights_version)
            lag_sum += lag_mean
            lag_peak = max(lag_peak, lag_max)
            random_sum += random_fraction
            batches += 1
            batch = self.agent.prepare(raw)
            for key, value in self.agent.update(batch).items():
                sums[key] = sums[key] + value.detach() if key in sums else value.detach().clone()
                counts[key] += 1
            self.update_latency.observe(time.perf_counter() - t1)
            if self.threads is not None:
                self.threads.observe(time.perf_counter() - t1)
            if self.agent.consecutive_nonfinite >= self.cfg.learner.max_nonfinite:
                self._stop_nonfinite()
            if self.agent.consecutive_nonfinite:
                continue
            # Also right after the first update: collectors leave uniform random actions as
            # soon as the learner trains, rather than publish_every updates later.
            if self.agent.updates % self.cfg.learner.publish_every == 0 or self.weights_version == 0:
                self.publish()
            if self.agent.updates % self.cfg.run.checkpoint_every_updates == 0:
                self._check_checkpoint_failures()
                self.checkpoint(wait=False)
        self.train_seconds_total += time.perf_counter() - start
        # One host sync per call, not per update.
        update_metrics = {k: float(v) / counts[k] for k, v in sums.items()}
        if batches:
            # Policy lag of the data trained on (Espeholt et al. 2018 measure the same for IMPALA):
            # mean over this call's batches and the oldest transition seen.
            update_metrics[keys.POLICY_LAG_MEAN] = lag_sum / batches
            update_metrics[keys.POLICY_LAG_MAX] = lag_peak
            update_metrics[keys.RANDOM_ACTION_FRACTION] = random_sum / batches
        return self.metrics(update_metrics)

    def _next_batch(self) -> Batch | None:
        """The next batch; None when the source has none within DATA_WAIT_S: the replay
        sampler's rate limiter holds the learner back while collectors insert nothing, and a
        train() call must not block the learner actor forever."""
        return self.source.next_batch(DATA_WAIT_S)

    def _check_checkpoint_failures(self) -> None:
        """Stop once ``run.max_checkpoint_failures`` writes in a row failed: training on
        while nothing is saved would lose all of it at the next crash."""
        limit = self.cfg.run.max_checkpoint_failures
        if self.consecutive_checkpoint_failures < limit:
            return
        raise CheckpointWriteError(
            f"{self.consecutive_checkpoint_failures} checkpoint writes in a row failed "
            f"(run.max_checkpoint_failures={limit}); last: {self._last_checkpoint_error}. "
            f"Newest good checkpoint: {self.last_checkpoint or 'none written by this learner'}. "
            f"Check that {redact(self.checkpoint_dir)} is writable (space, permissions, credentials)."
        )

    def _stop_nonfinite(self) -> None:
        n = self.agent.consecutive_nonfinite
        # Skipped updates never step the networks, so the current state is the last good one.
        path = self.checkpoint(wait=True)
        raise NonFiniteError(
            f"{n} consecutive non-finite updates (learner.max_nonfinite={self.cfg.learner.max_nonfinite}); "
            f"last good state saved to {path}. Check the replay data and learning rates."
        )

    # ----- weights -----------------------------------------------------------------------

    def publish(self) -> int:
        """Snapshot the actor now and publish it as version+1 once encoded (in the background)."""
        self.weights_version += 1
        self._publish(self.weights_version)
        return self.weights_version

    def _publish(self, version: int) -> None:
        start = time.perf_counter()
        state = snapshot(self.agent.actor.state_dict())

        def encode() -> None:
            payload = message_to_bytes(WeightsMessage(version=version, payload=encode_state_dict(state)))
            with self._weights_lock:
                if version >= self._published_version:
                    self._weights, self._published_version = payload, version
            self.publish_latency.observe(time.perf_counter() - start)

        self._io.submit(encode)

    def weights(self, newer_than: int = -1) -> tuple[int, bytes] | None:
        """(version, message) of the newest encoded weights if the version is above ``newer_than``."""
        with self._weights_lock:
            if self._weights is None or self._published_version <= newer_than:
                return None
            return self._published_version, self._weights

    def flush(self) -> None:
        """Wait for background encoding and checkpoint writes to finish."""
        self._io.submit(lambda: None).result()
        self._checkpoint_io.submit(lambda: None).result()

    # ----- checkpoints -------------------------------------------------------------------

    def state(self) -> LearnerState:
        """A CPU snapshot of the agent's state and the loop's counters and numpy RNG."""
        return LearnerState(
            agent=self.agent.state(),
            env_steps=self.env_steps,
            weights_version=self.weights_version,
            numpy_rng=self.np_rng.bit_generator.state,
        )

    def load_state(self, state: LearnerState) -> None:
        """Continue from ``state``; publishing its weights is up to the caller (see restore)."""
        self.agent.load_state(state.agent)
        self.env_steps = state.env_steps
        self.weights_version = state.weights_version
        if state.numpy_rng is not None:
            self.np_rng.bit_generator.state = state.numpy_rng

    def checkpoint(self, wait: bool = True, env_steps: int | None = None) -> str:
        """Snapshot now; write in the background (``wait`` blocks until it is stored).
        ``env_steps``, if given, raises the env step count first, as in train().

        Returns the checkpoint's URI (with ``wait=False``, where it will be once written).
        """
        if env_steps is not None:
            self.env_steps = max(self.env_steps, env_steps)
        t0 = time.perf_counter()
        state = self.state()
        data, updates = to_checkpoint(state, self.cfg.to_yaml()), state.agent.updates
        self.checkpoint_seconds_total += time.perf_counter() - t0
        root, keep = self.checkpoint_dir, self.cfg.run.keep_checkpoints
        path = join(root, f"ckpt-{updates:010d}")

        def write() -> str:
            try:
                written = save_checkpoint(root, updates, data, keep, run_id=self.cfg.run.run_id)
            except Exception as exc:
                self.checkpoint_failures_total += 1
                self.consecutive_checkpoint_failures += 1
                self._last_checkpoint_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "checkpoint %s failed (%d in a row, %d in all): %s",
                    redact(path),
                    self.consecutive_checkpoint_failures,
                    self.checkpoint_failures_total,
                    self._last_checkpoint_error,
                )
                raise
            self.consecutive_checkpoint_failures = 0
            self.last_checkpoint = written
            log.info("checkpoint %s", written)
            return written

        future = self._checkpoint_io.submit(write)
        return future.result() if wait else path

    def restore(self, path: str | Path, min_version: int = 0) -> str:
        """Resume exactly from a checkpoint URI, or a run URI's newest checkpoint of this run's
        lineage that verifies (newer corrupt ones are logged as skipped); returns its URI.

        ``min_version`` is the newest weight version collectors may hold (a learner that died
        after its checkpoint published more): the restored actor is then republished above
        it, since collectors only load versions newer than theirs.
        """
        # Of this run's lineage only, past any checkpoint that fails verification.
        restored, skipped = newest_verified(path, run_id=self.cfg.run.run_id or None)
        for reason in skipped:
            log.warning("restore: %s", reason)
        self.load_state(from_checkpoint(load_checkpoint(restored)))
        # Collectors get the restored actor under its saved version straight away.
        if self.weights_version > 0:
            self._publish(self.weights_version)
        self.flush()
        log.info(
            "restored %s: updates %d, env_steps %d, weights v%d",
            restored,
            self.updates,
            self.env_steps,
            self.weights_version,
        )
        if self.weights_version < min_version:
            self.weights_version = min_version
            self.publish()
            self.flush()
        return restored

    # ----- metrics -----------------------------------------------------------------------

    def metrics(self, update_metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        out: dict[str, Any] = {keys.flat_key(k): v for k, v in update_metrics.items()}
        # Distance of each CNN from its initial weights: a frozen CNN shows 0. It touches every
        # parameter, so it is recomputed at most once a second, not on every call.
        if now - self._weight_change_at >= 1.0:
            self._weight_change_at = now
            with torch.no_grad():
                for name, enc in self.agent.encoders():
                    initial = self._initial_encoders[name]
                    if initial:
                        sq = [(p.detach().float().cpu() - initial[k]).norm() ** 2 for k, p in enc.state_dict().items()]
                        self._weight_change[name] = float(torch.stack(sq).sum().sqrt())
        out.update({f"learner/{name}_cnn_weight_change": v for name, v in self._weight_change.items()})
        out.update(
            {
                keys.UPDATES_TOTAL_KEY: self.agent.updates,
                keys.WEIGHTS_VERSION_KEY: self.weights_version,
                keys.NONFINITE_TOTAL_KEY: self.agent.nonfinite_total,
                keys.CONSECUTIVE_NONFINITE_KEY: self.agent.consecutive_nonfinite,
                keys.CHECKPOINT_FAILURES_TOTAL_KEY: self.checkpoint_failures_total,
                keys.TRAIN_SECONDS_TOTAL_KEY: self.train_seconds_total,
                keys.DATA_WAIT_SECONDS_TOTAL_KEY: self.data_wait_seconds_total,
                "learner/checkpoint_snapshot_seconds_total": self.checkpoint_seconds_total,
                keys.READY_KEY: float(self.ready()),
                **self.batch_wait_latency.metrics(),
                **self.update_latency.metrics(),
                **self.publish_latency.metrics(),
                **self.source.metrics(),
            }
        )
        return out

    def close(self) -> None:
        self._io.shutdown(wait=True)
        self._checkpoint_io.shutdown(wait=True)
        self.source.close()
