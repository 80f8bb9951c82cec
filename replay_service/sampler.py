"""The learner's end of replay: an iterator of uniform random batches.

Uniform over every stored transition: each shard's live segments (seq, length, and the
segment's unit offset table, read once per segment) are mirrored locally and refreshed
incrementally; a batch draws global transition indices uniformly over the concatenation of
all shards' segments, so a shard is drawn in proportion to its transition count and a segment
in proportion to its length, exactly (Ape-X and Reverb's uniform selector make the same
promise per table). Each shard then gets one pipelined round trip per batch holding one
GETRANGE per transition, for exactly the bytes that transition needs (codec.py), plus the
shard's counters. Decoding (one zstd stream call per batch, which releases the GIL) runs on
background threads into a bounded queue of ready batches.

Failure handling: a shard that errors is skipped (its mirror dropped: its data is gone for
now) and retried with backoff; an epoch change means it restarted empty and its mirror starts
over. A transition whose bytes are missing (evicted after the mirror saw it) or corrupt is
counted and redrawn, so the batch stays uniform over what is readable.

With ``mirror`` set to ``device`` or ``host`` none of that runs per batch: a batch is a gather
from the learner's resident copy of everything stored (mirror.py), which the refresh loads.

Threads: the mirrors and the snapshot live in index.py (one lock, no I/O under it). The index
clients belong to the :class:`IndexRefresher` and are used only under its lock (refreshes, and
the rate limiter's counter poll when no refresh runs); each worker thread has its own clients
for fetches. ``_lock`` guards the per-shard counters and the rate limiter's reservations.

This module is over 400 lines on purpose: what is left here (the rate-limited fetch, its
redraws and bad-data accounting, the worker threads and the metrics) all reads and writes the
counters under ``_lock``; split apart, that one lock's rules would span several modules.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np
import torch

from common.schema import FRAME_SHAPE, STACK, Batch
from replay_service.codec import RECORD_DTYPE, TERMINATED, CorruptSegmentError, decode_batch
from replay_service.counters import LogOnce, ShardCounters, shard_metrics
from replay_service.errors import SampleError, ShardAuthError, ShardUnavailable
from replay_service.index import IndexRefresher, ShardIndex, Snapshot
from replay_service.metric_keys import SIZE, WAIT_SECONDS_TOTAL
from replay_service.mirror import ResidentMirror, check_memory, mirror_units, resolve_mode
from replay_service.ratelimit import SampleToInsertRatio, poll_counters
from replay_service.shards import ShardClient, ShardHealth, ShardStats, check_shards_at_start
from replay_service.table import GONE, ShardTable, TableFollower
from replay_service.window import nstep_window, window_steps

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 8


class ReplaySampler:
    """Uniform batches from all shards; ``next(sampler)`` returns a :class:`Batch`.

    With ``prefetch=0`` every batch is sampled on the caller's thread (a CPU learner with the
    resident mirror: see :meth:`next_batch`; tests); otherwise ``threads`` background threads
    keep up to ``prefetch`` batches ready. Call :meth:`close` (or use as a context manager) to
    stop them.

    ``min_size`` transitions must be stored before the first batch (Reverb's
    min_size_to_sample: early batches would repeat the first few segments). With
    ``samples_per_insert > 0`` a batch waits until the collectors have inserted enough
    (ratelimit.py); the time spent is reported as ``replay_sampler/rate_limit_wait_seconds_total``.

    ``mirror``: ``off`` (byte ranges per batch), ``host``, ``device`` (a resident copy of
    ``capacity`` transitions in segments of up to ``segment_length`` steps, on ``device``) or
    ``auto`` (``device`` when ``device`` is a GPU); refused at start when it does not fit.
    With ``n_step > 1`` each transition is an n-step window (replay_service/window.py): its
    reward is the discounted sum, ``discount`` the bootstrap discount, ``next_*`` the
    observation after the window; one GETRANGE still fetches all of it (codec.py).
    ``frames=False`` (a vector-only learner) makes the mirror's batches carry a (B, 1, 1, 1)
    placeholder image instead of gathering frames; byte-range sampling decodes them anyway.
    ``bulk``: batches the resident mirror draws in one gather, handed out one at a time. For
    frameless batches the per-draw Python work dominates (0.35 ms of a 256-batch, 0.10 ms each
    in draws of 8, measured on a 2-core CPU), and it takes the GIL from the learner's update;
    a drawn batch may then be up to ``bulk - 1`` batches older than the newest inserts.
    """

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        password: str = "",
        prefetch: int = 4,
        threads: int = 2,
        index_refresh_s: float = 0.25,
        seed: int = 0,
        pin_memory: bool = False,
        min_size: int = 1,
        *,
        samples_per_insert: float = 0.0,
        spi_tolerance: float = 65_536.0,
        rate_limit_poll_s: float = 0.01,
        timeout: float = 5.0,
        mirror: str = "off",
        capacity: int = 0,
        segment_length: int = 64,
        device: str = "cpu",
        shard_table: ShardTable | None = None,
        table_poll_s: float = 1.0,
        n_step: int = 1,
        gamma: float = 0.99,
        frames: bool = True,
        bulk: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        if n_step < 1:
            raise ValueError(f"n_step={n_step!r}: must be >= 1")
        self.n_step, self.gamma = n_step, gamma
        self._unit_offs = np.arange(n_step + STACK + 1)  # table entries one full window reads
        # Shards replaced at a new address are followed (table.py); a gone one keeps its last URL, unused.
        self._table = TableFollower(urls, shard_table, table_poll_s)
        current = self._table.current() if self._table.enabled else list(urls)
        self.urls = [u or old for u, old in zip(current, urls, strict=True)]
        self.batch_size = batch_size
        self.password = password
        self.timeout = timeout
        # Pinned host memory only helps (and only exists) with CUDA.
        self.pin_memory = bool(pin_memory and torch.cuda.is_available())
        self.min_size = max(1, min_size)
        self.limiter = SampleToInsertRatio(samples_per_insert, self.min_size, spi_tolerance)
        self.limiter.check_batch(batch_size)
        # A draw of bulk batches reserves them all at once: it must fit the limiter's window
        # (2 * tolerance) or the learner and the writers could wait for each other.
        self.bulk = max(1, bulk if not self.limiter.enabled else min(bulk, int(2 * spi_tolerance // batch_size)))
        self._drawn: collections.deque[Batch] = collections.deque()
        self.rate_limit_poll_s = rate_limit_poll_s
        self._seed = seed
        self._health = [ShardHealth(i, u, "replay sampler") for i, u in enumerate(self.urls)]
        for h, u in zip(self._health, current, strict=True):
            if u == GONE:
                h.retire()
        self._clients: dict[int, list[ShardClient]] = {}  # per worker thread, used only by it
        self._index = ShardIndex(len(self.urls))
        self._counters = [ShardCounters() for _ in self.urls]
        self._lock = threading.Lock()  # counters
        dev = torch.device(device)
        self.mirror = resolve_mode(mirror, dev.type == "cuda")
        self._resident: ResidentMirror | None = None
        if self.mirror != "off":
            if capacity < 1:
                raise ValueError(f"capacity={capacity!r}: the resident mirror is sized by replay.capacity (>= 1)")
            dev = dev if self.mirror == "device" else torch.device("cpu")
            check_memory(self.mirror, capacity, segment_length, dev)
            units = mirror_units(capacity, segment_length)
            self._resident = ResidentMirror(self._index, units, dev, self.pin_memory, n_step, gamma, frames)
        self._reported_at = 0.0  # when the mirror's samples last went to the shards
        # The index clients: used only under the refresher's lock (one RESP connection each, and
        # resetting one closes the socket under whoever is reading it).
        self._refresher = IndexRefresher(
            self._index,
            [ShardClient(u, password, timeout) for u in self.urls],
            self._health,
            index_refresh_s,
            on_stats=self._update_stats,
            on_restart=self._shard_restarted,
            on_corrupt=self._corrupt_index,
            loader=self._resident,
        )
        self._reserved = 0  # transitions of batches in flight (rate limiter)
        self._rng = np.random.default_rng(seed)
        self._bad_log = LogOnce()
        self.wait_seconds_total = 0.0
        self.rate_limit_wait_seconds_total = 0.0
        self._check_start()
        self._stop = threading.Event()
        self._queue: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=max(1, prefetch))
        self._threads: list[threading.Thread] = []
        if prefetch > 0:
            for i in range(max(1, threads)):
                th = threading.Thread(target=self._worker, args=(i,), name=f"replay-sampler-{i}", daemon=True)
                th.start()
                self._threads.append(th)

    def _check_start(self) -> None:
        try:
            check_shards_at_start(self._refresher.clients, self._health)
        except (ShardAuthError, ShardUnavailable):
            self._close_clients()
            raise

    # ----- index -------------------------------------------------------------------------

    def _client(self, shard: int, worker: int) -> ShardClient:
        per_worker = self._clients.get(worker)
        if per_worker is None:
            per_worker = self._clients[worker] = [ShardClient(u, self.password, self.timeout) for u in self.urls]
        if per_worker[shard].url != self.urls[shard]:  # the shard moved (only this worker uses these)
            per_worker[shard].close()
            per_worker[shard] = ShardClient(self.urls[shard], self.password, self.timeout)
        return per_worker[shard]

    def _follow_table(self) -> None:
        """Switch to the shards' new addresses, if any moved (see table.py): under the
        refresher's lock (its clients), with the moved shard's mirror and counters dropped."""
        changes = self._table.changes()
        if not changes:
            return
        with self._refresher.lock:
            for i, url in changes.items():
                if url == GONE:
                    self._health[i].retire()
                else:
                    old, self._refresher.clients[i] = (
                        self._refresher.clients[i],
                        ShardClient(url, self.password, self.timeout),
                    )
                    old.close()
                    self.urls[i] = url
                    self._health[i].moved(url)
                self._index.drop(i)
                with self._lock:
                    self._counters[i].stats = ShardStats()
                    self._counters[i].unreported = 0  # samples of the old server, which is gone

    def refresh_index(self) -> int:
        """Bring the local mirror up to date; returns the total transitions stored."""
        self._follow_table()
        self._refresher.refresh()
        return self._stored

    def _shard_lost(self, i: int, exc: BaseException) -> None:
        self._refresher.lost(i, exc)

    def _shard_restarted(self, i: int, stats: ShardStats) -> None:
        with self._lock:
            self._counters[i].restarts_total += 1
        log.warning(
            "replay shard %d restarted empty (epoch %s, next seq %d); its mirror starts over",
            i,
            stats.epoch,
            stats.next,
        )

    def _corrupt_index(self, i: int, seq: int, exc: CorruptSegmentError) -> None:
        with self._lock:
            self._counters[i].corrupt_total += 1
            count = self._counters[i].corrupt_total
        self._bad_log.warn(i, "corrupt segment index", count, f"seq {seq}: {exc}")

    def _update_stats(self, i: int, stats: ShardStats) -> None:
        with self._lock:
            c = self._counters[i]
            c.stats = stats

    @property
    def index_refresh_s(self) -> float:
        return self._refresher.interval_s

    @property
    def size(self) -> int:
        """Transitions stored, as of the last index refresh. Without sampler threads nothing
        else refreshes the index while the learner waits for replay to fill (it asks for the
        size, not a batch, until then), so asking refreshes it when due."""
        if not self._threads:
            self._follow_table()
            self._refresher.maybe_refresh()
        return self._stored

    @property
    def _stored(self) -> int:
        return self._index.snapshot.total

    # ----- sampling ----------------------------------------------------------------------

    @staticmethod
    def _draw(snap: Snapshot, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if snap.total == 0:
            raise SampleError("replay is empty (or every shard is unreachable)")
        return snap.draw(n, rng)

    def _rate_totals(self) -> tuple[int, int]:
        live = [c for c, h in zip(self._counters, self._health, strict=True) if h.up]
        inserted = sum(c.stats.inserted_total for c in live)
        sampled = sum(c.stats.sampled_total + c.unreported for c in live) + self._reserved
        return inserted, sampled

    def _acquire(self, n: int, deadline: float | None = None) -> bool:
        """Reserve ``n`` samples under the rate limiter; False when stopping or, with a
        ``deadline`` (time.monotonic()), once it has passed."""
        if not self.limiter.enabled:
            return True
        start = time.perf_counter()
        waited = False
        while True:
            with self._lock:
                if self.limiter.can_sample(*self._rate_totals(), n):
                    self._reserved += n
                    if waited:
                        self.rate_limit_wait_seconds_total += time.perf_counter() - start
                    return True
            waited = True
            if (deadline is not None and time.monotonic() >= deadline) or self._stop.wait(self.rate_limit_poll_s):
                return False
            self._refresh_counters()

    def _refresh_counters(self) -> None:
        """Poll the shards' counters for the rate limiter on the index clients, so only when no
        refresh is using them: resetting a client here would close the socket a refresh is
        reading from, and a healthy shard would be dropped. A refresh running now updates the
        counters itself. From the mirror, the samples not yet reported go first: the writers may
        be waiting for them while this side waits for inserts."""

        def poll(clients: Sequence[ShardClient]) -> None:
            if self._resident is not None:
                self._report_sampled(clients)
            poll_counters(clients, self._health, self._counters_polled, self._shard_lost)

        self._refresher.try_with_clients(poll)

    def _counters_polled(self, i: int, stats: ShardStats) -> None:
        if stats.epoch != self._index.mirror(i).epoch:
            self._refresher.expire()  # restarted: the next batch refreshes the mirror
        self._update_stats(i, stats)

    def sample_batch(self, rng: np.random.Generator | None = None, worker: int = -1) -> Batch:
        """Fetch and decode one batch on the calling thread."""
        batch = self._sample(rng or self._rng, worker)
        assert batch is not None  # only a deadline makes _sample return None
        return batch

    def _sample(self, rng: np.random.Generator, worker: int, deadline: float | None = None) -> Batch | None:
        """One batch, or None when the rate limiter holds it back past ``deadline``."""
        try:
            return self._drawn.popleft()
        except IndexError:
            pass
        self._follow_table()
        self._refresher.maybe_refresh()
        if self._stored == 0:
            self.refresh_index()
        b = self.batch_size
        if not self._acquire(b * self.bulk if self._resident is not None else b, deadline):
            if self._stop.is_set():
                raise SampleError("sampler is closing")
            return None
        if self._resident is not None:
            first, *rest = self._sample_resident(b * self.bulk, rng).split(b)
            self._drawn.extend(rest)
            return first
        # Frames t..t+n+3 of each transition are decoded straight into this (pinned) tensor; for
        # n = 1 the observation and next-observation stacks are views of it, never copies.
        frames = torch.empty((b, self.n_step + STACK, *FRAME_SHAPE), dtype=torch.uint8, pin_memory=self.pin_memory)
        try:
            recs, steps = self._fetch(b, rng, worker, frames.numpy())
        finally:
            with self._lock:
                self._reserved -= b if self.limiter.enabled else 0
        if self.n_step > 1:
            return self._nstep_batch(frames, recs, steps)
        r0 = recs[:, 0]
        small = {
            "vector": np.ascontiguousarray(r0["vector"], np.float32),
            "action": np.ascontiguousarray(r0["action"], np.float32),
            "reward": np.ascontiguousarray(r0["reward"], np.float32),
            "next_vector": np.ascontiguousarray(recs[:, 1]["vector"], np.float32),
            "terminated": (r0["flags"] & TERMINATED).astype(np.float32),
            "policy_version": r0["version"].astype(np.int64),
        }
        tensors = {k: torch.from_numpy(v) for k, v in small.items()}
        if self.pin_memory:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        return Batch.from_frames(frames, **tensors)

    def _sample_resident(self, b: int, rng: np.random.Generator) -> Batch:
        try:
            batch, shard = self._resident.sample(b, rng)  # type: ignore[union-attr]
        finally:
            with self._lock:
                self._reserved -= b if self.limiter.enabled else 0
        with self._lock:
            for s, n in enumerate(np.bincount(shard, minlength=len(self.urls)).tolist()):
                self._counters[s].sampled_total += n
                self._counters[s].unreported += n
        if time.monotonic() - self._reported_at >= (self.rate_limit_poll_s if self.limiter.enabled else 0.25):
            self._reported_at = time.monotonic()
            self._refresher.try_with_clients(self._report_sampled)
        return batch

    def _report_sampled(self, clients: Sequence[ShardClient]) -> None:
        """Hand the shards the samples not reported yet (the writers' rate limiter reads them
        there); on the index clients, so only under the refresher's lock or after the threads."""
        for i, c in enumerate(self._counters):
            with self._lock:
                n, c.unreported = c.unreported, 0
            try:
                if n and self._health[i].up:
                    if clients[i].generation != self._health[i].generation:
                        clients[i].reset(self._health[i].generation)
                    clients[i].report_sampled(n)
                    with self._lock:
                        c.stats.sampled_total += n  # the shard's count now holds them
                    continue
            except (ShardUnavailable, ShardAuthError) as exc:
                self._shard_lost(i, exc)
            with self._lock:
                c.unreported += n

    def _nstep_batch(self, frames: torch.Tensor, recs: np.ndarray, steps: np.ndarray) -> Batch:
        """An n-step batch from each item's frames t..t+k+3 and records t..t+k."""
        n, rows = self.n_step, np.arange(len(steps))
        reward, discount, k = nstep_window(recs["reward"][:, :n], recs["flags"][:, :n], steps, self.gamma)
        small = {
            "vector": np.ascontiguousarray(recs[:, 0]["vector"], np.float32),
            "action": np.ascontiguousarray(recs[:, 0]["action"], np.float32),
            "reward": reward,
            "next_vector": np.ascontiguousarray(recs["vector"][rows, k], np.float32),
            "terminated": (recs["flags"][rows, k - 1] & TERMINATED).astype(np.float32),
            "policy_version": recs[:, 0]["version"].astype(np.int64),
            "discount": discount,
        }
        tensors = {name: torch.from_numpy(v) for name, v in small.items()}
        if self.pin_memory:
            tensors = {name: v.pin_memory() for name, v in tensors.items()}
        next_image = torch.empty((len(k), STACK, *FRAME_SHAPE), dtype=torch.uint8, pin_memory=self.pin_memory)
        # _fetch puts full windows first; a redrawn row may not be, so the prefix is measured.
        full = len(k) if (k == n).all() else int(np.argmin(k == n))
        src, dst = frames.numpy(), next_image.numpy()  # numpy copies these strided blocks far faster
        dst[:full] = src[:full, n : n + STACK]
        for r in range(full, len(k)):
            dst[r] = src[r, k[r] : k[r] + STACK]
        image = frames[:, :STACK]
        return Batch(image=image, next_image=next_image, **tensors)

    def _fetch(
        self, b: int, rng: np.random.Generator, worker: int, frames: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw, fetch and decode ``b`` transitions into ``frames`` (b, n+4, 84, 84); redraws
        the ones that fail; returns their records (b, n+1) and window steps k (b,) (for n = 1:
        frames t..t+4, records t and t+1, k = 1; a window cut by its segment's end leaves the
        entries past its k unused)."""
        recs = np.zeros((b, self.n_step + 1), RECORD_DTYPE)
        steps_out = np.ones(b, np.int64)
        todo = np.arange(b)
        for _attempt in range(_MAX_ATTEMPTS):
            snap = self._index.snapshot
            seg, t = self._draw(snap, len(todo), rng)
            shard = snap.shard[seg]
            steps = window_steps(self.n_step, snap.ends[seg] - snap.starts[seg], t)
            if len(todo) == b and self.n_step > 1:
                # Full windows first (draws are i.i.d., so the order is free): they decode
                # straight into the front of the batch; only the few cut ones are copied in.
                order = np.argsort(-steps, kind="stable")
                seg, t, steps = seg[order], t[order], steps[order]
            span = steps + STACK  # units t .. t+k+3
            # Table entries t .. t+k+4, padded with the last one (decode reads only its own).
            offs = snap.tab[(snap.tab_base[seg] + t)[:, None] + np.minimum(self._unit_offs, span[:, None])]
            starts = snap.uoff[seg] + offs[:, 0]
            stops = snap.uoff[seg] + offs[:, -1]
            replies: list[object] = [None] * len(todo)
            sent: list[tuple[int, np.ndarray, int, int]] = []
            for s in np.unique(shard).tolist():
                rows = np.flatnonzero(shard == s)
                with self._lock:
                    report, self._counters[s].unreported = self._counters[s].unreported, 0
                try:
                    client = self._client(s, worker)
                    if client.generation != self._health[s].generation:
                        client.reset(self._health[s].generation)
                    count = client.fetch_send(
                        snap.epochs[s],
                        snap.seqs[seg[rows]].tolist(),
                        starts[rows].tolist(),
                        stops[rows].tolist(),
                        report,
                    )
                    sent.append((s, rows, count, report))
                except (ShardUnavailable, ShardAuthError) as exc:
                    self._shard_lost(s, exc)
            for s, rows, count, report in sent:
                try:
                    got, stats = self._client(s, worker).fetch_recv(count, report)
                except (ShardUnavailable, ShardAuthError) as exc:
                    self._shard_lost(s, exc)
                    continue
                self._health[s].succeeded()
                self._update_stats(s, stats)
                for r, v in zip(rows.tolist(), got, strict=True):
                    replies[r] = v
            ok = np.zeros(len(todo), bool)
            for k in np.unique(steps).tolist():  # one decode per window length (n = 1: one)
                g = np.flatnonzero(steps == k)
                if len(todo) == b and k == self.n_step:  # first attempt: a prefix of the batch
                    m = len(g)
                    ok[:m] = decode_batch(snap.codec[seg[:m]], replies[:m], offs[:m], frames[:m], recs[:m])
                    continue
                f_out = np.empty((len(g), k + STACK, *FRAME_SHAPE), np.uint8)
                r_out = np.zeros((len(g), k + 1), RECORD_DTYPE)
                ok[g] = decode_batch(
                    snap.codec[seg[g]], [replies[i] for i in g], offs[g, : k + STACK + 1], f_out, r_out
                )
                frames[todo[g[ok[g]]], : k + STACK] = f_out[ok[g]]
                recs[todo[g[ok[g]]], : k + 1] = r_out[ok[g]]
            steps_out[todo[ok]] = steps[ok]
            self._count_outcomes(snap, shard, ok, replies, snap.seqs[seg])
            todo = todo[~ok]
            if len(todo) == 0:
                return recs, steps_out
            self.refresh_index()
            if self._stored == 0:
                break
        raise SampleError(f"{len(todo)} of {b} transitions could not be fetched after {_MAX_ATTEMPTS} attempts")

    def _count_outcomes(
        self, snap: Snapshot, shard: np.ndarray, ok: np.ndarray, replies: list[object], seqs: np.ndarray
    ) -> None:
        with self._lock:
            for s in np.unique(shard).tolist():
                rows = shard == s
                c = self._counters[s]
                good = int((rows & ok).sum())
                c.sampled_total += good
                c.unreported += good
        bad: dict[int, list[int]] = {}
        for r in np.flatnonzero(~ok).tolist():
            s = int(shard[r])
            reply = replies[r]
            if reply is None:
                continue  # the shard failed: counted as a loss already
            with self._lock:
                c = self._counters[s]
                if reply == b"":
                    c.missing_total += 1  # evicted since the mirror saw it: normal under FIFO
                    continue
                c.corrupt_total += 1
                count = c.corrupt_total
            bad.setdefault(s, []).append(int(seqs[r]))
            self._bad_log.warn(s, "corrupt transition", count, f"seq {int(seqs[r])}: {str(reply)[:80]!r}")
        for s, bad_seqs in bad.items():
            # Stop drawing from segments that returned corrupt bytes (length 0 in the mirror).
            self._index.quarantine(s, snap.epochs[s], bad_seqs)

    # ----- background threads ------------------------------------------------------------

    def _worker(self, worker: int) -> None:
        rng = np.random.default_rng([self._seed, worker + 1])
        while not self._stop.is_set():
            try:
                if self._stored < self.min_size:
                    self.refresh_index()
                    if self._stored < self.min_size:
                        self._stop.wait(0.05)
                        continue
                batch = self.sample_batch(rng, worker)
            except SampleError:
                # Every shard empty or gone for the moment: never the end of the run.
                self._stop.wait(0.05)
                continue
            except Exception as exc:  # a bug: hand it to the consumer instead of dying silently
                log.exception("replay sampler thread %d failed", worker)
                self._put(exc)
                return
            self._put(batch)

    def _put(self, item: Batch | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                # Keep the size and the metrics the learner sees current while the queue is full.
                self._refresher.maybe_refresh()

    def __iter__(self) -> Iterator[Batch]:
        return self

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next ready batch, or None if none is ready within ``timeout`` seconds (the rate
        limiter holds the learner back while collectors insert nothing, e.g. at the end of a
        run), so a caller can return instead of blocking forever; ``None`` waits as long as
        it takes.

        Without sampler threads the batch is sampled here and now: with ``timeout=None`` it
        raises :class:`SampleError` when replay holds fewer than ``min_size`` transitions or
        no shard can serve it; with a timeout, those and the rate limiter make it retry for up
        to ``timeout`` seconds and then return None, as the threads' queue would."""
        if not self._threads:
            if timeout is not None:
                return self._sample_within(timeout)
            if self._stored < self.min_size:
                self.refresh_index()
            if self._stored < self.min_size:
                raise SampleError(f"replay holds {self._stored} transitions, fewer than min_size={self.min_size}")
            return self.sample_batch()
        start = time.perf_counter()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            self.wait_seconds_total += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise SampleError(f"replay sampler failed: {item}") from item
        return item

    def _sample_within(self, timeout: float) -> Batch | None:
        """A batch sampled on this thread, or None after ``timeout`` seconds in which replay
        stayed below ``min_size``, no shard could serve one, or the rate limiter held it back.
        The sampling time counts as data wait: the learner is not updating meanwhile."""
        start, deadline = time.perf_counter(), time.monotonic() + timeout
        try:
            while not self._stop.is_set():
                try:
                    if self._stored < self.min_size:
                        self.refresh_index()
                    if self._stored >= self.min_size:
                        batch = self._sample(self._rng, -1, deadline)
                        if batch is not None:
                            return batch
                except SampleError:
                    pass  # every shard empty or gone for the moment, or closing: never the end of the run
                if time.monotonic() >= deadline or self._stop.wait(0.05):
                    break
            return None
        finally:
            self.wait_seconds_total += time.perf_counter() - start

    def __next__(self) -> Batch:
        # Without a timeout next_batch returns only once a batch is there.
        return cast(Batch, self.next_batch())

    # ----- reporting ---------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        with self._lock:
            counters = [c.copy() for c in self._counters]
        return {
            SIZE: self._stored,
            WAIT_SECONDS_TOTAL: self.wait_seconds_total,
            "replay_sampler/rate_limit_wait_seconds_total": self.rate_limit_wait_seconds_total,
            "replay_sampler/ready_batches": self._queue.qsize(),
            **shard_metrics(counters, self._health),
            **(self._resident.metrics() if self._resident is not None else {}),
        }

    def _close_clients(self) -> None:
        for c in self._refresher.clients:
            c.close()
        for clients in self._clients.values():
            for c in clients:
                c.close()

    def close(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
            for th in self._threads:
                th.join(timeout=5)
        self._report_sampled(self._refresher.clients)  # so that writers' limiters see them
        self._close_clients()

    def __enter__(self) -> ReplaySampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
