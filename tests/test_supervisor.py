"""The supervisor's decisions with small stand-in actors on a real local Ray: what replaces
what, what the replacement is given, and when the run gives up."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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


@ray.remote(max_restarts=0, concurrency_groups={"control": 1, "weights": 1})  # type: ignore[call-overload]
class FakeCollector:
    """Counts steps like a collector; ``plan`` says how it misbehaves. ``stop`` and
    ``offer_weights`` run in their own concurrency groups, as the real collector's do."""

    def __init__(self, index: int, incarnation: int, plan: str) -> None:
        self.index, self.incarnation, self.plan = index, incarnation, plan
        self.steps = 0
        self.calls = 0
        self.weights: list[bytes | None] = []
        self.offers: list[tuple[bytes, int]] = []  # (weights, calls begun when offered)
        self.in_call = False
        self.stopping = threading.Event()

    def node(self) -> dict[str, Any]:
        return {"address": "127.0.0.1"}

    def collect(self, num_steps: int, run_env_steps: int, weights: bytes | None) -> dict[str, float]:
        self.calls += 1
        self.weights.append(weights)
        self.in_call = True
        if self.plan == "raise":
            raise RuntimeError(f"simulator of collector {self.index} is gone")
        if self.plan == "die_on_3" and self.incarnation == 0 and self.calls == 3:
            os._exit(1)
        if self.plan == "blocked":  # as a writer waiting on the replay rate limit: only stop ends it
            self.stopping.wait(timeout=120)
        time.sleep(1.0 if self.plan == "slow" else 0.05)  # a replacement joins before the budget is reached
        self.steps += num_steps
        self.in_call = False
        return {
            "collector/env_steps_total": self.steps,
            "collector/episodes_total": self.steps // 20,
            "collector/weights_version": 0,
        }

    def received(self) -> list[bytes | None]:
        return self.weights

    @ray.method(concurrency_group="weights")
    def offer_weights(self, weights: bytes) -> dict[str, float]:
        self.offers.append((weights, self.calls if self.in_call else -1))
        return {}

    def offered(self) -> list[tuple[bytes, int]]:
        return self.offers

    @ray.method(concurrency_group="control")
    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        if self.plan == "slow_close":  # as a simulator that takes a while to shut down
            started = time.time()
            time.sleep(1.0)
            # Recorded elsewhere: the supervisor kills the actor once it has closed.
            ray.get(ray.get_actor("close_intervals").add.remote(self.index, started, time.time()))


@ray.remote
class CloseIntervals:
    def __init__(self) -> None:
        self.seen: dict[int, tuple[float, float]] = {}

    def add(self, index: int, start: float, end: float) -> None:
        self.seen[index] = (start, end)

    def get(self) -> dict[int, tuple[float, float]]:
        return self.seen


@ray.remote(max_restarts=0)
class FakeLearner:
    """Publishes version ``base + updates`` with every call, as the learner numbers its versions."""

    def __init__(self, die_after: int = -1) -> None:
        self.updates = 0
        self.base = 0
        self.die_after = die_after

    def node(self) -> dict[str, Any]:
        return {"address": "127.0.0.1", "device": "cpu"}

    def train(self, n: int, env_steps: int) -> tuple[dict[str, float], tuple[int, Any]]:
        if self.updates == self.die_after:
            os._exit(1)
        self.updates += n
        version = self.base + self.updates
        # As LearnerActor: the weights go into the object store here, the driver gets the reference.
        metrics: dict[str, float] = {"learner/updates_total": self.updates, "learner/weights_version": version}
        return metrics, (version, ray.put(b"w%d" % version))

    def start_fresh(self, min_version: int) -> dict[str, Any]:
        self.base = max(self.base, min_version)
        return {}

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
    published: list[int] = []
    publish = sup.weights.publish
    sup.weights.publish = lambda version, ref: (published.append(version), publish(version, ref))[1]  # type: ignore[method-assign]
    assert sup.run() == "budget"
    sup.finish()
    text = out.getvalue()
    assert sup.progress.counts.learner_restarts == 1
    assert "no checkpoint exists yet, so the new learner starts fresh" in text
    assert sup.progress.updates > 0
    # The fresh learner's versions continue above the 5 the first one published: collectors only
    # load newer versions, so a count from 1 again would not reach them until it passed 5.
    assert published[:5] == [1, 2, 3, 4, 5] and published[5] > 5, published
    assert published == sorted(set(published)), published
    for index in (0, 1):
        got = [int(w[1:]) for w in ray.get(sup.slots[index].actor.received.remote()) if w is not None]
        assert got and max(got) > 5, got


def test_scaling_down_stops_the_highest_indices(local_ray: None) -> None:
    sup, _made, _out = _supervisor("fine", total=10_000)
    sup.start_collector(0)
    sup.start_collector(1)
    sup.scale_to(4)
    assert sorted(sup.slots) == [0, 1, 2, 3]
    sup.scale_to(1)
    assert sorted(i for i, s in sup.slots.items() if not s.retiring) == [0]
    assert sup.progress.collectors_wanted == 1


def test_scaling_down_closes_the_retired_collectors_all_at_once(local_ray: None) -> None:
    intervals_actor = CloseIntervals.options(name="close_intervals").remote()  # type: ignore[attr-defined]
    sup, made, out = _supervisor("slow_close", total=10_000)
    for index in range(4):
        sup.start_collector(index)
    ray.get([made[(i, 0)].node.remote() for i in range(4)])  # constructed, not yet handed a call
    sup.scale_to(1)
    assert sorted(sup.slots) == [0]
    assert out.getvalue().count("stopped (scaled down)") == 3
    # Each close takes 1 s: they overlap (one wait for all), not one after another.
    seen = ray.get(intervals_actor.get.remote())
    ray.kill(intervals_actor)
    assert sorted(seen) == [1, 2, 3], seen
    intervals = list(seen.values())
    assert max(start for start, _ in intervals) < min(end for _, end in intervals), intervals


def _drive(sup: Supervisor, until: Any, timeout: float = 240.0) -> None:
    """The supervisor's handling of finished calls, without its loop's budget checks."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out driving the supervisor"
        done, _ = ray.wait(list(sup.pending), num_returns=1, timeout=0.2)
        for ref in done:
            sup._handle(ref)


def test_scaling_down_then_up_before_the_retiring_calls_end_keeps_every_wanted_collector(local_ray: None) -> None:
    sup, made, out = _supervisor("slow", total=10**6)
    for index in range(4):
        sup.start_collector(index)
    _drive(sup, lambda: all(s.busy_steps for s in sup.slots.values()))  # a 1 s call in flight on each
    sup.scale_to(1)
    sup.scale_to(4)  # before collectors 1-3 finished the call they were retiring after
    assert sorted(i for i, s in sup.slots.items() if not s.retiring) == [0, 1, 2, 3]
    # Counted on the driver, so that the wait never blocks behind a collector's call in flight.
    submitted: dict[int, int] = {i: 0 for i in range(4)}
    submit = sup.submit_collect

    def counting_submit(slot: Any) -> None:
        submit(slot)
        submitted[slot.index] += bool(slot.busy_steps)

    sup.submit_collect = counting_submit  # type: ignore[method-assign]
    _drive(sup, lambda: all(submitted.values()))  # each finished its first call and got another
    assert sorted(i for i, s in sup.slots.items() if s.live and not s.retiring) == [0, 1, 2, 3]
    assert all(len(ray.get(made[(i, 0)].received.remote())) >= 2 for i in range(4))
    assert "stopped (scaled down)" not in out.getvalue()


def test_finish_stops_collectors_blocked_inside_their_call(local_ray: None) -> None:
    sup, _, out = _supervisor("blocked", total=10**6)
    for index in range(4):
        sup.start_collector(index)
    _drive(sup, lambda: sum(s.busy_steps > 0 for s in sup.slots.values()) == 4)
    started = time.monotonic()
    sup.finish(timeout=60)
    # Without the stop, each blocked call would hold finish() for its whole timeout.
    assert time.monotonic() - started < 10, out.getvalue()
    assert not sup.pending
    assert sup.progress.env_steps == 4 * 20  # the stopped calls' counts arrived


class _Boom(RuntimeError):
    pass


def test_an_unexpected_error_writes_exit_reason_error_with_its_cause(local_ray: None, tmp_path: Path) -> None:
    from deploy.run.driver import supervise_and_finish
    from deploy.run.evaluation import EvalScheduler
    from deploy.run.signals import StopSignals
    from deploy.run.telemetry import RunTelemetry

    sup, _, out = _supervisor("fine", total=10**6, **{"run.out_dir": str(tmp_path), "run.eval_every_updates": 0})
    ticks = 0

    def tick(_: Progress) -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 20:
            raise _Boom("the exporter's disk is full")

    sup.on_tick = tick
    evals = EvalScheduler(sup.cfg, str(tmp_path))
    telemetry = RunTelemetry(sup.cfg, "boom")
    with pytest.raises(_Boom):
        supervise_and_finish(sup.cfg, sup, evals, telemetry, None, StopSignals(), out)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_reason"] == "error: _Boom: the exporter's disk is full", summary
    assert "done (error)" in out.getvalue()


def test_the_driver_forwards_weight_references_and_never_holds_weight_bytes(local_ray: None) -> None:
    sup, made, _out = _supervisor("fine", total=600)
    published: list[Any] = []
    publish = sup.weights.publish

    def spy(version: int, ref: Any) -> None:
        published.append(ref)
        publish(version, ref)

    sup.weights.publish = spy  # type: ignore[method-assign]
    assert sup.run() == "budget"
    sup.finish()
    assert published and all(isinstance(ref, ray.ObjectRef) for ref in published)
    # What the driver's ray.get of a train result holds: the reference, not the bytes.
    _metrics, (version, ref) = ray.get(sup.learner.train.remote(1, 0))
    assert isinstance(ref, ray.ObjectRef) and ray.get(ref) == b"w%d" % version
    # The collectors got the bytes: Ray resolves a reference passed as a call argument.
    received = [w for w in ray.get(made[(0, 0)].received.remote()) if w is not None]
    assert received and all(isinstance(w, bytes) and w.startswith(b"w") for w in received)


def test_a_learner_that_sends_weight_bytes_is_refused(local_ray: None) -> None:
    sup, _made, _out = _supervisor("fine")
    with pytest.raises(TypeError, match="not an object reference"):
        sup._on_trained(0, ({"learner/updates_total": 1}, (1, b"weights")))


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


@pytest.mark.parametrize("every", [0.2, 0.0])
def test_collectors_in_a_long_call_are_offered_newer_weights(local_ray: None, every: float) -> None:
    """collector.weights_every_s: a collector 1 s into a call gets newer weights then, not with
    its next call; at most one offer every ``every`` seconds; 0 turns offers off."""
    sup, made, _out = _supervisor("slow", total=200, **{"collector.weights_every_s": every, "collector.start_steps": 0})
    started = time.monotonic()
    assert sup.run() == "budget"
    took = time.monotonic() - started
    sup.finish()
    offered = [o for index in (0, 1) for o in ray.get(made[(index, 0)].offered.remote())]
    if not every:
        assert offered == []
        return
    assert offered, "no offer reached a collector in the middle of its call"
    assert all(w.startswith(b"w") for w, _ in offered)
    # Most reach it inside a call; one sent as a call ends may arrive just after it (the real
    # collector then loads it before the first step of its next call).
    inside = sum(during > 0 for _, during in offered)
    assert inside >= len(offered) / 2, offered
    for index in (0, 1):
        versions = [int(w[1:]) for w, _ in ray.get(made[(index, 0)].offered.remote())]
        assert versions == sorted(set(versions)), "each offer is newer than the last"
        assert len(versions) <= took / every + 1
