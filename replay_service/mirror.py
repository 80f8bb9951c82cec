"""The learner's resident replay mirror: every stored segment pulled once, decoded once, kept in
learner memory; a batch is a gather from there.

Byte-range sampling (``replay.mirror=off``) fetches and decodes 5 frames per sampled transition
on every batch: ~14-28k transitions/s on two cores, a tenth of what a GPU learner eats. Here
the index refresh (index.py) hands every NEW segment of a shard to :meth:`ResidentMirror.load`,
which GETs the whole value once, decodes all its frames in one zstd stream call
(codec.decode_units) and writes frames and step records into a :class:`UnitRing` on the
learner's GPU (``device``) or in host memory (``host``). The segment's unit table in the index
(``Mirror.tab``) then holds ring slots instead of byte offsets, so a batch is the index's
uniform :meth:`Snapshot.draw` plus one ``index_select`` of frames and one of records: no Redis
round trip, no decode per sample. The shards stay the store: collectors write there, eviction
follows them (a segment the index drops is no longer referenced and its slots are reused), a
lost or restarted shard's part empties with its index mirror, and a restarted learner refills
from them. Corrupt values are reported through the refresher's ``on_corrupt`` and never
written to the ring.

Slots are per unit (frame ``i`` and record ``i`` of a segment share one), taken from a free
list, so shards that evict at different times never fragment the ring. The ring holds
``capacity * (1 + 8 / segment_length)`` units (:func:`mirror_units`): T + 4 frames per
segment of T steps, with room for segments of half the full length on average (episodes end
mid-segment). A segment that finds no room is skipped and counted (``mirror_full_total``).

The module runs past 400 lines (a third of them this description) because the ring and the
mirror that loads into it and gathers from it follow one set of slot and locking rules, below;
split apart, those rules would span two modules.

Locking rules:

* The ring's slot bookkeeping (free list, pending, retired, readers) is guarded by its
  condition ``UnitRing._cond``; it is held for bookkeeping only, never during a copy or I/O.
* Only the index refresher (under its lock, so one thread at a time) loads: it sweeps, takes
  slots, writes them, and :meth:`ResidentMirror.settle` ends a refresh. Slots taken by a
  refresh are *pending* until then: not yet in any index mirror, but not free either.
* The sweep frees the slots no index mirror references. A freed slot is *retired* with the
  ring's generation; it is reused only once every gather that entered at that generation or
  before has left (:meth:`UnitRing.reading`), because such a gather may hold a snapshot that
  still draws the evicted segment. A gather takes its snapshot after entering, so it can
  never see a slot freed before it entered. Gathers therefore run without a lock, in
  parallel, and a write never lands in a slot a gather may read. On a GPU every copy and
  gather goes to the device's default stream in the order these rules put them in.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from common.config import ConfigError
from common.schema import ACTION_DIM, FRAME_SHAPE, STACK, VECTOR_DIM, Batch
from replay_service.codec import (
    FRAME_BYTES,
    SPAN,
    TERMINATED,
    TRUNCATED,
    CorruptSegmentError,
    decode_units,
)
from replay_service.errors import SampleError
from replay_service.index import Loaded, ShardIndex, Snapshot
from replay_service.shards import ShardClient
from replay_service.window import nstep_window, window_steps

log = logging.getLogger(__name__)

MODES = ("auto", "device", "host", "off")
# Float columns of a unit's record in the ring: vector, action, reward, terminated, truncated.
_V, _A = slice(0, VECTOR_DIM), slice(VECTOR_DIM, VECTOR_DIM + ACTION_DIM)
_R, _TERM, _TRUNC = VECTOR_DIM + ACTION_DIM, VECTOR_DIM + ACTION_DIM + 1, VECTOR_DIM + ACTION_DIM + 2
RECORD_FLOATS = VECTOR_DIM + ACTION_DIM + 3
UNIT_BYTES = FRAME_BYTES + RECORD_FLOATS * 4 + 8  # frame, float record, int64 policy version
_PULL_TRANSITIONS = 8192  # transitions per GET round trip while loading (bounds the reply bytes)
_RECLAIM_WAIT_S = 2.0


def resolve_mode(mode: str, gpu: bool) -> str:
    """``replay.mirror`` with ``auto`` decided: ``device`` on a GPU learner, else ``host``."""
    if mode not in MODES:
        raise ConfigError(f"replay.mirror={mode!r}: allowed: {', '.join(MODES)}")
    if mode == "auto":
        return "device" if gpu else "host"
    return mode


def mirror_units(capacity: int, segment_length: int) -> int:
    """Ring slots for ``capacity`` transitions in segments of up to ``segment_length`` steps."""
    return capacity + math.ceil(capacity * 2 * STACK / max(1, segment_length))


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (free plus reclaimable cache), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(mode: str, capacity: int, segment_length: int, device: torch.device) -> int:
    """Refuse to start a mirror that does not fit (90 % of what is free); returns its bytes."""
    need = mirror_units(capacity, segment_length) * UNIT_BYTES
    if mode == "device":
        free, where = torch.cuda.mem_get_info(device)[0], f"GPU memory on {device}"
    else:
        free, where = host_available_bytes(), "host memory"
    if need > 0.9 * free:
        raise ConfigError(
            f"replay.capacity={capacity} with replay.mirror={mode} needs {need / 2**30:.2f} GiB of {where} "
            f"for the resident mirror (~{UNIT_BYTES} bytes x capacity x (1 + 8/collector.segment_length)), "
            f"but only {free / 2**30:.2f} GiB is free: lower replay.capacity, use replay.mirror=host "
            "(GPU short) or replay.mirror=off (byte-range sampling, no resident copy)"
        )
    return need


class UnitRing:
    """Frames and step records of mirrored segments, one slot per unit; see the module docstring."""

    def __init__(self, units: int, device: torch.device) -> None:
        self.units = units
        self.device = device
        self.frames = torch.empty((units, *FRAME_SHAPE), dtype=torch.uint8, device=device)
        self.floats = torch.empty((units, RECORD_FLOATS), dtype=torch.float32, device=device)
        self.version = torch.empty(units, dtype=torch.int64, device=device)
        self._cond = threading.Condition()
        self._free = np.arange(units, dtype=np.int64)[::-1].copy()  # a stack: pop from the end
        self._nfree = units
        self._pending = np.zeros(units, bool)
        self._retired: list[tuple[int, np.ndarray]] = []
        self._readers: Counter[int] = Counter()
        self._gen = 0

    @property
    def used(self) -> int:
        with self._cond:
            return self.units - self._nfree - sum(len(s) for _, s in self._retired)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while gathering from a snapshot taken inside: its slots stay unreused."""
        with self._cond:
            gen = self._gen
            self._readers[gen] += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[gen] -= 1
                if not self._readers[gen]:
                    del self._readers[gen]
                self._cond.notify_all()

    def sweep(self, referenced: np.ndarray) -> None:
        """Retire every taken slot that is neither ``referenced`` nor pending."""
        with self._cond:
            taken = np.ones(self.units, bool)
            taken[self._free[: self._nfree]] = False
            for _, slots in self._retired:
                taken[slots] = False
            taken[referenced] = False
            taken &= ~self._pending
            gone = np.flatnonzero(taken)
            if len(gone):
                self._retired.append((self._gen, gone))
                self._gen += 1

    def take(self, n: int) -> np.ndarray | None:
        """``n`` free slots, pending until :meth:`settle`; None when the ring is full."""
        deadline = time.monotonic() + _RECLAIM_WAIT_S
        with self._cond:
            while True:
                self._reclaim()
                if self._nfree >= n:
                    self._nfree -= n
                    slots = self._free[self._nfree : self._nfree + n][::-1].copy()
                    self._pending[slots] = True
                    return slots
                left = deadline - time.monotonic()
                if not self._retired or left <= 0:
                    return None
                self._cond.wait(left)  # gathers holding retired slots end within milliseconds

    def _reclaim(self) -> None:
        oldest = min(self._readers) if self._readers else self._gen
        keep = []
        for gen, slots in self._retired:
            if gen < oldest:
                self._free[self._nfree : self._nfree + len(slots)] = slots
                self._nfree += len(slots)
            else:
                keep.append((gen, slots))
        self._retired = keep

    def settle(self) -> None:
        with self._cond:
            self._pending[:] = False

    def untake(self, slots: np.ndarray) -> None:
        """Give back slots taken but never written (pending, so in no snapshot)."""
        with self._cond:
            self._pending[slots] = False
            self._free[self._nfree : self._nfree + len(slots)] = slots[::-1]
            self._nfree += len(slots)

    def run(self, slots: np.ndarray) -> np.ndarray | None:
        """The host frames of ``slots`` as one writable array when they are consecutive, else None."""
        if self.device.type != "cpu" or int(slots[-1]) - int(slots[0]) != len(slots) - 1:
            return None
        if len(slots) > 1 and (np.diff(slots) != 1).any():
            return None
        return self.frames[int(slots[0]) : int(slots[-1]) + 1].numpy()

    def write_frames(self, slots: np.ndarray, frames: np.ndarray) -> None:
        """Frames (n, 84, 84) into ``slots`` (taken, so no gather reads them)."""
        idx = torch.from_numpy(slots).to(self.device)
        self.frames.index_copy_(0, idx, torch.from_numpy(frames).to(self.device))

    def write_records(self, slots: np.ndarray, records: np.ndarray) -> None:
        """Step records (n,) into ``slots`` (taken, so no gather reads them)."""
        floats = np.empty((len(records), RECORD_FLOATS), np.float32)
        floats[:, _V] = records["vector"]
        floats[:, _A] = records["action"]
        floats[:, _R] = records["reward"]
        floats[:, _TERM] = (records["flags"] & TERMINATED) != 0
        floats[:, _TRUNC] = (records["flags"] & TRUNCATED) != 0
        idx = torch.from_numpy(slots).to(self.device)
        self.floats.index_copy_(0, idx, torch.from_numpy(floats).to(self.device))
        self.version.index_copy_(0, idx, torch.from_numpy(records["version"].astype(np.int64)).to(self.device))


def window(snap: Snapshot, seg: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ring slots of what transitions ``(seg, t)`` read: frames t..t+4 and records t, t+1.

    The one place that decides which units a sample reads. An n-step window goes here:
    records t..t+n cut at the segment's end (``np.minimum(t + k, T)`` with T =
    ``snap.ends[seg] - snap.starts[seg]``) and next frames t+n..t+n+3 from the same table.
    """
    base = snap.tab_base[seg] + t
    frame_slots = snap.tab[base[:, None] + np.arange(SPAN)]
    return frame_slots, frame_slots[:, :2]


class ResidentMirror:
    """The ring plus what loads it (the index refresher's loader) and what samples it."""

    def __init__(
        self,
        index: ShardIndex,
        units: int,
        device: torch.device,
        pin_memory: bool,
        n_step: int = 1,
        gamma: float = 0.99,
        frames: bool = True,
    ) -> None:
        self.index = index
        self.n_step, self.gamma = n_step, gamma
        # False for a vector-only learner (learner.encoder=none): its batches carry a 1x1
        # placeholder image instead of 8 gathered frames (14 MB per batch of 256 it never reads).
        self.frames = frames
        self.ring = UnitRing(units, device)
        self.pin_memory = pin_memory and device.type == "cpu"
        self.full_total = 0  # segments skipped for lack of room
        self.loaded_total = 0
        self.pulled_bytes_total = 0
        self._full_logged = -1e9

    # ----- loading (the refresher's thread, under its lock) -------------------------------

    def load(
        self,
        shard: int,
        client: ShardClient,
        epoch: str,
        live: Sequence[tuple[int, int]],
        on_corrupt: Callable[[int, int, CorruptSegmentError], None],
    ) -> Loaded:
        """Pull, decode and write the new segments ``live`` ((seq, T) ascending) of ``shard``;
        returns (seqs, lengths, uoffs, codecs, tables) of those now in the ring, tables being
        their units' slots. Raises what the client raises when the shard fails."""
        self.ring.sweep(np.concatenate([m.tab for m in self.index.mirrors]))
        out: Loaded = ([], [], [], [], [])
        start = 0
        while start < len(live):
            stop, total = start, 0
            while stop < len(live) and (stop == start or total + live[stop][1] <= _PULL_TRANSITIONS):
                total += live[stop][1]
                stop += 1
            chunk = live[start:stop]
            values = client.values(epoch, [s for s, _ in chunk])
            self._write_chunk(shard, chunk, values, on_corrupt, out)
            start = stop
        return out

    def _write_chunk(
        self,
        shard: int,
        chunk: Sequence[tuple[int, int]],
        values: Sequence[Any],
        on_corrupt: Callable[[int, int, CorruptSegmentError], None],
        out: Loaded,
    ) -> None:
        # Frames decode straight into the ring where their slots are one run of host memory (a
        # fresh ring, or room freed in order), else into ``staged`` and are copied in at the end.
        staged = np.empty((sum(n + STACK for _, n in chunk), *FRAME_SHAPE), np.uint8)
        staged_slots: list[np.ndarray] = []
        records: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        row = 0
        for (seq, n), value in zip(chunk, values, strict=True):
            if value is None or value == b"":
                continue  # evicted since the lengths were read
            taken = self.ring.take(n + STACK)
            if taken is None:
                self._full(shard, seq)
                continue
            direct = self.ring.run(taken)
            try:
                if not isinstance(value, bytes):
                    raise CorruptSegmentError(f"GET answered {value!r:.100}")
                recs = decode_units(value, staged[row : row + n + STACK] if direct is None else direct)
                if len(recs) != n + STACK:
                    raise CorruptSegmentError(f"value holds {len(recs) - STACK} transitions, the index says {n}")
            except CorruptSegmentError as exc:
                self.ring.untake(taken)  # pending, never in a snapshot: free again at once
                on_corrupt(shard, seq, exc)
                continue
            if direct is None:
                staged_slots.append(taken)
                row += n + STACK
            records.append(recs)
            slots.append(taken)
            self.pulled_bytes_total += len(value)
            seqs, lengths, uoffs, codecs, tables = out
            seqs.append(seq)
            lengths.append(n)
            uoffs.append(0)  # no byte offsets: the table holds ring slots
            codecs.append(0)
            tables.append(taken)
        if staged_slots:
            self.ring.write_frames(np.concatenate(staged_slots), staged[:row])
        if slots:
            self.ring.write_records(np.concatenate(slots), np.concatenate(records))
            self.loaded_total += len(slots)

    def _full(self, shard: int, seq: int) -> None:
        self.full_total += 1
        if time.monotonic() - self._full_logged >= 60.0:
            self._full_logged = time.monotonic()
            log.warning(
                "replay mirror full (%d units): segment %d of shard %d skipped (%d so far); segments are "
                "shorter than collector.segment_length / 2 on average: raise replay.capacity",
                self.ring.units,
                seq,
                shard,
                self.full_total,
            )

    def settle(self) -> None:
        """A refresh committed (or gave up on) what it loaded: pending slots become ordinary."""
        self.ring.settle()

    # ----- sampling (any thread, no lock held while copying) ------------------------------

    def sample(self, n: int, rng: np.random.Generator) -> tuple[Batch, np.ndarray]:
        """``n`` transitions uniform over the stored ones: (the batch, each one's shard)."""
        ring = self.ring
        with ring.reading():
            snap = self.index.snapshot
            if snap.total == 0:
                raise SampleError("replay is empty (or every shard is unreachable)")
            seg, t = snap.draw(n, rng)
            if self.n_step > 1:
                return self._nstep_batch(snap, seg, t), snap.shard[seg]
            frame_slots, record_slots = window(snap, seg, t)
            ridx = torch.from_numpy(record_slots.reshape(-1)).to(ring.device)
            frames = self._gather_frames(frame_slots) if self.frames else None
            floats = ring.floats.index_select(0, ridx).view(n, 2, RECORD_FLOATS)
            version = ring.version.index_select(0, ridx.view(n, 2)[:, 0].contiguous())
        small = {
            "vector": floats[:, 0, _V],
            "action": floats[:, 0, _A],
            "reward": floats[:, 0, _R],
            "next_vector": floats[:, 1, _V],
            "terminated": floats[:, 0, _TERM],
            "policy_version": version,
        }
        tensors = {k: v.contiguous() for k, v in small.items()}
        if self.pin_memory:
            tensors = {k: v.pin_memory() for k, v in tensors.items()}
        if frames is None:
            blank = self._blank(n)
            return Batch(image=blank, next_image=blank, **tensors), snap.shard[seg]
        return Batch.from_frames(frames.view(n, SPAN, *FRAME_SHAPE), **tensors), snap.shard[seg]

    def _gather_frames(self, slots: np.ndarray) -> torch.Tensor:
        """The ring's frames at ``slots`` (any shape), flat; on the CPU straight into the
        (pinned) batch buffer."""
        ring = self.ring
        fidx = torch.from_numpy(slots.reshape(-1)).to(ring.device)
        if ring.device.type != "cpu":
            return ring.frames.index_select(0, fidx)
        out = torch.empty((len(fidx), *FRAME_SHAPE), dtype=torch.uint8, pin_memory=self.pin_memory)
        torch.index_select(ring.frames, 0, fidx, out=out)
        return out

    def _blank(self, n: int) -> torch.Tensor:
        """The placeholder image of a frameless batch: (n, 1, 1, 1) zeros on the ring's device."""
        return torch.zeros((n, 1, 1, 1), dtype=torch.uint8, device=self.ring.device)

    def _nstep_batch(self, snap: Snapshot, seg: np.ndarray, t: np.ndarray) -> Batch:
        """An n-step batch (replay_service/window.py): records t..t+k, the observation's frames
        t..t+3 and the next observation's t+k..t+k+3, k cut at the segment's end (or an end
        flag). Called inside ``ring.reading()``."""
        ring, b, n = self.ring, len(seg), self.n_step
        steps = window_steps(n, snap.ends[seg] - snap.starts[seg], t)
        base = snap.tab_base[seg] + t
        # Records t .. t+n, clipped at t+steps: entries past a window's end are read but unused.
        record_slots = snap.tab[base[:, None] + np.minimum(np.arange(n + 1)[None, :], steps[:, None])]
        ridx = torch.from_numpy(record_slots.reshape(-1)).to(ring.device)
        floats = ring.floats.index_select(0, ridx).view(b, n + 1, RECORD_FLOATS)
        host = floats[:, :n].cpu().numpy()
        flags = np.where(host[:, :, _TERM] > 0, TERMINATED, 0) | np.where(host[:, :, _TRUNC] > 0, TRUNCATED, 0)
        reward, discount, k = nstep_window(host[:, :, _R], flags.astype(np.uint8), steps, self.gamma)
        if self.frames:
            stack = np.arange(STACK)[None, :]
            slots = snap.tab[base[:, None] + np.concatenate([np.repeat(stack, b, 0), k[:, None] + stack], axis=1)]
            frames = self._gather_frames(slots).view(b, 2, STACK, *FRAME_SHAPE)
            image, next_image = frames[:, 0], frames[:, 1]
        else:
            image = next_image = self._blank(b)
        rows, kt = torch.arange(b, device=ring.device), torch.from_numpy(k).to(ring.device)
        small = {
            "vector": floats[:, 0, _V],
            "action": floats[:, 0, _A],
            "reward": torch.from_numpy(reward).to(ring.device),
            "next_vector": floats[rows, kt, _V],
            "terminated": floats[rows, kt - 1, _TERM],
            "policy_version": ring.version.index_select(0, ridx.view(b, n + 1)[:, 0].contiguous()),
            "discount": torch.from_numpy(discount).to(ring.device),
        }
        tensors = {name: v.contiguous() for name, v in small.items()}
        if self.pin_memory:
            tensors = {name: v.pin_memory() for name, v in tensors.items()}
        return Batch(image=image, next_image=next_image, **tensors)

    def metrics(self) -> dict[str, float]:
        used = self.ring.used
        return {
            "replay_sampler/mirror_units": self.ring.units,
            "replay_sampler/mirror_units_used": used,
            "replay_sampler/mirror_bytes": self.ring.units * UNIT_BYTES,
            "replay_sampler/mirror_segments_loaded_total": self.loaded_total,
            "replay_sampler/mirror_pulled_bytes_total": self.pulled_bytes_total,
            "replay_sampler/mirror_full_total": self.full_total,
        }
