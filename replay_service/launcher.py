"""The redis-server processes convoy starts for replay shards.

A shard convoy starts runs with no disk persistence (replay is a cache of experience, not a
database; snapshots of gigabytes of frames would stall it), binds to ``replay.bind`` and, when
``replay.password`` is set, requires it. The password goes through a 0600 config file, never
the command line, so it does not show in ``ps``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from replay_service.errors import ShardError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Child-side: get SIGTERM when the parent dies, so a killed driver leaves no redis-server."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RedisShardProcess:
    """One redis-server started by convoy on a free port; :meth:`stop` always removes it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str = "",
        executable: str = "redis-server",
        maxmemory: str = "",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self._dir = tempfile.mkdtemp(prefix="convoy-shard-")
        conf = Path(self._dir) / "redis.conf"
        lines = [
            f"port {self.port}",
            f"bind {host}",
            'save ""',
            "appendonly no",
            f"dir {self._dir}",
            "daemonize no",
            "loglevel warning",
            # Replay values are written once and read by range; Lua scripts may run for a
            # whole batch, which is fine below the default 5 s busy threshold.
            "protected-mode " + ("yes" if not password and host not in ("127.0.0.1", "localhost", "::1") else "no"),
        ]
        if password:
            lines.append(f"requirepass {password}")
        if maxmemory:
            lines.append(f"maxmemory {maxmemory}")
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        self._log_path = Path(self._dir) / "redis.log"
        self._log = open(self._log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                [executable, str(conf)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # Linux-only cleanup guarantee
                start_new_session=True,
            )
        except FileNotFoundError:
            self._log.close()
            raise ShardError(
                f"replay.redis_server={executable!r} not found; install it (Debian: apt-get install redis-server) "
                "or set replay.shard_urls to existing shards"
            ) from None
        atexit.register(self.stop)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, password=self.password or None, socket_timeout=1.0)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ShardError(f"redis-server on port {self.port} exited at start: {self.log_tail()}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)
            raise ShardError(f"redis-server on port {self.port} did not answer within {timeout}s: {self.log_tail()}")
        finally:
            client.close()

    def log_tail(self, n: int = 5) -> str:
        try:
            return " | ".join(self._log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Hard-kill (tests of shard loss)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        with contextlib.suppress(OSError):
            for p in Path(self._dir).iterdir():
                p.unlink()
            os.rmdir(self._dir)
        atexit.unregister(self.stop)
