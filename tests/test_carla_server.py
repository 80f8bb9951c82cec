"""The CARLA server manager against a stand-in server (tests/fake_carla_server.py): port
leasing across processes, health waiting, restart with backoff and cap, recycling,
process-group clean-up, orphan reaping, attaching. No CARLA needed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.carla.attached import AttachedServer
from actors.carla.errors import SimulatorUnavailable
from actors.carla.launch import LaunchSpec, find_launcher
from actors.carla.ports import PORTS_PER_SERVER, lease_ports, port_is_free
from actors.carla.server import CarlaServerManager
from actors.carla.server_api import backoff_delay
from tests.fake_carla_server import ping_probe

REPO = Path(__file__).resolve().parents[1]
FAKE_SERVER = Path(__file__).with_name("fake_carla_server.py")


def _free_base(span: int = 64) -> int:
    """A port range nothing on this machine listens on (tests run in parallel with others)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1] - s.getsockname()[1] % 4
        if base + span < 65000 and all(port_is_free(p) for p in range(base, base + span)):
            return base
    raise RuntimeError("no free port range")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


@pytest.fixture
def carla_root(tmp_path: Path) -> Path:
    root = tmp_path / "CARLA_0.9.16"
    root.mkdir()
    script = root / "CarlaUE4.sh"
    # Like the real script: a shell that runs the engine as its child (no exec).
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    script.chmod(0o755)
    return root


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "launches.jsonl"
    monkeypatch.setenv("FAKE_CARLA_RECORD", str(path))
    return path


def _launches(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def manager_factory(carla_root: Path, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    made: list[CarlaServerManager] = []
    base = _free_base()

    def make(**kw: object) -> CarlaServerManager:
        spec = LaunchSpec(find_launcher(carla_root), gpus=kw.pop("gpus", ()))  # type: ignore[arg-type]
        opts: dict = {
            "lock_dir": tmp_path / "locks",
            "port_base": base,
            "max_servers": 8,
            "start_timeout_s": 10.0,
            "probe": ping_probe,
            "probe_timeout_s": 1.0,
            "backoff_s": 1.0,
            "backoff_max_s": 4.0,
            "max_restarts": 3,
            "stop_grace_s": 1.0,
            "sleep": Sleeps(),
        }
        opts.update(kw)
        m = CarlaServerManager(spec, **opts)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


# ----- pure parts ----------------------------------------------------------------------------


def test_launch_command_has_offscreen_low_quality_ports_and_gpu(carla_root: Path) -> None:
    from actors.carla.ports import PortBlock

    spec = LaunchSpec(find_launcher(carla_root), gpus=(0, 1))
    block = PortBlock(slot=3, rpc=2012)
    cmd = spec.command(block)
    assert cmd[0].endswith("CarlaUE4.sh")
    for flag in (
        "-carla-rpc-port=2012",
        "-carla-streaming-port=2013",
        "-carla-secondary-port=2014",
        "-quality-level=Low",
        "-nosound",
        "-RenderOffScreen",
        "-graphicsadapter=1",  # slot 3 on 2 GPUs
    ):
        assert flag in cmd
    assert spec.environment(block, {"CUDA_VISIBLE_DEVICES": ""})["CUDA_VISIBLE_DEVICES"] == "1"
    no_gpu = LaunchSpec(find_launcher(carla_root), quality_level="Epic", render_offscreen=False)
    assert "-RenderOffScreen" not in no_gpu.command(block) and "-quality-level=Epic" in no_gpu.command(block)
    # Ray hides GPUs from CPU-only actors with an empty value; the server must not inherit it.
    assert "CUDA_VISIBLE_DEVICES" not in no_gpu.environment(block, {"CUDA_VISIBLE_DEVICES": ""})


def test_find_launcher_picks_ue4_or_ue5_script_and_names_carla_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "CarlaUnreal.sh").write_text("#!/bin/sh\n")
    assert find_launcher(tmp_path).name == "CarlaUnreal.sh"
    monkeypatch.delenv("CARLA_ROOT", raising=False)
    with pytest.raises(SimulatorUnavailable, match="CARLA_ROOT"):
        find_launcher("")
    with pytest.raises(SimulatorUnavailable, match=r"neither CarlaUE4\.sh nor CarlaUnreal\.sh"):
        find_launcher(tmp_path / "nothing")


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(k, 2.0, 10.0) for k in range(5)] == [0.0, 2.0, 4.0, 8.0, 10.0]


# ----- port leasing ----------------------------------------------------------------------------

_LEASE_SCRIPT = """
import sys, json
sys.path.insert(0, {repo!r})
from actors.carla.ports import lease_ports
lease = lease_ports({lock_dir!r}, {base}, 16)
print(json.dumps(list(lease.block.ports)), flush=True)
sys.stdin.read()
"""


def test_port_leases_never_collide_across_processes(tmp_path: Path) -> None:
    base = _free_base()
    lock_dir = str(tmp_path / "locks")
    code = _LEASE_SCRIPT.format(repo=str(REPO), lock_dir=lock_dir, base=base)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    try:
        blocks = [tuple(json.loads(p.stdout.readline())) for p in procs]  # type: ignore[union-attr]
        mine = lease_ports(lock_dir, base, 16)
        blocks.append(mine.block.ports)
        ports = [port for block in blocks for port in block]
        assert len(ports) == len(set(ports)) == 7 * PORTS_PER_SERVER
        assert all(b[1] == b[0] + 1 and b[2] == b[0] + 2 and b[3] == b[0] + 3 for b in blocks)
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=10)
    # The kernel drops a dead holder's flock: the first slot is free again.
    mine.release()
    again = lease_ports(lock_dir, base, 16)
    assert again.block.rpc == base
    again.release()


def test_lease_skips_a_slot_whose_ports_another_program_holds(tmp_path: Path) -> None:
    base = _free_base()
    with socket.socket() as squatter:
        squatter.bind(("", base + 2))  # slot 0's secondary port
        squatter.listen(1)
        lease = lease_ports(tmp_path, base, 4)
        assert lease.block.slot == 1 and lease.block.rpc == base + PORTS_PER_SERVER
        lease.release()
    with pytest.raises(RuntimeError, match="no free CARLA port block"):
        held = [lease_ports(tmp_path, base, 2) for _ in range(3)]
        del held


# ----- the manager -----------------------------------------------------------------------------


def test_start_waits_until_the_server_answers(manager_factory, record: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_CARLA_START_DELAY", "1.0")
    m = manager_factory(gpus=(0,))
    t0 = time.monotonic()
    ep = m.start()
    assert time.monotonic() - t0 >= 1.0
    assert m.alive() and ping_probe("127.0.0.1", ep.rpc_port, 1.0)
    assert ep.traffic_manager_port == ep.rpc_port + 3 and ep.gpu == 0
    (launch,) = _launches(record)
    assert f"-carla-rpc-port={ep.rpc_port}" in launch["argv"] and "-RenderOffScreen" in launch["argv"]
    assert launch["cuda_visible_devices"] == "0"
    assert m.metrics()["simulator/launches_total"] == 1


def test_a_server_that_never_answers_is_retried_with_backoff_then_given_up(
    manager_factory, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_CARLA_MODE", "never_answer")
    m = manager_factory(start_timeout_s=0.5, probe_timeout_s=0.2, max_restarts=2)
    with pytest.raises(SimulatorUnavailable, match=r"3 consecutive failures .*did not answer") as err:
        m.start()
    assert "carla-" in str(err.value) and ".log" in str(err.value)  # names the server log
    assert m._sleep.calls == [1.0, 2.0]
    assert m.counters.failed_launches_total == 3 and not m.alive()


def test_restart_after_death_keeps_ports_backs_off_and_is_capped(
    manager_factory, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FAKE_CARLA_DIE_AFTER", "0.3")
    m = manager_factory(max_restarts=2)
    ep = m.start()
    assert _wait(lambda: not m.alive(), 5)
    assert m.restart("died") == ep  # same leased ports
    assert _wait(lambda: not m.alive(), 5)
    m.restart("died again")
    assert m._sleep.calls == [1.0, 2.0]
    m.episode_finished()  # a finished episode ends the crash streak: back to the base wait
    assert _wait(lambda: not m.alive(), 5)
    m.restart("died a third time")
    assert m._sleep.calls == [1.0, 2.0, 1.0]
    assert _wait(lambda: not m.alive(), 5)
    m.restart("4")
    assert _wait(lambda: not m.alive(), 5)
    with pytest.raises(SimulatorUnavailable, match="3 consecutive failures"):
        m.restart("5")
    launches = _launches(record)
    assert len(launches) == 5 and len({x["pid"] for x in launches}) == 5  # start + 4 restarts
    assert m.metrics()["simulator/restarts_total"] == 5
    # Every dead server's renderer was killed with its group at the restart.
    assert all(_wait(lambda pid=x["renderer_pid"]: _gone(pid), 5) for x in launches)


def test_a_hung_server_is_killed_and_replaced(manager_factory, record: Path) -> None:  # type: ignore[no-untyped-def]
    m = manager_factory()
    ep = m.start()
    old = m.process.pid
    os.killpg(old, signal.SIGSTOP)  # a real hang: alive, answers nothing
    assert m.alive() and not ping_probe("127.0.0.1", ep.rpc_port, 0.3)
    m.restart("tick timed out")
    assert m.process.pid != old and _gone(old)
    assert ping_probe("127.0.0.1", ep.rpc_port, 1.0)
    first, second = _launches(record)
    assert _gone(first["pid"]) and _gone(first["renderer_pid"]) and not _gone(second["pid"])


def test_recycles_every_n_episodes_without_backoff(manager_factory, record: Path) -> None:  # type: ignore[no-untyped-def]
    m = manager_factory(recycle_episodes=2)
    ep = m.start()
    m.episode_finished()
    assert not m.recycle_due()
    m.episode_finished()
    assert m.recycle_due()
    assert m.recycle() == ep
    assert not m.recycle_due() and m.counters.recycles_total == 1 and m._sleep.calls == []
    assert len(_launches(record)) == 2


def test_close_kills_the_whole_process_group_and_frees_the_ports(manager_factory, record: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = manager_factory()
    ep = m.start()
    shell = m.process.pid
    (launch,) = _launches(record)
    pids = [shell, launch["pid"], launch["renderer_pid"]]
    assert not any(_gone(p) for p in pids)
    m.close()
    assert all(_wait(lambda p=p: _gone(p), 5) for p in pids)
    assert _wait(lambda: all(port_is_free(p) for p in (ep.rpc_port, ep.rpc_port + 1, ep.rpc_port + 2)), 5)
    again = lease_ports(tmp_path / "locks", ep.rpc_port, 1)  # the slot's lock is free again
    again.release()


_ORPHAN_SCRIPT = """
import sys, json
sys.path.insert(0, {repo!r})
from actors.carla.launch import LaunchSpec
from actors.carla.server import CarlaServerManager
from tests.fake_carla_server import ping_probe
m = CarlaServerManager(LaunchSpec(__import__("pathlib").Path({launcher!r})), lock_dir={lock_dir!r},
                       port_base={base}, max_servers=4, probe=ping_probe, start_timeout_s=10)
ep = m.start()
print(json.dumps([ep.rpc_port, m.process.pid]), flush=True)
sys.stdin.read()
"""


def test_a_server_orphaned_by_a_killed_collector_is_reaped_by_the_next_lease(carla_root: Path, tmp_path: Path) -> None:
    base = _free_base()
    code = _ORPHAN_SCRIPT.format(
        repo=str(REPO), launcher=str(carla_root / "CarlaUE4.sh"), lock_dir=str(tmp_path), base=base
    )
    collector = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    rpc, server_pgid = json.loads(collector.stdout.readline())  # type: ignore[union-attr]
    collector.kill()  # SIGKILL: no clean-up ran, the server lives on holding its ports
    collector.wait()
    assert rpc == base and not _gone(server_pgid) and not port_is_free(rpc)
    lease = lease_ports(tmp_path, base, 4)
    try:
        assert lease.block.rpc == base  # the slot was reclaimed, not skipped
        assert _wait(lambda: _gone(server_pgid), 5)
    finally:
        lease.release()


def test_attached_server_uses_port_per_collector_and_a_local_traffic_manager_port(
    manager_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    m = manager_factory()
    ep = m.start()
    attached = AttachedServer(
        "127.0.0.1",
        ep.rpc_port - 4,
        index=1,
        lock_dir=tmp_path / "locks",
        port_base=ep.rpc_port + 4,
        probe=ping_probe,
        start_timeout_s=2.0,
    )
    got = attached.start()
    assert got.rpc_port == ep.rpc_port and got.traffic_manager_port not in (ep.rpc_port, ep.traffic_manager_port)
    assert not attached.recycle_due()
    attached.close()
    nobody = AttachedServer(
        "127.0.0.1",
        _free_base(),
        lock_dir=tmp_path / "locks",
        probe=ping_probe,
        start_timeout_s=0.5,
        port_base=ep.rpc_port + 4,
    )
    with pytest.raises(SimulatorUnavailable, match=r"carla.host/carla.port\) did not answer"):
        nobody.start()
    nobody.close()
