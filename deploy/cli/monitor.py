"""``convoy monitor``: a real Prometheus for the local Ray cluster, with the shipped config.

It runs Debian's ``prometheus`` (or any on PATH) in the foreground with
deploy/monitoring/prometheus.yml, which finds every node's Ray metrics agent through the
service-discovery file Ray's head writes; convoy's metrics go through Ray's metrics export,
so there is nothing else to configure. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TextIO

from deploy.cli.base import CommandFailed, Subparsers, positive_int

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
SHIPPED_SD_FILE = "/tmp/ray/prom_metrics_service_discovery.json"
INSTALL_HINT = (
    "convoy monitor needs Prometheus (the `prometheus` binary), which is not on PATH.\n"
    "  Debian/Ubuntu:  sudo apt-get update && sudo apt-get install -y prometheus\n"
    "                  (or: sudo deploy/scripts/ensure-prometheus.sh)\n"
    "  macOS:          brew install prometheus\n"
    "  Elsewhere:      https://prometheus.io/download/"
)


class MonitorError(RuntimeError):
    pass


def register(sub: Subparsers) -> None:
    mo = sub.add_parser("monitor", help="run Prometheus for the local Ray cluster (deploy/monitoring/prometheus.yml)")
    mo.add_argument("--port", type=positive_int, default=9090, help="Prometheus listen port (default 9090)")
    mo.add_argument("--host", default="127.0.0.1", help="Prometheus listen address (default 127.0.0.1)")
    mo.add_argument("--data", default="runs/prometheus", metavar="D", help="Prometheus data (default: runs/prometheus)")
    mo.add_argument("--ray-temp-dir", default=None, metavar="DIR", help="Ray's temp dir (default $RAY_TMPDIR or /tmp)")
    mo.add_argument("--scrape-interval", default=None, metavar="DUR", help="e.g. 2s (default: the shipped 10s)")
    mo.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        return monitor(args.port, args.host, args.data, args.ray_temp_dir, args.scrape_interval)
    except MonitorError as exc:
        raise CommandFailed(str(exc)) from exc


def ray_sd_file(ray_temp_dir: str | None = None) -> str:
    """Where a local Ray cluster's head writes its service-discovery file: ``<temp>/ray/...``
    with Ray's temp dir (``$RAY_TMPDIR``, else /tmp)."""
    base = ray_temp_dir or os.environ.get("RAY_TMPDIR") or "/tmp"
    return str(Path(base) / "ray" / Path(SHIPPED_SD_FILE).name)


def prometheus_config(sd_file: str, scrape_interval: str | None = None) -> str:
    """The shipped configuration, with the service-discovery file (and scrape interval) replaced
    only where they differ from the shipped defaults."""
    text = PROMETHEUS_CONFIG.read_text()
    if SHIPPED_SD_FILE not in text:
        raise MonitorError(f"{PROMETHEUS_CONFIG}: expected the service-discovery file {SHIPPED_SD_FILE}")
    text = text.replace(SHIPPED_SD_FILE, sd_file)
    if scrape_interval is not None:
        text = text.replace("scrape_interval: 10s", f"scrape_interval: {scrape_interval}", 1)
    return text


def grafana_help(url: str) -> str:
    prov = MONITORING / "grafana" / "provisioning"
    dash = MONITORING / "grafana" / "dashboards"
    return (
        "Grafana, with the shipped provisioning (datasource -> this Prometheus, dashboard 'convoy'):\n"
        f"  docker run --rm --network host -v {prov}:/etc/grafana/provisioning:ro \\\n"
        f"    -v {dash}:/var/lib/grafana/dashboards/convoy:ro grafana/grafana\n"
        "  then open http://127.0.0.1:3000 (admin/admin) -> Dashboards -> convoy -> convoy.\n"
        f"  A Grafana of your own: copy {prov}/* into its provisioning directory, the dashboards to\n"
        f"  /var/lib/grafana/dashboards/convoy, and set the datasource url to {url}; or import\n"
        f"  {dash / 'convoy.json'} and pick any Prometheus that scrapes Ray."
    )


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MonitorError(f"prometheus exited with code {proc.returncode} (see its output above)")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise MonitorError(f"prometheus did not become ready at {url} within {timeout_s:.0f} s")


def _print_banner(url: str, sd_file: str, out: TextIO) -> None:
    print(f"Prometheus: {url}  (config {PROMETHEUS_CONFIG}; Ray service discovery {sd_file})", file=out)
    if not Path(sd_file).exists():
        print(
            f"  no Ray cluster here yet ({sd_file} does not exist): targets appear when `convoy train` "
            "(or `ray start --head`) starts one",
            file=out,
        )
    print(f"  targets: {url}/targets   example query: rate(ray_convoy_collector_env_steps_total[1m])", file=out)
    print(grafana_help(url), file=out)
    print("Ctrl-C stops Prometheus.", file=out, flush=True)


def _run_until_stopped(cmd: list[str], url: str, sd_file: str, out: TextIO) -> int:
    """Run Prometheus in the foreground; SIGTERM and Ctrl-C stop it, and it never outlives us."""
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        _wait_ready(url, proc, timeout_s=60)
        _print_banner(url, sd_file, out)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(timeout=30)
            return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def monitor(
    port: int = 9090,
    host: str = "127.0.0.1",
    data_dir: str = "runs/prometheus",
    ray_temp_dir: str | None = None,
    scrape_interval: str | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run Prometheus until Ctrl-C / SIGTERM; returns its exit code."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise MonitorError(INSTALL_HINT)
    sd_file = ray_sd_file(ray_temp_dir)
    work = Path(tempfile.mkdtemp(prefix="convoy-prometheus-"))
    try:
        config = work / "prometheus.yml"
        config.write_text(prometheus_config(sd_file, scrape_interval))
        # Prometheus watches the file's directory for changes; it must exist before a cluster does.
        Path(sd_file).parent.mkdir(parents=True, exist_ok=True)
        data = Path(data_dir)  # kept after Prometheus stops: the metric history of past runs
        url = f"http://{host}:{port}"
        cmd = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address={host}:{port}",
            "--log.level=warn",
        ]
        return _run_until_stopped(cmd, url, sd_file, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
