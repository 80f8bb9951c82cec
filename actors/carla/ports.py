"""Leasing blocks of free ports for CARLA servers, without collisions across processes.

A server launched with ``-carla-rpc-port=N`` listens on N (RPC), N+1 (streaming) and N+2
(secondary, the multi-GPU primary port), and its client runs the traffic manager on a port
of its own (CARLA's default 8000 for every client is the classic collision when several
collectors share a node). convoy gives each server a block of four: N, N+1, N+2 and N+3
for the traffic manager, N = port_base + 4 * slot.

A slot is owned by whoever holds an exclusive ``flock`` on ``<lock_dir>/slot-<N>.lock``.
``flock`` is released by the kernel when the holder dies, so a crashed collector never
leaks its slot; a bind check then skips ports some other program holds. The lock file
records the server's process group, so the next owner of a slot can stop a server
orphaned by a collector that was killed with SIGKILL (its ports would stay busy forever).
The lock directory must be on a local file system (flock over NFS is unreliable).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PORTS_PER_SERVER = 4


def default_lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / "convoy-carla"


@dataclass(frozen=True)
class PortBlock:
    slot: int
    rpc: int

    @property
    def streaming(self) -> int:
        return self.rpc + 1

    @property
    def secondary(self) -> int:
        return self.rpc + 2

    @property
    def traffic_manager(self) -> int:
        return self.rpc + 3

    @property
    def ports(self) -> tuple[int, int, int, int]:
        return (self.rpc, self.streaming, self.secondary, self.traffic_manager)


def port_is_free(port: int) -> bool:
    """Whether a TCP listener could bind ``port`` on every interface. SO_REUSEADDR lets the
    check ignore TIME_WAIT left by a server we just stopped, but not a live listener."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


class PortLease:
    """An owned port block; the lock is held until :meth:`release` or the process exits."""

    def __init__(self, block: PortBlock, fd: int, path: Path) -> None:
        self.block = block
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def record_server(self, pgid: int | None) -> None:
        """Note the server's process group in the lock file (for orphan clean-up, see module doc)."""
        if self._fd is None:
            raise RuntimeError(f"port lease {self.block.rpc}: already released")
        data = {"owner_pid": os.getpid(), "server_pgid": pgid, "rpc_port": self.block.rpc}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(data).encode(), 0)

    def ports_free(self) -> bool:
        return all(port_is_free(p) for p in self.block.ports)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None

    def __enter__(self) -> PortLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _reap_orphan(path: Path, rpc: int) -> bool:
    """Stop a server a dead previous owner of this slot left running (we hold the lock now)."""
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return False
    pgid = data.get("server_pgid") if isinstance(data, dict) else None
    if not isinstance(pgid, int) or pgid <= 1:
        return False
    # Only a process group whose leader is a CARLA server on this slot's port: never a
    # process that merely reused the id.
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if f"-carla-rpc-port={rpc}" not in cmdline:
        return False
    log.warning("port slot %d: stopping orphaned CARLA server (process group %d) of a dead collector", rpc, pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return True


def lease_ports(
    lock_dir: str | Path = "",
    port_base: int = 2000,
    max_servers: int = 64,
    wait_free_s: float = 2.0,
) -> PortLease:
    """Lease the first free block of :data:`PORTS_PER_SERVER` ports; raises ``RuntimeError``
    naming the range when every slot is taken."""
    directory = Path(lock_dir) if lock_dir else default_lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    busy: list[int] = []
    for slot in range(max_servers):
        block = PortBlock(slot, port_base + PORTS_PER_SERVER * slot)
        if block.traffic_manager > 65535:
            break
        path = directory / f"slot-{block.rpc}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                continue  # another collector (maybe in another process) holds this slot
            raise
        lease = PortLease(block, fd, path)
        reaped = _reap_orphan(path, block.rpc)
        deadline = time.monotonic() + (wait_free_s if reaped else 0.0)
        while not lease.ports_free() and time.monotonic() < deadline:
            time.sleep(0.1)  # a server we just reaped takes a moment to let go of its ports
        if lease.ports_free():
            lease.record_server(None)
            return lease
        busy.append(block.rpc)
        lease.release()
    raise RuntimeError(
        f"no free CARLA port block in {port_base}..{port_base + PORTS_PER_SERVER * max_servers - 1} "
        f"(lock dir {directory}; {len(busy)} slots free of locks but with ports in use by other programs); "
        "raise carla.max_servers or move carla.port_base"
    )
