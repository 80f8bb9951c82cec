"""The run's weights channel: the newest published weights and what each collector was sent.

The learner puts each version it publishes into Ray's object store itself and returns only
the reference with its ``train`` result; the driver never holds weight bytes, and every
collector gets the reference once per version: with its next ``collect`` call, or offered in
the middle of a call (``collector.weights_every_s``; the idea of Sample Factory's
ParameterServer and ParameterClient). A collector slot that was never sent anything (a new or
a replacement actor) needs the newest weights with its first call.
"""

from __future__ import annotations

from typing import Any


class WeightsChannel:
    """One place that holds the newest ``(version, ref)`` and the version each slot was sent."""

    def __init__(self) -> None:
        self._version = 0
        self._ref: Any = None
        self._sent: dict[int, int] = {}

    def publish(self, version: int, ref: Any) -> None:
        """The learner's newest weights (``ref``: an object-store reference to them)."""
        self._version, self._ref = version, ref

    def owner_died(self) -> None:
        """The learner that put the newest weights is gone, and with it their object (Ray frees
        an object with its owner): send nothing until the next learner publishes. The version
        stays, so slots that hold it are not sent it again."""
        self._ref = None

    def latest(self) -> tuple[int, Any]:
        """``(version, ref)`` of the newest weights; ``(0, None)`` before the first publish."""
        return self._version, self._ref

    @property
    def version(self) -> int:
        return self._version

    def needs(self, slot_id: int) -> bool:
        """Whether slot ``slot_id`` has not been sent the newest published weights yet."""
        return self._ref is not None and self._sent.get(slot_id, 0) < self._version

    def sent(self, slot_id: int, version: int) -> None:
        self._sent[slot_id] = version

    def forget(self, slot_id: int) -> None:
        """Slot ``slot_id`` has a new actor that holds no weights yet."""
        self._sent.pop(slot_id, None)

    def take(self, slot_id: int) -> Any:
        """The ref to send with slot ``slot_id``'s next call (marked as sent), or None when it has it."""
        if not self.needs(slot_id):
            return None
        self.sent(slot_id, self._version)
        return self._ref
