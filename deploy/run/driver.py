"""The Ray driver: places the shards, the learner and the collectors, then supervises them.

Placement is by Ray resources, never by the driver's machine: collectors ask for
``collector.resources`` (``{carla: 1}`` for CARLA), the learner for ``learner.num_gpus``
(``auto``: one when the cluster has a GPU) and ``learner.resources``, shard actors for
``replay.shard_resources`` and spread over nodes. Nothing assumes that two pieces share a
machine: shards advertise their node's address (loopback only on a local single-node Ray),
and everything the run writes goes to ``run.out_dir``, a path or an fsspec URI.

The loop itself (one call in flight per actor, replacing what dies) is
:class:`deploy.run.supervisor.Supervisor`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from common import storage
from common.config import ConfigError, ConvoyConfig
from deploy.run.evaluation import EvalScheduler, evaluator_resources, format_eval
from deploy.run.progress import Progress
from deploy.run.supervisor import Factories, GiveUp, Supervisor
from deploy.run.telemetry import RunTelemetry
from replay_service.sampler import ReplaySampler
from replay_service.shards import check_shard, redact
from replay_service.writer import ReplayWriter

log = logging.getLogger(__name__)

PASSWORD_ENV = "CONVOY_REPLAY_PASSWORD"


def sink_factory(cfg: ConvoyConfig, urls: list[str], collector_id: int) -> functools.partial[ReplayWriter]:
    return functools.partial(
        ReplayWriter,
        urls,
        cfg.replay.capacity,
        cfg.replay.codec,
        cfg.replay.password,
        collector_id,
        samples_per_insert=cfg.replay.samples_per_insert,
        spi_tolerance=cfg.replay.spi_tolerance,
        min_size_to_sample=cfg.min_size_to_sample(),
    )


def source_factory(cfg: ConvoyConfig, urls: list[str], pin_memory: bool) -> functools.partial[ReplaySampler]:
    """The learner's sampler; ``pin_memory`` is True exactly when the learner runs on a GPU."""
    return functools.partial(
        ReplaySampler,
        urls,
        cfg.learner.batch_size,
        password=cfg.replay.password,
        prefetch=cfg.replay.prefetch_batches,
        threads=cfg.replay.sampler_threads or (4 if pin_memory else 1),
        index_refresh_s=cfg.replay.index_refresh_s,
        seed=cfg.run.seed,
        pin_memory=pin_memory,
        min_size=cfg.min_size_to_sample(),
        samples_per_insert=cfg.replay.samples_per_insert,
        spi_tolerance=cfg.replay.spi_tolerance,
    )


def run_name(cfg: ConvoyConfig) -> str:
    """``run.name``, else the last path component of ``run.out_dir``."""
    return cfg.run.name or storage.basename(cfg.run.out_dir) or "run"


def collector_resources(cfg: ConvoyConfig) -> dict[str, float]:
    """``collector.resources``, or the backend's default: a CARLA collector needs a server slot."""
    if cfg.collector.resources is not None:
        return dict(cfg.collector.resources)
    return {"carla": 1.0} if cfg.env.backend == "carla" else {}


def learner_gpus(cfg: ConvoyConfig, cluster: dict[str, float]) -> float:
    """``learner.num_gpus``; ``auto`` is decided from the cluster's resources, not from torch here."""
    if cfg.learner.num_gpus == "auto":
        return 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    return float(cfg.learner.num_gpus)


def resolve_secrets(cfg: ConvoyConfig, shards_on_node_addresses: bool) -> tuple[ConvoyConfig, str]:
    """The config with its shard password filled in, and a line saying where it came from.

    Precedence: ``replay.password``, then ``$CONVOY_REPLAY_PASSWORD``, then (only when shards
    convoy starts listen on node addresses) a random one for this run. The password reaches
    actors only through their constructor arguments and is redacted wherever it is shown."""
    password, source = cfg.replay.password, "replay.password"
    if not password and os.environ.get(PASSWORD_ENV):
        password, source = os.environ[PASSWORD_ENV], f"${PASSWORD_ENV}"
    if not password and shards_on_node_addresses and not cfg.replay.shard_urls:
        password, source = secrets.token_urlsafe(24), "generated for this run (shards listen on node addresses)"
    if not password:
        return cfg, "none (shards on loopback only)"
    return dataclasses.replace(cfg, replay=dataclasses.replace(cfg.replay, password=password)), source


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def _local_resources(cfg: ConvoyConfig) -> dict[str, float]:
    """Custom resources a local (single-machine) Ray cluster declares, so that a run config
    written for a cluster (``{carla: 1}`` per collector, ``{replay: 1}`` per shard) also runs
    on one machine."""
    out: dict[str, float] = {}

    def add(res: dict[str, float], times: int) -> None:
        for k, v in res.items():
            out[k] = out.get(k, 0.0) + v * times

    add(collector_resources(cfg), cfg.collector.num_collectors)
    if cfg.run.eval_every_updates:
        add(evaluator_resources(cfg), 1)
    add(dict(cfg.learner.resources), 1)
    if not cfg.replay.shard_urls:
        add(dict(cfg.replay.shard_resources), cfg.replay.num_shards)
    return out


def make_control(namespace: str, wanted: int) -> Any:
    """The run's named control actor, on the driver's own node: it must not go away with a
    worker node (its state is the wanted collector count, which the supervisor also holds)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from deploy.run.control import CONTROL_NAME, RunControl

    here = ray.get_runtime_context().get_node_id()
    return RunControl.options(  # type: ignore[attr-defined]
        name=CONTROL_NAME,
        namespace=namespace,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(wanted)


def _wait(refs: list[Any], what: str, out: TextIO, say_every_s: float = 15.0) -> list[Any]:
    """ray.get that says what it waits for (a node the autoscaler is still starting)."""
    import ray

    t0 = time.monotonic()
    while True:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=say_every_s)
        if len(ready) == len(refs):
            return list(ray.get(refs))
        print(f"waiting for {what} to be placed ({time.monotonic() - t0:.0f}s)", file=out, flush=True)


def train(cfg: ConvoyConfig, out: TextIO = sys.stdout, resume: str | Path | None = None) -> dict[str, Any]:
    """Run training to ``run.total_env_steps`` (or Ctrl-C / SIGTERM / a piece that keeps
    failing); returns the end-of-run summary, also written to ``<run.out_dir>/summary.json``.

    With ``resume`` (a run or checkpoint, path or URI) the learner continues exactly from
    its newest complete checkpoint and env steps count on from its counter; replay starts
    empty unless ``replay.shard_urls`` points at shards that kept their data."""
    import ray

    from actors.remote import CollectorActor
    from deploy.run.control import CONTROL_NAME, namespace_for
    from learner.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from learner.remote import LearnerActor
    from replay_service.remote import ShardActor

    joined = bool(cfg.run.ray_address)
    bind = cfg.replay.bind if cfg.replay.bind != "auto" else ("node" if joined else "loopback")
    cfg, password_source = resolve_secrets(cfg, shards_on_node_addresses=bind == "node")
    run_uri = cfg.run.out_dir
    name = run_name(cfg)
    storage.write_text(storage.join(run_uri, "config.yaml"), cfg.to_yaml())
    print("resolved config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()), file=out, flush=True)
    print(f"run {name!r}: storage {storage.redact(run_uri)}; shard password: {password_source}", file=out, flush=True)

    progress = Progress()
    if resume is not None:
        # Resolved once: the driver's counters and the learner's state come from the same checkpoint.
        resume = str(resolve_checkpoint(resume))
        state = load_checkpoint(resume, networks=(), full=False).state
        progress.resumed_from(int(state.get("env_steps", 0)), int(state["updates"]))
        if progress.base_env_steps >= cfg.run.total_env_steps:
            raise ConfigError(
                f"run.total_env_steps={cfg.run.total_env_steps} is already reached by the checkpoint "
                f"({progress.base_env_steps} env steps); raise it to train further, e.g. "
                f"run.total_env_steps={progress.base_env_steps + 100_000}"
            )
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    summary: dict[str, Any] = {}
    namespace = namespace_for(name)
    try:
        if joined:
            ray.init(address=cfg.run.ray_address, namespace=namespace, logging_level=logging.WARNING)
        else:
            needed_cpus = math.ceil(cfg.collector.num_collectors * cfg.collector.num_cpus) + 1
            # Logical CPUs: on a small machine collectors and learner share cores by design.
            ray.init(
                num_cpus=max(needed_cpus, os.cpu_count() or 1),
                # Ray's dashboard head writes the Prometheus service-discovery file that
                # deploy/monitoring/prometheus.yml (`convoy monitor`) finds this cluster by.
                include_dashboard=cfg.run.metrics,
                logging_level=logging.WARNING,
                object_store_memory=256 * 1024**2,
                namespace=namespace,
                resources=_local_resources(cfg) or None,
            )
        try:
            ray.get_actor(CONTROL_NAME, namespace=namespace)
            raise ConfigError(
                f"a run named {name!r} is already running on this cluster (namespace {namespace!r}); "
                "set run.name or run.out_dir to another name"
            )
        except ValueError:
            pass
        control = make_control(namespace, cfg.collector.num_collectors)
        config_dict = cfg.to_dict()  # unredacted: constructor arguments are the one way secrets travel

        # ----- replay shards -----
        def make_shard(index: int, port: int) -> Any:
            return ShardActor.options(  # type: ignore[attr-defined]
                resources=dict(cfg.replay.shard_resources) or None,
                scheduling_strategy="SPREAD",
                name=f"shard-{index}",
                namespace=namespace,
            ).remote(index, bind, port, cfg.replay.password, cfg.replay.redis_server)

        shard_actors: list[Any] = []
        if cfg.replay.shard_urls:
            urls = list(cfg.replay.shard_urls)
            for url in urls:
                check_shard(url, cfg.replay.password)
            print(f"replay shards (given): {', '.join(redact(u) for u in urls)}", file=out, flush=True)
        else:
            shard_actors = [make_shard(i, 0) for i in range(cfg.replay.num_shards)]
            urls = _wait([s.url.remote() for s in shard_actors], "replay shards", out)
            nodes = ray.get([s.node.remote() for s in shard_actors])
            for i, (url, node) in enumerate(zip(urls, nodes, strict=True)):
                print(f"placement: shard {i} -> node {node['address']} ({redact(url)})", file=out, flush=True)
            for url in urls:
                check_shard(url, cfg.replay.password)

        # ----- learner -----
        gpus = learner_gpus(cfg, ray.cluster_resources())

        def make_learner() -> Any:
            return LearnerActor.options(  # type: ignore[attr-defined]
                num_cpus=1, num_gpus=gpus, resources=dict(cfg.learner.resources) or None
            ).remote(config_dict, source_factory(cfg, urls, pin_memory=gpus > 0), run_uri)

        learner = make_learner()
        (lnode,) = _wait([learner.node.remote()], "the learner", out)
        print(f"placement: learner -> node {lnode['address']} ({lnode['device']}, {gpus:g} GPU)", file=out, flush=True)
        if resume is not None:
            info = ray.get(learner.restore.remote(resume))
            print(
                f"resumed from {info['checkpoint']}: updates {info['updates']}, env_steps {info['env_steps']}",
                file=out,
                flush=True,
            )

        # ----- collectors (placed as resources allow; the run starts with the first) -----
        coll_res = collector_resources(cfg)

        def make_collector(index: int, incarnation: int) -> Any:
            return CollectorActor.options(  # type: ignore[attr-defined]
                num_cpus=cfg.collector.num_cpus, resources=coll_res or None
            ).remote(config_dict, index, sink_factory(cfg, urls, index), incarnation)

        def newest_checkpoint() -> str | None:
            try:
                return str(resolve_checkpoint(run_uri))
            except CheckpointError:
                return None

        # Every component's metric dict arrives here: exported once, through Ray's metrics
        # agent, and written as TensorBoard curves (deploy/run/telemetry.py).
        telemetry = RunTelemetry(cfg, name)
        # Evaluation of checkpoints on an evaluator actor; `best` kept (deploy/run/evaluation.py).
        evals = EvalScheduler(cfg, run_uri, start_updates=progress.base_updates)

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
            Factories(collector=make_collector, learner=make_learner, shard=make_shard if shard_actors else None),
            learner,
            shard_actors,
            progress,
            out,
            control=control,
            make_control=functools.partial(make_control, namespace),
            restore_path=newest_checkpoint,
            on_tick=on_tick,
        )
        supervisor.shard_ports = [int(u.rsplit(":", 1)[1].split("/", 1)[0]) for u in urls] if shard_actors else []
        exit_reason = "budget"
        try:
            try:
                exit_reason = supervisor.run()
            except (KeyboardInterrupt, _Stop) as exc:
                exit_reason = "interrupted"
                print(f"\nstopping ({type(exc).__name__} {exc}); writing a final checkpoint", file=out, flush=True)
            except GiveUp as exc:
                exit_reason = f"gave_up: {exc}"
                print(f"\ngiving up: {exc}; writing a final checkpoint", file=out, flush=True)
            supervisor.finish()
        finally:
            summary = _finish(cfg, supervisor, progress, exit_reason, out, evals)
            final_eval = evals.summary()
            evals.close()
            _close(supervisor, shard_actors, control)
            telemetry.close(progress, final_eval)  # the final counters and curve point
    finally:
        if ray.is_initialized():
            ray.shutdown()
        signal.signal(signal.SIGTERM, previous_term)
    return summary


def _finish(
    cfg: ConvoyConfig,
    supervisor: Supervisor,
    progress: Progress,
    exit_reason: str,
    out: TextIO,
    evals: EvalScheduler | None = None,
) -> dict[str, Any]:
    """Final checkpoint, summary line and ``summary.json``: written at every end."""
    import ray

    final: str | None = None
    try:
        final = str(ray.get(supervisor.learner.checkpoint.remote(progress.env_steps), timeout=600))
        print(f"final checkpoint: {final}", file=out, flush=True)
    except Exception as exc:  # the learner may be the piece that failed; the summary still gets written
        print(f"final checkpoint: none ({type(exc).__name__}: {exc})", file=out, flush=True)
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
    line = (
        f"done ({exit_reason.split(':', 1)[0]}): env_steps {summary['env_steps']} ({s['run/env_steps_per_s']:.1f}/s), "
        f"updates {summary['updates']} ({s['run/updates_per_s']:.2f}/s), "
        f"weights v{summary['weights_version']}, "
        f"collectors acted with up to v{int(s['run/max_acting_version'])}"
    )
    written = s["run/replay_transitions_written_total"]
    if written:
        line += f", {s['run/replay_bytes_written_total'] / written:.0f} replay bytes/transition"
    print(line, file=out, flush=True)
    return summary


def _close(supervisor: Supervisor, shard_actors: list[Any], control: Any) -> None:
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
