"""The Ray driver: resolves the run, places its pieces, supervises them, and finishes.

:func:`train` reads as its four steps: :mod:`deploy.run.resolve` (name, secrets, config,
resume counters), :mod:`deploy.run.placement` (Ray, shards, learner, collectors' factories,
all by Ray resources), :class:`deploy.run.supervisor.Supervisor` (one call in flight per
actor, replacing what dies) and :mod:`deploy.run.finish` (summary first, final checkpoint,
every actor closed, all bounded in time).
Everything the run writes goes to ``run.out_dir``, a path or an fsspec URI.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from common.config import ConvoyConfig
from deploy.run.evaluation import EvalScheduler, format_eval
from deploy.run.finish import finish_run
from deploy.run.placement import Placement, check_run_is_new, make_control, place, ray_init_options
from deploy.run.progress import Progress
from deploy.run.resolve import newest_checkpoint, resolve, write_config
from deploy.run.signals import StopSignals
from deploy.run.supervisor import GiveUp, Supervisor, describe_failure
from deploy.run.telemetry import RunTelemetry

log = logging.getLogger(__name__)


def train(cfg: ConvoyConfig, out: TextIO = sys.stdout, resume: str | Path | None = None) -> dict[str, Any]:
    """Run training to ``run.total_env_steps`` (or ``run.max_seconds``, Ctrl-C / SIGTERM, a
    piece that keeps failing); returns the end-of-run summary, also written to
    ``<run.out_dir>/summary.json``. SIGINT and SIGTERM end the run the same way (exit reason
    ``interrupted``); one that arrives before the run is placed raises ``KeyboardInterrupt``.
    An unexpected error is raised again once the summary (exit reason ``error: ...``) is written.

    With ``resume`` (a run or checkpoint, path or URI) the learner continues exactly from
    its newest complete checkpoint and env steps count on from its counter; replay starts
    empty unless ``replay.shard_urls`` points at shards that kept their data."""
    import ray

    from deploy.run.control import namespace_for

    run = resolve(cfg, resume, out)
    cfg, progress, namespace = run.cfg, run.progress, namespace_for(run.name)
    signals = StopSignals()
    signals.install()
    try:
        ray.init(**ray_init_options(cfg, namespace))
        signals.install()  # ray.init took SIGTERM over (deploy/run/signals.py says how and why)
        # The run is validated (config, resume target, directory, not already running)
        # before anything is written to its directory.
        check_run_is_new(run.name, namespace)
        write_config(run, out)
        placed = place(cfg, run.name, run.bind, namespace, run.resume, out)
        # Every component's metric dict arrives here: exported once, and written as curves.
        telemetry = RunTelemetry(cfg, run.name)
        evals = EvalScheduler(cfg, cfg.run.out_dir, start_updates=progress.base_updates)
        supervisor = _supervisor(cfg, placed, progress, namespace, evals, telemetry, out)
        return supervise_and_finish(cfg, supervisor, evals, telemetry, placed.control, signals, out)
    finally:
        signals.finishing()  # a signal now must not cut ray.shutdown short
        if ray.is_initialized():
            ray.shutdown()
        signals.restore()


def supervise_and_finish(
    cfg: ConvoyConfig,
    supervisor: Supervisor,
    evals: EvalScheduler,
    telemetry: RunTelemetry,
    control: Any,
    signals: StopSignals,
    out: TextIO,
) -> dict[str, Any]:
    """The supervisor's loop, then the end of the run however the loop ended (deploy/run/finish.py)."""
    error: Exception | None = None
    try:
        exit_reason = supervisor.run()
    except KeyboardInterrupt:
        exit_reason = "interrupted"
        print(f"\nstopping ({signals.last or 'KeyboardInterrupt'}); writing the summary", file=out, flush=True)
    except GiveUp as exc:
        exit_reason = f"gave_up: {exc}"
        print(f"\ngiving up: {exc}; writing the summary", file=out, flush=True)
    except Exception as exc:  # raised again below, once the summary names it
        error, exit_reason = exc, f"error: {describe_failure(exc)}"
        log.exception("the run failed")
        print(f"\nthe run failed ({describe_failure(exc)}); writing the summary", file=out, flush=True)
    finally:
        signals.finishing()  # from here on a signal hurries the end instead of interrupting it
    summary = finish_run(cfg, supervisor, exit_reason, out, evals, telemetry, control, signals)
    if error is not None:
        raise error
    return summary


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
        restore_path=functools.partial(newest_checkpoint, cfg),
        on_tick=on_tick,
    )
    supervisor.shard_ports = placed.shard_ports
    supervisor.hold = lambda: evals.holding(progress.updates)
    return supervisor
