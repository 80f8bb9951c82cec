"""SIGINT and SIGTERM end a run the same way: the first interrupts, a later one hurries.

Ctrl-C sends SIGINT; Kubernetes, ``ray job stop`` and systemd send SIGTERM (and SIGKILL after
a grace period). Both get one handler. The first signal raises ``KeyboardInterrupt`` in the
main thread: that is the exception Ray's blocking calls (``ray.get``, ``ray.wait``) let
through when a signal handler raises; any other exception raised there is swallowed until
the call returns. Every later signal, and any signal once the run is finishing, only sets
:attr:`StopSignals.hurry`: the finishing steps wait in short slices and cut their waits when it
is set, so a second signal never interrupts the writing of ``summary.json`` half-way.

Why the handler is installed twice: ``ray.init`` replaces the SIGTERM handler. Its Python
handler calls ``sys.exit``, and the driver's core worker installs Abseil's failure signal
handler for SIGTERM in C (``absl::InstallFailureSignalHandler``). That handler prints the
"*** SIGTERM received" stack, arms ``alarm(3)`` with an abort-on-SIGALRM handler (its guard
against a hanging crash handler; ``alarm_on_failure_secs`` defaults to 3) and passes the
signal on to Python's handler. A process that handles SIGTERM and keeps running to write its
final checkpoint is therefore aborted (SIGABRT, exit -6) three seconds later. Installing our
handler again after ``ray.init`` (``signal.signal`` calls ``sigaction``) removes both; the
failure handler stays in place for SIGSEGV, SIGABRT and the other crash signals.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The run's SIGINT/SIGTERM handler (main thread only, as Python's signal handlers are)."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.hurry = threading.Event()
        self._raise_next = True
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again after ``ray.init``; see the module docstring)."""
        for sig in SIGNALS:
            original = self._previous.get(sig, signal.getsignal(sig))
            # A signal ignored when the run started (SIGINT of a shell's background job) stays
            # ignored; setting SIG_IGN again also takes it back from ray.init.
            previous = signal.signal(sig, signal.SIG_IGN if original == signal.SIG_IGN else self._handle)
            self._previous.setdefault(sig, previous)

    def restore(self) -> None:
        """Give the signals back to the handlers they had before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def finishing(self) -> None:
        """The run is finishing: from now on a signal only sets :attr:`hurry`."""
        self._raise_next = False

    @property
    def last(self) -> str:
        """The name of the newest signal received ("" if none)."""
        return self.received[-1] if self.received else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        if self._raise_next:
            self._raise_next = False
            raise KeyboardInterrupt(self.last)
        self.hurry.set()


def wait_all(refs: list[Any], timeout: float, hurry: threading.Event | None = None) -> list[Any]:
    """The refs of ``refs`` that are ready within ``timeout``; waits in half-second slices, so
    that a set ``hurry`` ends the wait within one."""
    import ray

    deadline = time.monotonic() + timeout
    ready: list[Any] = []
    waiting = list(refs)
    while waiting and not (hurry is not None and hurry.is_set()):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(0.5, left))
        ready += done
    return ready
