"""The collector's end of replay: encode a segment and insert it into one shard."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from common.metrics import Latency
from common.schema import Segment
from replay_service.codec import FrameCodec, encode_segment
from replay_service.errors import ShardAuthError, ShardUnavailable, ShardWriteError
from replay_service.metric_keys import BYTES_TOTAL, DROPPED_TRANSITIONS_TOTAL, TRANSITIONS_TOTAL
from replay_service.ratelimit import SampleToInsertRatio, poll_counters
from replay_service.shards import ShardClient, ShardHealth, ShardStats, check_shards_at_start
from replay_service.table import GONE, ShardTable, TableFollower

log = logging.getLogger(__name__)


@dataclass
class _ShardCounters:
    segments_total: int = 0
    transitions_total: int = 0
    bytes_total: int = 0
    evicted_total: int = 0
    stored: int = 0  # transitions in the shard after our last insert
    inserted_all: int = 0  # the shard's inserted_total (every writer), for the rate limiter
    sampled_all: int = 0  # the shard's sampled_total, for the rate limiter


class ReplayWriter:
    """Writes whole segments; a segment is encoded completely before the one atomic insert,
    so nothing half-written can enter replay.

    Shards are chosen round-robin, starting at an offset per writer so that writers spread
    over shards from their first segment on. A shard that fails is skipped (its share goes to
    the others) and retried with backoff; when every shard is down the segment is dropped and
    counted, the collector keeps running: a lost shard costs its data, never the run.

    A write a shard refuses (out of memory under its ``maxmemory``, arguments insert.lua
    rejects) is counted in ``replay_writer/write_errors_total`` and handled like a lost shard:
    backed off from and retried later, never raised into the collector.

    With ``shard_table`` (a callable returning every shard's current URL, see table.py) a shard
    replaced at a new address is followed within ``table_poll_s``.

    With ``samples_per_insert > 0``, :meth:`write` waits while the collectors are more than the
    tolerance ahead of the learner (see ratelimit.py). Setting ``stop`` (from another thread)
    ends that wait: at the end of a run the learner no longer samples, so it could last forever.
    """

    def __init__(
        self,
        urls: Sequence[str],
        capacity: int,
        codec: str = "zstd",
        password: str = "",
        writer_id: int = 0,
        *,
        samples_per_insert: float = 0.0,
        spi_tolerance: float = 65_536.0,
        min_size_to_sample: int = 1,
        rate_limit_poll_s: float = 0.02,
        timeout: float = 5.0,
        stop: threading.Event | None = None,
        shard_table: ShardTable | None = None,
        table_poll_s: float = 1.0,
    ) -> None:
        if not urls:
            raise ValueError("ReplayWriter needs at least one shard URL")
        self._table = TableFollower(urls, shard_table, table_poll_s)
        current = self._table.current() if self._table.enabled else list(urls)
        self.password, self.timeout = password, timeout
        # A shard gone for good keeps a client of its last URL that is never used.
        self.shards = [ShardClient(u or old, password, timeout) for u, old in zip(current, urls, strict=True)]
        self.health = [ShardHealth(i, u, f"replay writer {writer_id}") for i, u in enumerate(current)]
        for h, u in zip(self.health, current, strict=True):
            if u == GONE:
                h.retire()
        # Each shard holds an equal share; uniform sampling weights shards by their size.
        self.capacity_per_shard = max(1, capacity // len(self.shards))
        self.codec = FrameCodec(codec)
        self.limiter = SampleToInsertRatio(samples_per_insert, max(1, min_size_to_sample), spi_tolerance)
        self.rate_limit_poll_s = rate_limit_poll_s
        self.stop = stop if stop is not None else threading.Event()
        self._next = writer_id % len(self.shards)
        self._counters = [_ShardCounters() for _ in self.shards]
        self.dropped_segments_total = 0
        self.dropped_transitions_total = 0
        self.write_errors_total = 0
        self.moves_total = 0
        self.insert_latency = Latency("replay_writer/insert_seconds")  # one atomic insert (+ eviction)
        self.rate_limit_wait_seconds_total = 0.0
        self.rate_limited_total = 0
        self._check_start()

    def _check_start(self) -> None:
        try:
            check_shards_at_start(self.shards, self.health)
        except (ShardAuthError, ShardUnavailable):
            self.close()
            raise

    # ----- rate limiting ---------------------------------------------------------------------

    def _totals(self) -> tuple[int, int]:
        live = [c for c, h in zip(self._counters, self.health, strict=True) if h.up]
        return sum(c.inserted_all for c in live), sum(c.sampled_all for c in live)

    def _refresh_counters(self) -> None:
        poll_counters(self.shards, self.health, self._polled, self._lost)

    def _polled(self, i: int, stats: ShardStats) -> None:
        self._counters[i].inserted_all = stats.inserted_total
        self._counters[i].sampled_all = stats.sampled_total

    def _lost(self, i: int, exc: BaseException) -> None:
        self.health[i].failed(exc)

    def _wait_for_learner(self) -> None:
        if not self.limiter.enabled or self.limiter.can_insert(*self._totals()):
            return
        self.rate_limited_total += 1
        start = time.perf_counter()
        while True:
            self._refresh_counters()
            if self.limiter.can_insert(*self._totals()) or not any(h.up for h in self.health) or self.stop.is_set():
                break
            time.sleep(self.rate_limit_poll_s)
        self.rate_limit_wait_seconds_total += time.perf_counter() - start

    # ----- writing ---------------------------------------------------------------------------

    def _follow_table(self) -> None:
        """Switch to the shards' new addresses, if any moved (see table.py)."""
        for i, url in self._table.changes().items():
            self.moves_total += 1
            c = self._counters[i]
            c.stored = c.inserted_all = c.sampled_all = 0  # a new shard: its counters start over
            if url == GONE:
                self.health[i].retire()
                continue
            old, self.shards[i] = self.shards[i], ShardClient(url, self.password, self.timeout)
            old.close()
            self.health[i].moved(url)

    def write(self, segment: Segment) -> None:
        self._follow_table()
        blob = encode_segment(segment, self.codec)
        self._wait_for_learner()
        n = len(self.shards)
        for k in range(n):
            i = (self._next + k) % n
            if not self.health[i].available():
                continue
            if self.shards[i].generation != self.health[i].generation:
                self.shards[i].reset(self.health[i].generation)
            start = time.perf_counter()
            try:
                # The epoch a shard with none adopts (fresh or restarted empty, see insert.lua): a fresh
                # candidate per insert, so a shard restarted on its old address never reuses an epoch
                # a sampler has mirrored.
                res = self.shards[i].insert(blob, segment.num_transitions, self.capacity_per_shard, os.urandom(8).hex())
            except ShardUnavailable as exc:
                self.health[i].failed(exc)
                continue
            except ShardAuthError as exc:  # e.g. a shard restarted with another password
                self.health[i].failed(exc)
                continue
            except ShardWriteError as exc:  # out of memory, or bad arguments: counted, backed off
                self.write_errors_total += 1
                self.health[i].failed(exc)
                continue
            self.insert_latency.observe(time.perf_counter() - start)
            self.health[i].succeeded()
            self._next = (i + 1) % n
            c = self._counters[i]
            c.segments_total += 1
            c.transitions_total += segment.num_transitions
            c.bytes_total += len(blob)
            c.evicted_total += res.evicted
            c.stored = res.size
            c.inserted_all = res.inserted_total
            c.sampled_all = res.sampled_total
            return
        self.dropped_segments_total += 1
        self.dropped_transitions_total += segment.num_transitions

    # ----- reporting -------------------------------------------------------------------------

    @property
    def segments_total(self) -> int:
        return sum(c.segments_total for c in self._counters)

    @property
    def transitions_total(self) -> int:
        return sum(c.transitions_total for c in self._counters)

    @property
    def bytes_total(self) -> int:
        return sum(c.bytes_total for c in self._counters)

    @property
    def evicted_total(self) -> int:
        return sum(c.evicted_total for c in self._counters)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "replay_writer/segments_total": self.segments_total,
            TRANSITIONS_TOTAL: self.transitions_total,
            BYTES_TOTAL: self.bytes_total,
            "replay_writer/evicted_transitions_total": self.evicted_total,
            **self.insert_latency.metrics(),
            "replay_writer/dropped_segments_total": self.dropped_segments_total,
            DROPPED_TRANSITIONS_TOTAL: self.dropped_transitions_total,
            "replay_writer/rate_limit_wait_seconds_total": self.rate_limit_wait_seconds_total,
            "replay_writer/rate_limited_total": self.rate_limited_total,
            "replay_writer/shards_up": sum(h.up for h in self.health),
            "replay_writer/write_errors_total": self.write_errors_total,
            "replay_writer/shard_moves_total": self.moves_total,
        }
        for i, (c, h) in enumerate(zip(self._counters, self.health, strict=True)):
            p = f"replay_writer/shard{i}/"
            out[p + "up"] = float(h.up)
            out[p + "segments_total"] = c.segments_total
            out[p + "transitions_total"] = c.transitions_total
            out[p + "bytes_total"] = c.bytes_total
            out[p + "evicted_transitions_total"] = c.evicted_total
            out[p + "transitions_stored"] = c.stored
            out[p + "lost_total"] = h.lost_total
            out[p + "reconnects_total"] = h.reconnects_total
        return out

    def close(self) -> None:
        for s in self.shards:
            s.close()
