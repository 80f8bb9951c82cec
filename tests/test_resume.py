"""Exact resume, crash-safe checkpoint writes, and the non-finite guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import load_config
from common.schema import Batch
from learner.checkpoint import list_checkpoints, load_checkpoint
from learner.loop import Learner, NonFiniteError

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "learner.batch_size=4",
    "learner.hidden_dim=8",
    "learner.publish_every=2",
    "run.checkpoint_every_updates=1000",
    "collector.start_steps=0",
    "learner.num_threads=1",
]


class IndexedSource:
    """Batch i is a pure function of i, so a resumed learner can see the same stream."""

    def __init__(self, start: int = 0, nan_reward: bool = False) -> None:
        self.i = start
        self.nan_reward = nan_reward

    @property
    def size(self) -> int:
        return 10_000

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        return next(self)

    def __next__(self) -> Batch:
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        n = 4
        reward = torch.full((n,), float("nan")) if self.nan_reward else torch.randn(n, generator=g)
        return Batch(
            image=torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g),
            vector=torch.randn(n, 23, generator=g),
            action=torch.rand(n, 2, generator=g) * 2 - 1,
            reward=reward,
            next_image=torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=g),
            next_vector=torch.randn(n, 23, generator=g),
            terminated=torch.zeros(n),
            policy_version=torch.zeros(n, dtype=torch.int64),
        )

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def _state(learner: Learner) -> dict[str, torch.Tensor]:
    flat = {
        f"{net}.{k}": v.detach().cpu().clone() for net, sd in learner.agent.state_dicts().items() for k, v in sd.items()
    }
    for name, opt in (("actor_opt", learner.agent.actor_opt), ("critic_opt", learner.agent.critic_opt)):
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                flat[f"{name}.{pid}.{k}"] = torch.as_tensor(v).clone()
    return flat


def test_resume_continues_counters_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = load_config(None, OVERRIDES)
    a = Learner(cfg, IndexedSource(), tmp_path / "a")
    a.train(6, env_steps=600)
    ckpt = a.checkpoint(wait=True)
    saved = _state(a)
    a.train(5)
    reference = _state(a)
    a.close()

    b = Learner(cfg, IndexedSource(start=6), tmp_path / "b")
    assert b.restore(tmp_path / "a") == ckpt
    # Parameters, targets and optimizer state are exactly what was saved.
    restored = _state(b)
    assert restored.keys() == saved.keys()
    for k in saved:
        assert torch.equal(restored[k], saved[k]), k
    assert b.updates == 6 and b.env_steps == 600 and b.weights_version == a.weights_version - 2
    b.flush()
    published = b.weights()
    assert published is not None and published[0] == b.weights_version, "restored weights are republished"
    b.train(5)
    assert b.updates == 11
    # Same batches + restored RNG (smoothing noise) => bit-identical continuation.
    resumed = _state(b)
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    b.close()


_KILL_SCRIPT = """
import sys, time
import learner.checkpoint as ck
from common.config import load_config
from learner.loop import Learner
from tests.test_resume import IndexedSource, OVERRIDES
run = sys.argv[1]
learner = Learner(load_config(None, OVERRIDES), IndexedSource(), run)
learner.train(2)
learner.checkpoint(wait=True)
print("first", flush=True)
real = ck.save_file
def slow(tensors, path):
    real(tensors, path)
    time.sleep(30)  # the parent kills us while the temporary directory is half written
ck.save_file = slow
learner.train(2)
learner.checkpoint(wait=True)
"""


def test_killed_checkpoint_writer_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 60
        while not list((tmp_path / "checkpoints").glob(".tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list((tmp_path / "checkpoints").glob(".tmp-*")), "second checkpoint never started"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-0000000002"]
    data = load_checkpoint(tmp_path)
    assert data.state["updates"] == 2
    # The next writer removes the debris.
    learner = Learner(load_config(None, OVERRIDES), IndexedSource(), tmp_path)
    learner.restore(tmp_path)
    learner.checkpoint(wait=True)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    learner.close()


def test_consecutive_nonfinite_updates_stop_with_a_checkpoint(tmp_path: Path) -> None:
    cfg = load_config(None, [*OVERRIDES, "learner.max_nonfinite=3"])
    learner = Learner(cfg, IndexedSource(), tmp_path)
    learner.train(4)
    good = _state(learner)
    learner.source = IndexedSource(nan_reward=True)
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite updates.*last good state saved"):
        learner.train(10)
    assert learner.agent.nonfinite_total == 3
    data = load_checkpoint(tmp_path)
    assert data.state["updates"] == 4
    for k, v in _state(learner).items():
        assert torch.equal(v, good[k]), k
    learner.close()


def test_isolated_nonfinite_updates_are_skipped_and_counted(tmp_path: Path) -> None:
    cfg = load_config(None, [*OVERRIDES, "learner.max_nonfinite=3"])
    learner = Learner(cfg, IndexedSource(), tmp_path)
    learner.train(2)
    learner.source = IndexedSource(nan_reward=True)
    m = learner.train(2)
    assert m["learner/nonfinite_total"] == 2 and m["learner/consecutive_nonfinite"] == 2
    learner.source = IndexedSource(start=50)
    m = learner.train(2)
    assert m["learner/updates_total"] == 4 and m["learner/consecutive_nonfinite"] == 0
    learner.close()
