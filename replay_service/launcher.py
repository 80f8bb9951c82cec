"""The redis-server processes convoy starts for replay shards.

A shard convoy starts runs with no disk persistence (replay is a cache of experience, not a
database; snapshots of gigabytes of frames would stall it), binds to one address, runs in
protected mode and always requires a password, also on loopback:

- convoy's clients log in as the ACL user ``convoy``, allowed only the commands replay uses
  (:data:`CLIENT_COMMANDS`) on its own keys: no FLUSHALL, CONFIG, DEBUG, KEYS or SHUTDOWN.
- the ``default`` user is off; the launcher alone logs in as ``convoy-admin`` with a random
  password of its own (readiness checks and tests that must see the server's config).
- passwords enter redis.conf only as their SHA-256 (ACL ``#<hash>`` rules), so no character of
  a password (a space, a quote, a newline, ``#``) can end a directive or add one, and the file
  holds no secret. It is still written 0600, never passed on the command line (``ps``).
- ``maxmemory`` bounds the server (see :func:`maxmemory_for`); a write past it fails with an
  OOM error that the writer counts and retries, instead of the machine swapping.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis

from replay_service.errors import ShardError

CLIENT_USER = "convoy"
ADMIN_USER = "convoy-admin"
# Every command convoy's clients send (shards.py, resp.py, the benchmark's INFO) and the ones
# insert.lua calls: ACLs apply inside scripts too. AUTH and HELLO are always allowed.
CLIENT_COMMANDS = [
    "ping",
    "select",
    "info",
    "evalsha",
    "eval",
    "script|load",
    "get",
    "set",
    "mget",
    "hget",
    "hmget",
    "hset",
    "hdel",
    "getrange",
    "incr",
    "incrby",
    "decrby",
    "strlen",
    "del",
]
KEY_PATTERN = "cvy:*"
# One random password per process for shards started without one (tests, `ShardSet()`), so a
# shard restarted on its old address (owner.py) takes the password its clients already hold.
_PROCESS_PASSWORD = secrets.token_urlsafe(24)
# Bytes a stored transition can take at most: one uncompressed 84x84 frame plus its record,
# rounded up (codec "none"; lz4 and zstd store several times less).
_MAX_BYTES_PER_TRANSITION = 8 * 1024
_BASE_MEMORY = 64 * 1024**2


def maxmemory_for(capacity_per_shard: int) -> int:
    """``maxmemory`` for a shard that keeps ``capacity_per_shard`` transitions: twice the most
    they can take uncompressed plus 64 MiB, so FIFO eviction (insert.lua) always acts first
    and the limit only stops a runaway shard (a bug, or a foreign writer)."""
    return _BASE_MEMORY + 2 * max(1, capacity_per_shard) * _MAX_BYTES_PER_TRANSITION


def _acl_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Child-side: get SIGTERM when the parent dies, so a killed driver leaves no redis-server."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def server_config(host: str, port: int, directory: str, password: str, admin_password: str, maxmemory: int) -> str:
    """redis.conf for one shard; the passwords appear only as SHA-256 hashes."""
    lines = [
        f"port {port}",
        f"bind {host}",
        "protected-mode yes",
        'save ""',
        "appendonly no",
        f"dir {directory}",
        "daemonize no",
        "loglevel warning",
        # Replay values are written once and read by range; Lua scripts may run for a
        # whole batch, which is fine below the default 5 s busy threshold.
        "user default off resetpass nocommands resetkeys resetchannels",
        f"user {CLIENT_USER} on #{_acl_hash(password)} resetkeys ~{KEY_PATTERN} resetchannels -@all "
        + " ".join("+" + c for c in CLIENT_COMMANDS),
        f"user {ADMIN_USER} on #{_acl_hash(admin_password)} ~* &* +@all",
    ]
    if maxmemory:
        lines += [f"maxmemory {maxmemory}", "maxmemory-policy noeviction"]
    return "\n".join(lines) + "\n"


class RedisShardProcess:
    """One redis-server started by convoy on a free port; :meth:`stop` always removes it.

    ``password`` is the ``convoy`` user's; without one the process-wide random password is
    used and :attr:`url` carries it (the caller could not know it otherwise). ``maxmemory`` is
    in bytes (0: no limit).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        password: str = "",
        executable: str = "redis-server",
        maxmemory: int = 0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._password_in_url = not password
        self.password = password or _PROCESS_PASSWORD
        self.admin_password = secrets.token_urlsafe(24)
        self._dir = tempfile.mkdtemp(prefix="convoy-shard-")
        conf = Path(self._dir) / "redis.conf"
        conf.touch(0o600)
        conf.write_text(server_config(host, self.port, self._dir, self.password, self.admin_password, maxmemory))
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
        """``redis://convoy@host:port/0`` (the password goes separately), or with the password
        in it when none was given."""
        cred = f"{CLIENT_USER}:{quote(self.password, safe='')}" if self._password_in_url else CLIENT_USER
        return f"redis://{cred}@{self.host}:{self.port}/0"

    def admin(self, timeout: float = 5.0, db: int = 0) -> redis.Redis:
        """A client with every right (the launcher's own user); for readiness checks and tests."""
        return redis.Redis(
            host=self.host,
            port=self.port,
            db=db,
            username=ADMIN_USER,
            password=self.admin_password,
            socket_timeout=timeout,
        )

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = self.admin(timeout=1.0)
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
