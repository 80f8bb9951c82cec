"""A real S3-protocol server for tests (moto's server mode), and a throttling TCP proxy.

``start_moto_server(host)`` runs ``python -m moto.server`` on a free port of ``host`` (a
loopback or a bridge address a test created) and returns its URL and a ``stop`` function;
the server keeps everything in memory and accepts any credentials.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class S3Endpoint:
    """A running server with one fresh bucket; ``uri`` is ``s3://<bucket>``."""

    url: str
    bucket: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies, so a killed test run (e.g. by
    `timeout`) leaves no server behind (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def start_moto_server(host: str, timeout_s: float = 30.0) -> tuple[str, Callable[[], None]]:
    """Start moto's S3 server on a free port of ``host``; returns ``(url, stop)``.

    ``stop`` is idempotent; if the server does not answer within ``timeout_s`` it is stopped
    and RuntimeError says why.
    """
    port = _free_port(host)
    # A file, not a pipe: the server logs every request, and a pipe nobody reads fills up
    # and blocks it.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the server runs; stop() closes it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"moto server exited with {proc.returncode}: {err}")
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                return url, stop
            except urllib.error.HTTPError:
                return url, stop  # it answers: ready
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {url} did not answer within {timeout_s:.0f}s") from None
                time.sleep(0.1)
    except BaseException:
        stop()
        raise


def create_bucket(url: str, bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=bucket)
    client.close()


class ThrottledProxy:
    """Forwards TCP connections on a free loopback port to ``target``, sending client bytes
    at no more than ``bytes_per_s`` in total: a slow uplink, so an upload takes seconds."""

    def __init__(self, target_host: str, target_port: int, bytes_per_s: float) -> None:
        self.target = (target_host, target_port)
        self.rate = bytes_per_s
        self._next_send = time.monotonic()
        self._rate_lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        try:
            while chunk := src.recv(16384):
                if throttle:
                    with self._rate_lock:
                        self._next_send = max(self._next_send, time.monotonic()) + len(chunk) / self.rate
                        wait = self._next_send - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._sockets:
            s.close()
