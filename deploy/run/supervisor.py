"""The driver's supervisor: keeps every actor of a run busy and replaces the ones that die.

One loop owns every actor of the run and knows what to do when each kind dies (a one-for-
one strategy, as in Erlang/OTP and Sample Factory's runner; never "restart the world" as
the CARLA scripts that rerun a whole job on any crash):

- a **collector** whose process or node dies, or whose ``collect`` raises, is replaced by a
  fresh actor with the same index (same noise scale, the next substream of its seeds); the
  replacement gets the newest weights with its first call. The run gives up only after
  ``collector.max_failures`` failures in a row with no finished episode between them.
- the **learner** is restarted from the run's newest complete checkpoint (fresh when there
  is none) while collectors keep filling replay, at most ``run.max_learner_restarts`` times.
- **shards** restart their own redis-server (replay_service/owner.py); the supervisor
  counts those restarts, and replaces a shard actor that died with one asking for the
  same port.

Each actor has exactly one call in flight: collectors ``collect(steps_per_call)``, the
learner ``train(updates_per_call)``. Collectors that wait for resources (a CARLA node the
autoscaler is still bringing up) join when Ray places them: the run starts with one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from common.config import ConvoyConfig

log = logging.getLogger(__name__)


class GiveUp(RuntimeError):
    """A piece keeps failing; the message names it and the last cause."""


def describe_failure(exc: BaseException) -> str:
    """One line saying why an actor call failed (the remote traceback's last line)."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Slot:
    """One collector index and the actor currently filling it."""

    index: int
    actor: Any = None
    incarnation: int = 0
    live: bool = False
    sent_version: int = 0
    node: str = ""
    busy_steps: int = 0  # env steps of the call in flight (0: none)
    retiring: bool = False
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class Counts:
    collector_restarts: int = 0
    learner_restarts: int = 0
    shard_restarts: int = 0
    failures_in_a_row: int = 0


@dataclass
class Progress:
    """What the driver knows about the run, from the metric dicts the actors return."""

    start: float = field(default_factory=time.monotonic)
    base_env_steps: int = 0  # counters of the run before a resume: rates count only this run's work
    base_updates: int = 0
    collector: dict[int, dict[str, float]] = field(default_factory=dict)
    # Counters of collectors that were replaced or removed, so totals never go back.
    retired: dict[str, float] = field(default_factory=dict)
    learner: dict[str, float] = field(default_factory=dict)
    shards: dict[int, dict[str, float]] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    collectors_live: int = 0
    collectors_wanted: int = 0
    samples_per_insert_target: float = 0.0
    warmup_transitions: int = 0  # inserted before the learner may sample: not part of the ratio
    eval_text: str = ""  # the newest evaluation, from deploy.run.evaluation.EvalScheduler.short()
    _last_t: float = field(default_factory=time.monotonic)
    _last_steps: int = 0
    _last_updates: int = 0

    _SUMMED = (
        "collector/env_steps_total",
        "collector/episodes_total",
        "replay_writer/bytes_total",
        "replay_writer/transitions_total",
        "replay_writer/dropped_transitions_total",
    )

    def _sum(self, key: str) -> float:
        return self.retired.get(key, 0.0) + sum(m.get(key, 0.0) for m in self.collector.values())

    def retire(self, index: int) -> None:
        """Keep the counters of collector ``index`` (replaced or removed) in the totals."""
        last = self.collector.pop(index, {})
        for key in self._SUMMED:
            self.retired[key] = self.retired.get(key, 0.0) + last.get(key, 0.0)

    @property
    def env_steps(self) -> int:
        return self.base_env_steps + int(self._sum("collector/env_steps_total"))

    def resumed_from(self, env_steps: int, updates: int) -> None:
        self.base_env_steps = self._last_steps = env_steps
        self.base_updates = self._last_updates = updates

    @property
    def updates(self) -> int:
        return int(self.learner.get("learner/updates_total", self.base_updates))

    def summary(self) -> dict[str, float]:
        returns = [
            m["collector/last_episode_return"]
            for m in self.collector.values()
            if not math.isnan(m.get("collector/last_episode_return", math.nan))
        ]
        elapsed = time.monotonic() - self.start
        new_steps = self.env_steps - self.base_env_steps
        written = self._sum("replay_writer/transitions_total")
        sampled = self.learner.get("replay_sampler/sampled_transitions_total", 0.0)
        return {
            "run/env_steps_total": self.env_steps,
            "run/updates_total": self.updates,
            "run/episodes_total": self._sum("collector/episodes_total"),
            "run/elapsed_seconds": elapsed,
            "run/env_steps_per_s": new_steps / max(elapsed, 1e-9),
            "run/updates_per_s": (self.updates - self.base_updates) / max(elapsed, 1e-9),
            "run/replay_size": self.learner.get("replay_sampler/size", 0),
            "run/weights_version": self.learner.get("learner/weights_version", 0),
            "run/max_acting_version": max(
                (m.get("collector/last_acting_version", 0) for m in self.collector.values()), default=0
            ),
            "run/last_episode_return": returns[-1] if returns else math.nan,
            "run/replay_bytes_written_total": self._sum("replay_writer/bytes_total"),
            "run/replay_transitions_written_total": written,
            "run/dropped_transitions_total": self._sum("replay_writer/dropped_transitions_total"),
            "run/corrupt_segments_total": self.learner.get("replay_sampler/corrupt_total", 0.0),
            # Measured replay ratio: sampled per transition inserted after the warm-up, the
            # quantity the rate limiter holds at samples_per_insert_target.
            "run/samples_per_insert": sampled / (written - self.warmup_transitions)
            if written > self.warmup_transitions
            else 0.0,
            "run/samples_per_insert_target": self.samples_per_insert_target,
            "run/collectors_live": self.collectors_live,
            "run/collectors_wanted": self.collectors_wanted,
            "run/collector_restarts_total": self.counts.collector_restarts,
            "run/learner_restarts_total": self.counts.learner_restarts,
            "run/shard_restarts_total": self.counts.shard_restarts,
        }

    def line(self) -> str:
        now = time.monotonic()
        dt = max(now - self._last_t, 1e-9)
        steps, updates = self.env_steps, self.updates
        sps, ups = (steps - self._last_steps) / dt, (updates - self._last_updates) / dt
        self._last_t, self._last_steps, self._last_updates = now, steps, updates
        s = self.summary()
        ret = s["run/last_episode_return"]
        restarts = ""
        c = self.counts
        if c.collector_restarts or c.learner_restarts or c.shard_restarts:
            restarts = f" | restarts c{c.collector_restarts} l{c.learner_restarts} s{c.shard_restarts}"
        return (
            f"[{now - self.start:7.1f}s] env_steps {steps:>8d} ({sps:6.1f}/s) | updates {updates:>7d} ({ups:5.1f}/s) | "
            f"collectors {self.collectors_live}/{self.collectors_wanted} | "
            f"replay {int(s['run/replay_size']):>7d} | episodes {int(s['run/episodes_total']):>5d} | "
            f"last_return {ret:8.2f} | weights v{int(s['run/weights_version'])} "
            f"acting v{int(s['run/max_acting_version'])} | spi {s['run/samples_per_insert']:.0f}/"
            f"{self.samples_per_insert_target:.0f}{restarts}" + (f" | {self.eval_text}" if self.eval_text else "")
        )


@dataclass
class Factories:
    """How the supervisor makes (and remakes) each kind of actor; built by deploy.run.driver."""

    collector: Callable[[int, int], Any]  # (index, incarnation) -> actor handle
    learner: Callable[[], Any]
    shard: Callable[[int, int], Any] | None = None  # (index, port) -> actor handle; None: shards given by URL


class Supervisor:
    """Runs the loop until the budget, Ctrl-C (raised out of :meth:`run`) or :class:`GiveUp`."""

    def __init__(
        self,
        cfg: ConvoyConfig,
        factories: Factories,
        learner: Any,
        shards: list[Any],
        progress: Progress,
        out: TextIO,
        control: Any = None,
        make_control: Callable[[int], Any] | None = None,
        restore_path: Callable[[], str | None] = lambda: None,
        on_tick: Callable[[Progress], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.factories = factories
        self.learner = learner
        self.shards = shards
        self.shard_ports: list[int] = [0] * len(shards)
        self.progress = progress
        self.out = out
        self.control = control
        self.make_control = make_control
        self.restore_path = restore_path
        self.on_tick = on_tick
        self.slots: dict[int, Slot] = {}
        self.wanted = cfg.collector.num_collectors
        self.pending: dict[Any, tuple[str, int, Any]] = {}
        self.weights_ref: Any = None
        self.weights_version = 0
        self.learner_live = True  # the driver hands over a placed (and, on resume, restored) learner
        self.learner_generation = 0
        self.in_flight_steps = 0
        self.restart_times: list[dict[str, Any]] = []
        self._awaiting_first_act: dict[int, float] = {}
        self._awaiting_first_update: float | None = None
        self._next_control = 0.0
        self._next_shard_poll = 0.0
        progress.collectors_wanted = self.wanted
        progress.samples_per_insert_target = cfg.replay.samples_per_insert
        progress.warmup_transitions = cfg.min_size_to_sample()

    # ----- printing ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # ----- collectors -------------------------------------------------------------------

    def start_collector(self, index: int, incarnation: int = 0) -> None:
        slot = Slot(index=index, incarnation=incarnation, actor=self.factories.collector(index, incarnation))
        self.slots[index] = slot
        # Resolves when Ray has placed the actor and its constructor (simulator start) ran.
        self.pending[slot.actor.node.remote()] = ("placed", index, slot.actor)

    def _collector_failed(self, slot: Slot, exc: BaseException) -> None:
        cause = describe_failure(exc)
        self.in_flight_steps -= slot.busy_steps
        slot.busy_steps = 0
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        self.progress.retire(slot.index)
        if slot.retiring:
            self.slots.pop(slot.index, None)
            return
        counts = self.progress.counts
        counts.collector_restarts += 1
        counts.failures_in_a_row += 1
        log.warning("collector %d failed: %s", slot.index, cause)
        self.say(
            f"collector {slot.index} failed ({cause}); replacing it "
            f"(collector restart {counts.collector_restarts}, {counts.failures_in_a_row} failure(s) in a row)"
        )
        if counts.failures_in_a_row >= self.cfg.collector.max_failures:
            raise GiveUp(
                f"collectors failed {counts.failures_in_a_row} times in a row without a finished episode "
                f"(collector.max_failures={self.cfg.collector.max_failures}); last: collector {slot.index}: {cause}"
            )
        self._awaiting_first_act[slot.index] = time.monotonic()
        self.start_collector(slot.index, slot.incarnation + 1)

    def submit_collect(self, slot: Slot) -> None:
        total = self.cfg.run.total_env_steps
        steps = min(self.cfg.collector.steps_per_call, total - self.progress.env_steps - self.in_flight_steps)
        if steps <= 0 or slot.retiring or not slot.live:
            return
        send = self.weights_ref if slot.sent_version < self.weights_version else None
        if send is not None:
            slot.sent_version = self.weights_version
        ref = slot.actor.collect.remote(steps, self.progress.env_steps + self.in_flight_steps, send)
        slot.busy_steps = steps
        self.in_flight_steps += steps
        self.pending[ref] = ("collect", slot.index, slot.actor)

    def _retire(self, slot: Slot) -> None:
        """Stop a collector removed by scaling down: its unfinished segment is dropped with
        it (segments enter replay whole or not at all)."""
        with contextlib.suppress(Exception):
            ray.get(slot.actor.close.remote(), timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(slot.actor, no_restart=True)
        self.progress.retire(slot.index)
        self.slots.pop(slot.index, None)
        self.say(f"collector {slot.index} stopped (scaled down)")

    def scale_to(self, wanted: int) -> None:
        if wanted == self.wanted:
            return
        self.say(f"scaling collectors {self.wanted} -> {wanted}")
        self.wanted = self.progress.collectors_wanted = wanted
        for index in range(wanted):
            if index not in self.slots:
                self.start_collector(index)
        for slot in list(self.slots.values()):
            if slot.index >= wanted and not slot.retiring:
                slot.retiring = True
                if not slot.busy_steps:
                    self._retire(slot)

    # ----- learner ----------------------------------------------------------------------

    def submit_train(self) -> None:
        ref = self.learner.train.remote(self.cfg.learner.updates_per_call, self.progress.env_steps)
        self.pending[ref] = ("train", self.learner_generation, self.learner)

    def _learner_failed(self, exc: BaseException) -> None:
        cause = describe_failure(exc)
        counts = self.progress.counts
        counts.learner_restarts += 1
        log.warning("learner failed: %s", cause)
        if counts.learner_restarts > self.cfg.run.max_learner_restarts:
            raise GiveUp(
                f"the learner failed {counts.learner_restarts} times "
                f"(run.max_learner_restarts={self.cfg.run.max_learner_restarts}); last: {cause}"
            )
        with contextlib.suppress(Exception):
            ray.kill(self.learner, no_restart=True)
        self.learner_live = False
        self.learner_generation += 1
        self._awaiting_first_update = time.monotonic()
        self.learner = self.factories.learner()
        path = self.restore_path()
        if path is None:
            self.say(f"learner failed ({cause}); no checkpoint exists yet, so the new learner starts fresh")
            self.pending[self.learner.node.remote()] = ("learner_ready", self.learner_generation, self.learner)
        else:
            self.say(f"learner failed ({cause}); restarting it from {path} (learner restart {counts.learner_restarts})")
            ref = self.learner.restore.remote(path, self.weights_version)
            self.pending[ref] = ("learner_ready", self.learner_generation, self.learner)

    # ----- shards -----------------------------------------------------------------------

    def _poll_shards(self) -> None:
        for i, shard in enumerate(self.shards):
            self.pending[shard.metrics.remote()] = ("shard", i, shard)

    def _shard_failed(self, index: int, exc: BaseException) -> None:
        self.progress.counts.shard_restarts += 1
        self.say(f"replay shard {index} actor failed ({describe_failure(exc)}); starting a new one on its port")
        with contextlib.suppress(Exception):
            ray.kill(self.shards[index], no_restart=True)
        assert self.factories.shard is not None, "only convoy-started shards are polled"
        self.shards[index] = self.factories.shard(index, self.shard_ports[index])

    # ----- the loop ---------------------------------------------------------------------

    def _handle(self, ref: Any) -> None:
        kind, index, actor = self.pending.pop(ref)
        if kind in ("placed", "collect"):
            slot = self.slots.get(index)
            if slot is None or slot.actor is not actor:
                return  # a call of an actor that was already replaced
            try:
                result = ray.get(ref)
            except (RayError, RayActorError) as exc:
                self._collector_failed(slot, exc)
                return
            if kind == "placed":
                slot.live = True
                slot.node = str(result.get("address", ""))
                self.say(f"placement: collector {index} -> node {slot.node} (incarnation {slot.incarnation})")
            else:
                self.in_flight_steps -= slot.busy_steps
                slot.busy_steps = 0
                before = self.progress.collector.get(index, {}).get("collector/episodes_total", 0)
                self.progress.collector[index] = result
                if result.get("collector/episodes_total", 0) > before:
                    self.progress.counts.failures_in_a_row = 0
                if index in self._awaiting_first_act:
                    took = time.monotonic() - self._awaiting_first_act.pop(index)
                    self.restart_times.append({"kind": "collector", "index": index, "seconds": took})
                    self.say(f"collector {index} replacement acting {took:.1f}s after the failure")
                if slot.retiring:
                    self._retire(slot)
                    return
            self.submit_collect(slot)
        elif kind in ("train", "learner_ready"):
            if index != self.learner_generation:
                return  # the dead learner's last call
            try:
                result = ray.get(ref)
            except (RayError, RayActorError) as exc:
                self._learner_failed(exc)
                return
            if kind == "learner_ready":
                self.learner_live = True
                if "updates" in result:
                    self.say(f"learner restored: updates {result['updates']}, env_steps {result['env_steps']}")
            else:
                metrics, published = result
                self.progress.learner = metrics
                if published is not None:
                    self.weights_version, weights = published
                    self.weights_ref = ray.put(weights)
                if self._awaiting_first_update is not None and metrics.get("learner/updates_total", 0) > 0:
                    took = time.monotonic() - self._awaiting_first_update
                    if metrics.get("replay_sampler/size", 0) and "learner/critic_loss" in metrics:
                        self._awaiting_first_update = None
                        self.restart_times.append({"kind": "learner", "seconds": took})
                        self.say(f"learner updating again {took:.1f}s after the failure")
            self.submit_train()
        elif kind == "shard":
            try:
                result = ray.get(ref)
            except (RayError, RayActorError) as exc:
                self._shard_failed(index, exc)
                return
            prev = self.progress.shards.get(index, {}).get("replay_shard/restarts_total", 0)
            now = result.get("replay_shard/restarts_total", 0)
            if now > prev:
                self.progress.counts.shard_restarts += int(now - prev)
                self.say(f"replay shard {index}: redis-server restarted on the same address")
            self.progress.shards[index] = result

    def _sync_control(self) -> None:
        if self.control is None:
            return
        try:
            wanted = ray.get(self.control.get_wanted.remote(), timeout=5)
        except GetTimeoutError:
            return
        except (RayError, RayActorError) as exc:
            # It lives on the driver's node, so this is rare; the supervisor knows the count.
            self.say(f"the run's control actor failed ({describe_failure(exc)}); starting a new one")
            with contextlib.suppress(Exception):
                ray.kill(self.control, no_restart=True)
            self.control = self.make_control(self.wanted) if self.make_control else None
            return
        self.scale_to(int(wanted))
        status = {k.split("/", 1)[1]: v for k, v in self.progress.summary().items()}
        status["collectors_live"] = self.progress.collectors_live
        self.control.set_status.remote(status)

    def run(self) -> str:
        """Supervise until the budget is reached; returns the exit reason: ``"budget"`` (env
        steps) or ``"time"`` (``run.max_seconds`` of wall time since the progress clock started)."""
        total = self.cfg.run.total_env_steps
        max_seconds = self.cfg.run.max_seconds
        for index in range(self.wanted):
            if index not in self.slots:
                self.start_collector(index)
        waiting_said = 0.0
        next_print = time.monotonic() + self.cfg.run.progress_every_s
        while self.progress.env_steps < total:
            if max_seconds and time.monotonic() - self.progress.start >= max_seconds:
                steps = self.progress.env_steps
                self.say(f"time budget reached (run.max_seconds={max_seconds:g}) at {steps} env steps")
                return "time"
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.2)
            for ref in done:
                self._handle(ref)
            if self.learner_live and not any(k == "train" for k, _, _ in self.pending.values()):
                self.submit_train()
            self.progress.collectors_live = sum(s.live for s in self.slots.values() if not s.retiring)
            now = time.monotonic()
            if self.progress.collectors_live == 0 and now - waiting_said > 10:
                waiting_said = now
                self.say(f"waiting for collectors to be placed: 0/{self.wanted} live")
            if now >= self._next_control:
                self._next_control = now + 1.0
                self._sync_control()
            if now >= self._next_shard_poll and not any(k == "shard" for k, _, _ in self.pending.values()):
                self._next_shard_poll = now + 1.0
                self._poll_shards()
            if self.on_tick is not None:
                self.on_tick(self.progress)
            if now >= next_print:
                self.say(self.progress.line())
                next_print = now + self.cfg.run.progress_every_s
        return "budget"

    def finish(self, timeout: float = 60.0) -> None:
        """Let the calls in flight end (so counters are final), without new submissions."""
        deadline = time.monotonic() + timeout
        for ref, (kind, index, actor) in list(self.pending.items()):
            left = max(0.1, deadline - time.monotonic())
            try:
                result = ray.get(ref, timeout=left)
            except (RayError, RayActorError, GetTimeoutError):
                continue
            if kind == "train" and index == self.learner_generation:
                self.progress.learner = result[0]
            elif kind == "collect" and self.slots.get(index) is not None and self.slots[index].actor is actor:
                self.progress.collector[index] = result
        self.pending.clear()
        self.say(self.progress.line())

    def live_actors(self) -> list[Any]:
        return [s.actor for s in self.slots.values()] + [self.learner]
