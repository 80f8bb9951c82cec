"""The Ray driver: resolves the run, places its pieces, supervises them, and finishes.

:func:`train` reads as its four steps: :mod:`deploy.run.resolve` (name, secrets, config,
resume counters), :mod:`deploy.run.placement` (Ray, shards, learner, collectors' factories,
all by Ray resources), :class:`deploy.run.supervisor.Supervisor` (one call in flight per
actor, replacing what dies) and :mod:`deploy.run.finish` (final checkpoint, summary, close).
Everything the run writes goes to ``run.out_dir``, a path or an fsspec URI.
"""

from __future__ import annotations

import functools
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from common.config import ConvoyConfig
from deploy.run.evaluation import EvalScheduler, format_eval
from deploy.run.finish import close_actors, summarize
from deploy.run.placement import Placement, make_control, place, ray_init_options
from deploy.run.progress import Progress
from deploy.run.resolve import resolve
from deploy.run.supervisor import GiveUp, Supervisor
from deploy.run.telemetry import RunTelemetry


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def train(cfg: ConvoyConfig, out: TextIO = sys.stdout, resume: str | Path | None = None) -> dict[str, Any]:
    """Run training to ``run.total_env_steps`` (or Ctrl-C / SIGTERM / a piece that keeps
    failing); returns the end-of-run summary, also written to ``<run.out_dir>/summary.json``.

    With ``resume`` (a run or checkpoint, path or URI) the learner continues exactly from
    its newest complete checkpoint and env steps count on from its counter; replay starts
    empty unless ``replay.shard_urls`` points at shards that kept their data."""
    import ray

    from deploy.run.control import namespace_for

    run = resolve(cfg, resume, out)
    cfg, progress, namespace = run.cfg, run.progress, namespace_for(run.name)
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    summary: dict[str, Any] = {}
    try:
        ray.init(**ray_init_options(cfg, namespace))
        placed = place(cfg, run.name, run.bind, namespace, run.resume, out)
        # Every component's metric dict arrives here: exported once, and written as curves.
        telemetry = RunTelemetry(cfg, run.name)
        evals = EvalScheduler(cfg, cfg.run.out_dir, start_updates=progress.base_updates)
        supervisor = _supervisor(cfg, placed, progress, namespace, evals, telemetry, out)
        exit_reason = "budget"
        try:
            exit_reason = _supervise(supervisor, out)
            supervisor.finish()
        finally:
            summary = summarize(cfg, supervisor, progress, exit_reason, out, evals)
            final_eval = evals.summary()
            evals.close()
            close_actors(supervisor, placed.control)
            telemetry.close(progress, final_eval)  # the final counters and curve point
    finally:
        if ray.is_initialized():
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_term)
    return summary


def _supervise(supervisor: Supervisor, out: TextIO) -> str:
    """The supervisor's loop; returns the exit reason (a stop or a give-up ends it too)."""
    try:
        return supervisor.run()
    except (KeyboardInterrupt, _Stop) as exc:
        print(f"\nstopping ({type(exc).__name__} {exc}); writing a final checkpoint", file=out, flush=True)
        return "interrupted"
    except GiveUp as exc:
        print(f"\ngiving up: {exc}; writing a final checkpoint", file=out, flush=True)
        return f"gave_up: {exc}"


def newest_checkpoint(run_uri: str) -> str | None:
    """Where a replacement learner restores from: the run's newest complete checkpoint, if any."""
    from learner.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return str(resolve_checkpoint(run_uri))
    except CheckpointError:
        return None


def _supervisor(
    cfg: ConvoyConfig,
    placed: Placement,
    progress: Progress,
    namespace: str,
    evals: EvalScheduler,
    telemetry: RunTelemetry,
    out: TextIO,
) -> Supervisor:
    """The supervisor of the placed pieces; each tick also drives evaluation and telemetry."""

    def on_tick(p: Progress) -> None:
        if supervisor.learner_live:
            evals.maybe_submit(p.updates, p.env_steps, supervisor.learner)
        record = evals.poll()
        if record is not None:
            print(format_eval(record), file=out, flush=True)
        p.eval_text = evals.short() if evals.enabled else ""
        telemetry.tick(p, evals.summary())

    supervisor = Supervisor(
        cfg,
        placed.factories,
        placed.learner,
        placed.shards,
        progress,
        out,
        control=placed.control,
        make_control=functools.partial(make_control, namespace),
        restore_path=functools.partial(newest_checkpoint, cfg.run.out_dir),
        on_tick=on_tick,
    )
    supervisor.shard_ports = placed.shard_ports
    supervisor.hold = lambda: evals.holding(progress.updates)
    return supervisor
