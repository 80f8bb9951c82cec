"""The sampler's index: a mirror of each shard's live segments, the snapshot a batch draws from,
and the refresher that brings the mirrors up to date from the shards.

The invariant this module keeps: a :class:`Snapshot` is built from one consistent set of mirrors.
Mirrors are immutable; :class:`ShardIndex` replaces them whole and builds snapshots only under
its lock, and nothing slow (no network) ever runs under it. A refresh reads a mirror, talks to
the shard without the lock, and commits its new mirror only if the shard's mirror is still the
one it read (compare-and-swap): a shard lost or quarantined meanwhile wins, and the refresh
simply reads again next time. Without that, a snapshot built while another thread replaced a
mirror paired one mirror's lengths with another's offsets, which raised IndexError in the
learner or quarantined healthy segments as corrupt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from replay_service.codec import CorruptSegmentError, parse_index
from replay_service.errors import ShardAuthError, ShardUnavailable
from replay_service.shards import ShardClient, ShardHealth, ShardStats


def _empty(dtype: type) -> np.ndarray:
    return np.zeros(0, dtype)


@dataclass(frozen=True)
class Mirror:
    """Local copy of one shard's live segments, oldest first: for each segment its seq, its
    transition count, where its units start, its codec and (in ``tab`` from ``tab_base``) its
    unit table: where unit ``i`` lives, as byte offsets in the value (T + 5 entries, byte-range
    sampling) or as slots of the learner's resident ring (T + 4 entries, mirror.py).
    ``next_seq`` is the last seq the shard had handed out when read."""

    epoch: str = ""
    seqs: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    lengths: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    uoff: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    codec: np.ndarray = field(default_factory=lambda: _empty(np.uint8))
    tab_base: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    tab: np.ndarray = field(default_factory=lambda: _empty(np.int64))
    next_seq: int = 0

    def without_before(self, head: int) -> Mirror:
        """The segments the shard has not evicted (those from seq ``head`` on)."""
        k = int(np.searchsorted(self.seqs, head, side="left"))
        if k == 0:
            return self
        cut = int(self.tab_base[k]) if k < len(self.seqs) else len(self.tab)
        return replace(
            self,
            seqs=self.seqs[k:],
            lengths=self.lengths[k:],
            uoff=self.uoff[k:],
            codec=self.codec[k:],
            tab_base=self.tab_base[k:] - cut,
            tab=self.tab[cut:],
        )

    def extended(
        self,
        next_seq: int,
        seqs: Sequence[int],
        lengths: Sequence[int],
        uoffs: Sequence[int],
        codecs: Sequence[int],
        tables: Sequence[np.ndarray],
    ) -> Mirror:
        """With newer segments appended (seqs ascending, above every seq already here)."""
        if not seqs:
            return replace(self, next_seq=max(self.next_seq, next_seq))
        base = len(self.tab) + np.concatenate([[0], np.cumsum([len(t) for t in tables])[:-1]])
        return Mirror(
            self.epoch,
            np.concatenate([self.seqs, np.asarray(seqs, np.int64)]),
            np.concatenate([self.lengths, np.asarray(lengths, np.int64)]),
            np.concatenate([self.uoff, np.asarray(uoffs, np.int64)]),
            np.concatenate([self.codec, np.asarray(codecs, np.uint8)]),
            np.concatenate([self.tab_base, base.astype(np.int64)]),
            np.concatenate([self.tab, *tables]),
            max(self.next_seq, next_seq),
        )

    def quarantined(self, seqs: Sequence[int]) -> Mirror:
        """With the given segments' lengths set to 0: never drawn again, offsets kept aligned."""
        hit = np.isin(self.seqs, np.asarray(seqs, np.int64))
        if not hit.any():
            return self
        return replace(self, lengths=np.where(hit, 0, self.lengths))


@dataclass(frozen=True)
class Snapshot:
    """Every shard's mirror concatenated: what one batch draws from (immutable, swapped whole)."""

    shard: np.ndarray
    seqs: np.ndarray
    starts: np.ndarray  # first global transition index of each segment
    ends: np.ndarray  # cumulative transition counts
    uoff: np.ndarray
    codec: np.ndarray
    tab_base: np.ndarray
    tab: np.ndarray
    epochs: tuple[str, ...]

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @classmethod
    def of(cls, mirrors: Sequence[Mirror]) -> Snapshot:
        """Concatenate ``mirrors`` (a tuple the caller will not change while this runs)."""
        lengths = np.concatenate([m.lengths for m in mirrors])
        ends = np.cumsum(lengths)
        tab_offsets = np.cumsum([0] + [len(m.tab) for m in mirrors[:-1]])
        return cls(
            shard=np.concatenate([np.full(len(m.seqs), i, np.int64) for i, m in enumerate(mirrors)]),
            seqs=np.concatenate([m.seqs for m in mirrors]),
            starts=ends - lengths,
            ends=ends,
            uoff=np.concatenate([m.uoff for m in mirrors]),
            codec=np.concatenate([m.codec for m in mirrors]),
            tab_base=np.concatenate([m.tab_base + off for m, off in zip(mirrors, tab_offsets, strict=True)]),
            tab=np.concatenate([m.tab for m in mirrors]),
            epochs=tuple(m.epoch for m in mirrors),
        )

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` transitions uniform over every stored one: (segment row, position in it)."""
        g = rng.integers(0, self.total, size=n)
        seg = np.searchsorted(self.ends, g, side="right")
        return seg, g - self.starts[seg]


class ShardIndex:
    """The mirrors of all shards and the current snapshot; every change goes through here."""

    def __init__(self, num_shards: int) -> None:
        self._lock = threading.Lock()  # mirrors and snapshot; held for CPU work only
        self._mirrors: tuple[Mirror, ...] = tuple(Mirror() for _ in range(num_shards))
        self._snapshot = Snapshot.of(self._mirrors)

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def mirror(self, shard: int) -> Mirror:
        return self._mirrors[shard]

    @property
    def mirrors(self) -> tuple[Mirror, ...]:
        return self._mirrors

    def commit(self, updates: dict[int, tuple[Mirror, Mirror]]) -> None:
        """Install ``{shard: (read, new)}``: each new mirror only if ``read`` is still the
        shard's mirror (else the shard was lost or quarantined since; that change wins)."""
        with self._lock:
            mirrors = list(self._mirrors)
            changed = False
            for i, (read, new) in updates.items():
                if mirrors[i] is read and new is not read:
                    mirrors[i] = new
                    changed = True
            if changed:
                self._publish(mirrors)

    def drop(self, shard: int) -> None:
        """The shard's data is unreachable: sample uniformly over what is left."""
        with self._lock:
            if self._mirrors[shard].seqs.size or self._mirrors[shard].epoch:
                mirrors = list(self._mirrors)
                mirrors[shard] = Mirror()
                self._publish(mirrors)

    def quarantine(self, shard: int, epoch: str, seqs: Sequence[int]) -> None:
        """Stop drawing from segments of ``epoch`` that returned corrupt bytes; a shard that
        restarted since (another epoch) reuses those seqs for healthy segments, kept."""
        with self._lock:
            m = self._mirrors[shard]
            if m.epoch != epoch:
                return
            q = m.quarantined(seqs)
            if q is not m:
                mirrors = list(self._mirrors)
                mirrors[shard] = q
                self._publish(mirrors)

    def _publish(self, mirrors: list[Mirror]) -> None:
        # Caller holds the lock. Built from the tuple before it is published, so no pass can
        # see a mirror another pass did not.
        frozen = tuple(mirrors)
        self._snapshot = Snapshot.of(frozen)
        self._mirrors = frozen


# A loader's answer: (seqs, lengths, uoffs, codecs, unit tables) of the segments it took.
Loaded = tuple[list[int], list[int], list[int], list[int], list[np.ndarray]]


class SegmentLoader(Protocol):
    """Takes a shard's new segments in whole instead of reading their offset tables (the
    learner's resident mirror, mirror.py). The refresher commits a shard's evictions before
    calling :meth:`load`, so their room is free again, and calls :meth:`settle` after every
    refresh, committed or not."""

    def load(
        self,
        shard: int,
        client: ShardClient,
        epoch: str,
        live: Sequence[tuple[int, int]],
        on_corrupt: Callable[[int, int, CorruptSegmentError], None],
    ) -> Loaded: ...

    def settle(self) -> None: ...


class IndexRefresher:
    """Brings a :class:`ShardIndex` up to date from the shards, over clients of its own.

    One refresh runs at a time (``lock``), and ``clients`` are used only under that lock: a
    ShardClient has one RESP connection, and resetting it closes the socket under whoever is
    reading it. Anyone else who needs these clients (the sampler's rate-limit counter poll)
    borrows them through :meth:`try_with_clients`, which never waits for a refresh.

    What a refresh learns goes to the owner's callbacks: ``on_stats`` (a shard's counters),
    ``on_restart`` (a shard came back empty) and ``on_corrupt`` (a segment index that does not
    parse; the segment is left out of the mirror). With a ``loader`` new segments go to it.
    """

    def __init__(
        self,
        index: ShardIndex,
        clients: Sequence[ShardClient],
        health: Sequence[ShardHealth],
        interval_s: float,
        *,
        on_stats: Callable[[int, ShardStats], None],
        on_restart: Callable[[int, ShardStats], None],
        on_corrupt: Callable[[int, int, CorruptSegmentError], None],
        loader: SegmentLoader | None = None,
    ) -> None:
        self.index = index
        self.loader = loader
        self.clients = list(clients)
        self.health = list(health)
        self.interval_s = interval_s
        self.lock = threading.Lock()
        self._on_stats = on_stats
        self._on_restart = on_restart
        self._on_corrupt = on_corrupt
        self._last_refresh = 0.0

    def refresh(self) -> None:
        """Bring every shard's mirror up to date now (waits for a refresh in progress)."""
        with self.lock:
            self._refresh_locked()

    def maybe_refresh(self) -> None:
        """Refresh when ``interval_s`` has passed and no other thread is refreshing."""
        if time.monotonic() - self._last_refresh >= self.interval_s and self.lock.acquire(blocking=False):
            try:
                self._refresh_locked()
            finally:
                self.lock.release()

    def expire(self) -> None:
        """Make the next :meth:`maybe_refresh` run (a shard restarted)."""
        self._last_refresh = 0.0

    def try_with_clients(self, fn: Callable[[Sequence[ShardClient]], None]) -> None:
        """Run ``fn`` on the clients unless a refresh is using them; skipped then, since that
        refresh reads the shards' counters itself."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            fn(self.clients)
        finally:
            self.lock.release()

    def lost(self, shard: int, exc: BaseException) -> None:
        """The shard failed: back off from it and sample uniformly over the others."""
        self.health[shard].failed(exc)
        self.index.drop(shard)

    def _refresh_locked(self) -> None:
        """Refresh every shard's mirror; the caller holds ``lock``."""
        updates: dict[int, tuple[Mirror, Mirror]] = {}
        try:
            for i in range(len(self.clients)):
                read = self.index.mirror(i)
                new = self._refresh_shard(i, read)
                if new is not None:
                    updates[i] = new
            # A shard lost by another thread since we read its mirror stays lost (see ShardIndex.commit).
            self.index.commit(updates)
        finally:
            if self.loader is not None:
                self.loader.settle()
        self._last_refresh = time.monotonic()

    def _refresh_shard(self, i: int, m: Mirror) -> tuple[Mirror, Mirror] | None:
        """(the mirror to replace, shard ``i``'s mirror brought up to date from ``m``); None when
        the shard is skipped or lost."""
        read = m
        health = self.health[i]
        if not health.available():
            return None
        client = self.clients[i]
        if client.generation != health.generation:
            client.reset(health.generation)
        try:
            stats = client.stats()
            health.succeeded()
            self._on_stats(i, stats)
            # A shard that restarted empty has a new epoch. Its sequence running backwards means
            # the same: a writer gave the empty shard the epoch it had before (writer.py adopts
            # one epoch per writer), and the old seqs now name other segments.
            if stats.epoch != m.epoch or stats.next < m.next_seq:
                if m.epoch:
                    self._on_restart(i, stats)
                m = Mirror(epoch=stats.epoch)
            m = m.without_before(stats.head)
            new = list(range(max(m.next_seq + 1, stats.head), stats.next + 1))
            if not new:
                return read, m
            lengths = client.lengths(new)
            live = [(s, n) for s, n in zip(new, lengths, strict=True) if n is not None]
            if self.loader is not None:
                if m is not read:
                    # Evictions first: the loader reuses their room for the new segments.
                    self.index.commit({i: (read, m)})
                    if self.index.mirror(i) is not m:
                        return None  # lost meanwhile
                    read = m
                loaded = self.loader.load(i, client, m.epoch, live, self._on_corrupt)
                return read, m.extended(stats.next, *loaded)
            heads = client.indexes(m.epoch, [s for s, _ in live], [n for _, n in live]) if live else []
        except (ShardUnavailable, ShardAuthError) as exc:
            self.lost(i, exc)
            return None
        return read, self._extend(i, m, stats.next, live, heads)

    def _extend(
        self, i: int, m: Mirror, next_seq: int, live: Sequence[tuple[int, int]], heads: Sequence[object]
    ) -> Mirror:
        """``m`` with the segments whose index parses; the others are reported and left out."""
        seqs, lens, uoffs, codecs, tabs = [], [], [], [], []
        for (s, n), data in zip(live, heads, strict=True):
            if data == b"":
                continue  # evicted since HMGET
            try:
                if not isinstance(data, bytes):
                    raise CorruptSegmentError(f"GETRANGE answered {data!r:.100}")
                codec_id, t, uoff, _, table = parse_index(data)
                if t != n:
                    raise CorruptSegmentError(f"index says {t} transitions, the shard's length hash says {n}")
            except CorruptSegmentError as exc:
                self._on_corrupt(i, s, exc)
                continue
            seqs.append(s)
            lens.append(t)
            uoffs.append(uoff)
            codecs.append(codec_id)
            tabs.append(table)
        return m.extended(next_seq, seqs, lens, uoffs, codecs, tabs)
