"""``convoy bench scale --collectors 2,8,16,32 --step-hz 15``: convoy with server-bound simulators.

For each collector count, a real convoy run (the driver's placement and supervisor: Ray,
collector actors, a Redis shard, the learner) whose simulators are paced to ``--step-hz``
steps per second (``env.step_hz``; by default the CARLA stand-in, ``carla.stand_in=true``, a
CARLA-shaped env whose steps cost little CPU, so that the collectors' own costs show). Once
every collector acts with published weights and ``--warmup`` more seconds have passed, it
measures over ``--seconds``:

- ``env_steps_per_s`` against the ideal ``collectors x step_hz`` (``efficiency``), measured
  per collector between its own reports (a report comes with every ``collect`` call), and
  inserted transitions and bytes per second the same way;
- ``updates_per_s`` of the learner and its ``fed_ratio`` (1 - data wait / train time);
- weight fan-out (publish to every live collector acting with the version; p50 and max) and
  the driver loop's p99 work per iteration, from the run's ``run/...`` timings
  (deploy/run/timing.py);
- each collector process's RSS and its CPU seconds per env step (from /proc, by the pids the
  collectors report at placement: a single-machine bench).

Ideal scaling keeps ``efficiency`` near 1 and fan-out and driver loop flat as collectors grow.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from actors.metric_keys import COLLECTOR_ENV_STEPS_TOTAL, COLLECTOR_LAST_ACTING_VERSION
from common.config import ConvoyConfig, load_config
from deploy.bench.learning import _collector_counts
from deploy.cli.base import print_runs
from deploy.run.progress import Progress
from deploy.run.timing import quantile
from learner.metric_keys import (
    DATA_WAIT_SECONDS_TOTAL_KEY,
    TRAIN_SECONDS_TOTAL_KEY,
    UPDATES_TOTAL_KEY,
    WEIGHTS_VERSION_KEY,
)
from replay_service.metric_keys import BYTES_TOTAL, TRANSITIONS_TOTAL

# A paced, CARLA-shaped simulator, no evaluation, no metrics export, the policy from the start.
DEFAULTS = (
    "env.backend=carla",
    "carla.stand_in=true",
    "collector.start_steps=0",
    "run.eval_every_updates=0",
    "run.metrics=false",
)
_TICK = os.sysconf("SC_CLK_TCK")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def proc_rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class WindowDone(Exception):
    """The measurement window is over: ends the supervisor's loop."""


@dataclass
class Window:
    """Watches a run through the supervisor's per-iteration tick and measures one window."""

    collectors: int
    warmup_s: float
    seconds: float
    supervisor: Any = None
    ready_at: float | None = None
    start: float | None = None  # wall time
    start_learner: dict[str, float] = field(default_factory=dict)
    start_cpu: dict[int, float] = field(default_factory=dict)
    reports: dict[int, list[tuple[float, dict[str, float]]]] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    def tick(self, progress: Progress) -> None:
        now = time.time()
        if self.start is None:
            self._warm(progress, now)
            return
        for index, metrics in progress.collector.items():
            seen = self.reports.setdefault(index, [])
            steps = metrics.get(COLLECTOR_ENV_STEPS_TOTAL, 0.0)
            if not seen or steps != seen[-1][1].get(COLLECTOR_ENV_STEPS_TOTAL):
                if seen and steps < seen[-1][1].get(COLLECTOR_ENV_STEPS_TOTAL, 0.0):
                    seen.clear()  # a replacement: its counters start again
                seen.append((now, dict(metrics)))
        if now - self.start >= self.seconds:
            self.result = self._measure(progress, now)
            raise WindowDone

    def _pids(self) -> dict[int, int]:
        return {s.index: s.pid for s in self.supervisor.slots.values() if s.live and s.pid}

    def _warm(self, progress: Progress, now: float) -> None:
        acting = [m.get(COLLECTOR_LAST_ACTING_VERSION, 0) > 0 for m in progress.collector.values()]
        if self.ready_at is None:
            if progress.collectors_live == self.collectors and len(acting) == self.collectors and all(acting):
                self.ready_at = now
                _say(f"  all {self.collectors} collectors act with published weights; warming up {self.warmup_s:g}s")
            return
        if now - self.ready_at >= self.warmup_s:
            self.start = now
            self.start_learner = dict(progress.learner)
            self.start_cpu = {i: proc_cpu_seconds(pid) for i, pid in self._pids().items()}
            _say(f"  measuring {self.seconds:g}s")

    def _rate(self, key: str) -> float:
        """Sum over collectors of (their counter's change / time) between their first and last report."""
        total = 0.0
        for seen in self.reports.values():
            if len(seen) >= 2:
                (t0, m0), (t1, m1) = seen[0], seen[-1]
                total += (m1.get(key, 0.0) - m0.get(key, 0.0)) / max(t1 - t0, 1e-9)
        return total

    def _measure(self, progress: Progress, now: float) -> dict[str, Any]:
        assert self.start is not None
        dt = now - self.start
        pids = self._pids()
        cpu = {i: proc_cpu_seconds(pid) - self.start_cpu[i] for i, pid in pids.items() if i in self.start_cpu}
        rss = {i: proc_rss_mb(pid) for i, pid in pids.items()}
        steps_per_s = self._rate(COLLECTOR_ENV_STEPS_TOTAL)
        learner0, learner1 = self.start_learner, progress.learner

        def delta(key: str) -> float:
            return learner1.get(key, 0.0) - learner0.get(key, 0.0)

        train_s, wait_s = delta(TRAIN_SECONDS_TOTAL_KEY), delta(DATA_WAIT_SECONDS_TOTAL_KEY)
        fanout = progress.fanout.since(self.start)
        loop = progress.loop_times.since(self.start)
        return {
            "window_s": round(dt, 2),
            "env_steps_per_s": round(steps_per_s, 2),
            "inserted_transitions_per_s": round(self._rate(TRANSITIONS_TOTAL), 2),
            "inserted_bytes_per_s": round(self._rate(BYTES_TOTAL), 1),
            "updates_per_s": round(delta(UPDATES_TOTAL_KEY) / dt, 3),
            "fed_ratio": round((train_s - wait_s) / train_s, 4) if train_s > 0 else None,
            "fanout_p50_s": _round(quantile(fanout, 0.5)),
            "fanout_max_s": _round(max(fanout) if fanout else float("nan")),
            "fanouts": len(fanout),
            "driver_loop_p50_s": _round(quantile(loop, 0.5), 6),
            "driver_loop_p99_s": _round(quantile(loop, 0.99), 6),
            "driver_loop_iterations": len(loop),
            "collector_rss_mb": {str(i): round(v, 1) for i, v in sorted(rss.items())},
            "collector_rss_mb_total": round(sum(rss.values()), 1),
            "collector_cpu_us_per_step": round(sum(cpu.values()) / dt / steps_per_s * 1e6, 1) if steps_per_s else None,
            "weights_version": int(learner1.get(WEIGHTS_VERSION_KEY, 0)),
        }


def _round(x: float, digits: int = 3) -> float | None:
    return None if x != x else round(x, digits)  # NaN (nothing measured) as null


def run_one(cfg: ConvoyConfig, window: Window, log: TextIO) -> dict[str, Any]:
    """One convoy run with ``cfg`` until ``window`` has measured (or the run's time limit)."""
    import ray

    from deploy.run.control import namespace_for
    from deploy.run.finish import close_actors, kill
    from deploy.run.placement import make_control, place, ray_init_options
    from deploy.run.resolve import resolve
    from deploy.run.supervisor import Supervisor

    out: Any = log
    resolved = resolve(cfg, None, out)
    cfg, namespace = resolved.cfg, namespace_for(resolved.name)
    ray.init(**ray_init_options(cfg, namespace))
    try:
        placed = place(cfg, resolved.name, resolved.bind, namespace, None, out)
        supervisor = Supervisor(
            cfg,
            placed.factories,
            placed.learner,
            placed.shards,
            resolved.progress,
            out,
            control=placed.control,
            make_control=functools.partial(make_control, namespace),
            on_tick=window.tick,
        )
        supervisor.shard_ports = placed.shard_ports
        window.supervisor = supervisor
        try:
            reason = supervisor.run()
            raise RuntimeError(f"the run ended ({reason}) before the window was measured; see the log")
        except WindowDone:
            pass
        finally:
            supervisor.finish(timeout=30)
            actors = supervisor.named_actors()
            close_actors(actors)
            for actor in [*actors.values(), placed.control]:
                kill(actor)
    finally:
        ray.shutdown()
    return window.result


def cpu_flags() -> dict[str, Any]:
    """The CPU features that decide the learner's and the codecs' speed."""
    from learner.agent import cpu_has_native_bf16

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"cpu_count": os.cpu_count(), "native_bf16": cpu_has_native_bf16(), **{f: f in flags for f in wanted}}


def run(
    config: str | None,
    overrides: Sequence[str],
    collectors: Sequence[int],
    step_hz: float,
    seconds: float,
    warmup: float,
    out_dir: str | None,
) -> dict[str, Any]:
    from deploy.cli import default_config_path

    root = Path(out_dir or tempfile.mkdtemp(prefix="convoy-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    config_path = config or default_config_path()
    runs = []
    base: ConvoyConfig | None = None
    for n in collectors:
        cfg = load_config(
            config_path,
            [
                *DEFAULTS,
                *overrides,
                f"collector.num_collectors={n}",
                f"env.step_hz={step_hz}",
                "run.total_env_steps=1000000000",
                # A safety net only: the window ends the run; placement and warm-up may take a while.
                f"run.max_seconds={warmup + seconds + 300}",
                f"run.out_dir={root / f'c{n}'}",
            ],
        )
        base = base or cfg
        _say(f"collectors={n} at {step_hz:g} steps/s each (log {root / f'c{n}.log'})")
        window = Window(n, warmup, seconds)
        with open(root / f"c{n}.log", "w") as log:
            result = run_one(cfg, window, log)
        ideal = n * step_hz
        record = {
            "collectors": n,
            "ideal_env_steps_per_s": ideal,
            **result,
            "efficiency": round(result["env_steps_per_s"] / ideal, 4),
        }
        _say(
            f"  -> {record['env_steps_per_s']:.1f} env steps/s of {ideal:g} (efficiency {record['efficiency']:.3f}), "
            f"fan-out p50 {record['fanout_p50_s']} s, driver loop p99 {record['driver_loop_p99_s']} s"
        )
        runs.append(record)
    assert base is not None
    return _report(base, runs, config_path, overrides, step_hz, seconds, warmup, root)


def _report(
    base: ConvoyConfig,
    runs: list[dict[str, Any]],
    config_path: str,
    overrides: Sequence[str],
    step_hz: float,
    seconds: float,
    warmup: float,
    root: Path,
) -> dict[str, Any]:
    """The bench's JSON object: the runs, the machine, and the resolved (redacted) config."""
    import yaml

    from learner.agent import resolve_device

    # The redacted config: a shard password or credentials in shard URLs never reach the report.
    sections = yaml.safe_load(base.to_yaml())
    resolved = {k: v for k, v in sections.items() if k in ("env", "carla", "collector", "replay", "learner")}
    return {
        "runs": runs,
        "step_hz": step_hz,
        "seconds": seconds,
        "warmup_s": warmup,
        "device": str(resolve_device(base.learner.device)),
        "cpu": cpu_flags(),
        "config": config_path,
        "overrides": list(overrides),
        "resolved": {
            "env.backend": base.env.backend,
            "carla.stand_in": base.carla.stand_in,
            "learner.encoder": base.learner.encoder,
            "learner.batch_size": base.learner.batch_size,
            "learner.publish_every": base.learner.publish_every,
            "collector.steps_per_call": base.collector.steps_per_call,
            "collector.segment_length": base.collector.segment_length,
            "replay.samples_per_insert": base.replay.samples_per_insert,
            "replay.num_shards": base.replay.num_shards,
        },
        "resolved_config": resolved,
        "out_dir": str(root),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convoy bench scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="run config (default: the one `convoy train` picks)")
    p.add_argument("--collectors", type=_collector_counts, default=[2, 8, 16, 32], help="collector counts")
    p.add_argument("--step-hz", type=float, default=15.0, help="env steps per second of each simulator")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the measured window")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after every collector acts, before measuring")
    p.add_argument("--out-dir", default=None, help="where the runs go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. env.backend=embedded learner.encoder=nature")
    args = p.parse_args(argv)
    if args.step_hz <= 0 or args.seconds <= 0 or args.warmup < 0:
        p.error("--step-hz and --seconds must be > 0, --warmup >= 0")
    result = run(args.config, args.overrides, args.collectors, args.step_hz, args.seconds, args.warmup, args.out_dir)
    print_runs(result, args.json)
    return 0
