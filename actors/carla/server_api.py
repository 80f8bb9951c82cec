"""What the CARLA env needs from a simulator server, and what every server kind shares.

:class:`SimulatorServer` is the interface (a launched server, an attached one, the in-process
stand-in's handle); :class:`RestartCounters` is the crash streak with exponential backoff
that both real kinds restart under, and :func:`carla_probe` the health check they use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from actors.carla.errors import SimulatorUnavailable

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


def backoff_delay(consecutive: int, base_s: float, max_s: float) -> float:
    """Wait before restart number ``consecutive`` (1, 2, ...): base, 2 base, 4 base, ... capped."""
    if consecutive <= 0:
        return 0.0
    return min(base_s * 2.0 ** (consecutive - 1), max_s)


@dataclass
class RestartCounters:
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
