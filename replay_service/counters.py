"""The sampler's per-shard counters, its rate-limited warnings about bad data, and the metrics
built from a copy of the counters. The sampler owns the lock that guards the counters
(sampler.py); nothing here takes it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from replay_service.metric_keys import CORRUPT_TOTAL, SAMPLED_TRANSITIONS_TOTAL
from replay_service.shards import ShardHealth, ShardStats

log = logging.getLogger("replay_service.sampler")


class LogOnce:
    """Warn on the first occurrence of a kind of bad data per shard, then every 60 s with a count."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, str], float] = {}

    def warn(self, shard: int, kind: str, count: int, detail: str) -> None:
        now = time.monotonic()
        if now - self._last.get((shard, kind), -1e9) >= 60.0:
            self._last[(shard, kind)] = now
            log.warning("replay shard %d: %s (%d so far, skipped): %s", shard, kind, count, detail)


@dataclass
class ShardCounters:
    stats: ShardStats = field(default_factory=ShardStats)
    sampled_total: int = 0
    corrupt_total: int = 0
    missing_total: int = 0
    restarts_total: int = 0
    unreported: int = 0  # sampled here, not yet added to the shard's sampled_total

    def copy(self) -> tuple[ShardStats, int, int, int, int]:
        return self.stats, self.sampled_total, self.corrupt_total, self.missing_total, self.restarts_total


def shard_metrics(
    counters: Sequence[tuple[ShardStats, int, int, int, int]], health: Sequence[ShardHealth]
) -> dict[str, float]:
    """Totals and per-shard metrics from copies of the counters (:meth:`ShardCounters.copy`)."""
    out: dict[str, float] = {
        SAMPLED_TRANSITIONS_TOTAL: sum(c[1] for c in counters),
        CORRUPT_TOTAL: sum(c[2] for c in counters),
        "replay_sampler/missing_total": sum(c[3] for c in counters),
        "replay_sampler/shards_up": sum(h.up for h in health),
    }
    for i, ((stats, sampled, corrupt, missing, restarts), h) in enumerate(zip(counters, health, strict=True)):
        p = f"replay_sampler/shard{i}/"
        out[p + "up"] = float(h.up)
        out[p + "transitions_stored"] = stats.size if h.up else 0
        out[p + "bytes_stored"] = stats.bytes if h.up else 0
        # The shard's own counters (every writer's inserts); they restart with the shard.
        out[p + "inserted_transitions_total"] = stats.inserted_total
        out[p + "evicted_transitions_total"] = stats.evicted_total
        out[p + "sampled_transitions_total"] = sampled
        out[p + "corrupt_total"] = corrupt
        out[p + "missing_total"] = missing
        out[p + "lost_total"] = h.lost_total
        out[p + "reconnects_total"] = h.reconnects_total
        out[p + "restarts_total"] = restarts
    return out
