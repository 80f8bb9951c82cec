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
  counts those restarts, and replaces a shard actor that died (first asking for its old port,
  then any), with a backoff and at most ``replay.max_shard_restarts`` times per shard
  (deploy/run/shardtable.py). The replacement may land on another node: its new URL goes
  into the shard table, which the control actor publishes to every writer and the sampler.

The module runs past 400 lines because every kind's handlers are methods of the one loop
that owns ``pending`` and the actor handles; the shard table's own rules (states, backoff,
bound) live apart in deploy/run/shardtable.py.

Each actor has exactly one call in flight: collectors ``collect(steps_per_call)``, the
learner ``train(updates_per_call)``; beside it a collector may have one ``offer_weights``
(newer weights during a long call, in the actor's own concurrency group). Collectors that
wait for resources (a CARLA node the autoscaler is still bringing up) join when Ray places
them: the run starts with one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from actors.metric_keys import COLLECTOR_ACTING_SINCE, COLLECTOR_EPISODES_TOTAL, COLLECTOR_LAST_ACTING_VERSION
from common.config import ConvoyConfig, redact_url
from deploy.run.dispatch import Handler, Periodic
from deploy.run.progress import Progress, RestartClock
from deploy.run.shardtable import LIVE, STARTING, ShardTable
from deploy.run.signals import wait_all
from deploy.run.weights import WeightsChannel

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
    node: str = ""
    pid: int = 0  # the actor's process id on its node (reported at placement)
    busy_steps: int = 0  # env steps of the call in flight (0: none)
    offering: bool = False  # an offer_weights call in flight
    offered_at: float = 0.0  # monotonic time of the last offer
    retiring: bool = False
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class Factories:
    """How the supervisor makes (and remakes) each kind of actor; built by deploy.run.driver."""

    collector: Callable[[int, int], Any]  # (index, incarnation) -> actor handle
    learner: Callable[[], Any]
    shard: Callable[[int, int], Any] | None = None  # (index, port) -> actor handle; None: shards given by URL
    shard_urls: list[str] = field(default_factory=list)  # where the started shards listen at first


class Supervisor:
    """Runs the loop until the budget, Ctrl-C (raised out of :meth:`run`) or :class:`GiveUp`.

    Every call in flight is recorded in ``pending`` as ``(kind, index, actor)``; a finished
    call goes to the :class:`Handler` registered for its kind in :meth:`_handlers`, and the
    loop's periodic work is the :class:`Periodic` list made by :meth:`_periodic`.
    """

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
        urls = factories.shard_urls if len(factories.shard_urls) == len(shards) else ["unknown"] * len(shards)
        self.shard_table = ShardTable(list(urls), cfg.replay.max_shard_restarts)
        self._shard_port: dict[int, int] = {}  # the port a replacement due asks for
        self.progress = progress
        self.out = out
        self.control = control
        self.make_control = make_control
        self.restore_path = restore_path
        self.on_tick = on_tick
        # True while no collect or train call may be handed out (run.eval_hold: an evaluation
        # is due or running); the calls it held back go out once it turns False.
        self.hold: Callable[[], bool] = lambda: False
        self._held: set[int] = set()
        self.slots: dict[int, Slot] = {}
        self.wanted = cfg.collector.num_collectors
        self.pending: dict[Any, tuple[str, int, Any]] = {}
        self.weights = WeightsChannel()
        self.learner_live = True  # the driver hands over a placed (and, on resume, restored) learner
        self.learner_generation = 0
        self.in_flight_steps = 0
        self.restarts = RestartClock()
        self.handlers = self._handlers()
        progress.collectors_wanted = self.wanted
        progress.samples_per_insert_target = cfg.replay.samples_per_insert
        progress.warmup_transitions = cfg.min_size_to_sample()

    def _handlers(self) -> dict[str, Handler]:
        """The one registry of call kinds: what each finished call does, and what a failure does."""
        coll, coll_failed = self._collector_current, self._collector_failed
        learner, learner_failed = self._learner_current, self._learner_failed
        return {
            "placed": Handler(coll, self._on_placed, coll_failed),
            "collect": Handler(coll, self._on_collected, coll_failed, on_final=self._final_collect),
            "learner_ready": Handler(learner, self._on_learner_ready, learner_failed),
            "train": Handler(learner, self._on_trained, learner_failed, on_final=self._final_train),
            "shard": Handler(self._shard_current, self._on_shard_metrics, self._shard_failed),
            "shard_placed": Handler(self._shard_current, self._on_shard_placed, self._shard_failed),
            "offer": Handler(coll, self._on_offered, self._offer_failed),
        }

    def _periodic(self, now: float) -> list[Periodic]:
        """The loop's periodic work, in the order it runs after each wait."""
        tasks = [
            Periodic(10.0, self._say_waiting, when=lambda: self.progress.collectors_live == 0),
            Periodic(1.0, self._sync_control),
            Periodic(1.0, self._poll_shards, when=lambda: not self._in_flight("shard")),
            Periodic(0.2, self._replace_due_shards),
        ]
        tasks.append(Periodic(0.25, self.offer_weights))  # retries offers the rate limit held back
        if self.on_tick is not None:
            on_tick = self.on_tick
            tasks.append(Periodic(0.0, lambda: on_tick(self.progress)))
        every = self.cfg.run.progress_every_s
        tasks.append(Periodic(every, lambda: self.say(self.progress.line()), first_at=now + every))
        return tasks

    # ----- printing ---------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _say_waiting(self) -> None:
        self.say(f"waiting for collectors to be placed: 0/{self.wanted} live")

    # ----- collectors -------------------------------------------------------------------

    def start_collector(self, index: int, incarnation: int = 0) -> None:
        slot = Slot(index=index, incarnation=incarnation, actor=self.factories.collector(index, incarnation))
        self.slots[index] = slot
        self.weights.forget(index)  # a new actor holds no weights: its first call carries the newest
        self.progress.fanout.forget(index)
        # Resolves when Ray has placed the actor and its constructor (simulator start) ran.
        self.pending[slot.actor.node.remote()] = ("placed", index, slot.actor)

    def _collector_current(self, index: int, actor: Any) -> bool:
        slot = self.slots.get(index)
        return slot is not None and slot.actor is actor  # else a call of an actor already replaced

    def _collector_failed(self, index: int, exc: BaseException) -> None:
        slot, cause = self.slots[index], describe_failure(exc)
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
        self.restarts.collector_failed(slot.index)
        self.start_collector(slot.index, slot.incarnation + 1)

    def submit_collect(self, slot: Slot) -> None:
        total = self.cfg.run.total_env_steps
        steps = min(self.cfg.collector.steps_per_call, total - self.progress.env_steps - self.in_flight_steps)
        if steps <= 0 or slot.retiring or not slot.live:
            return
        if self.hold():
            self._held.add(slot.index)
            return
        send = self.weights.take(slot.index)
        ref = slot.actor.collect.remote(steps, self.progress.env_steps + self.in_flight_steps, send)
        slot.busy_steps = steps
        self.in_flight_steps += steps
        self.pending[ref] = ("collect", slot.index, slot.actor)

    def offer_weights(self) -> None:
        """Offer the newest weights to collectors in the middle of a call that do not hold them
        (one offer in flight per collector, at most every ``collector.weights_every_s``): with
        64-step calls at CARLA's ~15 steps/s a call lasts about 4 s, and the next call's
        weights would come that much later."""
        every = self.cfg.collector.weights_every_s
        version, ref = self.weights.latest()
        if not every or ref is None or self.progress.env_steps < self.cfg.collector.start_steps:
            return  # turned off, nothing yet, or collectors still act randomly and would not take it up
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.offering or not slot.busy_steps or slot.retiring or not self.weights.needs(slot.index):
                continue
            if now - slot.offered_at < every:
                continue
            self.pending[slot.actor.offer_weights.remote(ref)] = ("offer", slot.index, slot.actor)
            self.weights.sent(slot.index, version)
            slot.offering, slot.offered_at = True, now

    def _on_offered(self, index: int, result: dict[str, float]) -> None:
        self.slots[index].offering = False
        self._time_fanout(index, result)

    def _offer_failed(self, index: int, exc: BaseException) -> None:
        # A collector that died fails its collect call too, which replaces it; weights whose
        # learner died are gone with it (the next learner publishes newer ones).
        self.slots[index].offering = False
        log.info("collector %d: weights offer failed: %s", index, describe_failure(exc))

    def _retire(self, *slots: Slot) -> None:
        """Stop collectors removed by scaling down, closing them all at once (10 s in all, not
        each): an unfinished segment is dropped with its collector (segments enter replay
        whole or not at all)."""
        closing = []
        for slot in slots:
            with contextlib.suppress(Exception):
                closing.append(slot.actor.close.remote())
        if closing:
            with contextlib.suppress(Exception):
                ray.wait(closing, num_returns=len(closing), timeout=10)
        for slot in slots:
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
            slot = self.slots.get(index)
            if slot is None:
                self.start_collector(index)
            elif slot.retiring:  # scaled down and up again before its call in flight ended: it stays
                slot.retiring = False
        idle = []
        for slot in list(self.slots.values()):
            if slot.index >= wanted and not slot.retiring:
                slot.retiring = True
                if not slot.busy_steps:
                    idle.append(slot)
        self._retire(*idle)

    # ----- learner ----------------------------------------------------------------------

    def submit_train(self) -> None:
        if self.hold():
            return  # the loop submits it once the hold ends
        ref = self.learner.train.remote(self.cfg.learner.updates_per_call, self.progress.env_steps)
        self.pending[ref] = ("train", self.learner_generation, self.learner)

    def _learner_current(self, generation: int, actor: Any) -> bool:
        return generation == self.learner_generation  # else the dead learner's last call

    def _learner_failed(self, generation: int, exc: BaseException) -> None:
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
        self.weights.owner_died()
        self.learner_live = False
        self.learner_generation += 1
        self.restarts.learner_failed()
        self.learner = self.factories.learner()
        path = self.restore_path()
        if path is None:
            self.say(f"learner failed ({cause}); no checkpoint exists yet, so the new learner starts fresh")
            # Its versions continue above the newest one collectors may hold: they only load newer ones.
            ref = self.learner.start_fresh.remote(self.weights.version)
            self.pending[ref] = ("learner_ready", self.learner_generation, self.learner)
        else:
            self.say(f"learner failed ({cause}); restarting it from {path} (learner restart {counts.learner_restarts})")
            ref = self.learner.restore.remote(path, self.weights.version)
            self.pending[ref] = ("learner_ready", self.learner_generation, self.learner)

    # ----- shards -----------------------------------------------------------------------

    def _poll_shards(self) -> None:
        for i, shard in enumerate(self.shards):
            if self.shard_table.state(i) == LIVE:
                self.pending[shard.metrics.remote()] = ("shard", i, shard)

    def _shard_current(self, index: int, actor: Any) -> bool:
        # A call of a shard actor already replaced, or one whose failure was handled, is stale.
        return self.shards[index] is actor and self.shard_table.state(index) in (LIVE, STARTING)

    def _shard_failed(self, index: int, exc: BaseException) -> None:
        table, was = self.shard_table, self.shard_table.state(index)
        self.progress.counts.shard_restarts += 1
        with contextlib.suppress(Exception):
            ray.kill(self.shards[index], no_restart=True)
        cause = describe_failure(exc)
        if not table.failed(index, time.monotonic()):
            self._publish_shard_table()
            limit = f"replay.max_shard_restarts={self.cfg.replay.max_shard_restarts}"
            if table.live == 0:
                raise GiveUp(f"every replay shard failed more than {limit} times; last: shard {index}: {cause}")
            self.say(
                f"replay shard {index} failed ({cause}) more than {limit} times; "
                f"the run goes on with the other {table.live} shard(s)"
            )
            return
        # First ask for the old port (a restart on the same node keeps the address); if that
        # replacement never came up (the port is held), any free port.
        self._shard_port[index] = (urlsplit(table.entries[index].url).port or 0) if was == LIVE else 0
        delay = table.entries[index].retry_at - time.monotonic()
        self.say(f"replay shard {index} actor failed ({cause}); replacing it in {max(0.0, delay):.1f}s")

    def _replace_due_shards(self) -> None:
        if self.factories.shard is None:
            return
        for index in self.shard_table.due(time.monotonic()):
            self.shard_table.starting(index)
            actor = self.shards[index] = self.factories.shard(index, self._shard_port.get(index, 0))
            self.pending[actor.url.remote()] = ("shard_placed", index, actor)

    def _on_shard_placed(self, index: int, url: str) -> None:
        before = self.shard_table.entries[index].url
        self.shard_table.replaced(index, url)
        self.progress.shards.pop(index, None)  # a new owner: its restart counter starts over
        self._publish_shard_table()
        where = "the same address" if url == before else f"a new address, {redact_url(url)}"
        self.say(f"replay shard {index} replaced at {where}")

    def _publish_shard_table(self) -> None:
        if self.control is not None and self.shard_table.entries:
            self.control.set_shard_table.remote(self.shard_table.urls())

    # ----- finished calls, per kind ------------------------------------------------------

    def _on_placed(self, index: int, result: dict[str, Any]) -> None:
        slot = self.slots[index]
        slot.live = True
        slot.node = str(result.get("address", ""))
        slot.pid = int(result.get("pid", 0))
        self.say(f"placement: collector {index} -> node {slot.node} (incarnation {slot.incarnation})")
        self.submit_collect(slot)

    def _on_collected(self, index: int, result: dict[str, float]) -> None:
        slot = self.slots[index]
        self.in_flight_steps -= slot.busy_steps
        slot.busy_steps = 0
        before = self.progress.collector.get(index, {}).get(COLLECTOR_EPISODES_TOTAL, 0)
        self.progress.collector[index] = result
        if result.get(COLLECTOR_EPISODES_TOTAL, 0) > before:
            self.progress.counts.failures_in_a_row = 0
        self._time_fanout(index, result)
        took = self.restarts.collector_acted(index)
        if took is not None:
            self.say(f"collector {index} replacement acting {took:.1f}s after the failure")
        if slot.retiring:
            self._retire(slot)
            return
        self.submit_collect(slot)

    def _on_learner_ready(self, index: int, result: dict[str, Any]) -> None:
        self.learner_live = True
        if "updates" in result:
            # Named: a restart may have skipped newer checkpoints that failed verification.
            source = f" ({result['checkpoint']})" if result.get("checkpoint") else ""
            self.say(f"learner restored: updates {result['updates']}, env_steps {result['env_steps']}{source}")
        self.submit_train()

    def _on_trained(self, index: int, result: tuple[dict[str, float], tuple[int, Any] | None]) -> None:
        metrics, published = result
        self.progress.learner = metrics
        if published is not None:
            version, ref = published
            if not isinstance(ref, ray.ObjectRef):  # the driver forwards references, never weight bytes
                raise TypeError(f"the learner returned weights as {type(ref).__name__}, not an object reference")
            self.weights.publish(version, ref)
            self.progress.fanout.published(version, self._live_indices())
            self.offer_weights()
        took = self.restarts.learner_trained(metrics)
        if took is not None:
            self.say(f"learner updating again {took:.1f}s after the failure")
        self.submit_train()

    def _on_shard_metrics(self, index: int, result: dict[str, float]) -> None:
        if self.progress.shard_reported(index, result):
            self.say(f"replay shard {index}: redis-server restarted on the same address")

    def _live_indices(self) -> list[int]:
        return [s.index for s in self.slots.values() if s.live and not s.retiring]

    def _time_fanout(self, index: int, result: dict[str, float]) -> None:
        """Feed the fan-out clock (read-only: deploy/run/timing.py) with what a collector acts with."""
        fanout = self.progress.fanout
        version = int(result.get(COLLECTOR_LAST_ACTING_VERSION, 0))
        fanout.acted(index, version, float(result.get(COLLECTOR_ACTING_SINCE, 0.0)))
        fanout.settle(self._live_indices())

    def _final_collect(self, index: int, result: dict[str, float]) -> None:
        self.progress.collector[index] = result

    def _final_train(self, index: int, result: tuple[dict[str, float], Any]) -> None:
        self.progress.learner = result[0]

    # ----- the loop ---------------------------------------------------------------------

    def _in_flight(self, kind: str) -> bool:
        return any(k == kind for k, _, _ in self.pending.values())

    def _handle(self, ref: Any) -> None:
        kind, index, actor = self.pending.pop(ref)
        handler = self.handlers[kind]
        if not handler.current(index, actor):
            return
        try:
            result = ray.get(ref)
        except (RayError, RayActorError) as exc:
            handler.on_failure(index, exc)
            return
        handler.on_result(index, result)

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
        self._publish_shard_table()  # also reaches a control actor that was just replaced
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
        periodic = self._periodic(time.monotonic())
        while self.progress.env_steps < total:
            if max_seconds and time.monotonic() - self.progress.start >= max_seconds:
                steps = self.progress.env_steps
                self.say(f"time budget reached (run.max_seconds={max_seconds:g}) at {steps} env steps")
                return "time"
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.2)
            busy_from = time.perf_counter()  # the loop's own work, not its wait (run/driver_loop_*)
            for ref in done:
                self._handle(ref)
            if self._held and not self.hold():
                for index in sorted(self._held):
                    if index in self.slots and not self.slots[index].busy_steps:
                        self.submit_collect(self.slots[index])
                self._held.clear()
            if self.learner_live and not self._in_flight("train"):
                self.submit_train()
            self.progress.collectors_live = sum(s.live for s in self.slots.values() if not s.retiring)
            now = time.monotonic()
            for task in periodic:
                task.poll(now)
            self.progress.loop_times.observe(time.perf_counter() - busy_from)
        return "budget"

    def finish(self, timeout: float = 10.0, hurry: threading.Event | None = None) -> None:
        """Tell every collector to stop (a call in flight returns after its current step, also
        from the replay rate limit's wait), then let the calls in flight end so that the counters
        are final: one deadline for all of them, cut short when ``hurry`` is set. Nothing new is
        submitted."""
        for slot in self.slots.values():
            with contextlib.suppress(Exception):  # an actor already gone has nothing to stop
                slot.actor.stop.remote()
        # Only calls that add to the final counters are waited for (not placements or shard polls).
        counted = [ref for ref, (kind, _, _) in self.pending.items() if self.handlers[kind].on_final is not None]
        for ref in wait_all(counted, timeout, hurry):
            kind, index, actor = self.pending[ref]
            on_final = self.handlers[kind].on_final
            with contextlib.suppress(RayError, RayActorError):  # a call that failed adds nothing
                if on_final is not None and self.handlers[kind].current(index, actor):
                    on_final(index, ray.get(ref))
        self.pending.clear()
        self.say(self.progress.line())

    def named_actors(self) -> dict[str, Any]:
        """Every actor of the run by a name for messages: collectors, the learner, the shards."""
        named = {f"collector {index}": slot.actor for index, slot in self.slots.items()}
        named["learner"] = self.learner
        named.update({f"replay shard {i}": shard for i, shard in enumerate(self.shards)})
        return named
