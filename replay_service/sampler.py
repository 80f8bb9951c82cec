"""The learner's end of replay: an iterator of uniform random batches.

Uniform over every stored transition: each shard's index (segment seq -> length) is mirrored
locally and refreshed incrementally, a batch draws global transition indices uniformly over
the concatenation of all shards' segments (so shards count in proportion to their size and
segments to their length), and each shard is asked once per batch for exactly the bytes
those transitions need (sample.lua). Decoding runs on background threads into a bounded
queue of ready batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from common.schema import FRAME_SHAPE, IMAGE_SHAPE, STACK, VECTOR_DIM, ACTION_DIM, Batch
from replay_service.codec import TERMINATED, CorruptSegmentError, decode_transition_parts
from replay_service.shards import ShardClient

log = logging.getLogger(__name__)


@dataclass
class _ShardIndex:
    """Local mirror of one shard's live segments, oldest first."""

    seqs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    next_seq: int = 0  # highest seq mirrored

    @property
    def size(self) -> int:
        return int(self.lengths.sum())


class SampleError(RuntimeError):
    """Sampling failed (for example, every shard is empty after retries)."""


class ReplaySampler:
    """Uniform batches from all shards; ``next(sampler)`` returns a :class:`Batch`.

    With ``prefetch=0`` every batch is fetched on the caller's thread (tests, benchmarks of
    the raw path); otherwise ``threads`` background threads keep up to ``prefetch`` batches
    ready. Call :meth:`close` (or use as a context manager) to stop them.
    """

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        password: str = "",
        prefetch: int = 4,
        threads: int = 1,
        index_refresh_s: float = 0.25,
        seed: int = 0,
        pin_memory: bool = False,
        min_size: int = 1,
    ) -> None:
        self.urls = list(urls)
        self.batch_size = batch_size
        self.password = password
        self.index_refresh_s = index_refresh_s
        self.pin_memory = pin_memory
        # No batch is drawn before this many transitions are stored (Reverb's
        # min_size_to_sample): early batches would repeat the first few segments.
        self.min_size = max(1, min_size)
        self._seed = seed
        self._clients: dict[int, list[ShardClient]] = {}
        self._index = [_ShardIndex() for _ in self.urls]
        self._index_lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one refresh at a time, or two threads mirror a segment twice
        self._last_refresh = 0.0
        self._rng = np.random.default_rng(seed)
        self.corrupt_total = 0
        self.missing_total = 0
        self.sampled_total = 0
        self.wait_seconds_total = 0.0
        self._stop = threading.Event()
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=max(1, prefetch))
        self._threads: list[threading.Thread] = []
        if prefetch > 0:
            for i in range(threads):
                th = threading.Thread(target=self._worker, args=(i,), name=f"replay-sampler-{i}", daemon=True)
                th.start()
                self._threads.append(th)

    # ----- index -------------------------------------------------------------------------

    def _client(self, shard: int, worker: int) -> ShardClient:
        per_worker = self._clients.setdefault(worker, [])
        if not per_worker:
            per_worker.extend(ShardClient(u, self.password) for u in self.urls)
        return per_worker[shard]

    def refresh_index(self, worker: int = -1) -> int:
        """Bring the local mirror up to date; returns the total transitions stored."""
        with self._refresh_lock:
            self._refresh_index(worker)
        return self.size

    def _refresh_index(self, worker: int) -> None:
        for i in range(len(self.urls)):
            client = self._client(i, worker)
            stats = client.stats()
            with self._index_lock:
                idx = self._index[i]
                if stats.next < idx.next_seq:
                    # The shard restarted empty: start the mirror over.
                    idx = self._index[i] = _ShardIndex()
                start = idx.next_seq
            new = list(range(max(start + 1, stats.head), stats.next + 1))
            lengths = client.lengths(new)
            keep = [(s, n) for s, n in zip(new, lengths, strict=True) if n is not None]
            with self._index_lock:
                alive = idx.seqs >= stats.head
                idx.seqs = np.concatenate([idx.seqs[alive], np.array([s for s, _ in keep], np.int64)])
                idx.lengths = np.concatenate([idx.lengths[alive], np.array([n for _, n in keep], np.int64)])
                idx.next_seq = max(idx.next_seq, stats.next)
        self._last_refresh = time.monotonic()

    @property
    def size(self) -> int:
        with self._index_lock:
            return sum(idx.size for idx in self._index)

    def _snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(shard of each segment, seq, length, cumulative end) over all shards."""
        with self._index_lock:
            shard = np.concatenate([np.full(len(idx.seqs), i, np.int64) for i, idx in enumerate(self._index)])
            seqs = np.concatenate([idx.seqs for idx in self._index])
            lengths = np.concatenate([idx.lengths for idx in self._index])
        return shard, seqs, lengths, np.cumsum(lengths)

    # ----- sampling ----------------------------------------------------------------------

    def sample_locations(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw ``n`` transitions uniformly: returns (shard, seq, step) arrays."""
        shard, seqs, _, ends = self._snapshot()
        if len(ends) == 0 or ends[-1] == 0:
            raise SampleError("replay is empty")
        g = rng.integers(0, ends[-1], size=n)
        seg = np.searchsorted(ends, g, side="right")
        starts = ends[seg] - (ends - np.concatenate([[0], ends[:-1]]))[seg]
        return shard[seg], seqs[seg], g - starts

    def sample_batch(self, rng: np.random.Generator | None = None, worker: int = -1) -> Batch:
        """Fetch and decode one batch on the calling thread."""
        rng = rng or self._rng
        if time.monotonic() - self._last_refresh >= self.index_refresh_s or self.size == 0:
            self.refresh_index(worker)
        b = self.batch_size
        frames = np.empty((b, STACK + 1, *FRAME_SHAPE), dtype=np.uint8)
        vector = np.empty((b, VECTOR_DIM), np.float32)
        next_vector = np.empty((b, VECTOR_DIM), np.float32)
        action = np.empty((b, ACTION_DIM), np.float32)
        reward = np.empty(b, np.float32)
        terminated = np.empty(b, np.float32)
        version = np.empty(b, np.int64)
        todo = np.arange(b)
        for _attempt in range(8):
            if len(todo) == 0:
                break
            shards, seqs, steps = self.sample_locations(len(todo), rng)
            failed: list[int] = []
            for s in np.unique(shards):
                rows = np.flatnonzero(shards == s)
                replies = self._client(int(s), worker).fetch(seqs[rows].tolist(), steps[rows].tolist())
                for row, reply in zip(rows, replies, strict=True):
                    slot = int(todo[row])
                    if not isinstance(reply, list):
                        if reply == 0:
                            self.missing_total += 1
                        else:
                            self.corrupt_total += 1
                        failed.append(slot)
                        continue
                    try:
                        recs = decode_transition_parts(int(reply[0]), reply[1], reply[2], reply[3], frames[slot])
                    except CorruptSegmentError as exc:
                        self.corrupt_total += 1
                        log.warning("skipping corrupt replay value in shard %d seq %d: %s", s, seqs[row], exc)
                        failed.append(slot)
                        continue
                    vector[slot] = recs["vector"][0]
                    next_vector[slot] = recs["vector"][1]
                    action[slot] = recs["action"][0]
                    reward[slot] = recs["reward"][0]
                    terminated[slot] = float(recs["flags"][0] & TERMINATED)
                    version[slot] = recs["version"][0]
            todo = np.array(failed, dtype=np.int64)
            if len(todo):
                self.refresh_index(worker)
        if len(todo):
            raise SampleError(f"{len(todo)} of {b} transitions could not be fetched after 8 attempts")
        self.sampled_total += b
        obs = np.ascontiguousarray(frames[:, :STACK])
        nxt = np.ascontiguousarray(frames[:, 1:])
        batch = Batch(
            image=torch.from_numpy(obs),
            vector=torch.from_numpy(vector),
            action=torch.from_numpy(action),
            reward=torch.from_numpy(reward),
            next_image=torch.from_numpy(nxt),
            next_vector=torch.from_numpy(next_vector),
            terminated=torch.from_numpy(terminated),
            policy_version=torch.from_numpy(version),
        )
        assert batch.image.shape[1:] == IMAGE_SHAPE
        return batch.pin_memory() if self.pin_memory else batch

    def _worker(self, worker: int) -> None:
        rng = np.random.default_rng([self._seed, worker + 1])
        while not self._stop.is_set():
            try:
                if self.size < self.min_size:
                    self.refresh_index(worker)
                    if self.size < self.min_size:
                        self._stop.wait(0.05)
                        continue
                batch = self.sample_batch(rng, worker)
            except Exception as exc:  # hand the failure to the consumer instead of dying silently
                log.exception("replay sampler thread %d failed", worker)
                self._put(exc)
                return
            self._put(batch, worker)

    def _put(self, item: Batch | BaseException, worker: int = -1) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                # Keep the size the learner sees current while the queue is full.
                if time.monotonic() - self._last_refresh >= self.index_refresh_s:
                    self.refresh_index(worker)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self._threads:
            if self.size < self.min_size:
                self.refresh_index()
            if self.size < self.min_size:
                raise SampleError(f"replay holds {self.size} transitions, fewer than min_size={self.min_size}")
            return self.sample_batch()
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds_total += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise SampleError(f"replay sampler failed: {item}") from item
        return item

    def metrics(self) -> dict[str, float]:
        return {
            "replay_sampler/size": self.size,
            "replay_sampler/sampled_transitions_total": self.sampled_total,
            "replay_sampler/corrupt_total": self.corrupt_total,
            "replay_sampler/missing_total": self.missing_total,
            "replay_sampler/wait_seconds_total": self.wait_seconds_total,
            "replay_sampler/ready_batches": self._queue.qsize(),
        }

    def close(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(timeout=5)
        for clients in self._clients.values():
            for c in clients:
                c.close()

    def __enter__(self) -> ReplaySampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
