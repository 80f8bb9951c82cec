"""Two of the driver's own timings, kept for the progress summary (``run/...`` metrics):

- :class:`RecentDurations`: how long each iteration of the supervisor's loop works (handling
  finished calls, submitting new ones, periodic tasks; not the wait for a result). A loop
  that slows as collectors are added would show here first.
- :class:`FanoutClock`: weight fan-out, from the moment the driver receives a published
  version to the moment every live collector acts with it (or a newer one). Collectors report
  when they started acting with their current version (``collector/acting_version_timestamp_
  seconds``, wall clock), so the latency includes waiting for a collector's call in flight to
  end, which is what a new version really waits for.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class RecentDurations:
    """The last ``keep`` durations with the wall time each ended at."""

    def __init__(self, keep: int = 50_000) -> None:
        self._items: deque[tuple[float, float]] = deque(maxlen=keep)
        self._cache: tuple[float, float, float] = (-math.inf, math.nan, math.nan)  # (at, p50, p99)

    def observe(self, seconds: float, at: float | None = None) -> None:
        self._items.append((time.time() if at is None else at, seconds))

    def since(self, start: float) -> list[float]:
        """Durations that ended at or after wall time ``start``."""
        return [d for t, d in self._items if t >= start]

    def p50_p99(self) -> tuple[float, float]:
        """Over the last minute; recomputed at most once a second (the summary is read often)."""
        now = time.time()
        if now - self._cache[0] >= 1.0:
            recent = self.since(now - 60.0)
            self._cache = (now, quantile(recent, 0.5), quantile(recent, 0.99))
        return self._cache[1], self._cache[2]


class FanoutClock:
    """Publish-to-acting latency of each weight version over the live collectors."""

    def __init__(self, keep: int = 4096, max_pending: int = 256) -> None:
        self.records: deque[tuple[float, float]] = deque(maxlen=keep)  # (settled at, latency)
        self.max_pending = max_pending
        self._published: dict[int, float] = {}  # version -> when the driver received it
        self._reached: dict[int, dict[int, float]] = {}  # version -> slot -> when it first acted with >= version
        self._acting: dict[int, int] = {}  # slot -> newest version it acts with

    def published(self, version: int, live: Iterable[int], at: float | None = None) -> None:
        """A new version reached the driver. Timed only once every live collector acts with
        some policy: during the random warm-up a version would wait for the warm-up's end."""
        live = list(live)
        if version in self._published or not live or any(self._acting.get(s, 0) <= 0 for s in live):
            return
        self._published[version] = time.time() if at is None else at
        self._reached[version] = {}
        while len(self._published) > self.max_pending:
            oldest = min(self._published)
            del self._published[oldest], self._reached[oldest]

    def acted(self, slot: int, version: int, since: float) -> None:
        """Collector ``slot`` reports acting with ``version`` since wall time ``since``."""
        if version <= self._acting.get(slot, 0):
            return
        self._acting[slot] = version
        for v, reached in self._reached.items():
            if v <= version:
                reached.setdefault(slot, since)

    def forget(self, slot: int) -> None:
        """Slot ``slot`` has a new actor (or none): it acts with nothing yet."""
        self._acting.pop(slot, None)
        for reached in self._reached.values():
            reached.pop(slot, None)

    def settle(self, live: Iterable[int], now: float | None = None) -> None:
        """Record every version that all ``live`` collectors now act with."""
        live = list(live)
        if not live:
            return
        for v in sorted(self._published):
            reached = self._reached[v]
            if any(s not in reached for s in live):
                break  # newer versions cannot be complete either
            latency = max(reached[s] for s in live) - self._published.pop(v)
            del self._reached[v]
            self.records.append((time.time() if now is None else now, max(latency, 0.0)))

    def since(self, start: float) -> list[float]:
        return [lat for t, lat in self.records if t >= start]

    def p50_max(self, window_s: float = 60.0) -> tuple[float, float]:
        recent = self.since(time.time() - window_s)
        return quantile(recent, 0.5), (max(recent) if recent else math.nan)
