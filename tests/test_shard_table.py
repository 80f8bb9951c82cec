"""The driver's shard table (bounded, backed-off replacement) and writers and the sampler
following a shard to its new address."""

from __future__ import annotations

import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from deploy.run.shardtable import GONE, LIVE, STARTING, WAITING, ShardTable
from replay_service.launcher import RedisShardProcess
from replay_service.sampler import ReplaySampler
from replay_service.table import TableFollower
from replay_service.writer import ReplayWriter
from tests.test_replay import make_segment


def test_replacement_backs_off_and_is_bounded() -> None:
    t = ShardTable(["redis://a:1/0", "redis://b:2/0"], max_restarts=2, base_backoff_s=1.0, max_backoff_s=3.0)
    assert t.failed(0, now=100.0) and t.state(0) == WAITING
    assert t.due(100.5) == [] and t.due(101.0) == [0]  # 1 s after the first failure
    t.starting(0)
    assert t.failed(0, now=200.0)  # the replacement never came up: failure 2
    assert t.entries[0].retry_at == 202.0  # 2 s
    t.starting(0)
    t.replaced(0, "redis://c:9/0")
    assert t.urls() == ["redis://c:9/0", "redis://b:2/0"] and t.entries[0].epoch == 1
    assert not t.failed(0, now=300.0)  # failure 3 > max_restarts=2: gone
    assert t.state(0) == GONE and t.urls() == ["", "redis://b:2/0"] and t.live == 1
    assert not t.failed(0, now=301.0) and t.entries[0].failures == 3  # gone stays gone
    with pytest.raises(ValueError):
        t.starting(0)
    t.check()
    assert ShardTable(["x"], 0, max_backoff_s=30.0).backoff(20) == 30.0


class ShardTableMachine(RuleBasedStateMachine):
    """Random failures, replacements (same or new address) and clock steps; the invariant
    holds after every step, and the table agrees with a simple model."""

    @initialize(n=st.integers(1, 4), max_restarts=st.integers(0, 4))
    def start(self, n: int, max_restarts: int) -> None:
        self.table = ShardTable([f"redis://n{i}:1/0" for i in range(n)], max_restarts, 1.0, 8.0)
        self.now = 0.0
        self.failures = [0] * n
        self.max_restarts = max_restarts
        self.ports = 100

    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.failures) - 1))
        was = self.table.state(i)
        scheduled = self.table.failed(i, self.now)
        if was != GONE:
            self.failures[i] += 1
        assert scheduled == (self.failures[i] <= self.max_restarts)
        if scheduled:
            assert self.table.entries[i].retry_at == pytest.approx(self.now + min(8.0, 2 ** (self.failures[i] - 1)))

    @rule(dt=st.floats(0.0, 20.0))
    def tick(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: bool(self.table.due(self.now)))
    @rule(data=st.data())
    def start_replacement(self, data: st.DataObject) -> None:
        due = self.table.due(self.now)
        i = data.draw(st.sampled_from(due))
        self.table.starting(i)
        assert self.table.state(i) == STARTING

    @precondition(lambda self: any(e.state == STARTING for e in self.table.entries))
    @rule(data=st.data(), moved=st.booleans())
    def replaced(self, data: st.DataObject, moved: bool) -> None:
        i = data.draw(st.sampled_from([k for k, e in enumerate(self.table.entries) if e.state == STARTING]))
        before_version, before = self.table.version, self.table.entries[i].url
        self.ports += 1
        url = f"redis://m{self.ports}:2/0" if moved else before
        self.table.replaced(i, url)
        assert self.table.state(i) == LIVE and self.table.urls()[i] == url
        assert self.table.version == before_version + (url != before)

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "table"):
            return
        self.table.check()
        assert [e.failures for e in self.table.entries] == self.failures
        assert self.table.live == sum(f <= self.max_restarts for f in self.failures)
        for i in self.table.due(self.now):
            assert self.table.state(i) == WAITING


TestShardTableMachine = ShardTableMachine.TestCase
TestShardTableMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_follower_reports_each_move_once_and_ignores_bad_tables() -> None:
    table = ["a", "b"]
    calls = {"n": 0}

    def read() -> list[str]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("control actor restarting")
        return list(table)

    f = TableFollower(["a", "b"], read, poll_s=0.0)
    assert f.changes() == {}
    table[1] = "c"
    assert f.changes() == {}  # the failing read: nothing changes
    assert f.changes() == {1: "c"} and f.changes() == {}
    table.append("d")
    assert f.changes() == {} and f.urls == ["a", "c"]  # another length: ignored
    assert TableFollower(["a"], None).changes() == {}


def test_writer_and_sampler_switch_to_a_shard_at_its_new_address() -> None:
    """Shard 1 dies and comes back at another port: within the poll interval every write and
    batch goes there, with no stall on the dead address."""
    a, b, moved = RedisShardProcess(password="pw"), RedisShardProcess(password="pw"), None
    try:
        table = [a.url, b.url]
        w = ReplayWriter(table.copy(), 10_000, password="pw", shard_table=lambda: table, table_poll_s=0.05)
        s = ReplaySampler(
            table.copy(),
            8,
            password="pw",
            prefetch=0,
            index_refresh_s=0.0,
            shard_table=lambda: table,
            table_poll_s=0.05,
        )
        for i in range(4):
            w.write(make_segment(t=4, index=i))
        assert s.refresh_index() == 16
        b.kill()
        w.write(make_segment(t=4, index=10))  # b is found dead (fast: refused on loopback)
        moved = RedisShardProcess(password="pw")  # the replacement, at a new address
        table[1] = moved.url
        time.sleep(0.1)
        start = time.monotonic()
        for i in range(6):
            w.write(make_segment(t=4, index=20 + i))
        took = time.monotonic() - start
        assert took < 1.0, f"writes stalled after the switch ({took:.2f}s)"
        m = w.metrics()
        assert m["replay_writer/shard_moves_total"] == 1 and m["replay_writer/shard1/up"] == 1.0
        assert m["replay_writer/shard1/transitions_stored"] > 0  # inserts reach the new address
        assert moved.admin().get("cvy:size") is not None
        start = time.monotonic()
        s.refresh_index()
        for _ in range(20):
            assert next(s).size == 8
        assert time.monotonic() - start < 3.0
        sm = s.metrics()
        assert sm["replay_sampler/shard1/up"] == 1.0 and sm["replay_sampler/shard1/transitions_stored"] > 0
        assert sm["replay_sampler/shard1/sampled_transitions_total"] > 0  # batches draw from it
        # Gone for good: never tried again, the other shard carries on.
        table[1] = ""
        time.sleep(0.1)
        w.write(make_segment(t=4, index=40))
        assert w.metrics()["replay_writer/shard1/up"] == 0.0
        assert next(s).size == 8
        w.close()
        s.close()
    finally:
        for p in (a, b, moved):
            if p is not None:
                p.stop()
