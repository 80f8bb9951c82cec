"""``convoy bench learner``: TD3 updates/s of convoy's learner against a straightforward TD3.

Three figures on the same machine, batch size and networks:

* ``updates_per_s_synthetic``: convoy's learner on batches already on the device (each update
  still augments its batch, ``learner.augment``, as in training: that is the update's work,
  not the replay path's);
* ``updates_per_s_fed``: convoy's learner fed through the real ReplaySampler from a real
  redis-server shard filled with embedded-simulator frames by the real ReplayWriter, in the
  sampler mode ``replay.mirror`` picks (``auto``: the resident mirror, on the GPU when there
  is one; pass ``replay.mirror=host`` or ``replay.mirror=off`` to measure another; the JSON
  says which ran as ``replay_mirror``);
* ``baseline_updates_per_s``: :class:`StraightforwardTD3` (deploy/bench/td3_baseline.py): the same networks and TD3
  math as a single-process implementation usually writes it (a float32 dict replay buffer in
  memory, indexing on the update thread, no prefetch, NCHW fp32, no compile, full backward
  of the actor loss through the critic).

``fed_ratio = fed / synthetic`` and ``speedup = fed / baseline``.

``--variants before,after,bf16,batch256[,compile]`` adds ``variants``: fed updates/s of each
learner setting, measured in the same run, in interleaved chunks (so a machine shared with
other work loads every variant alike), from one shard: ``before`` is the learner as it used
to run on a CPU (torch on every core, one sampler thread beside the update, and the random
shift by element-wise gathers, ``learner.augment.gather_shift``: the same shifts and the same
math, only slower), ``after`` as configured now (threads tuned, learner/threads.py; sampling as
``replay.sampler_threads`` says, deploy/run/placement.py), ``bf16`` forces bf16
autocast, ``batch256`` is batch 256 (compare ``samples_per_s``), ``compile`` turns on
torch.compile (``setup_s`` includes its compile time). ``cpu`` reports the CPU model and the
flags that decide precision and kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from common.config import ConvoyConfig, load_config
from common.schema import Batch, Segment
from common.sysutil import cpu_flags, tune_malloc_for_bulk_buffers
from deploy.bench.data import record_segments
from deploy.bench.td3_baseline import StraightforwardTD3
from deploy.cli.base import print_result
from learner import augment
from learner.agent import TD3Agent
from learner.loop import Learner
from replay_service.metric_keys import WAIT_SECONDS_TOTAL
from replay_service.mirror import resolve_mode

log = sys.stderr


def _say(msg: str) -> None:
    print(msg, file=log, flush=True)


def _rate(step: Callable[[int], None], chunk: int, min_seconds: float, min_updates: int, warmup: int) -> float:
    """Updates/s of ``step(n)`` (runs n updates) after ``warmup`` updates, over at least
    ``min_seconds`` and ``min_updates``."""
    if warmup:
        step(warmup)
    done, start = 0, time.perf_counter()
    while done < min_updates or time.perf_counter() - start < min_seconds:
        step(chunk)
        done += chunk
    return done / (time.perf_counter() - start)


def _transitions(segments: Sequence[Segment], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` transitions drawn from recorded segments as full uint8 stacks."""
    rng = np.random.default_rng(seed)
    picks = [
        (s, int(rng.integers(s.num_transitions))) for s in (segments[i] for i in rng.integers(len(segments), size=n))
    ]
    trs = [seg.transition(t) for seg, t in picks]
    return {k: np.stack([np.asarray(tr[k]) for tr in trs]) for k in trs[0]}


def _batch_from(data: dict[str, np.ndarray], idx: np.ndarray) -> Batch:
    return Batch(
        image=torch.from_numpy(data["image"][idx]),
        vector=torch.from_numpy(data["vector"][idx].astype(np.float32)),
        action=torch.from_numpy(data["action"][idx].astype(np.float32)),
        reward=torch.from_numpy(data["reward"][idx].astype(np.float32)),
        next_image=torch.from_numpy(data["next_image"][idx]),
        next_vector=torch.from_numpy(data["next_vector"][idx].astype(np.float32)),
        terminated=torch.from_numpy(data["terminated"][idx].astype(np.float32)),
        policy_version=torch.zeros(len(idx), dtype=torch.int64),
    )


class DeviceBatches:
    """A BatchSource cycling a few batches that already sit on the device."""

    def __init__(self, cfg: ConvoyConfig, data: dict[str, np.ndarray], device: torch.device, count: int = 4) -> None:
        rng = np.random.default_rng(0)
        n = len(data["reward"])
        self.batches = [_batch_from(data, rng.integers(n, size=cfg.learner.batch_size)) for _ in range(count)]
        self.i = 0

    def move_to(self, agent: TD3Agent) -> None:
        self.batches = [b.to(agent.device) for b in self.batches]

    @property
    def size(self) -> int:
        return 1 << 30

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        self.i += 1
        return self.batches[self.i % len(self.batches)]

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.batches.clear()


# ----- the benchmark -------------------------------------------------------------------------


def _bench_config(device: str, batch_size: int, replay_transitions: int, overrides: Sequence[str]) -> ConvoyConfig:
    """The default config with no warm-up, no rate limiter, and checkpoints and weight
    publishing pushed out of the measured window."""
    return load_config(
        None,
        [
            f"learner.device={device}",
            f"learner.batch_size={batch_size}",
            "collector.start_steps=0",
            "replay.samples_per_insert=0",
            f"replay.capacity={max(replay_transitions * 2, 1000)}",
            "run.checkpoint_every_updates=100000000",
            "learner.publish_every=100000000",
            *overrides,
        ],
    )


def _settle(learner: Learner, timing: _Timing) -> None:
    """Warm-up updates, then the CPU thread tuner's trials (learner/threads.py): set-up, not
    measured, as a long run spends them once at its start."""
    learner.train(timing.warmup)
    threads = learner.threads
    while threads is not None and threads.tuning:
        learner.train(1)
    timing.sync()


class _Timing:
    """How one figure is timed on ``dev``: updates per chunk, warm-up updates, and the
    device synchronisation that makes a chunk's time include its GPU work."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.cuda = dev.type == "cuda"
        self.chunk = 20 if self.cuda else 2
        self.warmup = 30 if self.cuda else 3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)


def _synthetic_rate(cfg: ConvoyConfig, data: dict[str, np.ndarray], timing: _Timing, min_seconds: float) -> float:
    """The learner loop on batches already on the device, so fed_ratio
    isolates what the replay path costs."""
    with tempfile.TemporaryDirectory(prefix="convoy-bench-") as tmp:
        synthetic_source = DeviceBatches(cfg, data, timing.dev)
        learner = Learner(cfg, synthetic_source, tmp)
        synthetic_source.move_to(learner.agent)
        _settle(learner, timing)

        def synthetic(n: int) -> None:
            learner.train(n)
            timing.sync()

        rate = _rate(synthetic, timing.chunk, min_seconds, 4 * timing.chunk, 0)
        learner.close()
    return rate


def _fill_replay(cfg: ConvoyConfig, urls: list[str], segments: Sequence[Segment], transitions: int) -> None:
    from replay_service.writer import ReplayWriter

    writer = ReplayWriter(urls, cfg.replay.capacity, cfg.replay.codec)
    written, i = 0, 0
    while written < transitions:
        writer.write(segments[i % len(segments)])
        written += segments[i % len(segments)].num_transitions
        i += 1
    writer.close()


def _fed_rate(
    cfg: ConvoyConfig, segments: Sequence[Segment], timing: _Timing, min_seconds: float, replay_transitions: int
) -> tuple[float, dict[str, float]]:
    """Convoy's learner through the real writer, shard and sampler; (updates/s, sampler metrics)."""
    from deploy.run.placement import source_factory
    from replay_service.shards import ShardSet

    with ShardSet(num_shards=1, executable=cfg.replay.redis_server) as shards:
        _fill_replay(cfg, shards.urls, segments, replay_transitions)
        source = source_factory(cfg, shards.urls, pin_memory=timing.cuda)()
        # With the resident mirror the sampler first pulls everything stored (a restarted
        # learner's refill); until then train() returns without updates. Time updates only.
        source.refresh_index()
        with tempfile.TemporaryDirectory(prefix="convoy-bench-") as tmp:
            learner = Learner(cfg, source, tmp)
            _settle(learner, timing)

            def fed(n: int) -> None:
                learner.train(n)
                timing.sync()

            rate = _rate(fed, timing.chunk, min_seconds, 4 * timing.chunk, 0)
            sampler_metrics = source.metrics()
            learner.close()
    return rate, sampler_metrics


def _baseline_rate(
    cfg: ConvoyConfig, data: dict[str, np.ndarray], timing: _Timing, min_seconds: float, batch_size: int
) -> float:
    baseline = StraightforwardTD3(cfg, data, timing.dev)

    def base(n: int) -> None:
        for _ in range(n):
            baseline.train_step(batch_size)
        timing.sync()

    return _rate(base, timing.chunk, min_seconds, 2 * timing.chunk, timing.warmup)


VARIANTS: dict[str, list[str]] = {
    "before": [f"learner.num_threads={os.cpu_count() or 1}", "replay.sampler_threads=1"],
    "after": [],
    "bf16": ["learner.precision=bf16"],
    "batch256": ["learner.batch_size=256"],
    "compile": ["learner.compile=true"],
}
_REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict[str, object]:
    """The CPU model and the feature flags that decide precision and kernel choice."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in _REPORTED_FLAGS if f in cpu_flags()]}


@contextlib.contextmanager
def _shift_of(variant: str) -> Iterator[None]:
    """The random shift's implementation while ``variant`` trains: ``before`` has the
    element-wise gathers the learner used to run (the same shifts from the same draws)."""
    if variant != "before":
        yield
        return
    fast = augment.shift
    augment.shift = augment.gather_shift
    try:
        yield
    finally:
        augment.shift = fast


def _variant_rates(
    cfg: ConvoyConfig,
    names: Sequence[str],
    segments: Sequence[Segment],
    timing: _Timing,
    min_seconds: float,
    replay_transitions: int,
) -> dict[str, dict[str, float]]:
    """Fed updates/s of each variant, in interleaved chunks over one shard."""
    from deploy.run.placement import source_factory
    from replay_service.shards import ShardSet

    out: dict[str, dict[str, float]] = {}
    learners: dict[str, Learner] = {}
    with ShardSet(num_shards=1, executable=cfg.replay.redis_server) as shards, tempfile.TemporaryDirectory() as tmp:
        _fill_replay(cfg, shards.urls, segments, replay_transitions)
        for name in names:
            vcfg = cfg.replace(*VARIANTS[name])
            start = time.perf_counter()
            learners[name] = Learner(vcfg, source_factory(vcfg, shards.urls, pin_memory=timing.cuda)(), f"{tmp}/{name}")
            out[name] = {"batch_size": vcfg.learner.batch_size}
            with _shift_of(name):
                _settle(learners[name], timing)
            out[name]["setup_s"] = time.perf_counter() - start
            _say(f"  {name}: ready after {out[name]['setup_s']:.1f} s")
        spent = dict.fromkeys(names, 0.0)
        done = dict.fromkeys(names, 0)
        while min(spent.values()) < min_seconds or min(done.values()) < 2 * timing.chunk:
            for name in names:
                start = time.perf_counter()  # each learner sets its own torch thread count
                with _shift_of(name):
                    learners[name].train(timing.chunk)
                timing.sync()
                spent[name] += time.perf_counter() - start
                done[name] += timing.chunk
        for name, learner in learners.items():
            out[name]["updates_per_s"] = done[name] / spent[name]
            out[name]["samples_per_s"] = out[name]["updates_per_s"] * out[name]["batch_size"]
            out[name]["threads"] = learner.threads.current if learner.threads is not None else torch.get_num_threads()
            learner.close()
    return out


def run(
    device: str,
    batch_size: int,
    min_seconds: float,
    overrides: Sequence[str] = (),
    frames_steps: int = 3000,
    replay_transitions: int = 20_000,
    variants: Sequence[str] = (),
) -> dict[str, object]:
    cfg = _bench_config(device, batch_size, replay_transitions, overrides)
    dev = torch.device(
        cfg.learner.device if cfg.learner.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    timing = _Timing(dev)

    _say(f"recording {frames_steps} embedded-simulator steps ...")
    segments = record_segments(frames_steps, cfg.collector.segment_length, seed=cfg.run.seed)
    baseline_n = 4096 if timing.cuda else 2048
    data = _transitions(segments, max(batch_size * 4, baseline_n))

    _say("synthetic: convoy learner on in-memory device batches ...")
    synthetic_rate = _synthetic_rate(cfg, data, timing, min_seconds)
    _say(f"  {synthetic_rate:.2f} updates/s")

    _say(f"fed: filling a redis-server shard with {replay_transitions} transitions ...")
    fed_rate, sampler_metrics = _fed_rate(cfg, segments, timing, min_seconds, replay_transitions)
    _say(f"  {fed_rate:.2f} updates/s")

    _say("baseline: straightforward TD3 with a float32 dict replay buffer ...")
    baseline_rate = _baseline_rate(cfg, data, timing, min_seconds, batch_size)
    _say(f"  {baseline_rate:.2f} updates/s")
    extra: dict[str, object] = {}
    if variants:
        _say(f"variants, fed, interleaved: {', '.join(variants)} ...")
        rates = _variant_rates(cfg, variants, segments, timing, min_seconds, replay_transitions)
        extra["variants"] = rates
        if "before" in rates and "after" in rates:
            extra["after_vs_before"] = rates["after"]["updates_per_s"] / rates["before"]["updates_per_s"]
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if timing.cuda else "cpu",
        "batch_size": batch_size,
        "encoder": cfg.learner.encoder,
        "precision": cfg.learner.precision,
        "channels_last": cfg.learner.channels_last,
        "compile": cfg.learner.compile,
        "torch_threads": torch.get_num_threads(),
        "updates_per_s_synthetic": synthetic_rate,
        "updates_per_s_fed": fed_rate,
        "fed_ratio": fed_rate / synthetic_rate,
        "baseline_updates_per_s": baseline_rate,
        "speedup": fed_rate / baseline_rate,
        "data_wait_seconds_total": sampler_metrics.get(WAIT_SECONDS_TOTAL, float("nan")),
        "replay_mirror": resolve_mode(cfg.replay.mirror, timing.cuda),
        "cpu": cpu_info(),
        **extra,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convoy bench learner", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=8.0, help="minimum measuring time per figure")
    p.add_argument(
        "--variants",
        default="",
        help=f"comma-separated learner settings to compare fed and interleaved: {', '.join(VARIANTS)}",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. learner.compile=true learner.encoder=nature_maxpool"
    )
    args = p.parse_args(argv)
    tune_malloc_for_bulk_buffers()  # as the learner process does (learner.remote)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    result = run(args.device, args.batch_size, args.seconds, args.overrides, variants=variants)
    print_result(result, args.json)
    return 0
