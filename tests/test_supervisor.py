"""The supervisor's decisions with small stand-in actors on a real local Ray: what replaces
what, what the replacement is given, and when the run gives up."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from common.config import ConvoyConfig
from deploy.run.progress import Progress
from deploy.run.supervisor import Factories, GiveUp, Supervisor


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", object_store_memory=80 * 1024**2)
    try:
        yield
    finally:
        ray.shutdown()


@ray.remote(max_restarts=0)
class FakeCollector:
    """Counts steps like a collector; ``plan`` says how it misbehaves."""

    def __init__(self, index: int, incarnation: int, plan: str) -> None:
        self.index, self.incarnation, self.plan = index, incarnation, plan
        self.steps = 0
        self.calls = 0
        self.weights: list[bytes | None] = []

    def node(self) -> dict[str, Any]:
        return {"address": "127.0.0.1"}

    def collect(self, num_steps: int, run_env_steps: int, weights: bytes | None) -> dict[str, float]:
        self.calls += 1
        self.weights.append(weights)
        if self.plan == "raise":
            raise RuntimeError(f"simulator of collector {self.index} is gone")
        if self.plan == "die_on_3" and self.incarnation == 0 and self.calls == 3:
            os._exit(1)
        time.sleep(0.05)  # long enough runs that a replacement joins before the budget is reached
        self.steps += num_steps
        return {
            "collector/env_steps_total": self.steps,
            "collector/episodes_total": self.steps // 20,
            "collector/weights_version": 0,
        }

    def received(self) -> list[bytes | None]:
        return self.weights

    def close(self) -> None:
        pass


@ray.remote(max_restarts=0)
class FakeLearner:
    def __init__(self, die_after: int = -1) -> None:
        self.updates = 0
        self.die_after = die_after

    def node(self) -> dict[str, Any]:
        return {"address": "127.0.0.1", "device": "cpu"}

    def train(self, n: int, env_steps: int) -> tuple[dict[str, float], tuple[int, bytes]]:
        if self.updates == self.die_after:
            os._exit(1)
        self.updates += n
        version = self.updates
        return {"learner/updates_total": self.updates, "learner/weights_version": version}, (version, b"w%d" % version)

    def checkpoint(self, env_steps: int) -> str:
        return "none"

    def close(self) -> None:
        pass


def _supervisor(
    plan: str, *, total: int = 400, learner_dies_after: int = -1, **cfg: Any
) -> tuple[Supervisor, dict[tuple[int, int], Any], io.StringIO]:
    config = ConvoyConfig().replace(
        f"run.total_env_steps={total}",
        "collector.num_collectors=2",
        "collector.steps_per_call=20",
        "learner.updates_per_call=1",
        "run.progress_every_s=0.5",
        *[f"{k}={v}" for k, v in cfg.items()],
    )
    made: dict[tuple[int, int], Any] = {}

    def collector(index: int, incarnation: int) -> Any:
        made[(index, incarnation)] = FakeCollector.remote(index, incarnation, plan)  # type: ignore[attr-defined]
        return made[(index, incarnation)]

    learners = iter([FakeLearner.remote(learner_dies_after), FakeLearner.remote()])  # type: ignore[attr-defined]
    first = next(learners)
    out = io.StringIO()
    sup = Supervisor(
        config,
        Factories(collector=collector, learner=lambda: next(learners)),
        first,
        [],
        Progress(),
        out,
    )
    return sup, made, out


def test_a_dead_collector_is_replaced_and_gets_the_newest_weights(local_ray: None) -> None:
    sup, made, out = _supervisor("die_on_3", total=3000)
    assert sup.run() == "budget"
    sup.finish()
    text = out.getvalue()
    assert sup.progress.counts.collector_restarts == 2, text  # both incarnation-0 collectors died once
    assert {(0, 1), (1, 1)} <= set(made)
    for index in (0, 1):
        first_call = ray.get(made[(index, 1)].received.remote())[0]
        # The replacement's first call carries weights (the newest at that moment).
        assert first_call is not None and first_call.startswith(b"w")
    assert sup.progress.env_steps == 3000
    assert "collector 0 failed" in text and "replacement acting" in text


def test_the_time_budget_ends_the_run_before_the_env_step_budget(local_ray: None) -> None:
    sup, _, out = _supervisor("fine", total=10**9, **{"run.max_seconds": 8.0})
    started = time.monotonic()
    assert sup.run() == "time"
    sup.finish()
    assert 7.5 <= time.monotonic() - started < 60
    assert 0 < sup.progress.env_steps < 10**9
    assert "time budget reached (run.max_seconds=8)" in out.getvalue()


def test_collectors_that_keep_failing_end_the_run_naming_the_cause(local_ray: None) -> None:
    sup, _, _out = _supervisor("raise", **{"collector.max_failures": 3})
    with pytest.raises(GiveUp, match=r"failed 3 times in a row.*simulator of collector \d is gone"):
        sup.run()
    assert sup.progress.counts.collector_restarts == 3


def test_a_dead_learner_without_checkpoint_restarts_fresh(local_ray: None) -> None:
    sup, _, out = _supervisor("fine", total=600, learner_dies_after=5)
    assert sup.run() == "budget"
    sup.finish()
    text = out.getvalue()
    assert sup.progress.counts.learner_restarts == 1
    assert "no checkpoint exists yet, so the new learner starts fresh" in text
    assert sup.progress.updates > 0


def test_scaling_down_stops_the_highest_indices(local_ray: None) -> None:
    sup, _made, _out = _supervisor("fine", total=10_000)
    sup.start_collector(0)
    sup.start_collector(1)
    sup.scale_to(4)
    assert sorted(sup.slots) == [0, 1, 2, 3]
    sup.scale_to(1)
    assert sorted(i for i, s in sup.slots.items() if not s.retiring) == [0]
    assert sup.progress.collectors_wanted == 1


def test_hold_sends_no_collect_or_train_call_until_it_ends(local_ray: None) -> None:
    """run.eval_hold's mechanism: while ``hold()`` is True nothing new goes out; the calls
    held back go out when it ends, and the run reaches its budget."""
    sup, _, _ = _supervisor("ok", total=600)
    state: dict[str, Any] = {"on": False, "t0": None, "mid": None, "t_mid": 0.0, "end": None}
    sup.hold = lambda: bool(state["on"])

    def on_tick(p: Progress) -> None:
        now = time.monotonic()
        if state["t0"] is None and p.env_steps >= 100:
            state["on"], state["t0"] = True, now
        elif state["on"] and state["mid"] is None and not sup._in_flight("collect") and not sup._in_flight("train"):
            state["mid"], state["t_mid"] = (p.env_steps, p.updates), now  # calls in flight at the start ended
        elif state["on"] and state["mid"] is not None and now - state["t_mid"] > 1.0:
            state["end"] = (p.env_steps, p.updates)
            state["on"] = False

    sup.on_tick = on_tick
    assert sup.run() == "budget"
    sup.finish()
    assert state["end"] is not None and state["mid"] == state["end"], state
    assert sup.progress.env_steps >= 600
