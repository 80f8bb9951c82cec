"""A stand-in CARLA server executable for the server-manager tests.

Run as ``CarlaUE4.sh`` would be (tests write a CarlaUE4.sh that calls this file without
``exec``, so, as with the real script, the launched process is a shell whose child is the
"engine"). It parses CARLA's port flags, listens on the RPC, streaming and secondary ports,
answers ``ping`` with ``pong`` on the RPC port, and starts a grandchild (the "renderer") so
process-group clean-up can be checked. Behaviour comes from environment variables:

FAKE_CARLA_START_DELAY  seconds before it listens (a slow start)
FAKE_CARLA_MODE         ok (default) | never_answer (listens, never replies) | exit (exits 3 at once)
FAKE_CARLA_DIE_AFTER    seconds after listening at which it exits with code 1
FAKE_CARLA_HANG_AFTER   seconds after listening at which it stops replying
FAKE_CARLA_RECORD       file to append a JSON line to: argv, pids, CUDA_VISIBLE_DEVICES
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time


def ping_probe(host: str, port: int, timeout_s: float) -> bool:
    """The health probe the tests give the manager: an answered ping, not just a connect."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            s.sendall(b"ping\n")
            return s.recv(16).startswith(b"pong")
    except OSError:
        return False


def _flag(argv: list[str], name: str) -> int | None:
    for a in argv:
        if a.startswith(f"-{name}="):
            return int(a.split("=", 1)[1])
    return None


def main(argv: list[str]) -> int:
    mode = os.environ.get("FAKE_CARLA_MODE", "ok")
    if mode == "exit":
        print("fake carla: exiting at once", flush=True)
        return 3
    rpc = _flag(argv, "carla-rpc-port") or 2000
    streaming = _flag(argv, "carla-streaming-port") or rpc + 1
    secondary = _flag(argv, "carla-secondary-port") or rpc + 2
    time.sleep(float(os.environ.get("FAKE_CARLA_START_DELAY", "0")))
    renderer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    listeners = []
    for port in (rpc, streaming, secondary):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))
        s.listen(16)
        listeners.append(s)
    record = os.environ.get("FAKE_CARLA_RECORD")
    if record:
        with open(record, "a") as f:
            info = {
                "argv": argv,
                "pid": os.getpid(),
                "pgid": os.getpgid(0),
                "renderer_pid": renderer.pid,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }
            f.write(json.dumps(info) + "\n")
    print(f"fake carla: listening on {rpc}, {streaming}, {secondary}", flush=True)
    started = time.monotonic()
    hang_after = float(os.environ.get("FAKE_CARLA_HANG_AFTER", "inf"))
    die_after = float(os.environ.get("FAKE_CARLA_DIE_AFTER", "inf"))

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(16).startswith(b"ping") and mode != "never_answer":
                    if time.monotonic() - started < hang_after:
                        conn.sendall(b"pong\n")
                    else:
                        time.sleep(3600)
            except OSError:
                pass

    listeners[0].settimeout(0.05)
    while time.monotonic() - started < die_after:
        try:
            conn, _ = listeners[0].accept()
        except TimeoutError:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
    print("fake carla: dying", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
