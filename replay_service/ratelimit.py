"""Samples-per-insert rate limiting shared by writers and the sampler through the shards.

As Reverb's ``SampleToInsertRatio`` (Cassirer et al. 2021, "Reverb: a framework for experience
replay"): with ``spi`` samples per inserted transition, ``min_size`` and tolerance ``tol``
(in sampled transitions), and cumulative counts ``I`` (transitions inserted) and ``S``
(transitions sampled) summed over the live shards, ``diff = spi * I - S`` must stay in::

    [spi * min_size - tol,  spi * min_size + tol]

The learner waits before a batch of ``B`` that would take ``diff`` below the lower edge (it ran
ahead of the collectors: it would over-train on a small buffer); a writer waits while ``diff``
is above the upper edge (collectors ran ahead of the learner: data would be evicted unsampled).
Both sides wait in one state only when ``2 * tol < B``, which the sampler refuses at start.

The counters live in each shard (``cvy:inserted_total`` bumped by insert.lua,
``cvy:sampled_total`` bumped by the sampler's fetch round trip) because writers and the learner
run in different processes. A shard that is lost takes its counts with it, which moves ``diff``
by that shard's share only; the limiter then converges again from the survivors. A side that
waits re-reads those counters with :func:`poll_counters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from replay_service.errors import ShardAuthError, ShardUnavailable
from replay_service.shards import ShardClient, ShardHealth, ShardStats


class RateLimitConfigError(ValueError):
    """The rate limiter's settings cannot work together (the message says which and why)."""


@dataclass(frozen=True)
class SampleToInsertRatio:
    samples_per_insert: float  # 0 = off
    min_size_to_sample: int
    tolerance: float

    def __post_init__(self) -> None:
        if self.samples_per_insert < 0:
            raise RateLimitConfigError(f"replay.samples_per_insert={self.samples_per_insert!r}: must be >= 0")
        if self.enabled and self.tolerance <= 0:
            raise RateLimitConfigError(f"replay.spi_tolerance={self.tolerance!r}: must be > 0 when the limiter is on")

    @property
    def enabled(self) -> bool:
        return self.samples_per_insert > 0

    @property
    def min_diff(self) -> float:
        return self.samples_per_insert * self.min_size_to_sample - self.tolerance

    @property
    def max_diff(self) -> float:
        return self.samples_per_insert * self.min_size_to_sample + self.tolerance

    def can_sample(self, inserted: int, sampled: int, n: int) -> bool:
        if not self.enabled:
            return True
        return self.samples_per_insert * inserted - (sampled + n) >= self.min_diff

    def can_insert(self, inserted: int, sampled: int) -> bool:
        if not self.enabled:
            return True
        return self.samples_per_insert * inserted - sampled <= self.max_diff

    def check_batch(self, batch_size: int) -> None:
        """Refuse settings where the learner and the writers could both wait forever."""
        if self.enabled and 2 * self.tolerance < batch_size:
            raise RateLimitConfigError(
                f"replay.spi_tolerance={self.tolerance!r}: must be >= batch_size / 2 = {batch_size / 2:g}, "
                "or the learner and the collectors can block each other"
            )


def poll_counters(
    clients: Sequence[ShardClient],
    health: Sequence[ShardHealth],
    on_stats: Callable[[int, ShardStats], None],
    on_lost: Callable[[int, ShardUnavailable | ShardAuthError], None],
) -> None:
    """Read each reachable shard's counters (one MGET each) for a waiting limiter.

    A shard backing off is skipped; one that fails goes to ``on_lost``; the others are marked up
    and their counters go to ``on_stats``. A client whose connections predate the shard's last
    failure is reset first, so the caller must be the only user of ``clients`` meanwhile.
    """
    for i, (client, h) in enumerate(zip(clients, health, strict=True)):
        if not h.available():
            continue
        if client.generation != h.generation:
            client.reset(h.generation)
        try:
            stats = client.stats()
        except (ShardUnavailable, ShardAuthError) as exc:
            on_lost(i, exc)
            continue
        h.succeeded()
        on_stats(i, stats)
