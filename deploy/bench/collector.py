"""``convoy bench collector [--json]``: what the collector's loop costs next to its simulator.

For each encoder (``learner.encoder`` none and nature by default) it times, on the same
simulator (``env.*``; the embedded one unless overridden), bare env steps with random actions
against the collector's own loop (actors/collector.py: policy forward plus noise, segment
building, encoding, and inserting into a real redis-server shard started here), in
interleaved rounds so that a machine whose load changes affects both alike. Reported per
encoder: ``bare_steps_per_s``, ``collector_steps_per_s``, ``overhead_ratio`` (collector /
bare: 1 means the loop costs nothing next to the simulator) and the CPU microseconds per env
step of each stage of the loop: ``policy`` (forward and noise), ``encode`` (segment encoding
and frame compression) and ``write`` (the insert round trip, without encoding).

Stage CPU is the thread's CPU time around the collector's ``act`` and its writer's
``encode_segment`` and ``write``, measured from outside: nothing in the collector changes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import ConvoyConfig, load_config
from deploy.cli.base import print_runs

ENCODERS = ("none", "nature")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class StageClock:
    """Thread CPU seconds spent inside wrapped callables, per stage."""

    seconds: dict[str, float] = field(default_factory=dict)

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.thread_time() - t0

        return timed


@contextlib.contextmanager
def _timed_encoding(clock: StageClock) -> Iterator[None]:
    """The writer's segment encoding, timed as the ``encode`` stage (restored on exit)."""
    import replay_service.writer as writer_module

    original = writer_module.encode_segment
    writer_module.encode_segment = clock.wrap("encode", original)
    try:
        yield
    finally:
        writer_module.encode_segment = original


def _bare_rate(env: Any, seconds: float, seed: int) -> float:
    """Env steps per second of the simulator alone, uniform random actions."""
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        steps += 1
        if terminated or truncated:
            env.reset(seed=seed + steps)
    return steps / (time.perf_counter() - start)


class _Loop:
    """One collector on its own simulator, acting with published weights, writing to the shard."""

    def __init__(self, cfg: ConvoyConfig, url: str) -> None:
        from actors.collector import Collector
        from actors.envs import make_env
        from common.networks import Actor
        from common.weights import message_to_bytes, pack_weights
        from replay_service.writer import ReplayWriter

        self.clock = StageClock()
        writer = ReplayWriter([url], cfg.replay.capacity, cfg.replay.codec, samples_per_insert=0.0)
        self.collector = Collector(cfg, 0, writer, lambda: make_env(cfg.env, cfg.carla))
        self.collector.set_weights(
            message_to_bytes(pack_weights(1, Actor(cfg.learner.encoder, cfg.learner.hidden_dim)))
        )
        self.collector.set_run_env_steps(cfg.collector.start_steps)  # past the random warm-up: the policy acts
        self.collector.act = self.clock.wrap("policy", self.collector.act)  # type: ignore[method-assign]
        writer.write = self.clock.wrap("write", writer.write)  # type: ignore[method-assign]
        self.steps = 0
        self.seconds = 0.0

    def run(self, seconds: float) -> float:
        """Collect for about ``seconds``; returns this chunk's env steps per second."""
        chunk = 16
        steps, start = 0, time.perf_counter()
        with _timed_encoding(self.clock):
            while time.perf_counter() - start < seconds:
                self.collector.collect(chunk)
                steps += chunk
        took = time.perf_counter() - start
        self.steps += steps
        self.seconds += took
        return steps / took

    def cpu_us_per_step(self) -> dict[str, float]:
        s = self.clock.seconds
        encode = s.get("encode", 0.0)
        # The write stage's clock includes the encoding it calls; report the insert alone.
        stages = {"policy": s.get("policy", 0.0), "encode": encode, "write": s.get("write", 0.0) - encode}
        return {k: round(v / max(self.steps, 1) * 1e6, 1) for k, v in stages.items()}

    def close(self) -> None:
        self.collector.close()


def _record(encoder: str, bare: list[float], collector: list[float], loop: _Loop) -> dict[str, Any]:
    b, c = float(np.mean(bare)), float(np.mean(collector))
    return {
        "encoder": encoder,
        "bare_steps_per_s": round(b, 2),
        "collector_steps_per_s": round(c, 2),
        "overhead_ratio": round(c / b, 4),
        "cpu_us_per_step": loop.cpu_us_per_step(),
        "collector_env_steps": loop.steps,
    }


def run(
    config: str | None, overrides: Sequence[str], encoders: Sequence[str], seconds: float, rounds: int
) -> dict[str, Any]:
    import torch

    from actors.envs import make_env
    from deploy.cli import default_config_path
    from replay_service.launcher import RedisShardProcess

    torch.set_num_threads(1)  # as in a collector actor: one small forward pass per step
    config_path = config or default_config_path()
    base = ["collector.start_steps=0", "replay.samples_per_insert=0", "run.metrics=false", *overrides]
    cfgs = {enc: load_config(config_path, [*base, f"learner.encoder={enc}"]) for enc in encoders}
    shard = RedisShardProcess()
    loops: dict[str, _Loop] = {}
    bare_env = make_env(cfgs[encoders[0]].env, cfgs[encoders[0]].carla)
    bare: dict[str, list[float]] = {enc: [] for enc in encoders}
    loop_rates: dict[str, list[float]] = {enc: [] for enc in encoders}
    try:
        loops = {enc: _Loop(cfg, shard.url) for enc, cfg in cfgs.items()}
        for loop in loops.values():
            loop.run(min(1.0, seconds))  # warm-up: first resets, allocator, shard connection
            loop.clock.seconds.clear()
            loop.steps, loop.seconds = 0, 0.0
        for r in range(rounds):
            for enc in encoders:
                bare[enc].append(_bare_rate(bare_env, seconds, seed=1000 * r + 1))
                loop_rates[enc].append(loops[enc].run(seconds))
                _say(
                    f"round {r + 1}/{rounds} encoder={enc}: bare {bare[enc][-1]:.1f} steps/s, "
                    f"collector {loop_rates[enc][-1]:.1f} steps/s"
                )
    finally:
        for loop in loops.values():
            loop.close()
        bare_env.close()
        shard.stop()
    runs = [_record(enc, bare[enc], loop_rates[enc], loops[enc]) for enc in encoders]
    first = cfgs[encoders[0]]
    return {
        "runs": runs,
        "backend": first.env.backend,
        "codec": first.replay.codec,
        "segment_length": first.collector.segment_length,
        "seconds_per_chunk": seconds,
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "config": config_path,
        "overrides": list(overrides),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convoy bench collector", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="run config (default: the one `convoy train` picks)")
    p.add_argument("--encoders", default=",".join(ENCODERS), help="learner.encoder values, comma-separated")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of each timed chunk")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (bare, collector) per encoder")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. env.other_vehicles=0")
    args = p.parse_args(argv)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    if not encoders:
        p.error("--encoders: give at least one")
    if args.seconds <= 0 or args.rounds < 1:
        p.error("--seconds must be > 0 and --rounds >= 1")
    result = run(args.config, args.overrides, encoders, args.seconds, args.rounds)
    print_runs(result, args.json)
    return 0
