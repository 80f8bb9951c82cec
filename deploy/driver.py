"""The Ray driver: starts shards, collectors and the learner, keeps them busy, reports progress.

Each actor always has exactly one call in flight: collectors ``collect(steps_per_call)`` and
the learner ``train(updates_per_call)``. When a call returns, the driver records its
metrics and submits the next one, handing the newest weight message (one ``ray.put``
shared by all collectors) to collectors that do not have it yet.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from common.config import ConfigError, ConvoyConfig
from common.metrics import MetricsExporter
from replay_service.sampler import ReplaySampler
from replay_service.shards import ShardSet, redact
from replay_service.writer import ReplayWriter

log = logging.getLogger(__name__)


def _min_size_to_sample(cfg: ConvoyConfig) -> int:
    return cfg.replay.min_size_to_sample or max(cfg.collector.start_steps, cfg.learner.batch_size)


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
        min_size_to_sample=_min_size_to_sample(cfg),
    )


def source_factory(cfg: ConvoyConfig, urls: list[str], pin_memory: bool) -> functools.partial[ReplaySampler]:
    """The learner's sampler; ``pin_memory`` is True exactly when the learner runs on CUDA."""
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
        min_size=_min_size_to_sample(cfg),
        samples_per_insert=cfg.replay.samples_per_insert,
        spi_tolerance=cfg.replay.spi_tolerance,
    )


@dataclass
class Progress:
    """What the driver knows about the run, from the metric dicts the actors return."""

    start: float = field(default_factory=time.monotonic)
    base_env_steps: int = 0  # counters of the run before a resume: rates count only this run's work
    base_updates: int = 0
    collector: dict[int, dict[str, float]] = field(default_factory=dict)
    learner: dict[str, float] = field(default_factory=dict)
    _last_t: float = field(default_factory=time.monotonic)
    _last_steps: int = 0
    _last_updates: int = 0

    @property
    def env_steps(self) -> int:
        return self.base_env_steps + int(sum(m.get("collector/env_steps_total", 0) for m in self.collector.values()))

    def resumed_from(self, env_steps: int, updates: int) -> None:
        self.base_env_steps = self._last_steps = env_steps
        self.base_updates = self._last_updates = updates

    @property
    def updates(self) -> int:
        return int(self.learner.get("learner/updates_total", 0))

    def summary(self) -> dict[str, float]:
        eps = sum(m.get("collector/episodes_total", 0) for m in self.collector.values())
        returns = [
            m["collector/last_episode_return"]
            for m in self.collector.values()
            if not math.isnan(m.get("collector/last_episode_return", math.nan))
        ]
        elapsed = time.monotonic() - self.start
        new_steps = self.env_steps - self.base_env_steps
        return {
            "run/env_steps_total": self.env_steps,
            "run/updates_total": self.updates,
            "run/episodes_total": eps,
            "run/elapsed_seconds": elapsed,
            "run/env_steps_per_s": new_steps / max(elapsed, 1e-9),
            "run/updates_per_s": (self.updates - self.base_updates) / max(elapsed, 1e-9),
            "run/replay_size": self.learner.get("replay_sampler/size", 0),
            "run/weights_version": self.learner.get("learner/weights_version", 0),
            "run/max_acting_version": max(
                (m.get("collector/last_acting_version", 0) for m in self.collector.values()), default=0
            ),
            "run/last_episode_return": returns[-1] if returns else math.nan,
            "run/replay_bytes_written_total": sum(
                m.get("replay_writer/bytes_total", 0) for m in self.collector.values()
            ),
            "run/replay_transitions_written_total": sum(
                m.get("replay_writer/transitions_total", 0) for m in self.collector.values()
            ),
        }

    def line(self) -> str:
        now = time.monotonic()
        dt = max(now - self._last_t, 1e-9)
        steps, updates = self.env_steps, self.updates
        sps, ups = (steps - self._last_steps) / dt, (updates - self._last_updates) / dt
        self._last_t, self._last_steps, self._last_updates = now, steps, updates
        s = self.summary()
        ret = s["run/last_episode_return"]
        return (
            f"[{now - self.start:7.1f}s] env_steps {steps:>8d} ({sps:6.1f}/s) | updates {updates:>7d} ({ups:5.1f}/s) | "
            f"replay {int(s['run/replay_size']):>7d} | episodes {int(s['run/episodes_total']):>5d} | "
            f"last_return {ret:8.2f} | weights v{int(s['run/weights_version'])} "
            f"acting v{int(s['run/max_acting_version'])}"
        )


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def train(cfg: ConvoyConfig, out: TextIO = sys.stdout, resume: str | Path | None = None) -> dict[str, float]:
    """Run training to ``run.total_env_steps`` (or Ctrl-C / SIGTERM); returns the final summary.

    With ``resume`` (a run or checkpoint directory) the learner continues exactly from the
    newest checkpoint and env steps count on from its counter; replay starts empty unless
    ``replay.shard_urls`` points at shards that kept their data."""
    import ray
    import torch

    from actors.remote import CollectorActor
    from learner.remote import LearnerActor

    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    print("resolved config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()), file=out, flush=True)

    progress = Progress()
    if resume is not None:
        from learner.checkpoint import load_checkpoint, resolve_checkpoint

        # Resolved once: the driver's counters and the learner's state come from the same checkpoint.
        resume = resolve_checkpoint(resume)
        state = load_checkpoint(resume, networks=(), full=False).state
        progress.resumed_from(int(state.get("env_steps", 0)), int(state["updates"]))
        if progress.base_env_steps >= cfg.run.total_env_steps:
            raise ConfigError(
                f"run.total_env_steps={cfg.run.total_env_steps} is already reached by the checkpoint "
                f"({progress.base_env_steps} env steps); raise it to train further, e.g. "
                f"run.total_env_steps={progress.base_env_steps + 100_000}"
            )
    previous_term = signal.signal(signal.SIGTERM, _raise_stop)
    summary: dict[str, float] = {}
    shards = ShardSet(
        num_shards=cfg.replay.num_shards,
        urls=cfg.replay.shard_urls,
        host=cfg.replay.bind,
        password=cfg.replay.password,
        executable=cfg.replay.redis_server,
    )
    ray_started = False
    try:
        print(f"replay shards: {', '.join(redact(u) for u in shards.urls)}", file=out, flush=True)
        use_gpu = cfg.learner.device.startswith("cuda") or (cfg.learner.device == "auto" and torch.cuda.is_available())
        needed_cpus = math.ceil(cfg.collector.num_collectors * cfg.collector.num_cpus) + 1
        if cfg.run.ray_address:
            ray.init(address=cfg.run.ray_address, logging_level=logging.WARNING)
        else:
            # Logical CPUs: on a small machine collectors and learner share cores by design.
            ray.init(
                num_cpus=max(needed_cpus, os.cpu_count() or 1),
                include_dashboard=False,
                logging_level=logging.WARNING,
                object_store_memory=256 * 1024**2,
                # One "carla" slot per collector on a local cluster; on `ray up` clusters each
                # node declares how many CARLA servers it can run (README, "Running with CARLA").
                resources={"carla": cfg.collector.num_collectors} if cfg.env.backend == "carla" else None,
            )
        ray_started = True
        config_dict = cfg.to_dict()
        collectors = [
            CollectorActor.options(  # type: ignore[attr-defined]
                num_cpus=cfg.collector.num_cpus,
                # A CARLA collector owns a server: place it only where a server slot is free.
                resources={"carla": 1} if cfg.env.backend == "carla" else None,
            ).remote(config_dict, i, sink_factory(cfg, shards.urls, i))
            for i in range(cfg.collector.num_collectors)
        ]
        learner = LearnerActor.options(num_cpus=1, num_gpus=1 if use_gpu else 0).remote(  # type: ignore[attr-defined]
            config_dict, source_factory(cfg, shards.urls, pin_memory=use_gpu), str(run_dir)
        )
        if resume is not None:
            info = ray.get(learner.restore.remote(str(resume)))
            print(
                f"resumed from {info['checkpoint']}: updates {info['updates']}, env_steps {info['env_steps']}",
                file=out,
                flush=True,
            )
        exporter = MetricsExporter(cfg.run.metrics_host, labels={"component": "driver"}) if cfg.run.metrics else None
        if exporter:
            urls = ray.get([c.metrics_url.remote() for c in collectors] + [learner.metrics_url.remote()])
            print("metrics endpoints:", file=out)
            print(f"  driver      {exporter.url}", file=out)
            for i, u in enumerate(urls[:-1]):
                print(f"  collector {i} {u}", file=out)
            print(f"  learner     {urls[-1]}", file=out, flush=True)
        try:
            summary = _loop(cfg, collectors, learner, progress, exporter, out)
        except (KeyboardInterrupt, _Stop) as exc:
            print(f"\nstopping ({type(exc).__name__} {exc}); writing a final checkpoint", file=out, flush=True)
        ckpt = ray.get(learner.checkpoint.remote(progress.env_steps))
        print(f"final checkpoint: {ckpt}", file=out, flush=True)
        summary = progress.summary()
        summary_line = (
            f"done: env_steps {int(summary['run/env_steps_total'])} ({summary['run/env_steps_per_s']:.1f}/s), "
            f"updates {int(summary['run/updates_total'])} ({summary['run/updates_per_s']:.2f}/s), "
            f"weights v{int(summary['run/weights_version'])}, "
            f"collectors acted with up to v{int(summary['run/max_acting_version'])}"
        )
        written = summary["run/replay_transitions_written_total"]
        if written:
            summary_line += f", {summary['run/replay_bytes_written_total'] / written:.0f} replay bytes/transition"
        print(summary_line, file=out, flush=True)
        for actor in [*collectors, learner]:
            try:
                ray.get(actor.close.remote(), timeout=10)
            except Exception as exc:  # shutting down: report, keep closing the rest
                log.warning("closing an actor failed: %s", exc)
        if exporter:
            exporter.close()
    finally:
        if ray_started:
            ray.shutdown()
        shards.close()
        signal.signal(signal.SIGTERM, previous_term)
    return summary


def _loop(
    cfg: ConvoyConfig,
    collectors: list[Any],
    learner: Any,
    progress: Progress,
    exporter: MetricsExporter | None,
    out: TextIO,
) -> dict[str, float]:
    import ray

    total = cfg.run.total_env_steps
    per_call = cfg.collector.steps_per_call
    weights_ref: Any = None
    weights_version = 0
    sent_version = [0] * len(collectors)
    in_flight_steps = 0
    pending: dict[Any, tuple[str, int, int]] = {}

    def submit_collect(i: int) -> None:
        nonlocal in_flight_steps
        steps = min(per_call, total - progress.env_steps - in_flight_steps)
        if steps <= 0:
            return
        send = weights_ref if sent_version[i] < weights_version else None
        if send is not None:
            sent_version[i] = weights_version
        ref = collectors[i].collect.remote(steps, progress.env_steps + in_flight_steps, send)
        in_flight_steps += steps
        pending[ref] = ("collector", i, steps)

    def submit_train() -> None:
        ref = learner.train.remote(cfg.learner.updates_per_call, progress.env_steps)
        pending[ref] = ("learner", 0, 0)

    for i in range(len(collectors)):
        submit_collect(i)
    submit_train()
    next_print = time.monotonic() + cfg.run.progress_every_s
    while progress.env_steps < total:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
        for ref in done:
            kind, i, steps = pending.pop(ref)
            if kind == "collector":
                in_flight_steps -= steps
                progress.collector[i] = ray.get(ref)
                submit_collect(i)
            else:
                metrics, published = ray.get(ref)
                progress.learner = metrics
                if published is not None:
                    weights_version, weights = published
                    weights_ref = ray.put(weights)
                submit_train()
        if exporter:
            exporter.update(progress.summary())
        if time.monotonic() >= next_print:
            print(progress.line(), file=out, flush=True)
            next_print = time.monotonic() + cfg.run.progress_every_s
        if not any(kind == "collector" for kind, _, _ in pending.values()) and progress.env_steps < total:
            raise RuntimeError("no collector call in flight before the step budget was reached")
    # Let the learner's last call finish so its counters are final.
    for ref, (kind, _, _) in list(pending.items()):
        result = ray.get(ref)
        if kind == "learner":
            progress.learner = result[0]
    print(progress.line(), file=out, flush=True)
    return progress.summary()
