"""A CARLA server someone else runs (``carla.host``): convoy can wait for it, never restart it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from actors.carla.errors import SimulatorUnavailable
from actors.carla.ports import PORTS_PER_SERVER, PortLease, lease_ports
from actors.carla.server_api import Probe, RestartCounters, ServerEndpoint, carla_probe


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
        self.counters = RestartCounters()

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
