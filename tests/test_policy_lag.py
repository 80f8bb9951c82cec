"""The learner reports how many weight versions old its training data is, from the versions a
real collector tagged its transitions with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actors.collector import Collector
from common.config import load_config
from common.schema import Batch, Segment
from learner.loop import Learner, policy_lag
from tests.fakes import FakeDrivingEnv, ListSink


def test_policy_lag_by_hand() -> None:
    mean, peak, random_fraction = policy_lag(torch.tensor([0, 0, 3, 5]), current_version=6)
    assert (mean, peak, random_fraction) == (2.0, 3.0, 0.5)
    assert policy_lag(torch.tensor([0, 0]), current_version=6) == (0.0, 0.0, 1.0)


class SegmentsSource:
    """Every transition of the loaded segments as one batch (a BatchSource)."""

    batch: Batch
    versions: np.ndarray

    def load(self, segments: list[Segment]) -> None:
        trs = [s.transition(t) for s in segments for t in range(s.num_transitions)]
        self.versions = np.concatenate([s.policy_versions for s in segments])

        def stack(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.stack([np.asarray(tr[key]) for tr in trs])).to(dtype)

        self.batch = Batch(
            image=stack("image", torch.uint8),
            vector=stack("vector", torch.float32),
            action=stack("action", torch.float32),
            reward=stack("reward", torch.float32),
            next_image=stack("next_image", torch.uint8),
            next_vector=stack("next_vector", torch.float32),
            terminated=stack("terminated", torch.float32),
            policy_version=torch.from_numpy(self.versions.astype(np.int64)),
        )

    @property
    def size(self) -> int:
        return self.batch.size

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        return next(self)

    def __next__(self) -> Batch:
        return self.batch

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def test_learner_reports_lag_of_collector_tagged_data(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "learner.encoder=none",
            "learner.hidden_dim=8",
            "learner.batch_size=4",
            "learner.publish_every=1000000",
            "run.checkpoint_every_updates=1000000",
            "collector.start_steps=0",
            "collector.segment_length=4",
            "collector.num_collectors=1",
        ],
    )
    source = SegmentsSource()  # loaded once the collector has data
    learner = Learner(cfg, source, tmp_path)
    sink = ListSink()
    collector = Collector(cfg, 0, sink, lambda: FakeDrivingEnv(episode_len=4))

    def publish_and_send() -> None:
        learner.publish()
        learner.flush()
        _, message = learner.weights()  # type: ignore[misc]
        collector.set_weights(message)

    publish_and_send()  # v1
    collector.collect(8)
    publish_and_send()  # v2
    collector.collect(8)
    learner.publish()  # v3 and v4: the learner moves on, the collector keeps acting with v2
    learner.publish()
    learner.flush()
    source.load(sink.segments)
    assert set(source.versions.tolist()) == {1, 2}, "the collector tags each step with the version that acted"
    metrics = learner.train(1)
    versions = source.versions
    assert metrics["learner/policy_lag_mean"] == float(np.mean(4 - versions))
    assert metrics["learner/policy_lag_max"] == 3.0
    assert metrics["learner/random_action_fraction"] == 0.0
    learner.close()
    collector.close()
