"""The narrow interfaces between packages, so actors/, replay_service/ and learner/ never
import each other: deploy/ plugs a ReplayWriter into a collector as its SegmentSink and a
ReplaySampler into the learner as its BatchSource."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from common.schema import Batch, Segment


@runtime_checkable
class SegmentSink(Protocol):
    def write(self, segment: Segment) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...


@runtime_checkable
class BatchSource(Protocol):
    """Batches for the learner, from a source that knows how many transitions it can draw from."""

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch, or None if none is ready within ``timeout`` seconds (a rate limiter
        may hold the learner back); ``None`` waits as long as it takes."""
        ...

    @property
    def size(self) -> int: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...
