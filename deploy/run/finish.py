"""The end of every run, however it ends: a final checkpoint, a final evaluation, the summary
line and ``summary.json``, then every actor closed and killed."""

from __future__ import annotations

import json
import logging
from typing import Any, TextIO

from common import storage
from common.config import ConvoyConfig
from deploy.run.evaluation import EvalScheduler, format_eval
from deploy.run.progress import Progress
from deploy.run.resolve import run_name
from deploy.run.supervisor import Supervisor
from learner.metric_keys import CHECKPOINT_FAILURES_TOTAL_KEY

log = logging.getLogger(__name__)


def final_checkpoint(supervisor: Supervisor, progress: Progress, out: TextIO) -> str | None:
    import ray

    try:
        final = str(ray.get(supervisor.learner.checkpoint.remote(progress.env_steps), timeout=600))
    except Exception as exc:  # the learner may be the piece that failed; the summary still gets written
        print(f"final checkpoint: none ({type(exc).__name__}: {exc})", file=out, flush=True)
        return None
    print(f"final checkpoint: {final}", file=out, flush=True)
    return final


def summarize(
    cfg: ConvoyConfig,
    supervisor: Supervisor,
    progress: Progress,
    exit_reason: str,
    out: TextIO,
    evals: EvalScheduler | None = None,
) -> dict[str, Any]:
    """Final checkpoint, summary line and ``summary.json``: written at every end."""
    final = final_checkpoint(supervisor, progress, out)
    if evals is not None and evals.enabled and final is not None:
        record = evals.finish(final, progress.updates, progress.env_steps)
        if record is not None:
            print(format_eval(record), file=out, flush=True)
    s = progress.summary()
    summary: dict[str, Any] = {
        "run": run_name(cfg),
        "exit_reason": exit_reason,
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
    print(done_line(exit_reason, summary, s), file=out, flush=True)
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


def close_actors(supervisor: Supervisor, control: Any) -> None:
    import ray

    refs = [a.close.remote() for a in [*supervisor.live_actors(), *supervisor.shards]]
    for ref in refs:
        try:
            ray.get(ref, timeout=15)
        except Exception as exc:  # shutting down: report, keep closing the rest
            log.warning("closing an actor failed: %s", exc)
    for actor in [*supervisor.live_actors(), *supervisor.shards, control]:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:
            log.debug("killing an actor at shutdown: %s", exc)
