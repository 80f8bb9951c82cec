"""Matching asynchronous sensor data to the synchronous tick that produced it.

In synchronous mode ``world.tick()`` returns the new frame number while sensor data arrives
on the client's streaming threads (one stream per sensor), possibly after ``tick()`` has
returned and possibly behind data of earlier frames still queued; CARLA's own
examples (PythonAPI/examples/synchronous_mode.py) match data to frames by number for this
reason. The camera produces data every tick, so we wait for the image of exactly the tick's
frame; collision and lane-invasion sensors only fire on events, so we take every event up to
the tick's frame and leave later ones for the next step.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Generic, Protocol, TypeVar


class FrameData(Protocol):
    @property
    def frame(self) -> int: ...


T = TypeVar("T", bound=FrameData)


class SensorTimeout(TimeoutError):
    """No sensor data for the awaited frame within the time limit (a hung server)."""


class FrameQueue(Generic[T]):
    """Per-tick sensor data (a camera): ``put`` is the sensor callback, ``get(frame)`` returns
    the item of that frame and discards older ones."""

    def __init__(self) -> None:
        self._queue: queue.Queue[T] = queue.Queue()
        self.stale_total = 0

    def put(self, item: T) -> None:
        self._queue.put(item)

    def get(self, frame: int, timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SensorTimeout(f"no sensor data for frame {frame} within {timeout:.1f}s")
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                raise SensorTimeout(f"no sensor data for frame {frame} within {timeout:.1f}s") from None
            if item.frame == frame:
                return item
            if item.frame > frame:
                # Data of a later frame while waiting for this one: the tick we asked for was
                # skipped on the stream; waiting longer cannot produce it.
                raise SensorTimeout(f"sensor data jumped from before frame {frame} to frame {item.frame}")
            self.stale_total += 1

    def clear(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


class EventBuffer(Generic[T]):
    """Event sensors (collision, lane invasion): events are taken up to a frame; an event of
    frame ``f`` that arrives after the step for ``f`` was taken counts at the next step."""

    def __init__(self) -> None:
        self._events: list[T] = []
        self._lock = threading.Lock()

    def put(self, event: T) -> None:
        with self._lock:
            self._events.append(event)

    def pop_until(self, frame: int) -> list[T]:
        with self._lock:
            ready = [e for e in self._events if e.frame <= frame]
            self._events = [e for e in self._events if e.frame > frame]
        return ready

    def clear(self) -> None:
        with self._lock:
            self._events.clear()
