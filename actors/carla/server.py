"""CARLA server processes: launch, health, restart with backoff, recycling, clean-up.

:class:`CarlaServerManager` owns one server for a collector's whole life. It leases a port
block (:mod:`actors.carla.ports`), starts ``CarlaUE4.sh`` (0.9.x) or ``CarlaUnreal.sh``
(0.10) from ``CARLA_ROOT`` in a process group of its own, waits until the server answers an
RPC, restarts it (same ports) when it dies or hangs, with exponential backoff and a cap on
consecutive crashes, recycles it every ``carla.recycle_episodes`` episodes because CARLA
servers grow in memory over many resets, and kills the whole group on close — the launch
scripts start the engine binary as a child, so killing only the script would orphan it.

:class:`AttachedServer` is the same interface for a server someone else runs
(``carla.host``): it can only wait for that server to answer again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from actors.carla.ports import PORTS_PER_SERVER, PortBlock, PortLease, lease_ports
from actors.envs.errors import SimulatorUnavailable
from common.config import CarlaConfig

log = logging.getLogger(__name__)

LAUNCHERS = ("CarlaUE4.sh", "CarlaUnreal.sh")  # 0.9.x (UE4), 0.10 (UE5)

Probe = Callable[[str, int, float], bool]
"""``probe(host, rpc_port, timeout_s)``: whether a server answers there now."""


@dataclass(frozen=True)
class ServerEndpoint:
    host: str
    rpc_port: int
    traffic_manager_port: int
    gpu: int | None = None


class SimulatorServer(Protocol):
    """What the CARLA env needs from whoever provides its server."""

    @property
    def endpoint(self) -> ServerEndpoint: ...

    def start(self) -> ServerEndpoint: ...

    def alive(self) -> bool: ...

    def restart(self, reason: str) -> ServerEndpoint: ...

    def episode_finished(self) -> None: ...

    def recycle_due(self) -> bool: ...

    def recycle(self) -> ServerEndpoint: ...

    def metrics(self) -> dict[str, float]: ...

    def close(self) -> None: ...


# ----- probes --------------------------------------------------------------------------------


def carla_probe(host: str, port: int, timeout_s: float) -> bool:
    """A real RPC round trip: a listening socket alone does not mean the world is ready."""
    from actors.carla.client import import_carla

    carla = import_carla()
    try:
        client = carla.Client(host, port, worker_threads=1)
        client.set_timeout(timeout_s)
        client.get_server_version()
    except RuntimeError:
        return False
    return True


# ----- launching -----------------------------------------------------------------------------


def find_launcher(root: str | Path = "") -> Path:
    """The server launch script under ``root`` (or $CARLA_ROOT)."""
    base = str(root) or os.environ.get("CARLA_ROOT", "")
    if not base:
        raise SimulatorUnavailable(
            "no CARLA install to launch: set carla.root or $CARLA_ROOT to the directory holding "
            f"{' or '.join(LAUNCHERS)}, or set carla.host to attach to a running server"
        )
    for name in LAUNCHERS:
        path = Path(base) / name
        if path.is_file():
            return path
    raise SimulatorUnavailable(f"carla.root / $CARLA_ROOT = {base!r} holds neither {' nor '.join(LAUNCHERS)}")


def detect_gpus() -> list[int]:
    """Indices of the node's NVIDIA GPUs (empty when none or no driver)."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
            return [i for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU "))]
        except (OSError, subprocess.SubprocessError):
            pass
    proc = Path("/proc/driver/nvidia/gpus")
    return list(range(len(list(proc.iterdir())))) if proc.is_dir() else []


@dataclass(frozen=True)
class LaunchSpec:
    """How to start a server; :meth:`command` is pure, so tests check the flags without one."""

    executable: Path
    quality_level: str = "Low"
    render_offscreen: bool = True
    extra_args: tuple[str, ...] = ()
    gpus: tuple[int, ...] = ()

    def gpu_for(self, block: PortBlock) -> int | None:
        # Port slots are handed out lowest first, so consecutive servers of a node land on
        # consecutive GPUs.
        return self.gpus[block.slot % len(self.gpus)] if self.gpus else None

    def command(self, block: PortBlock) -> list[str]:
        args = [
            str(self.executable),
            f"-carla-rpc-port={block.rpc}",
            f"-carla-streaming-port={block.streaming}",
            f"-carla-secondary-port={block.secondary}",
            f"-quality-level={self.quality_level}",
            "-nosound",
        ]
        if self.render_offscreen:
            # Off-screen still renders camera sensors (unlike -nullrhi / no-rendering mode);
            # CARLA docs, "Rendering options".
            args.append("-RenderOffScreen")
        gpu = self.gpu_for(block)
        if gpu is not None:
            # Vulkan picks its device from -graphicsadapter (UE4's r.GraphicsAdapter);
            # CUDA_VISIBLE_DEVICES does not steer Vulkan but is set too (see environment()).
            args.append(f"-graphicsadapter={gpu}")
        args.extend(self.extra_args)
        return args

    def environment(self, block: PortBlock, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        gpu = self.gpu_for(block)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        elif env.get("CUDA_VISIBLE_DEVICES") == "":
            # Ray hides GPUs from CPU-only actors with an empty value; the server must not inherit that.
            del env["CUDA_VISIBLE_DEVICES"]
        return env


def backoff_delay(consecutive: int, base_s: float, max_s: float) -> float:
    """Wait before restart number ``consecutive`` (1, 2, ...): base, 2 base, 4 base, ... capped."""
    if consecutive <= 0:
        return 0.0
    return min(base_s * 2.0 ** (consecutive - 1), max_s)


def _kill_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the group, give it ``grace_s``, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.05)
            os.killpg(pgid, 0)  # raises ProcessLookupError once every member is gone
        os.killpg(pgid, signal.SIGKILL)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class _Counters:
    launches_total: int = 0
    restarts_total: int = 0
    recycles_total: int = 0
    failed_launches_total: int = 0
    episodes_since_launch: int = 0
    consecutive_crashes: int = 0
    restart_wait_seconds_total: float = 0.0
    waits: list[float] = field(default_factory=list)

    def crash_and_wait(
        self,
        where: str,
        reason: str,
        max_restarts: int,
        backoff_s: float,
        backoff_max_s: float,
        sleep: Callable[[float], None],
        detail: str = "",
    ) -> None:
        """Count one failure in the streak; give up past ``max_restarts``, else back off."""
        self.consecutive_crashes += 1
        if self.consecutive_crashes > max_restarts:
            raise SimulatorUnavailable(
                f"{where}: {self.consecutive_crashes} consecutive failures "
                f"(carla.max_restarts={max_restarts}); last: {reason}{detail}"
            )
        delay = backoff_delay(self.consecutive_crashes, backoff_s, backoff_max_s)
        self.waits.append(delay)
        self.restart_wait_seconds_total += delay
        if delay > 0:
            sleep(delay)


class CarlaServerManager:
    """One launched CARLA server, kept alive for a collector (see module docstring)."""

    def __init__(
        self,
        spec: LaunchSpec,
        *,
        host: str = "127.0.0.1",
        lock_dir: str | Path = "",
        port_base: int = 2000,
        max_servers: int = 64,
        start_timeout_s: float = 180.0,
        probe: Probe = carla_probe,
        probe_timeout_s: float = 5.0,
        backoff_s: float = 2.0,
        backoff_max_s: float = 60.0,
        max_restarts: int = 5,
        recycle_episodes: int = 0,
        log_dir: str | Path | None = None,
        stop_grace_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.spec = spec
        self.stop_grace_s = stop_grace_s
        self.host = host
        self.lock_dir = lock_dir
        self.port_base = port_base
        self.max_servers = max_servers
        self.start_timeout_s = start_timeout_s
        self.probe = probe
        self.probe_timeout_s = probe_timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_restarts = max_restarts
        self.recycle_episodes = recycle_episodes
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._sleep = sleep
        self.lease: PortLease | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self.counters = _Counters()

    # ----- state --------------------------------------------------------------------------

    @property
    def block(self) -> PortBlock:
        if self.lease is None:
            raise RuntimeError("CARLA server manager: start() first")
        return self.lease.block

    @property
    def endpoint(self) -> ServerEndpoint:
        b = self.block
        return ServerEndpoint(self.host, b.rpc, b.traffic_manager, self.spec.gpu_for(b))

    @property
    def log_path(self) -> Path:
        directory = self.log_dir or (self.lease.path.parent if self.lease else Path("."))
        return directory / f"carla-{self.block.rpc}.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def metrics(self) -> dict[str, float]:
        c = self.counters
        return {
            "simulator/launches_total": c.launches_total,
            "simulator/restarts_total": c.restarts_total,
            "simulator/recycles_total": c.recycles_total,
            "simulator/failed_launches_total": c.failed_launches_total,
            "simulator/restart_wait_seconds_total": c.restart_wait_seconds_total,
            "simulator/episodes_since_launch": c.episodes_since_launch,
        }

    # ----- life cycle ---------------------------------------------------------------------

    def start(self) -> ServerEndpoint:
        """Lease ports (once) and launch until the server answers (or give up)."""
        if self.lease is None:
            self.lease = lease_ports(self.lock_dir, self.port_base, self.max_servers)
            log.info("CARLA server ports: rpc %d, streaming %d, secondary %d, traffic manager %d", *self.block.ports)
        if self.alive():
            return self.endpoint
        while True:
            try:
                self._launch()
                self._wait_until_answering()
                return self.endpoint
            except SimulatorUnavailable as exc:
                self.counters.failed_launches_total += 1
                self._stop_process()
                self._count_crash_and_wait(f"launch failed: {exc}")

    def restart(self, reason: str) -> ServerEndpoint:
        """After a crash or time-out: stop what is left, back off, launch again on the same ports."""
        log.warning("CARLA server on port %d: restarting (%s)", self.block.rpc, reason)
        self.counters.restarts_total += 1
        self._stop_process()
        self._count_crash_and_wait(reason)
        return self.start()

    def episode_finished(self) -> None:
        """A finished episode proves the server healthy: the crash streak starts over."""
        self.counters.episodes_since_launch += 1
        self.counters.consecutive_crashes = 0

    def recycle_due(self) -> bool:
        return self.recycle_episodes > 0 and self.counters.episodes_since_launch >= self.recycle_episodes

    def recycle(self) -> ServerEndpoint:
        """Planned restart to shed the memory a long-running server accumulates; no backoff."""
        log.info(
            "CARLA server on port %d: recycling after %d episodes", self.block.rpc, self.counters.episodes_since_launch
        )
        self.counters.recycles_total += 1
        self._stop_process()
        return self.start()

    def close(self) -> None:
        self._stop_process()
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __enter__(self) -> CarlaServerManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- internals ----------------------------------------------------------------------

    def _count_crash_and_wait(self, reason: str) -> None:
        self.counters.crash_and_wait(
            f"CARLA server on port {self.block.rpc}",
            reason,
            self.max_restarts,
            self.backoff_s,
            self.backoff_max_s,
            self._sleep,
            detail=f"; log {self.log_path}:\n{_tail(self.log_path)}",
        )

    def _launch(self) -> None:
        block = self.block
        cmd = self.spec.command(block)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n=== convoy launch at {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n".encode())
            logf.flush()
            # A new session makes the server its own process group, so close() can kill the
            # engine binary the launch script starts, not just the script.
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=self.spec.environment(block),
                start_new_session=True,
                cwd=str(self.spec.executable.parent),
            )
        self.counters.launches_total += 1
        self.counters.episodes_since_launch = 0
        assert self.lease is not None
        self.lease.record_server(self.process.pid)
        # Kills the group if the collector exits without close() (interpreter exit or GC).
        self._finalizer = weakref.finalize(self, _kill_group, self.process.pid, 1.0)

    def _wait_until_answering(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise SimulatorUnavailable(f"server exited with code {code} while starting")
            if self.probe(self.host, self.block.rpc, min(self.probe_timeout_s, self.start_timeout_s)):
                return
            if time.monotonic() >= deadline:
                raise SimulatorUnavailable(
                    f"server did not answer on port {self.block.rpc} within {self.start_timeout_s:.0f}s"
                )
            time.sleep(0.2)

    def _stop_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self.process is None:
            return
        _kill_group(self.process.pid, self.stop_grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.process = None
        if self.lease is not None:
            self.lease.record_server(None)
            deadline = time.monotonic() + 10.0
            while not self.lease.ports_free() and time.monotonic() < deadline:
                time.sleep(0.1)


class AttachedServer:
    """A server convoy does not own (``carla.host``): it can be waited for, never restarted.

    Collector ``index`` attaches to ``port + 4 * index`` (one synchronous client per server).
    The traffic manager runs in the collector's process, so its port is leased on this node.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        index: int = 0,
        lock_dir: str | Path = "",
        port_base: int = 8000,
        max_servers: int = 64,
        start_timeout_s: float = 180.0,
        probe: Probe = carla_probe,
        probe_timeout_s: float = 5.0,
        backoff_s: float = 2.0,
        backoff_max_s: float = 60.0,
        max_restarts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.host = host
        self.rpc_port = port + PORTS_PER_SERVER * index
        self.lock_dir = lock_dir
        self.port_base = port_base
        self.max_servers = max_servers
        self.start_timeout_s = start_timeout_s
        self.probe = probe
        self.probe_timeout_s = probe_timeout_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_restarts = max_restarts
        self._sleep = sleep
        self.lease: PortLease | None = None
        self.counters = _Counters()

    @property
    def endpoint(self) -> ServerEndpoint:
        if self.lease is None:
            raise RuntimeError("attached CARLA server: start() first")
        return ServerEndpoint(self.host, self.rpc_port, self.lease.block.traffic_manager)

    def start(self) -> ServerEndpoint:
        if self.lease is None:
            self.lease = lease_ports(self.lock_dir, self.port_base, self.max_servers)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.probe(self.host, self.rpc_port, self.probe_timeout_s):
            if time.monotonic() >= deadline:
                raise SimulatorUnavailable(
                    f"CARLA server at {self.host}:{self.rpc_port} (carla.host/carla.port) did not answer "
                    f"within {self.start_timeout_s:.0f}s"
                )
            time.sleep(0.5)
        return self.endpoint

    def alive(self) -> bool:
        return self.probe(self.host, self.rpc_port, self.probe_timeout_s)

    def restart(self, reason: str) -> ServerEndpoint:
        self.counters.restarts_total += 1
        self.counters.crash_and_wait(
            f"CARLA server at {self.host}:{self.rpc_port}",
            reason,
            self.max_restarts,
            self.backoff_s,
            self.backoff_max_s,
            self._sleep,
        )
        return self.start()

    def episode_finished(self) -> None:
        self.counters.episodes_since_launch += 1
        self.counters.consecutive_crashes = 0

    def recycle_due(self) -> bool:
        return False  # not ours to restart

    def recycle(self) -> ServerEndpoint:
        return self.endpoint

    def metrics(self) -> dict[str, float]:
        return {
            "simulator/restarts_total": self.counters.restarts_total,
            "simulator/restart_wait_seconds_total": self.counters.restart_wait_seconds_total,
        }

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def server_from_config(cfg: CarlaConfig, index: int = 0) -> SimulatorServer:
    """The server a collector's env uses: attach when ``carla.host`` is set, else launch one."""
    common = {
        "lock_dir": cfg.lock_dir,
        "port_base": cfg.port_base,
        "max_servers": cfg.max_servers,
        "start_timeout_s": cfg.start_timeout_s,
        "backoff_s": cfg.restart_backoff_s,
        "backoff_max_s": cfg.restart_backoff_max_s,
        "max_restarts": cfg.max_restarts,
    }
    if cfg.host:
        return AttachedServer(cfg.host, cfg.port, index=index, **common)  # type: ignore[arg-type]
    spec = LaunchSpec(
        executable=find_launcher(cfg.root),
        quality_level=cfg.quality_level,
        render_offscreen=cfg.render_offscreen,
        extra_args=cfg.extra_args,
        gpus=cfg.gpus or tuple(detect_gpus()),
    )
    return CarlaServerManager(spec, recycle_episodes=cfg.recycle_episodes, **common)  # type: ignore[arg-type]
