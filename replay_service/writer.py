"""The collector's end of replay: encode a segment and insert it into one shard."""

from __future__ import annotations

import time
from collections.abc import Sequence

from common.schema import Segment
from replay_service.codec import FrameCodec, encode_segment
from replay_service.shards import ShardClient


class ReplayWriter:
    """Writes whole segments; a segment is encoded completely before the one atomic insert,
    so nothing half-written can enter replay.

    Shards are chosen round-robin, starting at an offset per writer so that writers spread
    over shards from their first segment on.
    """

    def __init__(
        self,
        urls: Sequence[str],
        capacity: int,
        codec: str = "lz4",
        password: str = "",
        writer_id: int = 0,
    ) -> None:
        if not urls:
            raise ValueError("ReplayWriter needs at least one shard URL")
        self.shards = [ShardClient(u, password) for u in urls]
        # Each shard holds an equal share; uniform sampling weights shards by their size.
        self.capacity_per_shard = max(1, capacity // len(self.shards))
        self.codec = FrameCodec(codec)
        self._next = writer_id % len(self.shards)
        self.segments_total = 0
        self.transitions_total = 0
        self.bytes_total = 0
        self.evicted_total = 0
        self.insert_seconds_total = 0.0

    def write(self, segment: Segment) -> None:
        blob = encode_segment(segment, self.codec)
        shard = self.shards[self._next]
        self._next = (self._next + 1) % len(self.shards)
        start = time.perf_counter()
        _, _, evicted = shard.insert(blob, segment.num_transitions, self.capacity_per_shard)
        self.insert_seconds_total += time.perf_counter() - start
        self.segments_total += 1
        self.transitions_total += segment.num_transitions
        self.bytes_total += len(blob)
        self.evicted_total += evicted

    def metrics(self) -> dict[str, float]:
        return {
            "replay_writer/segments_total": self.segments_total,
            "replay_writer/transitions_total": self.transitions_total,
            "replay_writer/bytes_total": self.bytes_total,
            "replay_writer/evicted_transitions_total": self.evicted_total,
            "replay_writer/insert_seconds_total": self.insert_seconds_total,
        }

    def close(self) -> None:
        for s in self.shards:
            s.close()
