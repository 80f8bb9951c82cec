"""Pacing a simulator to a server-bound step rate (``env.step_hz``, a test and benchmark aid).

A CARLA server in synchronous mode computes a tick only when its client asks for one, and
the client waits, idle, for as long as the server takes: about 1/15 s a step on a typical
GPU node. :class:`Pacer` gives the embedded simulator and the CARLA stand-in the same shape:
each step takes at least ``1 / hz`` of wall time, and the part the simulator did not use is
slept away, so a paced collector costs its node no CPU while it waits, as a real one would.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Pacer:
    """``with pacer.step(): ...`` lasts at least ``1 / hz`` seconds; ``hz = 0`` turns it off."""

    def __init__(self, hz: float = 0.0) -> None:
        if hz < 0:
            raise ValueError(f"step rate {hz!r}: must be >= 0 (0 = unpaced)")
        self.hz = float(hz)
        self.period = 1.0 / hz if hz > 0 else 0.0
        self.slept_seconds_total = 0.0

    @property
    def enabled(self) -> bool:
        return self.period > 0.0

    @contextmanager
    def step(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.monotonic()
        yield
        # The step's own work counts towards its period: a server's tick time includes its compute.
        left = start + self.period - time.monotonic()
        if left > 0:
            time.sleep(left)
            self.slept_seconds_total += left
