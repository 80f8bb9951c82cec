"""CARLA server processes: launch, health, restart with backoff, recycling, clean-up.

:class:`CarlaServerManager` owns one server for a collector's whole life. It leases a port
block (:mod:`actors.carla.ports`), starts ``CarlaUE4.sh`` (0.9.x) or ``CarlaUnreal.sh``
(0.10) from ``CARLA_ROOT`` in a process group of its own, waits until the server answers an
RPC, restarts it (same ports) when it dies or hangs, with exponential backoff and a cap on
consecutive crashes, recycles it every ``carla.recycle_episodes`` episodes because CARLA
servers grow in memory over many resets, and kills the whole group on close — the launch
scripts start the engine binary as a child, so killing only the script would orphan it.

:class:`actors.carla.attached.AttachedServer` is the same interface
(:class:`actors.carla.server_api.SimulatorServer`) for a server someone else runs
(``carla.host``): it can only wait for that server to answer again. Launching itself (the
command line, GPUs, killing the process group) is in :mod:`actors.carla.launch`.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from actors.carla.attached import AttachedServer
from actors.carla.errors import SimulatorUnavailable
from actors.carla.launch import LaunchSpec, detect_gpus, find_launcher, kill_group, log_tail
from actors.carla.ports import PortBlock, PortLease, lease_ports
from actors.carla.server_api import Probe, RestartCounters, ServerEndpoint, SimulatorServer, carla_probe
from common.config import CarlaConfig

log = logging.getLogger(__name__)


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
        self.counters = RestartCounters()

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
            detail=f"; log {self.log_path}:\n{log_tail(self.log_path)}",
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
        self._finalizer = weakref.finalize(self, kill_group, self.process.pid, 1.0)

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
        kill_group(self.process.pid, self.stop_grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.process = None
        if self.lease is not None:
            self.lease.record_server(None)
            deadline = time.monotonic() + 10.0
            while not self.lease.ports_free() and time.monotonic() < deadline:
                time.sleep(0.1)


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
