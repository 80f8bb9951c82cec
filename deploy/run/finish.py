"""The end of every run, however it ends (budget, time, Ctrl-C/SIGTERM, a give-up, an error):
bounded, and the summary first.

1. The collectors are told to stop and the calls in flight get :data:`SETTLE_S` together, so
   that the counters are final (:meth:`Supervisor.finish`).
2. ``summary.json`` is written at once, naming the newest complete checkpoint: whatever comes
   next may be cut short (a second signal, or the SIGKILL that ends a Kubernetes grace period).
3. The final checkpoint, then ``summary.json`` again with it.
4. A final evaluation of it (not after an interrupt: the user asked the run to stop), then
   ``summary.json`` again with its result.
5. Every actor is closed in parallel under one deadline (:data:`CLOSE_S`), then killed.

From step 1 on a signal only sets ``hurry`` (deploy/run/signals.py): each wait then ends
within half a second, steps 3 and 4 are skipped, and the run still ends with a valid
``summary.json`` (its writes are atomic) and its newest complete checkpoint (a checkpoint is
complete only once its manifest is written, so one cut short is ignored by every reader).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, TextIO

from common import storage
from common.config import ConvoyConfig
from deploy.run.evaluation import EvalScheduler, format_eval
from deploy.run.progress import Progress
from deploy.run.resolve import run_name
from deploy.run.signals import StopSignals, wait_all
from deploy.run.supervisor import Supervisor
from deploy.run.telemetry import RunTelemetry
from learner.metric_keys import CHECKPOINT_FAILURES_TOTAL_KEY

log = logging.getLogger(__name__)

SETTLE_S = 10.0  # the calls in flight once the collectors were told to stop
CHECKPOINT_S = 600.0  # the final checkpoint
EVAL_S = 900.0  # the final evaluation (an episode on CARLA can take minutes)
CLOSE_S = 10.0  # every actor's close(), together


def finish_run(
    cfg: ConvoyConfig,
    supervisor: Supervisor,
    exit_reason: str,
    out: TextIO,
    evals: EvalScheduler,
    telemetry: RunTelemetry,
    control: Any,
    signals: StopSignals,
) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; returns the summary last written."""
    signals.finishing()
    hurry, progress = signals.hurry, supervisor.progress
    supervisor.finish(SETTLE_S, hurry)
    summary = write_summary(cfg, supervisor, exit_reason, evals, signals, final=None)
    final = None if hurry.is_set() else final_checkpoint(supervisor, progress, out, hurry)
    if final is not None:
        summary = write_summary(cfg, supervisor, exit_reason, evals, signals, final=final)
        if evals.enabled and exit_reason != "interrupted" and not hurry.is_set():
            record = evals.finish(final, progress.updates, progress.env_steps, EVAL_S, hurry)
            if record is not None:
                print(format_eval(record), file=out, flush=True)
                summary = write_summary(cfg, supervisor, exit_reason, evals, signals, final=final)
    if hurry.is_set():
        print(f"finishing cut short by {signals.last}: summary.json is written", file=out, flush=True)
    print(done_line(exit_reason, summary, progress.summary()), file=out, flush=True)
    evaluator = evals.detach_evaluator()
    started = time.monotonic()
    actors = supervisor.named_actors()
    if evaluator is not None:
        # An evaluation in flight (after an interrupt, or one the final evaluation did not
        # wait for) ends after its current step instead of holding close() for its episodes.
        stop_evaluator(evaluator)
        actors["evaluator"] = evaluator
    close_actors(actors, hurry)
    log.info("closed %d actors in %.1f s", len(actors), time.monotonic() - started)
    for actor in [*actors.values(), control]:
        kill(actor)
    telemetry.close(progress, evals.summary())  # the final counters and curve point
    return summary


def final_checkpoint(supervisor: Supervisor, progress: Progress, out: TextIO, hurry: threading.Event) -> str | None:
    import ray

    ref = supervisor.learner.checkpoint.remote(progress.env_steps)
    try:
        if not wait_all([ref], CHECKPOINT_S, hurry):
            why = "cut short" if hurry.is_set() else f"not written within {CHECKPOINT_S:.0f} s"
            print(f"final checkpoint: none ({why})", file=out, flush=True)
            return None
        final = str(ray.get(ref))
    except Exception as exc:  # the learner may be the piece that failed; the summary is written anyway
        print(f"final checkpoint: none ({type(exc).__name__}: {exc})", file=out, flush=True)
        return None
    print(f"final checkpoint: {final}", file=out, flush=True)
    return final


def newest_in_lineage(cfg: ConvoyConfig) -> str | None:
    """The run's own newest complete checkpoint (its lineage only), if any: what the summary
    names until the final checkpoint is written."""
    from learner.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return str(resolve_checkpoint(cfg.run.out_dir, run_id=cfg.run.run_id or None))
    except (CheckpointError, OSError):
        return None


def write_summary(
    cfg: ConvoyConfig,
    supervisor: Supervisor,
    exit_reason: str,
    evals: EvalScheduler | None,
    signals: StopSignals | None,
    final: str | None,
) -> dict[str, Any]:
    """``summary.json`` (written whole or not at all); ``final``: the final checkpoint, None
    until it is written (``newest_checkpoint`` names the newest complete one meanwhile)."""
    progress = supervisor.progress
    s = progress.summary()
    by = signals.received[0] if signals is not None and signals.received and exit_reason == "interrupted" else None
    summary: dict[str, Any] = {
        "run": run_name(cfg),
        "exit_reason": exit_reason,
        **({"interrupted_by": by} if by else {}),
        "env_steps": int(s["run/env_steps_total"]),
        "updates": int(s["run/updates_total"]),
        "weights_version": int(s["run/weights_version"]),
        "collector_restarts": progress.counts.collector_restarts,
        "learner_restarts": progress.counts.learner_restarts,
        "shard_restarts": progress.counts.shard_restarts,
        "dropped_transitions": int(s["run/dropped_transitions_total"]),
        "corrupt_segments": int(s["run/corrupt_segments_total"]),
        "checkpoint_failures": int(progress.learner.get(CHECKPOINT_FAILURES_TOTAL_KEY, 0)),
        "final_checkpoint": final,
        "newest_checkpoint": final or newest_in_lineage(cfg),
        "elapsed_seconds": round(s["run/elapsed_seconds"], 2),
        "env_steps_per_s": round(s["run/env_steps_per_s"], 2),
        "updates_per_s": round(s["run/updates_per_s"], 3),
        "samples_per_insert": round(s["run/samples_per_insert"], 3),
        "restart_seconds": supervisor.restarts.records,
        **(
            {"eval": evals.summary(), "best_checkpoint": evals.best_name} if evals is not None and evals.enabled else {}
        ),
    }
    storage.write_text(storage.join(cfg.run.out_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    return summary


def done_line(exit_reason: str, summary: dict[str, Any], s: dict[str, float]) -> str:
    line = (
        f"done ({exit_reason.split(':', 1)[0]}): env_steps {summary['env_steps']} ({s['run/env_steps_per_s']:.1f}/s), "
        f"updates {summary['updates']} ({s['run/updates_per_s']:.2f}/s), "
        f"weights v{summary['weights_version']}, "
        f"collectors acted with up to v{int(s['run/max_acting_version'])}"
    )
    written = s["run/replay_transitions_written_total"]
    if written:
        line += f", {s['run/replay_bytes_written_total'] / written:.0f} replay bytes/transition"
    return line


def stop_evaluator(evaluator: Any) -> None:
    try:
        evaluator.stop.remote()
    except Exception as exc:  # shutting down: it gets closed and killed anyway
        log.debug("stopping the evaluator: %s", exc)


def close_actors(actors: dict[str, Any], hurry: threading.Event | None = None, timeout: float = CLOSE_S) -> None:
    """``close()`` on every actor (by name) at once, one deadline for all (a collector's close
    waits for its call in flight, a learner's for its checkpoint writes); what is late gets
    killed, and the warning names it."""
    import ray

    calls: dict[Any, str] = {}
    for name, actor in actors.items():
        try:
            calls[actor.close.remote()] = name
        except Exception as exc:  # shutting down: report, keep closing the rest
            log.warning("closing %s failed: %s", name, exc)
    ready = wait_all(list(calls), timeout, hurry)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception as exc:
            log.warning("closing %s failed: %s", calls[ref], exc)
    done = set(ready)
    late = [name for ref, name in calls.items() if ref not in done]
    if late:
        log.warning("%d of %d actors did not close in time (%s); killing them", len(late), len(calls), ", ".join(late))


def kill(actor: Any) -> None:
    import ray

    if actor is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:
        log.debug("killing an actor at shutdown: %s", exc)
