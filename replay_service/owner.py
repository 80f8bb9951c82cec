"""A shard convoy started: one redis-server, restarted on the same address when it dies.

The owner is a plain class (``replay_service.remote.ShardActor`` makes it a Ray actor on the
node Ray picks). Writers and samplers already reconnect to a shard that comes back, so
restarting redis-server on the same host and port is all it takes for a killed shard to
fill again; its data is lost (a shard is a cache of experience, not a database).
"""

from __future__ import annotations

import logging
import threading
import time

from replay_service.errors import ShardError
from replay_service.launcher import RedisShardProcess
from replay_service.metric_keys import RESTARTS_TOTAL

log = logging.getLogger(__name__)


class ShardOwner:
    """Starts redis-server on ``host:port`` (a free port when None) and keeps it running.

    ``advertise`` is the address other machines use to reach it (the node's address when
    ``host`` is a wildcard); it defaults to ``host``.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str = "",
        executable: str = "redis-server",
        advertise: str = "",
        check_every_s: float = 0.2,
        max_backoff_s: float = 5.0,
        maxmemory: int = 0,
    ) -> None:
        self.host = host
        self.password = password
        self.executable = executable
        self.maxmemory = maxmemory
        self.advertise = advertise or host
        self.process = RedisShardProcess(
            host=host, port=port, password=password, executable=executable, maxmemory=maxmemory
        )
        self.port = self.process.port
        self.restarts_total = 0
        self.restart_failures_total = 0
        self.last_restart_seconds = 0.0
        self._check_every_s = check_every_s
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"shard-owner-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        # The process's URL (user, and the password only when none was given) at the advertised host.
        return self.process.url.replace(f"@{self.host}:", f"@{self.advertise}:", 1)

    def alive(self) -> bool:
        with self._lock:
            return self.process.alive()

    def _watch(self) -> None:
        backoff = self._check_every_s
        while not self._stop.wait(self._check_every_s if self.alive() else backoff):
            if self.alive():
                backoff = self._check_every_s
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                died = time.monotonic()
                log.warning(
                    "replay shard %s: redis-server died (%s); restarting it on the same address",
                    self.url,
                    self.process.log_tail(2),
                )
                self.process.stop()
                try:
                    self.process = RedisShardProcess(
                        host=self.host,
                        port=self.port,
                        password=self.password,
                        executable=self.executable,
                        maxmemory=self.maxmemory,
                    )
                except ShardError as exc:
                    # The port may still be held for a moment; try again with a growing pause.
                    self.restart_failures_total += 1
                    backoff = min(max(backoff * 2, 0.1), self._max_backoff_s)
                    log.warning("replay shard %s: restart failed (%s); retrying in %.1fs", self.url, exc, backoff)
                    continue
                self.restarts_total += 1
                self.last_restart_seconds = time.monotonic() - died
                log.warning("replay shard %s: back after %.2fs", self.url, self.last_restart_seconds)

    def kill_server(self) -> int:
        """SIGKILL the current redis-server (chaos tests); returns its pid."""
        with self._lock:
            pid = int(self.process.proc.pid)
            self.process.kill()
        return pid

    def metrics(self) -> dict[str, float]:
        return {
            "replay_shard/up": float(self.alive()),
            RESTARTS_TOTAL: self.restarts_total,
            "replay_shard/restart_failures_total": self.restart_failures_total,
            "replay_shard/last_restart_seconds": self.last_restart_seconds,
        }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self.process.stop()
