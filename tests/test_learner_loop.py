"""The learner loop on an in-memory batch source: gating, publishing, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load_config
from common.networks import Actor
from common.protocols import BatchSource
from common.schema import Batch
from common.weights import load_into, message_from_bytes
from learner.agent import cpu_has_native_bf16, resolve_precision
from learner.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint
from learner.loop import Learner
from learner.threads import CpuThreads
from tests.fakes import random_batch


class SyntheticSource:
    """Random batches of a fixed size; ``size`` is settable to test gating."""

    def __init__(self, batch_size: int, size: int = 10_000) -> None:
        self.batch_size = batch_size
        self._size = size
        self.g = torch.Generator().manual_seed(0)
        self.drawn = 0
        self.closed = False

    @property
    def size(self) -> int:
        return self._size

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        return next(self)

    def __next__(self) -> Batch:
        return random_batch(self.batch_size, self.g)

    def metrics(self) -> dict[str, float]:
        return {"synthetic/drawn_total": self.drawn}

    def close(self) -> None:
        self.closed = True


def _learner(tmp_path: Path, *over: str, size: int = 10_000) -> Learner:
    cfg = load_config(
        None,
        [
            "learner.batch_size=4",
            "learner.hidden_dim=8",
            "learner.publish_every=3",
            "run.checkpoint_every_updates=4",
            "run.keep_checkpoints=2",
            "collector.start_steps=100",
            "learner.num_threads=1",
            *over,
        ],
    )
    return Learner(cfg, SyntheticSource(cfg.learner.batch_size, size), tmp_path)


def test_no_updates_before_start_steps(tmp_path: Path) -> None:
    learner = _learner(tmp_path, size=99)
    m = learner.train(5)
    assert m["learner/updates_total"] == 0 and m["learner/ready"] == 0.0
    learner.source._size = 100  # type: ignore[attr-defined]
    m = learner.train(5)
    assert m["learner/updates_total"] == 5


def test_publishes_versions_and_weights_load_into_an_actor(tmp_path: Path) -> None:
    learner = _learner(tmp_path)
    metrics = learner.train(7)
    # Published after update 1 (first), 3 and 6.
    assert learner.weights_version == 3
    assert metrics["learner/weights_version"] == 3
    for key in (
        "learner/critic_loss",
        "learner/actor_loss",
        "learner/critic_grad_norm",
        "learner/critic_grad_norm_clipped",
    ):
        assert key in metrics
    learner.flush()  # weights are encoded in the background
    published = learner.weights(newer_than=0)
    assert published is not None and published[0] == 3
    msg = message_from_bytes(published[1])
    assert msg.version == 3
    assert learner.weights(newer_than=3) is None
    actor = Actor("nature", 8)
    load_into(actor, msg.payload)
    # The published weights are the learner's actor at publication time (update 6).
    learner2 = _learner(tmp_path / "b")
    assert not all(
        torch.equal(a, b)
        for a, b in zip(actor.state_dict().values(), learner2.agent.actor.state_dict().values(), strict=True)
    )


def test_checkpoints_are_written_pruned_and_load_weights_only(tmp_path: Path) -> None:
    learner = _learner(tmp_path)
    learner.train(9)  # checkpoints at updates 4 and 8, written in the background
    learner.flush()
    found = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in found] == ["ckpt-0000000004", "ckpt-0000000008"]
    path = learner.checkpoint()  # a third one: the oldest is pruned (keep 2)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000000008", "ckpt-0000000009"]
    assert resolve_checkpoint(tmp_path) == path
    data = load_checkpoint(tmp_path)
    assert data.state["updates"] == 9 and data.state["weights_version"] == learner.weights_version
    for name, state in learner.agent.state_dicts().items():
        for k, v in state.items():
            assert torch.equal(data.networks[name][k], v.cpu()), f"{name}.{k}"
    assert "actor" in data.optimizers and "critic" in data.optimizers
    assert "learner:" in data.config_yaml
    assert not list(tmp_path.glob("checkpoints/.tmp-*")), "no temporary directories left behind"


def test_resolve_checkpoint_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path)):
        resolve_checkpoint(tmp_path)


class RateLimitedSource(SyntheticSource):
    """A source whose rate limiter admits ``admitted`` batches, then none (collectors stopped)."""

    def __init__(self, batch_size: int, admitted: int) -> None:
        super().__init__(batch_size)
        self.admitted = admitted

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        if self.admitted == 0:
            return None
        self.admitted -= 1
        return next(self)


def test_train_returns_when_the_rate_limiter_holds_back_data(tmp_path: Path) -> None:
    """At the end of a run collectors stop inserting; a train() call must return (so the final
    checkpoint call gets through) instead of waiting for a batch that never comes."""
    cfg = load_config(None, ["learner.batch_size=4", "learner.hidden_dim=8", "collector.start_steps=0"])
    learner = Learner(cfg, RateLimitedSource(4, admitted=3), tmp_path)
    learner.train(10)
    assert learner.updates == 3
    learner.train(10)
    assert learner.updates == 3
    learner.close()


def test_the_replay_sampler_and_the_test_sources_are_batch_sources(redis_url: str) -> None:
    """The learner calls only what BatchSource declares; the real sampler and the fakes here
    must provide all of it."""
    from replay_service.sampler import ReplaySampler

    assert isinstance(SyntheticSource(4), BatchSource)
    assert isinstance(RateLimitedSource(4, admitted=1), BatchSource)
    sampler = ReplaySampler([redis_url], 4, prefetch=0)
    try:
        assert isinstance(sampler, BatchSource)
    finally:
        sampler.close()


def test_a_learner_sampling_on_its_own_thread_starts_once_replay_fills(redis_url: str, tmp_path: Path) -> None:
    """A CPU learner samples its resident mirror on its own thread (no sampler threads). While
    replay fills it asks only for the size, so the size must follow the shards by itself, or
    the learner would wait forever."""
    from deploy.run.placement import source_factory
    from replay_service.writer import ReplayWriter
    from tests.test_replay import make_segment

    cfg = load_config(
        None,
        [
            *("learner.batch_size=8", "learner.hidden_dim=8", "learner.encoder=none", "collector.start_steps=20"),
            *("replay.samples_per_insert=0", "replay.capacity=1000", "replay.index_refresh_s=0.05"),
            "replay.sampler_threads=0",
        ],
    )
    sampler = source_factory(cfg, [redis_url], pin_memory=False)()
    learner = Learner(cfg, sampler, tmp_path)
    try:
        assert not sampler._threads
        learner.train(4)
        assert learner.updates == 0, "no updates before collector.start_steps transitions"
        writer = ReplayWriter([redis_url], capacity=1000)
        for i in range(3):
            writer.write(make_segment(t=10, episode=i))
        writer.close()
        for _ in range(100):
            learner.train(4)
            if learner.updates:
                break
        assert learner.updates == 4
    finally:
        learner.close()


def test_cpu_threads_keep_the_fastest_count_and_retune() -> None:
    counts: list[int] = [4]
    threads = CpuThreads(
        0, cores=4, trial=2, warm=1, retune_every=10, set_threads=counts.append, get_threads=lambda: counts[-1]
    )
    assert threads.candidates == [1, 2, 4] and threads.current == 1 and threads.tuning
    # Per candidate: one warm-up update (not counted), then two timed ones.
    seconds = {1: 0.5, 2: 0.2, 4: 0.3}
    for _ in range(3 * 3):
        threads.observe(9.0 if threads._seen == 0 else seconds[threads.current])
    assert threads.chosen == 2 and counts[-1] == 2 and not threads.tuning
    for _ in range(10):
        threads.observe(0.1)
    assert threads.tuning and threads.current == 1, "retunes after retune_every updates"
    counts.append(7)  # something else changed torch's count: apply() puts ours back
    threads.apply()
    assert counts[-1] == 1


def test_fixed_cpu_threads_never_tune() -> None:
    counts: list[int] = [1]
    threads = CpuThreads(3, cores=16, set_threads=counts.append, get_threads=lambda: counts[-1])
    assert threads.candidates == [3] and threads.chosen == 3 and counts[-1] == 3
    for _ in range(20_000):
        threads.observe(0.1)
    assert counts == [1, 3]


def test_bf16_is_picked_by_cpu_flags() -> None:
    avx2 = frozenset({"avx", "avx2", "fma"})
    assert not cpu_has_native_bf16(avx2)
    assert cpu_has_native_bf16(avx2 | {"avx512f", "avx512_bf16"})
    assert cpu_has_native_bf16(avx2 | {"amx_bf16", "amx_tile"})
    # auto on a CPU: bf16 only where it is native; here the machine's own flags decide.
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert resolve_precision("auto", torch.device("cpu")) == expected
