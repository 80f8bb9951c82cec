"""Real multi-node Ray clusters on one machine: one Linux network namespace per node.

Each node gets its own namespace with a veth pair on a private bridge and its own address
on a test subnet that this module assigns itself (and checks is unused on the machine), so
Ray sees distinct node addresses exactly as on a real cluster: nothing shares a loopback.
The root namespace gets the bridge's ``.1`` address, so servers started by the test on
the host (an S3 server) are reachable from every node.

Everything this creates (namespaces, the bridge, veth links, Ray processes, temp dirs) is
removed by :meth:`NetnsCluster.close`, which also runs on failure and at interpreter exit.
Names are unique per cluster, so two test runs at once do not collide. Token
authentication (on by default in Ray 2.60) is configured with one token shared by every
node and by the driver.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
# A small, fast CPU run: collectors placed by a `collector` resource, shards by `replay`.
SMALL_RUN = [
    "collector.resources=collector:1",
    "collector.steps_per_call=50",
    "collector.start_steps=300",
    "replay.shard_resources=replay:1",
    # The replay-ratio limiter (tested on its own) would hold a tiny CPU run to the learner's pace.
    "replay.samples_per_insert=0",
    "learner.batch_size=32",
    "learner.hidden_dim=32",
    "learner.publish_every=2",
    "learner.updates_per_call=2",
    "run.progress_every_s=1",
    # Evaluation has its own tests (test_evaluator.py); here it would only lengthen the end of a run.
    "run.eval_every_updates=0",
]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def unavailable_reason() -> str | None:
    """Why a namespace cluster cannot run here, or None when it can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"cvyprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-j", "-4", "addr").stdout
    nets = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    routes = json.loads(_ip("-j", "-4", "route").stdout or "[]")
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default":
            nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no interface or route on this machine uses."""
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.213.{secrets.randbelow(250) + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.213.x.0/24 test subnet on this machine")


@dataclass
class Node:
    name: str
    netns: str
    address: str
    temp_dir: str
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float = 1
    num_gpus: float = 0
    alive: bool = False


class NetnsCluster:
    """A Ray cluster of ``len(nodes)`` real nodes, node 0 the head.

    ``nodes`` gives each node's custom resources and CPUs. Use as a context manager.
    """

    RAY_PORT = 6379

    def __init__(
        self,
        nodes: Sequence[Mapping[str, object]],
        object_store_mb: int = 150,
        setup: Callable[[NetnsCluster], Mapping[str, str]] | None = None,
    ) -> None:
        """``setup`` runs once the network exists and before any Ray node starts (e.g. to
        start a server on :attr:`gateway`); the variables it returns go to every node."""
        self.tag = secrets.token_hex(3)
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self.bridge = f"cvybr{self.tag}"
        self.object_store_bytes = object_store_mb * 1024**2
        self.base = Path(tempfile.mkdtemp(prefix=f"convoy-mn-{self.tag}-"))
        self.token_path = self.base / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.nodes: list[Node] = []
        for i, spec in enumerate(nodes):
            self.nodes.append(
                Node(
                    name=f"n{i}",
                    netns=f"cvy{self.tag}n{i}",
                    address=str(hosts[9 + i]),
                    temp_dir=str(self.base / f"ray-n{i}"),
                    resources=dict(spec.get("resources", {})),  # type: ignore[call-overload]
                    num_cpus=float(spec.get("num_cpus", 1)),  # type: ignore[arg-type]
                    num_gpus=float(spec.get("num_gpus", 0)),  # type: ignore[arg-type]
                )
            )
        self._links: list[str] = []
        self._closed = False
        self.extra_env: dict[str, str] = {}
        self._cleanups: list[Callable[[], None]] = []
        atexit.register(self.close)
        # A SIGTERM (a CI time-out, a killed test run) must still tear everything down:
        # turned into SystemExit, it unwinds through close() and the atexit hook.
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._make_network()
            if setup is not None:
                self.extra_env.update(setup(self))
            # One node at a time: `ray start`s of several workers at once time out on a loaded
            # 2-core machine ("The current node timed out during startup").
            for node in self.nodes:
                self.start_node(node)
        except BaseException:
            self.close()
            raise

    # ----- network ------------------------------------------------------------------

    def _make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes):
            _ip("netns", "add", node.netns)
            host_end, ns_end = f"cvy{self.tag}h{i}", f"cvy{self.tag}c{i}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self._links.append(host_end)
            _ip("link", "set", ns_end, "netns", node.netns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            self.ns(node, "ip", "addr", "add", f"{node.address}/{self.subnet.prefixlen}", "dev", ns_end)
            self.ns(node, "ip", "link", "set", ns_end, "up")
            self.ns(node, "ip", "link", "set", "lo", "up")
            # Only the test subnet is routed: the namespaces can reach each other and the
            # bridge's host address, and nothing else.

    def ns(self, node: Node, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", node.netns, *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            env=self.env(),
        )

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            # The GCS declares a node dead after this many failed health checks in a row, this
            # far apart (Ray's defaults: 5 x 3 s). These tests kill nodes on purpose; 3 x 1 s
            # lets a run notice the loss ~12 s sooner. The per-check timeout stays Ray's 10 s,
            # so a slow node on this loaded machine is not declared dead by mistake.
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "SDL_VIDEODRIVER": "offscreen",
        }
        env.pop("RAY_ADDRESS", None)
        env.update(self.extra_env)
        env.update(extra or {})
        return env

    # ----- Ray nodes ------------------------------------------------------------------

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.address}:{self.RAY_PORT}"

    def start_node(self, node: Node) -> None:
        """``ray start`` on ``node``; returns once the head lists it alive."""
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            f"--node-ip-address={node.address}",
            f"--num-cpus={node.num_cpus:g}",
            f"--num-gpus={node.num_gpus:g}",
            f"--resources={json.dumps(node.resources)}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
        ]
        if node is self.head:
            cmd += [
                "--head",
                f"--port={self.RAY_PORT}",
                f"--temp-dir={node.temp_dir}",
                "--include-dashboard=false",
            ]
        else:
            cmd += [f"--address={self.address}"]
        result = self.ns(node, *cmd, check=False, timeout=180)
        if result.returncode != 0:
            raise RuntimeError(f"ray start on {node.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        node.alive = True
        self.wait_for_nodes()

    def ray_pids(self, node: Node) -> list[int]:
        """PIDs of every process living in ``node``'s namespace (all of them are Ray's)."""
        out = _ip("netns", "pids", node.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def stop_node(self, node: Node) -> None:
        """Kill every process of the node at once (a node that goes away), not a graceful stop."""
        for pid in self.ray_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while self.ray_pids(node) and time.monotonic() < deadline:
            time.sleep(0.1)
        node.alive = False

    def wait_for_nodes(self, timeout: float = 90) -> None:
        """Until the head's GCS lists exactly the nodes this cluster thinks are alive."""
        want = {n.address for n in self.nodes if n.alive}
        script = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(json.dumps(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'])))"
        )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            r = self.ns(self.head, sys.executable, "-c", script, check=False, timeout=60)
            if r.returncode == 0:
                got = set(json.loads(r.stdout.strip().splitlines()[-1]))
                if got == want:
                    return
                last = f"alive {sorted(got)}, want {sorted(want)}"
            else:
                last = r.stderr[-1500:]
            time.sleep(1.0)
        raise RuntimeError(f"Ray nodes did not settle: {last}")

    def run(
        self,
        node: Node,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 600,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", node.netns, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(env),
            cwd=cwd,
        )

    def popen(
        self, node: Node, args: Sequence[str], env: Mapping[str, str] | None = None, **kw: object
    ) -> subprocess.Popen[str]:
        # SIGINT back to its default in the child: a test suite started as a shell's background
        # job (nohup, `make test &`) inherits SIGINT ignored, a convoy driver keeps an ignored
        # SIGINT ignored (as a background job should), and a test's Ctrl-C would then do nothing.
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            ["ip", "netns", "exec", node.netns, *args],
            text=True,
            env=self.env(env),
            preexec_fn=_default_sigint,
            **kw,
        )

    # ----- convoy runs ---------------------------------------------------------------

    def train(
        self, node: Node, *overrides: str, env: Mapping[str, str] | None = None
    ) -> tuple[subprocess.Popen[str], Lines]:
        """Start ``convoy train`` on ``node`` joined to this cluster with a small, fast CPU
        config (``SMALL_RUN``) plus ``overrides``; returns the process and its output lines."""
        proc = self.popen(
            node,
            [
                sys.executable,
                "-m",
                "deploy.cli",
                "train",
                "--config",
                "deploy/configs/local.yaml",
                f"run.ray_address={self.address}",
                *SMALL_RUN,
                *overrides,
            ],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        return proc, Lines(proc.stdout, proc)

    # ----- teardown -------------------------------------------------------------------

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` when the cluster is torn down (before the network goes)."""
        self._cleanups.append(cleanup)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            with contextlib.suppress(Exception):
                self.stop_node(node)
        for cleanup in reversed(self._cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        for node in self.nodes:
            _ip("netns", "delete", node.netns, check=False)
        for link in self._links:
            _ip("link", "delete", link, check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> NetnsCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_run(proc: subprocess.Popen[str], grace_s: float = 0.0) -> None:
    """End a run a test started if it still runs: with ``grace_s``, SIGINT first and that long
    for its final checkpoint; then SIGKILL."""
    if proc.poll() is not None:
        return
    if grace_s:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait()


class Lines:
    """Collects a process's output lines in a thread so a test can wait for one."""

    def __init__(self, stream: object, proc: subprocess.Popen[str] | None = None) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc is not None and self.proc.poll() is not None:
                time.sleep(0.5)  # the reader thread may still be draining the pipe
                if not any(re.search(pattern, line) for line in self.lines):
                    raise AssertionError(
                        f"the process ended (exit {self.proc.returncode}) before a line matching "
                        f"{pattern!r}:\n{self.text[-4000:]}"
                    )
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.text[-4000:]}")

    @property
    def text(self) -> str:
        return "".join(self.lines)
