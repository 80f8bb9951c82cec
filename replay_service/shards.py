"""Replay shards: redis-server processes convoy starts (or attaches to), and a client per shard.

A shard convoy starts runs with no disk persistence (replay is a cache of experience, not a
database; snapshots of gigabytes of frames would stall it), binds to ``replay.bind`` and, when
``replay.password`` is set, requires it. The password goes through a 0600 config file, never
the command line, so it does not show in ``ps``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import redis

from replay_service.codec import RECORD_SIZE

log = logging.getLogger(__name__)

KEY_PREFIX = "cvy:"
SEG_PREFIX = KEY_PREFIX + "seg:"
K_NEXT, K_HEAD, K_SIZE, K_BYTES, K_LENS, K_INSERTED, K_EVICTED = (
    KEY_PREFIX + s for s in ("next", "head", "size", "bytes", "lens", "inserted_total", "evicted_total")
)


class ShardError(RuntimeError):
    """A shard could not be started, reached or authenticated; the message says which and why."""


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
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - Linux-only cleanup guarantee
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


class ShardSet:
    """The shards of a run: started here (``num_shards`` processes) or attached by URL.

    Use as a context manager; on exit it stops exactly what it started.
    """

    def __init__(
        self,
        num_shards: int = 1,
        urls: Sequence[str] = (),
        host: str = "127.0.0.1",
        password: str = "",
        executable: str = "redis-server",
    ) -> None:
        self.processes: list[RedisShardProcess] = []
        self.password = password
        if urls:
            self.urls = list(urls)
        else:
            try:
                for _ in range(num_shards):
                    self.processes.append(RedisShardProcess(host=host, password=password, executable=executable))
            except BaseException:
                self.close()
                raise
            self.urls = [p.url for p in self.processes]
        for url in self.urls:
            check_shard(url, password)

    def close(self) -> None:
        for p in self.processes:
            p.stop()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, password: str = "", timeout: float = 5.0) -> redis.Redis:
    """A client for a shard URL; a password in the URL wins over ``password``."""
    kwargs: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if password and "@" not in url.split("//", 1)[-1]:
        kwargs["password"] = password
    return redis.Redis.from_url(url, **kwargs)


def redact(url: str) -> str:
    """The URL with any password replaced, for logs and errors."""
    scheme, _, rest = url.partition("//")
    if "@" in rest:
        cred, _, host = rest.rpartition("@")
        user = cred.split(":", 1)[0]
        return f"{scheme}//{user}:***@{host}"
    return url


def check_shard(url: str, password: str = "") -> None:
    """Fail fast (not hang) on an unreachable shard or a wrong password."""
    client = connect(url, password, timeout=3.0)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise ShardError(f"shard {redact(url)}: authentication failed ({exc}); check replay.password or the URL") from None
    except redis.ResponseError as exc:
        if "NOAUTH" in str(exc):
            raise ShardError(f"shard {redact(url)} requires a password; set replay.password or put it in the URL") from None
        raise ShardError(f"shard {redact(url)}: {exc}") from None
    except redis.RedisError as exc:
        raise ShardError(f"shard {redact(url)} is unreachable: {exc}") from None
    finally:
        client.close()


def _script(name: str) -> str:
    return resources.files("replay_service").joinpath(name).read_text()


@dataclass
class ShardStats:
    size: int
    bytes: int
    inserted_total: int
    evicted_total: int
    head: int
    next: int


class ShardClient:
    """The replay operations on one shard: atomic insert+evict, index reads, batch fetch."""

    def __init__(self, url: str, password: str = "", timeout: float = 5.0) -> None:
        self.url = url
        self.redis = connect(url, password, timeout)
        self._insert = self.redis.register_script(_script("insert.lua"))
        self._sample = self.redis.register_script(_script("sample.lua"))

    def insert(self, blob: bytes, num_transitions: int, capacity: int) -> tuple[int, int, int]:
        """Store one encoded segment; returns (seq, size after, transitions evicted)."""
        seq, size, evicted = self._insert(
            keys=[K_NEXT, K_HEAD, K_SIZE, K_BYTES, K_LENS, K_INSERTED, K_EVICTED],
            args=[blob, num_transitions, capacity, SEG_PREFIX],
        )
        return int(seq), int(size), int(evicted)

    def stats(self) -> ShardStats:
        vals = self.redis.mget([K_SIZE, K_BYTES, K_INSERTED, K_EVICTED, K_HEAD, K_NEXT])
        size, nbytes, ins, ev, head, nxt = (int(v) if v is not None else 0 for v in vals)
        return ShardStats(size=size, bytes=nbytes, inserted_total=ins, evicted_total=ev, head=head, next=nxt)

    def lengths(self, seqs: Sequence[int]) -> list[int | None]:
        if not seqs:
            return []
        return [int(v) if v is not None else None for v in self.redis.hmget(K_LENS, list(seqs))]

    def fetch(self, seqs: Sequence[int], steps: Sequence[int]) -> list[Any]:
        """One round trip: the byte ranges for transitions ``(seq, t)`` (see sample.lua)."""
        keys = [f"{SEG_PREFIX}{s}" for s in seqs]
        return list(self._sample(keys=keys, args=[*map(int, steps), RECORD_SIZE]))

    def get_segment(self, seq: int) -> bytes | None:
        value = self.redis.get(f"{SEG_PREFIX}{seq}")
        return bytes(value) if value is not None else None

    def close(self) -> None:
        self.redis.close()
