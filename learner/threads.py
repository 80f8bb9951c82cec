"""Torch intra-op threads of a CPU learner (``learner.num_threads``; 0 = tuned here).

Why tune instead of "every core": the best count depends on what else runs on the cores, not
on the CPU. Alone on a 2-core box the batch-128 pixel update is fastest with both cores; with
collectors, the sampler thread or other jobs on them, an OpenMP team waits at every barrier
for its thread on a busy core, and one thread ran the same update 1.8x faster than two
(measured on a 2-core AVX2 box shared with other work, ``convoy bench learner --variants``).
So the learner times its own updates: a few with each candidate count (1, half the cores,
all of them), keeps the fastest, and tries again every ``retune_every`` updates, since the load
changes. Thread count does not change the update's math.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's CPU set), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CpuThreads:
    """The learner's thread count: fixed (``fixed > 0``) or tuned from timed updates.

    Call :meth:`apply` before updating (something else in the process, e.g. another learner in
    a benchmark, may have changed torch's global count) and :meth:`observe` with each update's
    seconds. A trial is ``warm`` updates that are not counted (the thread pool resizes) and then
    ``trial`` timed ones; keep ``trial`` a multiple of ``learner.policy_delay`` so every trial
    holds the same mix of critic-only and critic-and-actor updates.
    """

    def __init__(
        self,
        fixed: int,
        cores: int,
        trial: int = 6,
        warm: int = 2,
        retune_every: int = 5_000,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        get_threads: Callable[[], int] = torch.get_num_threads,
    ) -> None:
        self.candidates = [fixed] if fixed > 0 else sorted({1, max(1, cores // 2), max(1, cores)})
        self.trial, self.warm, self.retune_every = trial, warm, retune_every
        self._set, self._get = set_threads, get_threads
        self.current = self.candidates[0]
        self.chosen: int | None = self.current if len(self.candidates) == 1 else None
        self._times: dict[int, float] = {}
        self._seen = 0  # updates observed in the current trial, or since the choice
        self.apply()

    @property
    def tuning(self) -> bool:
        return self.chosen is None

    def apply(self) -> None:
        if self._get() != self.current:
            self._set(self.current)

    def observe(self, seconds: float) -> None:
        self._seen += 1
        if self.chosen is not None:
            if len(self.candidates) > 1 and self._seen >= self.retune_every:
                self._start(self.candidates[0], retune=True)
            return
        if self._seen > self.warm:
            self._times[self.current] = self._times.get(self.current, 0.0) + seconds
        if self._seen < self.warm + self.trial:
            return
        i = self.candidates.index(self.current)
        if i + 1 < len(self.candidates):
            self._start(self.candidates[i + 1])
            return
        self.chosen = min(self._times, key=lambda c: self._times[c])
        self._switch(self.chosen)
        self._seen = 0
        log.info(
            "torch threads: %d (mean update %s)",
            self.chosen,
            ", ".join(f"{c}: {1000 * t / self.trial:.0f} ms" for c, t in sorted(self._times.items())),
        )

    def _start(self, count: int, retune: bool = False) -> None:
        if retune:
            self.chosen = None
            self._times.clear()
        self._seen = 0
        self._switch(count)

    def _switch(self, count: int) -> None:
        self.current = count
        self.apply()
