"""Evaluation during training, scheduled by the driver; the best checkpoint is kept as ``best``.

Design: what is evaluated is always a checkpoint. Every ``run.eval_every_updates`` learner
updates the scheduler asks the learner for a checkpoint (``LearnerActor.checkpoint``; the
snapshot is taken between two updates, the file written off the update path) and hands
its URI to an ``EvaluatorActor`` (actors/evaluator.py: its own process and simulator,
deterministic policy, the same seeds every time), which reads the checkpoint's actor from
run storage itself with :func:`load_actor_checkpoint` (verified against the manifest; the
same reader as ``convoy evaluate``): no checkpoint bytes pass through the driver's loop. A
checkpoint pruned before the evaluator reads it (``run.keep_checkpoints`` newer ones written
meanwhile) is a counted, logged failed evaluation. When the result comes back it
is appended to ``<run>/eval.jsonl`` and, if it beats the best so far (route completion, then
return), the checkpoint is marked ``best`` (learner/checkpoint.py ``mark_best``; pruning keeps
it). So ``best`` names exactly the weights that scored, survives a resume (the best score is
read back from the run at start) and works the same on any storage URI.

The driver calls :meth:`EvalScheduler.maybe_submit` and :meth:`EvalScheduler.poll` once per
loop iteration; neither waits on Ray (one evaluation in flight at a time; a due evaluation
is skipped, not queued, while one runs, and counted as ``eval/skipped_total``), so in
training collectors and the learner are never held up. A benchmark that needs evaluations at
their exact cadence sets ``run.eval_hold``: the supervisor then asks :meth:`EvalScheduler.holding`
before each call it hands out and sends none while an evaluation is due or running.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.metric_keys import EVAL_PREFIX, EVAL_RETURN, EVAL_ROUTE_COMPLETION
from common.config import ConvoyConfig
from common.storage import basename, open_store
from common.weights import ActorCheckpoint
from deploy.run.signals import wait_all
from learner.checkpoint import CheckpointError, best_checkpoint, load_checkpoint, mark_best

log = logging.getLogger(__name__)

HISTORY = "eval.jsonl"


def score(metrics: dict[str, Any]) -> tuple[float, float]:
    """What "best" maximises: route completion first, then return (ties broken by return)."""
    rc = float(metrics.get(EVAL_ROUTE_COMPLETION, -math.inf))
    ret = float(metrics.get(EVAL_RETURN, -math.inf))
    return (rc if math.isfinite(rc) else -math.inf, ret if math.isfinite(ret) else -math.inf)


def load_actor_checkpoint(checkpoint_uri: str) -> ActorCheckpoint:
    """The actor network and counters of the checkpoint at ``checkpoint_uri``, every file read
    checked against its manifest: the one checkpoint reader of evaluations (the evaluator
    actor gets it as its ``load_checkpoint``; ``convoy evaluate`` calls it)."""
    data = load_checkpoint(checkpoint_uri, networks=("actor",), full=False)
    return ActorCheckpoint(
        uri=str(checkpoint_uri),
        actor=data.networks["actor"],
        weights_version=int(data.state.get("weights_version", 0)),
        updates=int(data.state.get("updates", 0)),
        env_steps=int(data.state.get("env_steps", 0)),
        config_yaml=data.config_yaml,
    )


def read_history(run_uri: str | Path) -> list[dict[str, Any]]:
    """The run's evaluation records, oldest first ([] if none yet)."""
    try:
        raw = open_store(run_uri).read_bytes(HISTORY)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def format_eval(record: dict[str, Any]) -> str:
    return (
        f"eval @ {int(record['env_steps'])} env steps / {int(record['updates'])} updates: "
        f"route_completion {record['eval/route_completion']:.3f} | success {record['eval/success_rate']:.2f} | "
        f"return {record['eval/return']:.2f} | collisions {record['eval/collision_rate']:.2f} | "
        f"off_road {record['eval/off_road_rate']:.2f}" + (" | new best" if record.get("best") else "")
    )


class EvalScheduler:
    """Driver-side: decides when to evaluate, runs it on an evaluator actor, keeps ``best``.

    ``make_evaluator`` builds the evaluator actor handle (called lazily on the first
    evaluation, and again if the actor died). ``start_updates`` is the learner's counter at
    start (non-zero after a resume): the first evaluation is at the next multiple of
    ``run.eval_every_updates`` above it.
    """

    def __init__(
        self,
        cfg: ConvoyConfig,
        run_uri: str | Path,
        make_evaluator: Callable[[], Any] | None = None,
        start_updates: int = 0,
    ) -> None:
        self.cfg = cfg
        self.every = cfg.run.eval_every_updates
        self.run_uri = str(run_uri)
        self._make_evaluator = make_evaluator or (lambda: default_evaluator(cfg))
        self._evaluator: Any = None
        self.start = time.monotonic()
        self.next_due = (start_updates // self.every + 1) * self.every if self.every else 0
        self.history = read_history(self.run_uri)
        best = best_checkpoint(self.run_uri, cfg.run.run_id or None) if self.every else None
        self.best_name: str | None = best[0] if best else None
        self.best_score = score(best[1]) if best else (-math.inf, -math.inf)
        self.last: dict[str, Any] | None = self.history[-1] if self.history else None
        self.failures_total = 0
        self.skipped_total = 0  # due evaluations passed over while one was running
        self.hold = cfg.run.eval_hold
        self.held_s = 0.0  # seconds the run was held for evaluations (run.eval_hold)
        self._held_since: float | None = None
        self._ckpt_ref: Any = None
        self._eval_ref: Any = None
        self._pending: dict[str, Any] = {}
        self._evaluated: set[str] = {str(r.get("checkpoint")) for r in self.history}

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @property
    def busy(self) -> bool:
        return self._ckpt_ref is not None or self._eval_ref is not None

    @property
    def stage(self) -> str:
        """idle, checkpoint (waiting for the learner's checkpoint) or evaluating."""
        return "checkpoint" if self._ckpt_ref is not None else "evaluating" if self._eval_ref is not None else "idle"

    # ----- called from the driver loop ---------------------------------------------------------

    def maybe_submit(self, updates: int, env_steps: int, learner: Any) -> bool:
        """If an evaluation is due and none is running, ask ``learner`` for a checkpoint."""
        if not self.enabled or self.busy or updates < self.next_due:
            return False
        # Every multiple of eval_every_updates passed since the due one was skipped.
        skipped = updates // self.every - self.next_due // self.every
        if skipped > 0:
            self.skipped_total += skipped
            log.warning(
                "%d evaluation(s) skipped: the evaluator was still busy (%d so far)", skipped, self.skipped_total
            )
        self.next_due = (updates // self.every + 1) * self.every
        self._pending = {
            "updates": updates,
            "env_steps": env_steps,
            "elapsed_s": time.monotonic() - self.start,
            "held_s": self.held_s,
        }
        self._ckpt_ref = learner.checkpoint.remote(env_steps)
        return True

    def holding(self, updates: int) -> bool:
        """With ``run.eval_hold``: True while an evaluation is due or running, so the supervisor
        hands out no collect or train call and the evaluation lands at its exact cadence. The
        time held is kept (``held_s`` of each record) so benchmarks can leave it out."""
        held = self.hold and self.enabled and (self.busy or updates >= self.next_due)
        now = time.monotonic()
        if held and self._held_since is None:
            self._held_since = now
        elif not held and self._held_since is not None:
            self.held_s += now - self._held_since
            self._held_since = None
        return held

    def poll(self) -> dict[str, Any] | None:
        """Advance the evaluation in flight; the finished record when one completes, else None."""
        import ray

        if self._ckpt_ref is not None:
            ready, _ = ray.wait([self._ckpt_ref], timeout=0)
            if not ready:
                return None
            ref, self._ckpt_ref = self._ckpt_ref, None
            try:
                self._submit_eval(str(ray.get(ref)))
            except Exception as exc:  # the run goes on without this evaluation; counted and logged
                self._failed("checkpoint for evaluation", exc)
            return None
        if self._eval_ref is not None:
            ready, _ = ray.wait([self._eval_ref], timeout=0)
            if not ready:
                return None
            ref, self._eval_ref = self._eval_ref, None
            try:
                result = ray.get(ref)
            except Exception as exc:
                if not isinstance(exc, ray.exceptions.RayTaskError):
                    self._evaluator = None  # a dead evaluator is rebuilt for the next evaluation
                self._failed("evaluation", exc)
                return None
            return self._record(result)
        return None

    def finish(
        self,
        checkpoint_uri: str,
        updates: int,
        env_steps: int,
        timeout_s: float = 900.0,
        hurry: threading.Event | None = None,
    ) -> dict[str, Any] | None:
        """Blocking, at the end of a run: wait for the evaluation in flight, then evaluate the
        final checkpoint (unless it was already evaluated). Returns the final record; None when
        ``timeout_s`` passed or ``hurry`` was set (a second Ctrl-C or SIGTERM) first."""
        import ray

        if not self.enabled:
            return None
        deadline = time.monotonic() + timeout_s
        while self.busy and time.monotonic() < deadline and not (hurry is not None and hurry.is_set()):
            refs = [r for r in (self._ckpt_ref, self._eval_ref) if r is not None]
            ray.wait(refs, timeout=min(0.5, max(deadline - time.monotonic(), 0.01)))
            self.poll()
        if self.busy:
            log.warning("evaluation still running at the end of the run; not waited for")
            return None
        if checkpoint_uri in self._evaluated:
            return self.last
        self._pending = {"updates": updates, "env_steps": env_steps, "elapsed_s": time.monotonic() - self.start}
        try:
            self._submit_eval(checkpoint_uri)
            if not wait_all([self._eval_ref], max(deadline - time.monotonic(), 1.0), hurry):
                cut = hurry is not None and hurry.is_set()
                log.warning("final evaluation not waited for (%s)", "cut short" if cut else "timed out")
                return None
            result = ray.get(self._eval_ref)
        except Exception as exc:
            self._failed("final evaluation", exc)
            return None
        finally:
            self._eval_ref = None
        return self._record(result)

    def summary(self) -> dict[str, float]:
        """The newest evaluation's metrics (for the progress line, metrics and summary.json)."""
        out: dict[str, float] = {"eval/evaluations_total": float(len(self.history))}
        out["eval/failures_total"] = float(self.failures_total)
        out["eval/skipped_total"] = float(self.skipped_total)
        if self.last is not None:
            out.update({k: float(v) for k, v in self.last.items() if k.startswith(EVAL_PREFIX)})
            out["eval/best_route_completion"] = self.best_score[0]
            out["eval/best_return"] = self.best_score[1]
        return out

    def short(self) -> str:
        """A few characters for the progress line."""
        skipped = f" skipped {self.skipped_total}" if self.skipped_total else ""
        if self.last is None:
            return "eval -" + skipped
        return (
            f"eval rc {self.last['eval/route_completion']:.2f} ok {self.last['eval/success_rate']:.2f} "
            f"(best {self.best_score[0]:.2f})" + skipped
        )

    def close(self) -> None:
        import ray

        evaluator = self.detach_evaluator()
        if evaluator is not None:
            try:
                ray.get(evaluator.close.remote(), timeout=10)
            except Exception as exc:  # shutting down: report, go on
                log.warning("closing the evaluator failed: %s", exc)

    def detach_evaluator(self) -> Any:
        """The evaluator actor (None if none was made), handed over so that the end of a run
        closes it together with the other actors; a later evaluation would make a new one."""
        evaluator, self._evaluator = self._evaluator, None
        return evaluator

    # ----- internals --------------------------------------------------------------------------

    def _submit_eval(self, checkpoint_uri: str) -> None:
        self._pending["checkpoint"] = checkpoint_uri
        if self._evaluator is None:
            self._evaluator = self._make_evaluator()
        self._eval_ref = self._evaluator.evaluate_checkpoint.remote(checkpoint_uri)

    def _record(self, result: tuple[dict[str, float], dict[str, int]]) -> dict[str, Any]:
        metrics, counters = result  # counters: the checkpoint's own updates and env steps
        record: dict[str, Any] = {**self._pending, **counters, **metrics, "time": time.time()}
        uri = str(record["checkpoint"])
        self._evaluated.add(uri)
        if score(record) > self.best_score:
            try:
                mark_best(self.run_uri, uri, {k: v for k, v in record.items() if k.startswith(EVAL_PREFIX)})
                self.best_score, self.best_name = score(record), basename(uri)
                record["best"] = True
            except CheckpointError as exc:  # e.g. pruned before the evaluation finished
                log.warning("could not mark %s as best: %s", uri, exc)
        record.setdefault("best", False)
        self.history.append(record)
        self.last = record
        store = open_store(self.run_uri)
        store.write_bytes(HISTORY, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history).encode())
        return record

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures_total += 1
        log.warning("%s failed (%d so far): %s", what, self.failures_total, exc)


def evaluator_resources(cfg: ConvoyConfig) -> dict[str, float]:
    """Custom Ray resources of the evaluator: on CARLA it owns a server slot, like a collector."""
    return {"carla": 1.0} if cfg.env.backend == "carla" else {}


def default_evaluator(cfg: ConvoyConfig) -> Any:
    """An EvaluatorActor placed like a collector (CARLA: its own server slot, index after
    the collectors'); zero Ray CPUs so it never keeps a collector from being placed."""
    from actors.remote import EvaluatorActor

    resources = evaluator_resources(cfg) or None
    return EvaluatorActor.options(num_cpus=0, resources=resources).remote(  # type: ignore[attr-defined]
        cfg.to_dict(), cfg.collector.num_collectors, load_actor_checkpoint
    )
