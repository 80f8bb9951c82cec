"""The supervisor loop's two registries: a handler per kind of finished call, and periodic work.

The loop waits on the calls in flight and hands each finished one to the :class:`Handler`
registered for its kind; between waits it polls its :class:`Periodic` tasks (the shape of
Sample Factory's runner, whose message handlers and timer callbacks are registered by type).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Handler:
    """What the supervisor does with a finished call of one kind."""

    current: Callable[[int, Any], bool]  # (index, actor): is the call's actor still the one in place
    on_result: Callable[[int, Any], None]
    on_failure: Callable[[int, BaseException], None]
    # What a call still in flight at the end contributes to the final counters (None: nothing).
    on_final: Callable[[int, Any], None] | None = None


class Periodic:
    """Calls ``fn`` when polled at least ``period_s`` after its last call (and ``when()`` holds).

    The first call is due at ``first_at`` (monotonic seconds; 0: on the first poll). A call
    skipped because ``when()`` is false stays due, so it runs on the first poll where it holds.
    """

    def __init__(
        self,
        period_s: float,
        fn: Callable[[], None],
        when: Callable[[], bool] = lambda: True,
        first_at: float = 0.0,
    ) -> None:
        self.period_s = period_s
        self.fn = fn
        self.when = when
        self.next_at = first_at

    def poll(self, now: float) -> None:
        if now >= self.next_at and self.when():
            self.next_at = now + self.period_s
            self.fn()
