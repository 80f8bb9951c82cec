"""Evaluation during training: the evaluator plays fixed seeds deterministically, and the
scheduler evaluates checkpoints, writes eval.jsonl and keeps ``best`` (also across a resume,
and through pruning)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actors.envs.embedded import EmbeddedDrivingEnv
from actors.evaluator import Evaluator
from common.config import ConvoyConfig, load_config
from common.networks import Actor
from common.weights import WeightsError, message_to_bytes, pack_weights
from deploy.run.evaluation import EvalScheduler, load_actor_checkpoint, read_history
from learner.checkpoint import (
    CheckpointData,
    CheckpointError,
    best_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _cfg(*over: str) -> ConvoyConfig:
    return load_config(
        None,
        [
            "learner.encoder=none",
            "learner.hidden_dim=16",
            "env.max_episode_steps=25",
            "run.eval_episodes=2",
            "run.eval_seed=77",
            *over,
        ],
    )


class SeedRecordingEnv(EmbeddedDrivingEnv):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seeds: list[int | None] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        self.seeds.append(seed)
        return super().reset(seed=seed, options=options)


def test_evaluator_plays_fixed_seeds_deterministically() -> None:
    cfg = _cfg()
    env = SeedRecordingEnv(cfg.env)
    evaluator = Evaluator(cfg, lambda: env)
    torch.manual_seed(0)
    actor = Actor("none", 16)
    message = message_to_bytes(pack_weights(7, actor))
    try:
        first = evaluator.evaluate(message)
        second = evaluator.evaluate()  # the same weights again
        assert env.seeds == [77, 78, 77, 78]
        for key in first:
            if key != "eval/seconds":
                assert first[key] == second[key], key
        assert first["eval/weights_version"] == 7.0 and first["eval/episodes"] == 2.0
        assert 0.0 <= first["eval/route_completion"] <= 1.0
        rates = (
            sum(first[f"eval/{k}_rate"] for k in ("collision", "off_road", "time_limit")) + first["eval/success_rate"]
        )
        assert rates == pytest.approx(1.0)
        # Different weights, same seeds: a different policy gives different results.
        torch.manual_seed(1)
        other = evaluator.evaluate(message_to_bytes(pack_weights(8, Actor("none", 16))))
        assert env.seeds[-2:] == [77, 78]
        assert other["eval/return"] != first["eval/return"]
        with pytest.raises(WeightsError):
            evaluator.evaluate(message_to_bytes(pack_weights(9, Actor("none", 8))))
    finally:
        evaluator.close()


def test_evaluator_loads_and_verifies_the_checkpoint_it_is_told_to(tmp_path: Path) -> None:
    from tests.fakes import FakeDrivingEnv

    cfg = _cfg()
    torch.manual_seed(3)
    data = CheckpointData(
        networks={"actor": Actor("none", 16).state_dict()},
        state={"env_steps": 123, "weights_version": 4},
        config_yaml=cfg.to_yaml(),
    )
    uri = save_checkpoint(str(tmp_path / "checkpoints"), 40, data)
    evaluator = Evaluator(cfg, lambda: FakeDrivingEnv(), load_checkpoint=load_actor_checkpoint)
    try:
        metrics, counters = evaluator.evaluate_checkpoint(uri)
        assert counters == {"updates": 40, "env_steps": 123}
        assert metrics["eval/weights_version"] == 4.0 and metrics["eval/episodes"] == 2.0
        (Path(uri) / "actor.safetensors").write_bytes(b"tampered")
        with pytest.raises(CheckpointError, match=r"actor\.safetensors"):
            evaluator.evaluate_checkpoint(uri)
    finally:
        evaluator.close()


# ----- the scheduler with real Ray actors -----------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
        namespace=f"test-evaluator-{uuid.uuid4().hex[:8]}",
    )
    try:
        yield
    finally:
        ray.shutdown()


def _remote_classes() -> tuple[Any, Any]:
    import ray

    @ray.remote(num_cpus=0)
    class FakeLearner:
        """Writes a real checkpoint (keep=1: pruning must spare `best`) per call."""

        def __init__(self, run_dir: str, config_yaml: str) -> None:
            self.run_dir, self.config_yaml, self.updates = run_dir, config_yaml, 0

        def set_updates(self, n: int) -> None:
            self.updates = n

        def checkpoint(self, env_steps: int) -> str:
            self.updates += 10
            torch.manual_seed(self.updates)
            data = CheckpointData(
                networks={"actor": Actor("none", 16).state_dict()},
                state={"env_steps": env_steps, "weights_version": self.updates // 10},
                config_yaml=self.config_yaml,
            )
            return save_checkpoint(str(Path(self.run_dir) / "checkpoints"), self.updates, data, keep=1)

    @ray.remote(num_cpus=0)
    class ScriptedEvaluator:
        """Returns scripted scores; loads the checkpoint it is told to, as the real one does."""

        def __init__(self, scores: list[tuple[float, float]]) -> None:
            self.scores = list(scores)

        def evaluate_checkpoint(self, uri: str) -> tuple[dict[str, float], dict[str, int]]:
            checkpoint = load_actor_checkpoint(uri)
            Actor("none", 16).load_state_dict(checkpoint.actor)
            rc, ret = self.scores.pop(0)
            metrics = {
                "eval/route_completion": rc,
                "eval/return": ret,
                "eval/success_rate": float(rc >= 1.0),
                "eval/collision_rate": 0.0,
                "eval/off_road_rate": 0.0,
                "eval/weights_version": float(checkpoint.weights_version),
            }
            return metrics, {"updates": checkpoint.updates, "env_steps": checkpoint.env_steps}

        def ready(self) -> None:
            """Returns once every earlier call ran (an actor runs its calls in order)."""

    return FakeLearner, ScriptedEvaluator


def _run_eval(sched: EvalScheduler, updates: int, env_steps: int, learner: Any) -> dict[str, Any]:
    import time

    assert sched.maybe_submit(updates, env_steps, learner)
    assert not sched.maybe_submit(updates + 1000, env_steps, learner), "one evaluation in flight at a time"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        record = sched.poll()
        if record is not None:
            return record
        time.sleep(0.02)
    raise AssertionError("evaluation did not finish")


def test_scheduler_keeps_best_by_route_completion_then_return_across_resume(ray_local: None, tmp_path: Path) -> None:
    cfg = _cfg("run.eval_every_updates=10")
    run = str(tmp_path / "run")
    fake_learner, scripted = _remote_classes()
    learner = fake_learner.remote(run, cfg.to_yaml())
    scores = [(0.5, 10.0), (0.8, 5.0), (0.8, 4.0), (0.8, 6.0)]
    sched = EvalScheduler(cfg, run, make_evaluator=lambda: scripted.remote(scores))
    assert not sched.maybe_submit(9, 100, learner), "not due before eval_every_updates"
    bests = []
    for k in range(4):
        record = _run_eval(sched, 10 * (k + 1), 100 * (k + 1), learner)
        bests.append(record["best"])
        # The evaluator got the checkpoint's actor: its version is the checkpoint's.
        assert (
            record["eval/weights_version"]
            == load_checkpoint(record["checkpoint"], (), full=False).state["weights_version"]
        )
    # Ties on route completion are broken by return: 0.8/6.0 beats 0.8/5.0, 0.8/4.0 does not.
    assert bests == [True, True, False, True]
    name, metrics = best_checkpoint(run)
    assert name == "ckpt-0000000040" and metrics["eval/return"] == 6.0
    assert resolve_checkpoint(run, "best").endswith("ckpt-0000000040")
    lines = [json.loads(x) for x in (Path(run) / "eval.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in lines] == [100, 200, 300, 400]
    assert sched.summary()["eval/best_route_completion"] == 0.8

    # A resumed run reads the best score back: a worse result does not replace `best`, and
    # pruning (keep=1) keeps it on storage.
    learner2 = fake_learner.remote(run, cfg.to_yaml())
    ray_get = __import__("ray").get
    ray_get(learner2.set_updates.remote(40))
    resumed = EvalScheduler(
        cfg, run, make_evaluator=lambda: scripted.remote([(0.7, 50.0), (0.9, 1.0)]), start_updates=40
    )
    assert resumed.best_score == (0.8, 6.0) and len(resumed.history) == 4
    assert not resumed.maybe_submit(45, 450, learner2) and resumed.next_due == 50
    assert _run_eval(resumed, 50, 500, learner2)["best"] is False
    assert best_checkpoint(run)[0] == "ckpt-0000000040"
    assert {c.name for c in list_checkpoints(run)} == {"ckpt-0000000040", "ckpt-0000000050"}
    assert _run_eval(resumed, 60, 600, learner2)["best"] is True
    assert best_checkpoint(run)[0] == "ckpt-0000000060"
    assert len(read_history(run)) == 6
    resumed.close()
    sched.close()


def test_finish_evaluates_the_final_checkpoint(ray_local: None, tmp_path: Path) -> None:
    cfg = _cfg("run.eval_every_updates=10")
    run = str(tmp_path / "run")
    fake_learner, scripted = _remote_classes()
    learner = fake_learner.remote(run, cfg.to_yaml())
    sched = EvalScheduler(cfg, run, make_evaluator=lambda: scripted.remote([(0.3, 1.0), (0.6, 2.0)]))
    assert sched.maybe_submit(10, 100, learner)  # left in flight: finish waits for it
    import ray

    while sched.stage == "checkpoint":
        assert sched.poll() is None
    # The evaluator reads its checkpoint before the final one prunes it (keep=1).
    ray.get(sched._evaluator.ready.remote())
    final = ray.get(learner.checkpoint.remote(150))
    record = sched.finish(final, 20, 150)
    assert record is not None and record["checkpoint"] == final and record["eval/route_completion"] == 0.6
    assert [r["eval/route_completion"] for r in read_history(run)] == [0.3, 0.6]
    assert sched.finish(final, 20, 150) is record, "an evaluated checkpoint is not evaluated twice"
    sched.close()


def test_real_evaluator_actor_on_a_checkpoint(ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default evaluator actor (its own process and embedded simulator) scores a checkpoint."""
    import deploy.run.evaluation as evaluation
    from deploy.run.evaluation import default_evaluator

    run = str(tmp_path / "run")
    cfg = _cfg("run.eval_every_updates=10", f"run.out_dir={run}")
    fake_learner, _ = _remote_classes()
    learner = fake_learner.remote(run, cfg.to_yaml())
    sched = EvalScheduler(cfg, run, make_evaluator=lambda: default_evaluator(cfg))

    def driver_must_not_read(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the driver read a checkpoint: the evaluator loads its own")

    # Only the driver's process is patched; the evaluator actor imports the real reader.
    monkeypatch.setattr(evaluation, "load_checkpoint", driver_must_not_read)
    record = _run_eval(sched, 10, 100, learner)
    assert record["eval/episodes"] == 2.0 and np.isfinite(record["eval/return"])
    assert record["eval/weights_version"] == 1.0 and record["updates"] == 10 and record["env_steps"] == 100
    assert record["best"] is True
    # The actor wrote the first episode's video itself, at the checkpoint's env steps.
    assert [p.name for p in (Path(run) / "videos").iterdir()] == ["eval-0000000100.mp4"]
    assert len(list((Path(run) / "tensorboard" / "eval_video").iterdir())) == 1
    sched.close()


def test_stop_reaches_an_evaluator_actor_inside_a_long_evaluation(ray_local: None, tmp_path: Path) -> None:
    """``stop`` (its own concurrency group) ends an evaluation of 500 episodes after its current
    step, and ``close`` then returns at once: the end of a run does not wait for the episodes."""
    import time

    import ray

    from actors.evaluator import EvaluationStopped
    from deploy.run.evaluation import default_evaluator

    run = str(tmp_path / "run")
    cfg = _cfg(f"run.out_dir={run}", "run.eval_episodes=500", "env.max_episode_steps=400", "run.video_every_evals=0")
    fake_learner, _ = _remote_classes()
    uri = ray.get(fake_learner.remote(run, cfg.to_yaml()).checkpoint.remote(100))
    evaluator = default_evaluator(cfg)
    evaluating = evaluator.evaluate_checkpoint.remote(uri)
    ready, _ = ray.wait([evaluating], timeout=3)
    assert not ready, "500 episodes ended within 3 s: the evaluation is too short to test stopping"
    stopped_at = time.monotonic()
    ray.get(evaluator.stop.remote(), timeout=10)
    with pytest.raises(EvaluationStopped, match="evaluation stopped in episode"):
        ray.get(evaluating, timeout=30)
    ray.get(evaluator.close.remote(), timeout=30)
    assert time.monotonic() - stopped_at < 15
    ray.kill(evaluator)


def test_evaluator_stops_mid_episode_when_asked(tmp_path: Path) -> None:
    """Without Ray: ``stopping`` set from another thread ends ``evaluate`` after the current step."""
    import threading
    import time

    from actors.evaluator import EvaluationStopped

    cfg = _cfg("run.eval_episodes=3", "env.max_episode_steps=100")
    evaluator = Evaluator(cfg, lambda: EmbeddedDrivingEnv(cfg.env))
    evaluator.set_weights(message_to_bytes(pack_weights(1, Actor("none", 16))))
    steps = 0
    act = evaluator.act

    def act_and_stop_at_step_5(obs: dict[str, np.ndarray]) -> np.ndarray:
        nonlocal steps
        steps += 1
        if steps == 5:
            threading.Thread(target=evaluator.stopping.set).start()
            time.sleep(0.2)  # the other thread has set it before the next step
        return act(obs)

    evaluator.act = act_and_stop_at_step_5  # type: ignore[method-assign]
    # (An episode may end before step 5 with untrained weights; the stop still comes next step.)
    with pytest.raises(EvaluationStopped, match=r"evaluation stopped in episode \d+ after \d+ steps"):
        evaluator.evaluate()
    assert steps == 5 and evaluator.evaluations_total == 0
    evaluator.close()


class _NoRayLearner:
    """``learner.checkpoint.remote(...)`` as the scheduler calls it; the reference is a stand-in."""

    class _Method:
        def remote(self, env_steps: int) -> str:
            return f"ref@{env_steps}"

    checkpoint = _Method()


def test_scheduler_counts_skipped_evaluations_and_says_so(tmp_path: Path) -> None:
    sched = EvalScheduler(_cfg("run.eval_every_updates=10"), str(tmp_path / "run"))
    learner = _NoRayLearner()
    assert sched.maybe_submit(10, 100, learner) and sched.busy
    assert not sched.maybe_submit(25, 250, learner), "busy: the evaluation due at 20 waits"
    sched._ckpt_ref = None  # the evaluation finished
    # Due at 20 and at 30; one evaluation (at 35) covers both: one skipped.
    assert sched.maybe_submit(35, 350, learner) and sched.next_due == 40
    assert sched.skipped_total == 1
    assert sched.summary()["eval/skipped_total"] == 1.0
    assert sched.short().endswith("skipped 1")
    sched._ckpt_ref = None
    assert sched.maybe_submit(41, 410, learner) and sched.skipped_total == 1, "on time: nothing skipped"


def test_eval_hold_holds_while_an_evaluation_is_due_or_running(tmp_path: Path) -> None:
    sched = EvalScheduler(_cfg("run.eval_every_updates=10", "run.eval_hold=true"), str(tmp_path / "run"))
    learner = _NoRayLearner()
    assert not sched.holding(9)
    assert sched.holding(10), "due: hold until it is submitted"
    assert sched.maybe_submit(10, 100, learner)
    assert sched.holding(10) and sched.holding(12), "running: hold until it is done"
    sched._ckpt_ref = None
    assert not sched.holding(12) and sched.held_s > 0.0
    assert sched.maybe_submit(20, 200, learner) and sched._pending["held_s"] > 0.0
    assert sched.skipped_total == 0
    # Without run.eval_hold the scheduler never holds anything up.
    free = EvalScheduler(_cfg("run.eval_every_updates=10"), str(tmp_path / "run2"))
    assert not free.holding(10) and free.maybe_submit(10, 100, learner) and not free.holding(10)
