"""The run's shard table: where each convoy-started replay shard listens, kept by the driver.

A shard actor that dies (its node died, or its process) is replaced by the supervisor, maybe on
another node, so at another address. This table is the one place that knows the current
address: the supervisor changes it, the run's control actor publishes it, and every writer and
the sampler poll it (replay_service/table.py) and switch within seconds.

Replacement backs off (1 s doubling to 30 s) and is bounded: past
``replay.max_shard_restarts`` failures a shard is *gone*, its URL becomes ``""`` (writers and
the sampler stop trying it) and the run goes on with the others; when every shard is gone the
supervisor gives up.

States of one shard: ``live`` (its actor runs at ``url``) -> ``waiting`` (failed; a replacement
is due at ``retry_at``) -> ``starting`` (a replacement actor is being placed) -> ``live`` again
at its new URL (``epoch`` + 1), or ``waiting`` if that failed too; ``gone`` is final.
"""

from __future__ import annotations

from dataclasses import dataclass

LIVE, WAITING, STARTING, GONE = "live", "waiting", "starting", "gone"


@dataclass
class ShardEntry:
    url: str
    epoch: int = 0  # replacements that came up; each one may have a new address
    failures: int = 0  # actor failures, including replacements that never came up
    state: str = LIVE
    retry_at: float = 0.0


class ShardTable:
    """Index -> (URL, epoch) of the run's shards, with bounded, backed-off replacement."""

    def __init__(
        self, urls: list[str], max_restarts: int, base_backoff_s: float = 1.0, max_backoff_s: float = 30.0
    ) -> None:
        self.entries = [ShardEntry(u) for u in urls]
        self.max_restarts = max_restarts
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.version = 0  # bumped whenever urls() changes

    def urls(self) -> list[str]:
        """What writers and the sampler read: each shard's URL, ``""`` for a gone one."""
        return [e.url if e.state != GONE else "" for e in self.entries]

    def state(self, index: int) -> str:
        return self.entries[index].state

    def backoff(self, failures: int) -> float:
        return min(self.max_backoff_s, self.base_backoff_s * 2 ** max(0, failures - 1))

    def failed(self, index: int, now: float) -> bool:
        """Shard ``index``'s actor failed (also a replacement that never came up). True when a
        replacement is scheduled (at ``retry_at``); False when the shard is now gone."""
        e = self.entries[index]
        if e.state == GONE:
            return False
        e.failures += 1
        if e.failures > self.max_restarts:
            e.state = GONE
            self.version += 1
            return False
        e.state = WAITING
        e.retry_at = now + self.backoff(e.failures)
        return True

    def due(self, now: float) -> list[int]:
        """Shards whose replacement should start now."""
        return [i for i, e in enumerate(self.entries) if e.state == WAITING and now >= e.retry_at]

    def starting(self, index: int) -> None:
        e = self.entries[index]
        if e.state != WAITING:
            raise ValueError(f"shard {index} is {e.state}, not waiting for a replacement")
        e.state = STARTING

    def replaced(self, index: int, url: str) -> None:
        """The replacement of shard ``index`` is up at ``url``."""
        e = self.entries[index]
        if e.state != STARTING:
            raise ValueError(f"shard {index} is {e.state}, no replacement was starting")
        e.state = LIVE
        e.epoch += 1
        if url != e.url:
            e.url = url
            self.version += 1

    @property
    def live(self) -> int:
        """Shards not gone (live, or being replaced)."""
        return sum(e.state != GONE for e in self.entries)

    def check(self) -> None:
        """The invariant every operation keeps (tests call it after each step)."""
        for i, e in enumerate(self.entries):
            assert e.state in (LIVE, WAITING, STARTING, GONE), (i, e)
            assert (e.state == GONE) == (e.failures > self.max_restarts), (i, e)
            assert e.epoch <= e.failures, (i, e)  # every replacement follows a failure
            assert e.url, (i, e)  # the last address stays known, also when gone
        urls = self.urls()
        assert len(urls) == len(self.entries)
        assert all((u == "") == (e.state == GONE) for u, e in zip(urls, self.entries, strict=True))
