"""Races in the threaded replay sampler (a snapshot built while another thread replaced a
shard's mirror; a counter poll resetting the connection a refresh was reading; a shard
restarted under its old epoch), each forced deterministically, and a threaded stress run
against real redis-server shards that are killed and restarted.

The forced tests pause one thread inside the racy window (through a hook in numpy or the RESP
connection, which both the old and the fixed code go through) and run the other side of the
race while it waits, so they fail on the unfixed sampler every time rather than by luck.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from replay_service.errors import ShardUnavailable
from replay_service.launcher import RedisShardProcess
from replay_service.resp import RespConnection
from replay_service.sampler import ReplaySampler
from replay_service.writer import ReplayWriter
from tests.test_replay import MODES, make_segment, mirror_kw


def _run(target: Callable[[], object], name: str) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``target`` on a thread; exceptions it raises land in the returned list."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    th = threading.Thread(target=body, name=name, daemon=True)
    th.start()
    return th, errors


# ----- race 1: a shard lost while the snapshot is being built ----------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_shard_lost_during_snapshot_build_never_tears_the_snapshot(
    two_shards: list[str], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """``_shard_lost`` (a worker saw the shard fail) replaces a mirror while another thread
    concatenates the mirrors into a snapshot. Unguarded, the snapshot pairs the lost shard's
    old lengths with its new empty seqs/offsets: draws past the end raise IndexError, or land
    on another segment's offsets and get healthy segments quarantined as corrupt.

    The refresher is paused before its k-th ``np.concatenate`` call, for every k the refresh
    makes, and the shard is lost right there; the result must always be consistent.
    """
    w = ReplayWriter(two_shards, capacity=100_000)
    for i in range(8):  # 4 segments of 10 per shard
        w.write(make_segment(t=10, episode=i))
    only_shard0 = ReplayWriter(two_shards[:1], capacity=100_000)
    real_concatenate = np.concatenate
    state: dict[str, Any] = {}

    def pausing_concatenate(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "refresher":
            state["calls"] += 1
            if state["calls"] == state["pause_at"]:
                state["paused"].set()
                assert state["go"].wait(10), "the test never released the refresher"
        return real_concatenate(*args, **kwargs)

    monkeypatch.setattr(np, "concatenate", pausing_concatenate)
    failures: list[str] = []
    pause_at = 0
    while True:
        pause_at += 1
        s = ReplaySampler(two_shards, 64, prefetch=0, index_refresh_s=3600.0, seed=pause_at, **mirror_kw(mode))
        try:
            assert s.refresh_index() == 40 * 2 + 10 * (pause_at - 1)
            # New data on shard 0, so the refresh extends a mirror and rebuilds the snapshot.
            only_shard0.write(make_segment(t=10, episode=100 + pause_at))
            state.update(calls=0, pause_at=pause_at, paused=threading.Event(), go=threading.Event())
            refresher, refresh_errors = _run(s.refresh_index, "refresher")
            deadline = time.monotonic() + 5
            while not state["paused"].wait(0.01) and refresher.is_alive() and time.monotonic() < deadline:
                pass
            paused = state["paused"].is_set()
            if paused:
                # The other side of the race: a worker's fetch from shard 1 failed.
                lose = functools.partial(s._shard_lost, 1, ShardUnavailable("shard 1: connection reset"))
                loser, _ = _run(lose, "loser")
                loser.join(0.3)  # done at once when unguarded; waits for the snapshot when guarded
            state["go"].set()
            refresher.join(10)
            assert not refresher.is_alive() and not refresh_errors, refresh_errors
            if not paused:
                break  # k is past the last concatenate of a refresh: every window was tried
            loser.join(10)
            assert not loser.is_alive()
            monkeypatch.setattr(np, "concatenate", real_concatenate)
            try:
                s.sample_batch()
            except Exception as exc:  # collected, reported below
                failures.append(f"shard lost at concatenate #{pause_at}: {type(exc).__name__}: {exc}")
            finally:
                monkeypatch.setattr(np, "concatenate", pausing_concatenate)
            m = s.metrics()
            stored0 = 40 + 10 * pause_at
            if s.size != stored0:
                failures.append(f"shard lost at concatenate #{pause_at}: size {s.size}, shard 0 alone holds {stored0}")
            if m["replay_sampler/corrupt_total"]:
                failures.append(f"shard lost at concatenate #{pause_at}: {m['replay_sampler/corrupt_total']} corrupt")
        finally:
            state.get("go", threading.Event()).set()
            s.close()
    w.close()
    only_shard0.close()
    assert pause_at > 3, "the refresh never reached the snapshot build"
    assert not failures, "\n".join(failures)


# ----- race 2: the rate limiter's counter poll resets the refresher's connection ------------------


@pytest.mark.parametrize("mode", MODES)
def test_counter_poll_never_resets_the_connection_a_refresh_is_using(
    two_shards: list[str], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The rate limiter polls the shards' counters (``_refresh_counters``) on the index
    clients that the refresher uses under its lock. After a failure bumped the shard's health
    generation, the poll used to reset that client, closing the socket the refresher was
    reading from: a healthy shard counted as lost and its mirror dropped.

    The refresher is paused between sending its index GETRANGEs and reading the replies;
    another thread reports a failure of the shard, the backoff runs out, and the poll runs.
    """
    w = ReplayWriter(two_shards, capacity=100_000)
    for i in range(8):
        w.write(make_segment(t=10, episode=i))
    s = ReplaySampler(two_shards, 64, prefetch=0, index_refresh_s=3600.0, **mirror_kw(mode))
    try:
        assert s.refresh_index() == 80
        only_shard1 = ReplayWriter(two_shards[1:], capacity=100_000)
        for i in range(2):
            only_shard1.write(make_segment(t=10, episode=50 + i))
        only_shard1.close()

        real_recv = RespConnection.recv
        paused, go = threading.Event(), threading.Event()

        def pausing_recv(self: RespConnection, count: int) -> list[Any]:
            if threading.current_thread().name == "refresher" and not paused.is_set():
                paused.set()
                assert go.wait(10), "the test never released the refresher"
            return real_recv(self, count)

        monkeypatch.setattr(RespConnection, "recv", pausing_recv)
        refresher, refresh_errors = _run(s.refresh_index, "refresher")
        try:
            assert paused.wait(5), "the refresher never read segment indexes"
            # Another thread's call to shard 1 failed meanwhile (a timeout, say)...
            s._health[1].failed(ShardUnavailable("shard 1: timed out"))
            time.sleep(0.3)  # ...and its backoff (0.2 s) ran out: a retry is due
            poller, poll_errors = _run(s._refresh_counters, "rate-limit-poll")
            poller.join(5)
            assert not poller.is_alive(), "the counter poll blocked behind a refresh"
            assert not poll_errors, poll_errors
        finally:
            go.set()
            refresher.join(10)
        assert not refresher.is_alive() and not refresh_errors, refresh_errors
        m = s.metrics()
        assert s.size == 100, f"shard 1's mirror was dropped: size {s.size}"
        assert m["replay_sampler/shard1/lost_total"] == 1, "a healthy shard was counted lost twice"
        monkeypatch.setattr(RespConnection, "recv", real_recv)
        s.refresh_index()
        s.sample_batch()
        assert s.metrics()["replay_sampler/corrupt_total"] == 0
    finally:
        s.close()
        w.close()


# ----- a shard restarted empty between two refreshes, under the epoch it had ---------------------


@pytest.mark.parametrize("mode", MODES)
def test_shard_restarted_under_its_old_epoch_is_mirrored_afresh(
    two_shards: list[str], redis_process: RedisShardProcess, mode: str
) -> None:
    """A writer hands an empty shard its own epoch (writer.py), so a shard restarted on its
    port between two refreshes can come back under the epoch the sampler mirrored, reusing
    seqs 1, 2, ... for other segments. Read with the old offsets they decode as corrupt and
    healthy segments get quarantined; the sampler must see the sequence run backwards."""
    url = two_shards[0]
    w = ReplayWriter([url], capacity=100_000)
    for i in range(4):
        w.write(make_segment(t=10, episode=i))
    s = ReplaySampler([url], 32, prefetch=0, index_refresh_s=3600.0, **mirror_kw(mode))
    try:
        assert s.refresh_index() == 40
        client = redis_process.admin()  # database 0, as ``url``
        client.flushdb()  # the restart, unseen by the sampler
        client.close()
        for i in range(2):
            w.write(make_segment(t=7, episode=10 + i))
        assert s.refresh_index() == 14
        eps = set()
        for _ in range(3):
            eps.update(s.sample_batch().image.numpy()[:, 0, 0, 0].tolist())
        m = s.metrics()
        assert eps == {10, 11}
        assert m["replay_sampler/corrupt_total"] == 0 and m["replay_sampler/shard0/restarts_total"] == 1
    finally:
        s.close()
        w.close()


# ----- stress: kill and restart a shard under the threaded, rate-limited sampler -----------------


@pytest.fixture
def killable_shards() -> Iterator[list[RedisShardProcess]]:
    shards = [RedisShardProcess(), RedisShardProcess()]
    yield shards
    for p in shards:
        p.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_threaded_sampler_survives_a_shard_killed_and_restarted_again_and_again(
    killable_shards: list[RedisShardProcess],
    mode: str,
) -> None:
    """4 sampler threads with prefetch and the rate limiter on, a writer inserting all along,
    and shard 1 killed and restarted on its port 8 times: no exception reaches the consumer,
    no healthy segment is quarantined, and batches keep coming after every restart."""
    cycles, batch = 8, 32
    urls = [p.url for p in killable_shards]
    stop = threading.Event()
    written = [0]

    def write_forever() -> None:
        w = ReplayWriter(urls, capacity=4_000, timeout=1.0)
        try:
            i = 0
            while not stop.is_set():
                w.write(make_segment(t=10, episode=i, seed=i))
                written[0] += 1
                i += 1
                time.sleep(0.005)
        finally:
            w.close()

    writer, writer_errors = _run(write_forever, "writer")
    # 2 samples per inserted transition: the learner is held back by the collectors, so the
    # limiter's counter polls run all the time, which is the code path under test.
    s = ReplaySampler(
        urls,
        batch,
        prefetch=4,
        threads=4,
        min_size=100,
        index_refresh_s=0.05,
        samples_per_insert=2.0,
        spi_tolerance=256.0,
        timeout=1.0,
        **mirror_kw(mode),
    )
    received = [0]
    consumer_errors: list[BaseException] = []

    def consume() -> None:
        while not stop.is_set():
            try:
                b = next(s)
            except BaseException as exc:  # reported by the test
                consumer_errors.append(exc)
                return
            assert b.reward.shape == (batch,)
            received[0] += 1

    consumer = threading.Thread(target=consume, name="consumer", daemon=True)
    consumer.start()

    def batches_flow(n: int, within: float) -> bool:
        start, deadline = received[0], time.monotonic() + within
        while received[0] < start + n and time.monotonic() < deadline and not consumer_errors:
            time.sleep(0.01)
        return received[0] >= start + n

    started = time.monotonic()
    try:
        assert batches_flow(5, 20), "no batches before the first kill"
        shard = killable_shards[1]
        for cycle in range(cycles):
            port = shard.port
            shard.kill()
            shard.stop()
            assert batches_flow(3, 10), f"cycle {cycle}: batches stopped while shard 1 was down"
            shard = killable_shards[1] = RedisShardProcess(port=port)
            # Back in the sampler: it mirrors shard 1 again and batches keep coming.
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not consumer_errors:
                m = s.metrics()
                if m["replay_sampler/shard1/up"] and m["replay_sampler/shard1/transitions_stored"] > 0:
                    break
                time.sleep(0.02)
            assert s.metrics()["replay_sampler/shard1/up"], f"cycle {cycle}: shard 1 never came back"
            assert batches_flow(5, 10), f"cycle {cycle}: batches stopped after shard 1 came back"
            assert not consumer_errors, consumer_errors
    finally:
        elapsed = time.monotonic() - started
        stop.set()
        consumer.join(5)
        s.close()
        writer.join(10)
    m = s.metrics()
    assert not consumer_errors, consumer_errors
    assert not writer_errors, writer_errors
    assert m["replay_sampler/corrupt_total"] == 0, "healthy segments were quarantined as corrupt"
    assert m["replay_sampler/shard1/lost_total"] >= cycles, m["replay_sampler/shard1/lost_total"]
    assert received[0] > 8 * cycles and written[0] > 0
    assert elapsed < 60, f"{cycles} kill/restart cycles took {elapsed:.1f}s"
