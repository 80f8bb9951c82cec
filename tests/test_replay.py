"""Replay service against a real redis-server: storage, uniform sampling, rate limiting,
shard loss, bad data, security and metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest
import redis

from common.config import ConfigError, load_config
from common.schema import ACTION_DIM, FRAME_SHAPE, STACK, VECTOR_DIM, Segment
from replay_service.codec import FrameCodec, decode_segment, encode_segment, parse_index
from replay_service.errors import ShardAuthError
from replay_service.launcher import RedisShardProcess
from replay_service.ratelimit import RateLimitConfigError, SampleToInsertRatio
from replay_service.sampler import ReplaySampler, SampleError
from replay_service.shards import (
    K_EPOCH,
    ShardClient,
    ShardSet,
    check_shard,
    segment_key,
)
from replay_service.writer import ReplayWriter


def make_segment(t: int = 8, episode: int = 0, index: int = 0, seed: int = 0, terminated: bool = False) -> Segment:
    """Frames encode (episode, index, position) so a sampled transition names its source."""
    rng = np.random.default_rng(seed + 1000 * episode + index)
    frames = rng.integers(0, 256, (t + STACK, *FRAME_SHAPE), dtype=np.uint8)
    frames[:, 0, 0] = episode % 256
    frames[:, 0, 1] = index % 256
    frames[:, 0, 2] = np.arange(t + STACK) % 256
    term = np.zeros(t, bool)
    term[-1] = terminated
    return Segment(
        frames=frames,
        vectors=rng.normal(size=(t + 1, VECTOR_DIM)).astype(np.float32),
        actions=rng.uniform(-1, 1, (t, ACTION_DIM)).astype(np.float32),
        rewards=rng.normal(size=t).astype(np.float32),
        terminated=term,
        truncated=np.zeros(t, bool),
        policy_versions=np.arange(t, dtype=np.int64) + 7,
        episode_id=episode,
        collector_id=3,
        segment_index=index,
    )


# Sampler modes the sampling tests run in: byte ranges per batch, and the resident mirror.
MODES = ["off", "host"]


def mirror_kw(mode: str) -> dict[str, Any]:
    """ReplaySampler arguments for ``mode`` (a resident mirror is sized by the capacity)."""
    return {} if mode == "off" else {"mirror": mode, "capacity": 20_000, "segment_length": 16}


def _epoch(url: str) -> str:
    c = redis.Redis.from_url(url)
    try:
        return (c.get(K_EPOCH) or b"").decode()
    finally:
        c.close()


# ----- storage ----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_round_trip_through_redis_is_bit_identical(redis_url: str, codec: str) -> None:
    seg = make_segment(t=13, terminated=True)
    w = ReplayWriter([redis_url], capacity=1000, codec=codec)
    w.write(seg)
    client = ShardClient(redis_url)
    blob = client.get_segment(_epoch(redis_url), 1)
    client.close()
    w.close()
    assert blob is not None
    back = decode_segment(blob)
    for name in ("frames", "vectors", "actions", "rewards", "terminated", "truncated", "policy_versions"):
        a, b = getattr(seg, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert (back.episode_id, back.collector_id, back.segment_index) == (0, 3, 0)


@pytest.mark.parametrize("mode", MODES)
def test_sampled_transitions_match_the_source_bit_for_bit(redis_url: str, mode: str) -> None:
    segs = [make_segment(t=5 + i, episode=i, index=i) for i in range(4)]
    w = ReplayWriter([redis_url], capacity=1000)
    for s in segs:
        w.write(s)
    w.close()
    with ReplaySampler([redis_url], 64, prefetch=0, seed=1, **mirror_kw(mode)) as sampler:
        batch = next(sampler)
    for b in range(batch.size):
        img = batch.image[b].numpy()
        ep, pos = int(img[0, 0, 0]), int(img[0, 0, 2])
        seg = segs[ep]
        tr = seg.transition(pos)
        assert np.array_equal(img, tr["image"])
        assert np.array_equal(batch.next_image[b].numpy(), tr["next_image"])
        assert np.array_equal(batch.vector[b].numpy(), tr["vector"])
        assert np.array_equal(batch.next_vector[b].numpy(), tr["next_vector"])
        assert np.array_equal(batch.action[b].numpy(), tr["action"])
        assert batch.reward[b].item() == pytest.approx(float(tr["reward"]))
        assert batch.terminated[b].item() == float(tr["terminated"])
        assert batch.policy_version[b].item() == pos + 7


@pytest.mark.parametrize("end", ["terminated", "truncated", "cut"])
def test_nstep_windows_match_the_source_by_hand(redis_url: str, end: str) -> None:
    """n = 3, gamma 0.5 over segments of 5 steps whose last step terminates, truncates, or
    neither (the episode goes on in the next segment: the window is cut there)."""
    segs = []
    for i in range(3):
        seg = make_segment(t=5, episode=i, index=i, terminated=end == "terminated")
        if end == "truncated":
            seg = dataclasses.replace(seg, truncated=np.eye(5, dtype=bool)[4])
        segs.append(seg)
    w = ReplayWriter([redis_url], capacity=1000)
    for s in segs:
        w.write(s)
    w.close()
    seen = set()
    with ReplaySampler([redis_url], 64, prefetch=0, seed=2, n_step=3, gamma=0.5) as sampler:
        for _ in range(3):
            batch = next(sampler)
            assert batch.discount is not None and batch.frames is None
            for b in range(batch.size):
                img = batch.image[b].numpy()
                seg, t = segs[int(img[0, 0, 0])], int(img[0, 0, 2])
                seen.add(t)
                k = min(3, 5 - t)
                r = seg.rewards.astype(np.float64)
                expected_sum = sum(0.5**j * r[t + j] for j in range(k))
                terminated = end == "terminated" and t + k == 5
                assert batch.reward[b].item() == pytest.approx(expected_sum, rel=1e-6)
                assert batch.discount[b].item() == (0.0 if terminated else 0.5**k)
                assert batch.terminated[b].item() == float(terminated)
                assert np.array_equal(img, seg.frames[t : t + STACK])
                assert np.array_equal(batch.next_image[b].numpy(), seg.frames[t + k : t + k + STACK])
                assert np.array_equal(batch.next_vector[b].numpy(), seg.vectors[t + k])
                assert np.array_equal(batch.vector[b].numpy(), seg.vectors[t])
                assert np.array_equal(batch.action[b].numpy(), seg.actions[t])
                assert batch.policy_version[b].item() == t + 7
    assert seen == set(range(5)), "every position, cut windows included, was drawn"


def test_embedded_like_frames_compress_far_below_naive() -> None:
    # Smooth synthetic frames stand in for rendered ones; the 50x target is checked by the bench.
    t = 64
    yy, xx = np.mgrid[0:84, 0:84]
    frames = np.stack([((xx + i) // 8 % 2 * 120 + yy // 21 * 20).astype(np.uint8) for i in range(t + STACK)])
    seg = make_segment(t=t)
    seg = Segment(**{**seg.__dict__, "frames": frames})
    blob = encode_segment(seg, FrameCodec("zstd"))
    naive = 2 * STACK * 84 * 84 + 2 * VECTOR_DIM * 4 + 13
    assert naive / (len(blob) / t) > 50


def test_eviction_is_fifo_and_atomic(redis_url: str) -> None:
    w = ReplayWriter([redis_url], capacity=30)
    for i in range(10):
        w.write(make_segment(t=10, episode=i))
    client = ShardClient(redis_url)
    stats = client.stats()
    assert stats.size == 30 and stats.head == 8 and stats.next == 10
    epoch = _epoch(redis_url)
    assert [client.get_segment(epoch, s) is not None for s in range(1, 11)] == [False] * 7 + [True] * 3
    # The byte counter matches what is really stored: nothing half-evicted.
    assert stats.bytes == sum(len(client.get_segment(epoch, s) or b"") for s in (8, 9, 10))
    assert stats.evicted_total == 70 and w.evicted_total == 70
    client.close()
    w.close()


# ----- uniform sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sampling_reaches_every_stored_transition(redis_url: str, mode: str) -> None:
    lengths = [3, 9, 1, 6]
    w = ReplayWriter([redis_url], capacity=1000)
    for i, t in enumerate(lengths):
        w.write(make_segment(t=t, episode=i))
    w.close()
    seen: set[tuple[int, int]] = set()
    with ReplaySampler([redis_url], 64, prefetch=0, seed=3, **mirror_kw(mode)) as sampler:
        for _ in range(20):
            img = next(sampler).image.numpy()
            seen.update(zip(img[:, 0, 0, 0].tolist(), img[:, 0, 0, 2].tolist(), strict=True))
    assert seen == {(i, p) for i, t in enumerate(lengths) for p in range(t)}


@pytest.mark.parametrize("mode", MODES)
def test_sampling_is_uniform_across_shards_and_segment_lengths(tmp_path: object, mode: str) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    with ShardSet(num_shards=2) as shards:
        w = ReplayWriter(shards.urls, capacity=10_000)
        # Round-robin: shard 0 gets episodes 0, 2, 4 (lengths 2, 12, 20); shard 1 gets 1, 3 (5, 1)
        # -> shards hold 34 and 6 transitions: a per-shard-uniform sampler would fail this.
        lengths = [2, 5, 12, 1, 20]
        for i, t in enumerate(lengths):
            w.write(make_segment(t=t, episode=i))
        w.close()
        counts: Counter[tuple[int, int]] = Counter()
        with ReplaySampler(shards.urls, 256, prefetch=0, seed=5, **mirror_kw(mode)) as sampler:
            for _ in range(80):
                img = next(sampler).image.numpy()
                counts.update(zip(img[:, 0, 0, 0].tolist(), img[:, 0, 0, 2].tolist(), strict=True))
    cells = [(i, p) for i, t in enumerate(lengths) for p in range(t)]
    observed = np.array([counts[c] for c in cells])
    assert observed.sum() == 80 * 256 and len(counts) == len(cells)
    _, p_value = scipy_stats.chisquare(observed)
    assert p_value > 1e-3, f"chi-square p={p_value:.2e}: sampling is not uniform over transitions"


def test_sampler_distribution_check_can_fail() -> None:
    """The chi-square bound used above rejects a sampler that is uniform per segment instead."""
    scipy_stats = pytest.importorskip("scipy.stats")
    lengths = [2, 5, 12, 1, 20]
    rng = np.random.default_rng(0)
    seg = rng.integers(0, len(lengths), 80 * 256)
    pos = (rng.random(len(seg)) * np.array(lengths)[seg]).astype(int)
    counts = Counter(zip(seg.tolist(), pos.tolist(), strict=True))
    observed = np.array([counts[(i, p)] for i, t in enumerate(lengths) for p in range(t)])
    assert scipy_stats.chisquare(observed)[1] < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_background_threads_deliver_batches_and_min_size(redis_url: str, mode: str) -> None:
    w = ReplayWriter([redis_url], capacity=1000)
    w.write(make_segment(t=10))
    with ReplaySampler(
        [redis_url], 32, prefetch=2, threads=2, min_size=20, index_refresh_s=0.01, **mirror_kw(mode)
    ) as sampler:
        time.sleep(0.2)
        assert sampler.metrics()["replay_sampler/ready_batches"] == 0  # 10 < min_size
        w.write(make_segment(t=10, episode=1))
        batch = next(sampler)
        assert batch.image.shape == (32, STACK, *FRAME_SHAPE) and not batch.image.is_pinned()
    w.close()


# ----- rate limiting --------------------------------------------------------------------------


def test_sample_to_insert_ratio_bounds() -> None:
    lim = SampleToInsertRatio(samples_per_insert=4.0, min_size_to_sample=100, tolerance=50)
    assert lim.can_sample(100, 0, 40) and not lim.can_sample(100, 0, 60)  # 400 - 60 < 350
    assert lim.can_insert(100, 0) and not lim.can_insert(113, 0)  # 452 > 450
    assert lim.can_insert(113, 10)
    off = SampleToInsertRatio(0.0, 1, 0)
    assert off.can_sample(0, 10**9, 10**9) and off.can_insert(10**9, 0)
    with pytest.raises(RateLimitConfigError, match="batch_size"):
        SampleToInsertRatio(1.0, 1, 10).check_batch(256)


@pytest.mark.parametrize("mode", MODES)
def test_rate_limiter_makes_learner_wait_and_blocks_collectors(redis_url: str, mode: str) -> None:
    # spi 2, tolerance 64, min size 40: diff = 2 * inserted - sampled must stay in [16, 144].
    spi, tol, batch = 2.0, 64.0, 32
    w = ReplayWriter([redis_url], 10_000, samples_per_insert=spi, spi_tolerance=tol, min_size_to_sample=40)
    for i in range(8):
        w.write(make_segment(t=10, episode=i))  # before the 8th: 2 * 70 = 140 <= 144
    assert w.metrics()["replay_writer/rate_limited_total"] == 0
    done = threading.Event()

    def collector() -> None:
        w.write(make_segment(t=10, episode=99))  # 2 * 80 = 160 > 144: waits for the learner
        done.set()

    th = threading.Thread(target=collector, daemon=True)
    th.start()
    time.sleep(0.3)
    assert not done.is_set(), "writer should wait while the learner is behind"
    with ReplaySampler(
        [redis_url], batch, prefetch=0, min_size=40, samples_per_insert=spi, spi_tolerance=tol, **mirror_kw(mode)
    ) as s:
        next(s)
        next(s)  # its round trip reports the first batch's 32 samples: 160 - 32 <= 144
        assert done.wait(5), "writer should resume once the learner sampled"
        th.join(5)
        pulled = [0]

        def learner() -> None:
            with contextlib.suppress(SampleError):  # raised when the test closes the sampler
                for _ in range(12):
                    next(s)
                    pulled[0] += 1

        lt = threading.Thread(target=learner, daemon=True)
        lt.start()
        time.sleep(0.5)
        stuck_at = pulled[0]
        assert stuck_at < 12, "learner should wait when it runs ahead of the collectors"
        time.sleep(0.3)
        assert pulled[0] == stuck_at
        for i in range(3):
            w.write(make_segment(t=10, episode=100 + i))
        deadline = time.monotonic() + 5
        while pulled[0] == stuck_at and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pulled[0] > stuck_at, "new inserts should let the learner go on"
        m = s.metrics()
        s._stop.set()  # unblock the learner thread's wait loop
    assert m["replay_sampler/rate_limit_wait_seconds_total"] > 0.5
    wm = w.metrics()
    assert wm["replay_writer/rate_limit_wait_seconds_total"] > 0.2 and wm["replay_writer/rate_limited_total"] >= 1
    w.close()


def test_replay_config_fields_validate() -> None:
    cfg = load_config(None, ["replay.samples_per_insert=8", "replay.spi_tolerance=4096"])
    assert cfg.replay.samples_per_insert == 8.0 and cfg.replay.codec == "zstd"
    with pytest.raises(ConfigError, match=r"replay\.samples_per_insert"):
        load_config(None, ["replay.samples_per_insert=-1"])
    with pytest.raises(ConfigError, match=r"replay\.min_size_to_sample"):
        load_config(None, ["replay.min_size_to_sample=-5"])


# ----- shard loss -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_killed_shard_costs_its_data_never_the_run(caplog: pytest.LogCaptureFixture, mode: str) -> None:
    a, b = RedisShardProcess(), RedisShardProcess()
    try:
        urls = [a.url, b.url]
        w = ReplayWriter(urls, capacity=100_000)
        for i in range(6):
            w.write(make_segment(t=10, episode=i))
        s = ReplaySampler(urls, 64, prefetch=0, index_refresh_s=0.0, **mirror_kw(mode))
        assert s.refresh_index() == 60
        next(s)
        port = b.port
        b.kill()
        caplog.clear()
        for i in range(6, 16):
            w.write(make_segment(t=10, episode=i))  # all to shard 0 now
        for _ in range(5):
            eps = set(next(s).image.numpy()[:, 0, 0, 0].tolist())
            assert eps <= {0, 2, 4, *range(6, 16)}
        assert s.size == 130  # shard 0 only: 3 + 10 segments
        wm, sm = w.metrics(), s.metrics()
        assert wm["replay_writer/shard1/lost_total"] == 1 and wm["replay_writer/shard1/up"] == 0
        assert wm["replay_writer/dropped_segments_total"] == 0 and wm["replay_writer/shard0/segments_total"] == 13
        assert sm["replay_sampler/shard1/lost_total"] == 1 and sm["replay_sampler/shards_up"] == 1
        lost_logs = [r for r in caplog.records if "lost" in r.getMessage()]
        assert len(lost_logs) == 2, [r.getMessage() for r in lost_logs]  # once each for writer and sampler

        # The shard comes back empty on the same port: both reconnect, the mirror starts over.
        b = RedisShardProcess(port=port)
        deadline = time.monotonic() + 15
        i = 16
        while w.metrics()["replay_writer/shard1/up"] == 0 and time.monotonic() < deadline:
            w.write(make_segment(t=10, episode=i))
            i += 1
            time.sleep(0.05)
        for _ in range(4):
            w.write(make_segment(t=10, episode=i))
            i += 1
        while s.metrics()["replay_sampler/shard1/up"] == 0 and time.monotonic() < deadline:
            s.refresh_index()
            time.sleep(0.05)
        s.refresh_index()
        wm, sm = w.metrics(), s.metrics()
        assert wm["replay_writer/shard1/reconnects_total"] == 1 and wm["replay_writer/shard1/up"] == 1
        assert sm["replay_sampler/shard1/reconnects_total"] == 1 and sm["replay_sampler/shard1/lost_total"] == 1
        on_new = sm["replay_sampler/shard1/transitions_stored"]
        assert on_new >= 20 and s.size == sm["replay_sampler/shard0/transitions_stored"] + on_new
        new_eps = set()
        for _ in range(10):
            new_eps.update(next(s).image.numpy()[:, 0, 0, 0].tolist())
        assert new_eps & set(range(16, i)), "data written after the restart is sampled"
        assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 2
        w.close()
        s.close()
    finally:
        a.stop()
        b.stop()


def test_every_shard_down_drops_and_counts_then_recovers() -> None:
    a = RedisShardProcess()
    try:
        w = ReplayWriter([a.url], capacity=1000)
        w.write(make_segment(t=4))
        port = a.port
        a.kill()
        w.write(make_segment(t=4))
        w.write(make_segment(t=4))
        assert w.metrics()["replay_writer/dropped_segments_total"] == 2
        a = RedisShardProcess(port=port)
        time.sleep(0.5)
        w.write(make_segment(t=4))
        assert w.metrics()["replay_writer/shard0/segments_total"] == 2
        w.close()
    finally:
        a.stop()


# ----- bad data -----------------------------------------------------------------------------


def test_corrupt_and_foreign_values_are_counted_and_skipped(redis_url: str) -> None:
    w = ReplayWriter([redis_url], capacity=1000)
    for i in range(4):
        w.write(make_segment(t=6, episode=i))
    w.close()
    raw = redis.Redis.from_url(redis_url)
    epoch = _epoch(redis_url)
    with ReplaySampler([redis_url], 64, prefetch=0, seed=2) as s:
        s.refresh_index()
        # After the mirror: corrupt frame bytes of segment 2, replace segment 3 with a hash.
        blob = bytearray(raw.get(segment_key(epoch, 2)) or b"")
        _, _, uoff, _, table = parse_index(bytes(blob))
        for k in range(6):
            blob[uoff + int(table[k]) + 121 + 4 : uoff + int(table[k]) + 121 + 12] = b"\xff" * 8
        raw.set(segment_key(epoch, 2), bytes(blob))
        raw.delete(segment_key(epoch, 3))
        raw.hset(segment_key(epoch, 3), "x", "y")
        for _ in range(5):
            eps = set(next(s).image.numpy()[:, 0, 0, 0].tolist())
            assert eps <= {0, 3}  # episodes 1 and 2 are seqs 2 and 3
        m = s.metrics()
    assert m["replay_sampler/corrupt_total"] > 0
    # A foreign value written before the sampler sees it never enters the mirror.
    raw.set(segment_key(epoch, 5), b"\x80\x04pickle-looking junk")
    raw.hset("cvy:lens", 5, 6)
    raw.set("cvy:next", 5)
    with ReplaySampler([redis_url], 16, prefetch=0) as s2:
        s2.refresh_index()
        assert s2.metrics()["replay_sampler/corrupt_total"] >= 1
        next(s2)
    raw.close()


@pytest.mark.parametrize("mode", MODES)
def test_empty_replay_is_a_clear_error(redis_url: str, mode: str) -> None:
    with (
        ReplaySampler([redis_url], 8, prefetch=0, **mirror_kw(mode)) as s,
        pytest.raises(SampleError, match="fewer than min_size"),
    ):
        next(s)


# ----- security -----------------------------------------------------------------------------


def test_password_shard_url_with_password_and_wrong_password() -> None:
    shard = RedisShardProcess(password="s3cret")
    try:
        # convoy's own ACL user; the default user is off on a convoy-started shard.
        good = f"redis://convoy:s3cret@{shard.host}:{shard.port}/0"
        check_shard(good)
        check_shard(shard.url, "s3cret")
        w = ReplayWriter([good], 100)
        w.write(make_segment(t=4))
        with ReplaySampler([shard.url], 4, password="s3cret", prefetch=0) as s:
            assert next(s).size == 4
        w.close()
        default_user = f"redis://:s3cret@{shard.host}:{shard.port}/0"
        for url, pw in (
            (f"redis://convoy:wrong@{shard.host}:{shard.port}/0", ""),
            (default_user, ""),
            (shard.url, ""),
            (shard.url, "nope"),
        ):
            start = time.monotonic()
            with pytest.raises(ShardAuthError, match=r"password|auth"):
                ReplayWriter([url], 100, password=pw)
            with pytest.raises(ShardAuthError):
                ReplaySampler([url], 4, password=pw, prefetch=0)
            assert time.monotonic() - start < 3.0, "a wrong password must fail fast, not hang"
        conf = shard._dir + "/redis.conf"  # the config file must not leak the password
        import os
        import stat

        assert stat.S_IMODE(os.stat(conf).st_mode) == 0o600
    finally:
        shard.stop()


@pytest.mark.parametrize("mode", MODES)
def test_metrics_are_flat_namespaced_and_per_shard(redis_url: str, mode: str) -> None:
    w = ReplayWriter([redis_url], capacity=1000)
    w.write(make_segment(t=5))
    with ReplaySampler([redis_url], 8, prefetch=0, **mirror_kw(mode)) as s:
        next(s)
        m = s.metrics()
    wm = w.metrics()
    w.close()
    for key in (
        "transitions_stored",
        "bytes_stored",
        "inserted_transitions_total",
        "evicted_transitions_total",
        "corrupt_total",
        "sampled_transitions_total",
        "lost_total",
    ):
        assert f"replay_sampler/shard0/{key}" in m
    assert m["replay_sampler/shard0/transitions_stored"] == 5 and m["replay_sampler/shard0/bytes_stored"] > 0
    assert m["replay_sampler/sampled_transitions_total"] == 8
    assert "replay_writer/rate_limit_wait_seconds_total" in wm and wm["replay_writer/shard0/transitions_total"] == 5
    assert all(isinstance(v, int | float) for v in {**m, **wm}.values())
