"""The learner-resident replay mirror (replay.mirror=host|device) against real redis-server
shards: same distribution as byte-range sampling, exact contents, eviction, shard restarts,
refill, corrupt segments, slot reuse and the memory check."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import redis
import torch

from common.config import ConfigError, load_config
from replay_service import mirror as mirror_mod
from replay_service.codec import parse_index
from replay_service.errors import ShardUnavailable
from replay_service.launcher import RedisShardProcess
from replay_service.metric_keys import WAIT_SECONDS_TOTAL
from replay_service.mirror import UnitRing, check_memory, mirror_units, resolve_mode
from replay_service.sampler import ReplaySampler
from replay_service.shards import ShardSet, segment_key
from replay_service.writer import ReplayWriter
from tests.test_replay import _epoch, make_segment, mirror_kw

HOST = mirror_kw("host")


def _cells(sampler: ReplaySampler, batches: int) -> Counter[tuple[int, int]]:
    """(episode, position) of every sampled transition, read from the frames' marker pixels."""
    counts: Counter[tuple[int, int]] = Counter()
    for _ in range(batches):
        img = next(sampler).image.numpy()
        counts.update(zip(img[:, 0, 0, 0].tolist(), img[:, 0, 0, 2].tolist(), strict=True))
    return counts


def test_mirror_and_byte_ranges_draw_the_same_distribution() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    lengths = [2, 5, 12, 1, 20, 7]
    with ShardSet(num_shards=2) as shards:
        w = ReplayWriter(shards.urls, capacity=10_000)
        for i, t in enumerate(lengths):
            w.write(make_segment(t=t, episode=i))
        w.close()
        with ReplaySampler(shards.urls, 256, prefetch=0, seed=5, **HOST) as s:
            host = _cells(s, 60)
            assert s.metrics()["replay_sampler/mirror_segments_loaded_total"] == len(lengths)
        with ReplaySampler(shards.urls, 256, prefetch=0, seed=6) as s:
            off = _cells(s, 60)
    cells = [(i, p) for i, t in enumerate(lengths) for p in range(t)]
    observed = np.array([[host[c] for c in cells], [off[c] for c in cells]])
    assert observed.sum() == 2 * 60 * 256 and set(host) == set(off) == set(cells)
    assert scipy_stats.chisquare(observed[0])[1] > 1e-3, "the mirror is not uniform over stored transitions"
    _, p_same, _, _ = scipy_stats.chi2_contingency(observed)
    assert p_same > 1e-3, f"mirror and byte-range batches differ in distribution (p={p_same:.2e})"


def test_bulk_draws_hand_out_exact_uniform_batches() -> None:
    """Frameless batches drawn 8 at a time (a vector-only learner's) hold exactly their
    transitions' records and stay uniform over the stored transitions."""
    scipy_stats = pytest.importorskip("scipy.stats")
    segs = [make_segment(t=t, episode=i) for i, t in enumerate([2, 5, 12, 1, 20, 7])]
    where = {seg.vectors[t].tobytes(): (i, t) for i, seg in enumerate(segs) for t in range(seg.num_transitions)}
    counts: Counter[tuple[int, int]] = Counter()
    with ShardSet(num_shards=2) as shards:
        w = ReplayWriter(shards.urls, capacity=10_000)
        for seg in segs:
            w.write(seg)
        w.close()
        with ReplaySampler(shards.urls, 64, prefetch=0, seed=5, frames=False, bulk=8, **HOST) as s:
            assert s.bulk == 8
            for _ in range(240):
                batch = next(s)
                assert batch.size == 64 and batch.image.shape == (64, 1, 1, 1)
                for row in range(64):
                    ep, t = where[batch.vector[row].numpy().tobytes()]
                    assert np.array_equal(batch.next_vector[row].numpy(), segs[ep].vectors[t + 1])
                    assert np.array_equal(batch.action[row].numpy(), segs[ep].actions[t])
                    assert batch.policy_version[row].item() == t + 7
                    counts[(ep, t)] += 1
        # With the rate limiter on, one draw must fit its window (2 * tolerance samples).
        with ReplaySampler(shards.urls, 64, prefetch=0, samples_per_insert=1.0, spi_tolerance=100, bulk=8, **HOST) as s:
            assert s.bulk == 3
    cells = [(i, t) for i, seg in enumerate(segs) for t in range(seg.num_transitions)]
    assert set(counts) == set(cells) and sum(counts.values()) == 240 * 64
    assert scipy_stats.chisquare([counts[c] for c in cells])[1] > 1e-3, "bulk draws are not uniform"


def test_sampling_on_the_learners_thread_returns_none_after_its_timeout(redis_url: str) -> None:
    """Without sampler threads, next_batch(timeout) samples on the caller's thread and gives up
    after the timeout (replay below min_size, or the rate limiter), as the threads' queue
    would, so a learner's train() call returns; the time counts as data wait."""
    w = ReplayWriter([redis_url], capacity=1000)
    w.write(make_segment(t=8))
    with ReplaySampler([redis_url], 4, prefetch=0, min_size=20, **HOST) as s:
        start = time.monotonic()
        assert s.next_batch(timeout=0.3) is None
        assert 0.3 <= time.monotonic() - start < 5
        assert s.metrics()[WAIT_SECONDS_TOTAL] >= 0.3
    # One sample per insert, tolerance 3: with 8 inserted, 8 may be sampled (a third batch of 4
    # would take the ratio past its window) until more is inserted.
    with ReplaySampler([redis_url], 4, prefetch=0, samples_per_insert=1.0, spi_tolerance=3, **HOST) as s:
        got = [s.next_batch(timeout=0.3) for _ in range(3)]
        assert [b is not None for b in got] == [True, True, False]
        w.write(make_segment(t=8, index=1))
        batch = s.next_batch(timeout=5.0)
        assert batch is not None and batch.size == 4
    w.close()


@pytest.mark.parametrize("direct", [True, False], ids=["decoded-into-ring", "staged-then-copied"])
def test_batch_holds_exactly_what_the_segment_holds(
    two_shards: list[str], direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct:  # as on a GPU, or where free slots are scattered
        monkeypatch.setattr(UnitRing, "run", lambda self, slots: None)
    segs = [make_segment(t=3 + 4 * i, episode=i, index=i, terminated=i % 2 == 1) for i in range(6)]
    w = ReplayWriter(two_shards, capacity=1000)
    for seg in segs:
        w.write(seg)
    w.close()
    with ReplaySampler(two_shards, 128, prefetch=0, seed=1, **HOST) as s:
        for _ in range(3):
            batch = next(s)
            assert batch.frames is not None
            for b in range(batch.size):
                frames = batch.frames[b].numpy()
                ep, t = int(frames[0, 0, 0]), int(frames[0, 0, 2])
                seg = segs[ep]
                assert np.array_equal(frames, seg.frames[t : t + 5]), "frames t..t+4"
                assert np.array_equal(batch.vector[b].numpy(), seg.vectors[t])
                assert np.array_equal(batch.next_vector[b].numpy(), seg.vectors[t + 1])
                assert np.array_equal(batch.action[b].numpy(), seg.actions[t])
                assert batch.reward[b].item() == float(seg.rewards[t])
                assert batch.terminated[b].item() == float(seg.terminated[t])
                assert batch.policy_version[b].item() == int(seg.policy_versions[t])


def test_eviction_on_a_shard_leaves_the_mirror_and_its_room_is_reused(redis_url: str) -> None:
    # A ring for 30 transitions in 10-step segments (54 units); 40 segments pass through it.
    w = ReplayWriter([redis_url], capacity=30)
    with ReplaySampler(
        [redis_url], 64, prefetch=0, index_refresh_s=3600.0, mirror="host", capacity=30, segment_length=10
    ) as s:
        for i in range(40):
            w.write(make_segment(t=10, episode=i))
            assert s.refresh_index() == min(30, 10 * (i + 1))
            eps = set(next(s).image.numpy()[:, 0, 0, 0].tolist())
            assert eps == {i - 2, i - 1, i} - {-1, -2}, f"evicted episodes still sampled, or live ones not: {eps}"
        m = s.metrics()
    assert m["replay_sampler/mirror_full_total"] == 0, "evicted segments' room was not reused"
    assert m["replay_sampler/mirror_units"] == mirror_units(30, 10) == 54
    assert m["replay_sampler/mirror_units_used"] <= 3 * 14 + 14  # the live three, one more retiring
    w.close()


def test_shard_restart_or_loss_empties_its_part_of_the_mirror(
    two_shards: list[str], redis_process: RedisShardProcess
) -> None:
    w = ReplayWriter(two_shards, capacity=100_000)
    for i in range(6):  # shard 0: episodes 0, 2, 4; shard 1: 1, 3, 5
        w.write(make_segment(t=10, episode=i))
    with ReplaySampler(two_shards, 64, prefetch=0, index_refresh_s=3600.0, **HOST) as s:
        assert s.refresh_index() == 60
        assert s.metrics()["replay_sampler/mirror_units_used"] == 6 * 14
        client = redis_process.admin(db=1)  # convoy's own user may not flush
        client.flushdb()  # shard 1 restarts empty
        client.close()
        only1 = ReplayWriter(two_shards[1:], capacity=100_000)
        only1.write(make_segment(t=7, episode=50))
        only1.close()
        assert s.refresh_index() == 37
        eps = {e for _ in range(5) for e in next(s).image.numpy()[:, 0, 0, 0].tolist()}
        m = s.metrics()
        assert eps == {0, 2, 4, 50}
        assert m["replay_sampler/shard1/restarts_total"] == 1
        assert m["replay_sampler/mirror_units_used"] == 3 * 14 + 11, "the restarted shard's old units stayed"
        # A lost shard: its part leaves the mirror at once, its units at the next load.
        s._shard_lost(1, ShardUnavailable("shard 1: connection reset"))
        assert s.size == 30
        assert set(next(s).image.numpy()[:, 0, 0, 0].tolist()) <= {0, 2, 4}
    w.close()


def test_a_fresh_sampler_refills_from_the_shards(two_shards: list[str]) -> None:
    segs = [make_segment(t=8, episode=i) for i in range(10)]
    w = ReplayWriter(two_shards, capacity=100_000)
    for seg in segs:
        w.write(seg)
    w.close()
    with ReplaySampler(two_shards, 32, prefetch=0, **HOST) as first:
        first_eps = {e for _ in range(10) for e in next(first).image.numpy()[:, 0, 0, 0].tolist()}
    with ReplaySampler(two_shards, 256, prefetch=0, seed=9, **HOST) as second:  # a restarted learner
        assert second.refresh_index() == 80
        m = second.metrics()
        assert m["replay_sampler/mirror_segments_loaded_total"] == 10
        assert m["replay_sampler/mirror_units_used"] == 10 * 12
        batch = next(second)
        eps = set(batch.image.numpy()[:, 0, 0, 0].tolist())
        b = 0
        ep, t = int(batch.image[b, 0, 0, 0]), int(batch.image[b, 0, 0, 2])
        assert np.array_equal(batch.next_image[b].numpy(), segs[ep].frames[t + 1 : t + 5])
    assert eps == first_eps == set(range(10))


def test_corrupt_segment_is_skipped_counted_and_never_mirrored(redis_url: str) -> None:
    w = ReplayWriter([redis_url], capacity=1000)
    for i in range(4):
        w.write(make_segment(t=6, episode=i))
    w.close()
    raw = redis.Redis.from_url(redis_url)
    epoch = _epoch(redis_url)
    # Before the sampler sees them: bad frame bytes in seq 2 (episode 1), a hash at seq 3 (episode 2).
    blob = bytearray(raw.get(segment_key(epoch, 2)) or b"")
    _, _, uoff, _, table = parse_index(bytes(blob))
    blob[uoff + int(table[3]) + 121 + 4 : uoff + int(table[3]) + 121 + 12] = b"\xff" * 8
    raw.set(segment_key(epoch, 2), bytes(blob))
    raw.delete(segment_key(epoch, 3))
    raw.hset(segment_key(epoch, 3), "x", "y")
    raw.close()
    with ReplaySampler([redis_url], 64, prefetch=0, **HOST) as s:
        assert s.refresh_index() == 12
        eps = {e for _ in range(5) for e in next(s).image.numpy()[:, 0, 0, 0].tolist()}
        m = s.metrics()
    assert eps == {0, 3}
    assert m["replay_sampler/corrupt_total"] == 2 and m["replay_sampler/shard0/corrupt_total"] == 2
    assert m["replay_sampler/mirror_segments_loaded_total"] == 2
    assert m["replay_sampler/mirror_units_used"] == 2 * 10, "a corrupt segment took ring slots"


def test_retired_slots_wait_for_gathers_that_may_still_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_mod, "_RECLAIM_WAIT_S", 0.05)
    ring = UnitRing(10, torch.device("cpu"))
    first = ring.take(10)
    assert first is not None and ring.take(1) is None
    ring.settle()
    with ring.reading():  # a gather whose snapshot still draws those slots
        ring.sweep(referenced=np.zeros(0, np.int64))  # its segments were evicted
        assert ring.take(5) is None, "slots reused while a gather could read them"
    with ring.reading():  # entered after the sweep: its snapshot cannot reach them
        again = ring.take(5)
    assert again is not None and set(again.tolist()) <= set(first.tolist())
    # Pending slots (taken by a refresh not yet committed) survive a sweep.
    ring.sweep(referenced=np.zeros(0, np.int64))
    assert ring.take(5) is not None and ring.take(1) is None


def test_memory_check_names_the_fields(redis_url: str) -> None:
    with pytest.raises(ConfigError, match=r"replay\.capacity=1000000000000 with replay\.mirror=host"):
        ReplaySampler([redis_url], 8, prefetch=0, mirror="host", capacity=10**12)
    with pytest.raises(ConfigError, match=r"replay\.mirror=off"):
        check_memory("host", 10**12, 64, torch.device("cpu"))
    assert check_memory("host", 1000, 64, torch.device("cpu")) == mirror_units(1000, 64) * mirror_mod.UNIT_BYTES
    with pytest.raises(ConfigError, match=r"replay\.mirror"):
        load_config(None, ["replay.mirror=disk"])
    assert load_config(None, []).replay.mirror == "auto"
    assert resolve_mode("auto", gpu=True) == "device" and resolve_mode("auto", gpu=False) == "host"


def test_source_factory_passes_the_mirror_mode(redis_url: str) -> None:
    from deploy.run.placement import sampler_threads, source_factory

    cfg = load_config(None, ["replay.mirror=host", "replay.capacity=2000", "replay.samples_per_insert=0"])
    sampler = source_factory(cfg, [redis_url], pin_memory=False)(prefetch=0)
    try:
        assert sampler.mirror == "host"
        assert sampler.metrics()["replay_sampler/mirror_units"] == mirror_units(2000, cfg.collector.segment_length)
    finally:
        sampler.close()
    cfg = load_config(None, ["replay.samples_per_insert=0", "learner.encoder=none", "replay.sampler_threads=0"])
    sampler = source_factory(cfg, [redis_url], pin_memory=False)()
    try:
        assert sampler.mirror == "host", "auto on a CPU learner"
        assert not sampler._threads, "sampler_threads=0: the learner samples on its own thread"
        assert sampler.bulk == 8, "frameless batches are drawn 8 at a time"
    finally:
        sampler.close()
    auto = cfg.replace("replay.sampler_threads=-1")
    assert sampler_threads(auto, cuda=False) == 0 and sampler_threads(auto, cuda=True) == 4
    # Byte-range sampling waits on the network: a thread hides it.
    assert sampler_threads(auto.replace("replay.mirror=off"), cuda=False) == 1
    assert sampler_threads(cfg, cuda=False) == 0
    assert sampler_threads(cfg.replace("replay.sampler_threads=2"), cuda=False) == 2


@pytest.mark.gpu
def test_device_mirror_batches_live_on_the_gpu(redis_url: str) -> None:
    segs = [make_segment(t=9, episode=i) for i in range(3)]
    w = ReplayWriter([redis_url], capacity=1000)
    for seg in segs:
        w.write(seg)
    w.close()
    with ReplaySampler([redis_url], 64, prefetch=0, mirror="device", capacity=1000, device="cuda") as s:
        batch = next(s)
        assert batch.image.is_cuda and batch.reward.is_cuda
        img = batch.image.cpu().numpy()
        for b in range(batch.size):
            ep, t = int(img[b, 0, 0, 0]), int(img[b, 0, 0, 2])
            assert np.array_equal(img[b], segs[ep].frames[t : t + 4])
            assert batch.policy_version[b].item() == t + 7


@pytest.mark.parametrize("mode", ["host", "off"])
def test_nstep_batches_follow_the_window_rule_in_both_modes(two_shards: list[str], mode: str) -> None:
    """n = 3 from the ring and from byte ranges: summed rewards, bootstrap discount and the
    next observation t+k, with k cut at the segment's end (and no bootstrap after termination)."""
    gamma, n = 0.9, 3
    segs = [make_segment(t=2 + 3 * i, episode=i, index=i, terminated=i % 2 == 1) for i in range(5)]
    w = ReplayWriter(two_shards, capacity=1000)
    for seg in segs:
        w.write(seg)
    w.close()
    with ReplaySampler(two_shards, 64, prefetch=0, seed=3, n_step=n, gamma=gamma, **mirror_kw(mode)) as s:
        seen_cut = seen_full = 0
        for _ in range(3):
            batch = next(s)
            for b in range(batch.size):
                image = batch.image[b].numpy()
                ep, t = int(image[0, 0, 0]), int(image[0, 0, 2])
                seg = segs[ep]
                k = min(n, seg.num_transitions - t)
                seen_cut, seen_full = seen_cut + (k < n), seen_full + (k == n)
                assert np.array_equal(image, seg.frames[t : t + 4])
                assert np.array_equal(batch.next_image[b].numpy(), seg.frames[t + k : t + k + 4]), (ep, t, k)
                assert np.array_equal(batch.next_vector[b].numpy(), seg.vectors[t + k])
                expected = sum(gamma**j * float(seg.rewards[t + j]) for j in range(k))
                assert batch.reward[b].item() == pytest.approx(expected, rel=1e-5)
                ended = bool(seg.terminated[t + k - 1])
                assert batch.discount is not None
                assert batch.discount[b].item() == pytest.approx(0.0 if ended else gamma**k, rel=1e-6)
                assert batch.terminated[b].item() == float(ended)
        assert seen_cut and seen_full, "both full windows and windows cut by a segment's end were drawn"


@pytest.mark.parametrize("n_step", [1, 3])
def test_a_vector_only_learners_batches_skip_the_frames_and_keep_everything_else(
    two_shards: list[str], n_step: int
) -> None:
    segs = [make_segment(t=4 + 3 * i, episode=i, index=i, terminated=i % 2 == 1) for i in range(5)]
    w = ReplayWriter(two_shards, capacity=1000)
    for seg in segs:
        w.write(seg)
    w.close()
    batches = {}
    for frames in (True, False):
        with ReplaySampler(two_shards, 64, prefetch=0, seed=4, n_step=n_step, frames=frames, **HOST) as s:
            batches[frames] = next(s)
    framed, frameless = batches[True], batches[False]
    assert framed.image.shape == (64, 4, 84, 84)
    assert frameless.image.shape == frameless.next_image.shape == (64, 1, 1, 1) and not frameless.image.any()
    for name in ("vector", "next_vector", "action", "reward", "terminated", "policy_version", "discount"):
        a, b = getattr(framed, name), getattr(frameless, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
