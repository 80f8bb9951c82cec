"""Simulator failures the collector knows how to handle.

A simulator server that dies or stops answering is an expected event at scale, not a bug:
the env raises :class:`SimulatorCrashed` (and nothing else) for it, the collector drops the
unfinished segment, asks the env to :meth:`RecoverableEnv.recover` and starts a new episode.
:class:`SimulatorUnavailable` means recovery itself gave up (too many consecutive crashes,
a server that never answers); it propagates, so Ray restarts the whole collector actor.

They live in actors/carla/, the lowest layer of actors/, because the server managers here
raise them and the envs and the collector above catch them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class SimulatorCrashed(RuntimeError):
    """The simulator server died or a call to it (a tick, a reset) timed out."""


class SimulatorUnavailable(RuntimeError):
    """The simulator could not be (re)started; the message says why and where its log is."""


@runtime_checkable
class RecoverableEnv(Protocol):
    """An env that can bring its simulator back after :class:`SimulatorCrashed`."""

    def recover(self) -> None:
        """Restart or reconnect the simulator; the next call must be ``reset()``."""
        ...
