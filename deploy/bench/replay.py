"""`convoy bench replay [--frames embedded|noise] [--json]`: bytes and sampling speed of replay.

Starts its own redis-server shard, fills it with segments of realistic length and reports:

- ``bytes_per_transition``: segment bytes stored in Redis (the shard's ``cvy:bytes`` counter,
  i.e. the sum of value lengths) / transitions; ``redis_used_memory_per_transition`` adds Redis'
  own per-key overhead (INFO used_memory delta);
- ``naive_bytes_per_transition``: obs and next_obs as full uint8 stacks plus vectors, action,
  reward and flag (what a dict-of-arrays replay stores);
- ``insert_transitions_per_s``: encode + atomic insert, one writer;
- ``sample_transitions_per_s``: decoded batches of 256 drawn by one consumer from ReplaySampler
  with byte-range sampling (``replay.mirror=off``: each batch fetches and decodes its frames);
- ``mirror_sample_transitions_per_s``: the same from the learner-resident mirror
  (``replay.mirror=host``: every segment pulled and decoded once, a batch is a gather), and
  ``mirror_speedup`` = mirror over byte-range, measured in alternating windows;
- ``mirror_refill_s``: a fresh sampler pulling and decoding everything stored (what a restarted
  learner does before its first batch), and ``mirror_refill_transitions_per_s``;
- ``baseline_sample_transitions_per_s``: :class:`NaiveDictReplay`, one msgpack dict per
  transition (full obs/next_obs stacks) sampled by random keys with one MGET and decoded to
  the same arrays.

``embedded`` frames are recorded from the embedded simulator (a few hundred real frames, cycled
into 64-step segments); ``noise`` frames are uniform random bytes, the incompressible worst case.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import msgpack
import numpy as np
import redis

from common.schema import ACTION_DIM, FRAME_SHAPE, STACK, VECTOR_DIM, Segment
from common.sysutil import tune_malloc_for_bulk_buffers
from deploy.cli.base import print_result
from replay_service.launcher import RedisShardProcess
from replay_service.metric_keys import CORRUPT_TOTAL
from replay_service.sampler import ReplaySampler
from replay_service.shards import K_BYTES, connect
from replay_service.writer import ReplayWriter

SEGMENT_LENGTH = 64
BATCH = 256
NAIVE_BYTES = 2 * (STACK * FRAME_SHAPE[0] * FRAME_SHAPE[1] + VECTOR_DIM * 4) + ACTION_DIM * 4 + 4 + 1


def _progress(msg: str) -> None:
    print(f"[bench replay] {msg}", file=sys.stderr, flush=True)


def record_embedded_frames(n: int = 400, seed: int = 0) -> np.ndarray:
    """Frames from the embedded simulator driven by a mildly random policy."""
    os.environ.setdefault("SDL_VIDEODRIVER", "offscreen")
    from actors.envs.embedded import EmbeddedDrivingEnv

    env = EmbeddedDrivingEnv()
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames = [obs["image"][-1]]
    try:
        while len(frames) < n:
            action = (rng.uniform(-1, 1, ACTION_DIM) * np.array([0.3, 1.0])).astype(np.float32)
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(obs["image"][-1])
            if terminated or truncated:
                obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
                frames.append(obs["image"][-1])
    finally:
        env.close()
    return np.stack(frames[:n])


def make_segments(frames: Callable[[int, int], np.ndarray], count: int, seed: int = 0) -> list[Segment]:
    rng = np.random.default_rng(seed)
    t = SEGMENT_LENGTH
    out = []
    for i in range(count):
        out.append(
            Segment(
                frames=frames(i, t + STACK),
                vectors=rng.uniform(-1, 1, (t + 1, VECTOR_DIM)).astype(np.float32),
                actions=rng.uniform(-1, 1, (t, ACTION_DIM)).astype(np.float32),
                rewards=rng.normal(size=t).astype(np.float32),
                terminated=np.zeros(t, bool),
                truncated=np.zeros(t, bool),
                policy_versions=np.full(t, i // 10, np.int64),
                episode_id=i // 6,
                collector_id=0,
                segment_index=i % 6,
            )
        )
    return out


class NaiveDictReplay:
    """The straightforward baseline: one msgpack dict per transition with full obs and next_obs
    stacks, stored under its own key, sampled by uniform random keys with one MGET per batch and
    decoded into the same arrays a Batch holds."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.size = 0

    def fill(self, segments: list[Segment], limit: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for seg in segments:
            for t in range(seg.num_transitions):
                if self.size >= limit:
                    break
                tr = seg.transition(t)
                pipe.set(
                    f"naive:{self.size}",
                    msgpack.packb(
                        {
                            "obs": tr["image"].tobytes(),
                            "next_obs": tr["next_image"].tobytes(),
                            "vector": tr["vector"].tobytes(),
                            "next_vector": tr["next_vector"].tobytes(),
                            "action": tr["action"].tobytes(),
                            "reward": float(tr["reward"]),
                            "terminated": bool(tr["terminated"]),
                        }
                    ),
                )
                self.size += 1
                if self.size % 256 == 0:
                    pipe.execute()
        pipe.execute()

    def sample(self, rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
        keys = [f"naive:{k}" for k in rng.integers(0, self.size, batch)]
        items = [msgpack.unpackb(v) for v in self.client.mget(keys)]
        return {
            "image": np.stack([np.frombuffer(d["obs"], np.uint8).reshape(STACK, *FRAME_SHAPE) for d in items]),
            "next_image": np.stack(
                [np.frombuffer(d["next_obs"], np.uint8).reshape(STACK, *FRAME_SHAPE) for d in items]
            ),
            "vector": np.stack([np.frombuffer(d["vector"], np.float32) for d in items]),
            "next_vector": np.stack([np.frombuffer(d["next_vector"], np.float32) for d in items]),
            "action": np.stack([np.frombuffer(d["action"], np.float32) for d in items]),
            "reward": np.array([d["reward"] for d in items], np.float32),
            "terminated": np.array([d["terminated"] for d in items], np.float32),
        }


def _window(fn: Callable[[], int], seconds: float) -> float:
    """Items/s of ``fn`` (returns items done per call) over one window of ``seconds``."""
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        n += fn()
    return n / (time.perf_counter() - start)


def _interleaved_rates(fns: list[Callable[[], int]], seconds: float, repeats: int) -> list[float]:
    """Medians of alternating windows of each of ``fns``: on a shared machine load drifts over
    a run, and alternating puts every side under the same drift."""
    # Warm all up first: the first seconds of bulk transfers in a fresh process run at well
    # under half speed (allocator and socket buffers settling), which would flatter whichever
    # side is measured warm.
    for fn in fns:
        _window(fn, min(seconds, 2.0))
    rates: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, r in zip(fns, rates, strict=True):
            r.append(_window(fn, seconds))
    return [float(np.median(r)) for r in rates]


def _frame_source(frames_kind: str) -> Callable[[int, int], np.ndarray]:
    """``frames(i, n)``: ``n`` frames for segment ``i``, cycled from recorded embedded-simulator
    frames or drawn as uniform noise."""
    if frames_kind == "embedded":
        _progress("recording frames from the embedded simulator")
        pool = record_embedded_frames()

        def frames(i: int, n: int) -> np.ndarray:
            start = (i * 37) % (len(pool) - n)
            return pool[start : start + n].copy()
    else:
        rng = np.random.default_rng(1)

        def frames(i: int, n: int) -> np.ndarray:
            return rng.integers(0, 256, (n, *FRAME_SHAPE), dtype=np.uint8)

    return frames


def _refill(url: str, transitions: int) -> float:
    """Seconds a fresh mirror-mode sampler takes to hold everything stored (a restarted learner)."""
    _progress(f"refilling a resident mirror from the shard ({transitions} transitions)")
    start = time.perf_counter()
    sampler = ReplaySampler(
        [url], BATCH, prefetch=0, mirror="host", capacity=transitions, segment_length=SEGMENT_LENGTH
    )
    try:
        size = sampler.refresh_index()
        elapsed = time.perf_counter() - start
    finally:
        sampler.close()
    if size != transitions:
        raise RuntimeError(f"the refilled mirror holds {size} of {transitions} transitions")
    return elapsed


def _sample_rates(
    url: str,
    stored: int,
    naive: NaiveDictReplay,
    brng: np.random.Generator,
    seconds: float,
    repeats: int,
    threads: int,
) -> tuple[float, float, float, float]:
    """(convoy's byte-range sampler, the baseline, convoy's mirror) transitions/s and the
    samplers' corrupt count."""
    _progress(
        f"sampling batches of {BATCH} ({threads} sampler threads, one consumer), alternating "
        f"{repeats} windows of {seconds:g}s: byte ranges, the baseline, the resident mirror"
    )
    sampler = ReplaySampler([url], BATCH, prefetch=8, threads=threads, index_refresh_s=1.0)
    mirror = ReplaySampler(
        [url],
        BATCH,
        prefetch=8,
        threads=threads,
        index_refresh_s=1.0,
        mirror="host",
        capacity=stored,
        segment_length=SEGMENT_LENGTH,
    )
    try:
        next(sampler)
        next(mirror)
        sample_rate, baseline_rate, mirror_rate = _interleaved_rates(
            [
                lambda: next(sampler).size,
                lambda: len(naive.sample(brng, BATCH)["reward"]),
                lambda: next(mirror).size,
            ],
            seconds,
            repeats,
        )
        corrupt = sampler.metrics()[CORRUPT_TOTAL] + mirror.metrics()[CORRUPT_TOTAL]
    finally:
        sampler.close()
        mirror.close()
    return sample_rate, baseline_rate, mirror_rate, corrupt


def run(frames_kind: str, segments: int, seconds: float, repeats: int, threads: int) -> dict[str, float | str]:
    segs = make_segments(_frame_source(frames_kind), segments)
    shard = RedisShardProcess()
    try:
        client = connect(shard.url)
        mem0 = int(client.info("memory")["used_memory"])
        writer = ReplayWriter([shard.url], capacity=10**9, codec="zstd")
        _progress(f"inserting {segments} segments of {SEGMENT_LENGTH} steps ({frames_kind} frames)")
        start = time.perf_counter()
        for seg in segs:
            writer.write(seg)
        insert_rate = writer.transitions_total / (time.perf_counter() - start)
        transitions = writer.transitions_total
        stored = int(client.get(K_BYTES) or 0)
        used = int(client.info("memory")["used_memory"]) - mem0
        writer.close()

        _progress("filling the naive msgpack-dict baseline")
        naive = NaiveDictReplay(client)
        naive.fill(segs, limit=min(transitions, 8192))
        brng = np.random.default_rng(2)
        naive.sample(brng, BATCH)
        refill_s = _refill(shard.url, transitions)
        sample_rate, baseline_rate, mirror_rate, corrupt = _sample_rates(
            shard.url, transitions, naive, brng, seconds, repeats, threads
        )
        client.close()
    finally:
        shard.stop()
    per_transition = stored / transitions
    return {
        "frames": frames_kind,
        "transitions": transitions,
        "bytes_per_transition": round(per_transition, 1),
        "redis_used_memory_per_transition": round(used / transitions, 1),
        "naive_bytes_per_transition": NAIVE_BYTES,
        "reduction": round(NAIVE_BYTES / per_transition, 2),
        "insert_transitions_per_s": round(insert_rate),
        "sample_transitions_per_s": round(sample_rate),
        "baseline_sample_transitions_per_s": round(baseline_rate),
        "sample_speedup": round(sample_rate / baseline_rate, 2),
        "mirror_sample_transitions_per_s": round(mirror_rate),
        "mirror_speedup": round(mirror_rate / sample_rate, 2),
        "mirror_refill_s": round(refill_s, 2),
        "mirror_refill_transitions_per_s": round(transitions / refill_s),
        "corrupt_total": corrupt,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="convoy bench replay", description=__doc__.split("\n")[0])
    p.add_argument("--frames", choices=("embedded", "noise"), default="embedded")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object to stdout")
    p.add_argument("--segments", type=int, default=0, help="segments to insert (default: 1500 embedded, 400 noise)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one timing window")
    p.add_argument("--repeats", type=int, default=3, help="timing windows; the median is reported")
    p.add_argument("--threads", type=int, default=2, help="sampler background threads")
    args = p.parse_args(argv)
    # Same allocator settings for convoy's sampler and the baseline (see common.sysutil).
    tune_malloc_for_bulk_buffers()
    segments = args.segments or (1500 if args.frames == "embedded" else 400)
    result = run(args.frames, segments, args.seconds, args.repeats, args.threads)
    print_result(result, args.json, line="{:36s} {}")
    return 0
