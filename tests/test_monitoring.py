"""The shipped monitoring: Prometheus config, Grafana dashboard and provisioning, `convoy
monitor`, and a real Prometheus scraping a real `convoy train` through Ray's metrics export."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "convoy.json"
PROVISIONING = MONITORING / "grafana" / "provisioning"
# Ray's agent labels every series with these, in CamelCase; promtool's lint flags them. They
# are Ray's (the same on Ray's own metrics), not convoy's.
RAY_LABELS = re.compile(r'(Component|NodeAddress|SessionName|Version|WorkerId)="[^"]*",?')


def _need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is missing: run deploy/scripts/ensure-prometheus.sh (Debian's prometheus package)"
    return path


def _panels() -> list[dict[str, Any]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        out += [p, *p.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


def dashboard_queries(run: str, rate_interval: str) -> list[tuple[str, str, str]]:
    """(panel title, legend, PromQL) of every target, with the dashboard's variables substituted."""
    out = []
    for panel in _panels():
        for t in panel["targets"]:
            expr = t["expr"]
            for var, value in (("__rate_interval", rate_interval), ("run", run)):
                expr = expr.replace("${" + var + "}", value).replace("$" + var, value)
            assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
            out.append((panel["title"], t.get("legendFormat", ""), expr))
    return out


def test_shipped_prometheus_config_passes_promtool() -> None:
    res = subprocess.run(
        [_need("promtool"), "check", "config", str(MONITORING / "prometheus.yml")], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert "static_configs" not in job, "targets come from Ray's service discovery, never a list of ports"


def test_dashboard_provisions_cleanly_and_every_query_parses(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dash and dash["uid"] == "convoy-main" and dash.get("id") is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["type"] == "query" and "run" in variables["run"]["definition"]
    panels = _panels()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'run=~"$run"' in t["expr"], f"{p['title']}: every query filters by the run variable"
    titles = " | ".join(p["title"] for p in panels).lower()
    for needle in (
        "env steps/s, all collectors",
        "env steps/s per collector",
        "collectors live vs wanted",
        "simulator restarts",
        "learner updates/s",
        "waiting for data",
        "samples per insert",
        "transitions per shard",
        "bytes per shard",
        "shards up",
        "policy lag",
        "episode return",
        "route completion",
        "success rate",
        "losses",
        "q values",
        "gradient norms before and after clipping",
        "restarts: collectors, learner, shards",
    ):
        assert needle in titles, f"no panel for {needle!r}"
    # Every expression is valid PromQL: promtool parses them as recording rules, offline.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"convoy:q{i}", "expr": e} for i, (_, _, e) in enumerate(dashboard_queries("r", "1m"))
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    res = subprocess.run([_need("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_a_prometheus() -> None:
    (ds,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://127.0.0.1:9090"
    (prov,) = yaml.safe_load((PROVISIONING / "dashboards" / "convoy.yaml").read_text())["providers"]
    assert prov["type"] == "file" and prov["options"]["path"] == "/var/lib/grafana/dashboards/convoy"


def test_convoy_monitor_without_prometheus_says_how_to_install(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "monitor"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path)},  # no prometheus on PATH
    )
    assert res.returncode == 1
    assert "apt-get install -y prometheus" in res.stderr and "not on PATH" in res.stderr


# ----- a real Prometheus scraping a real run ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for c in children.get(pid, []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _Lines:
    """A subprocess's stdout, read on a thread, searchable while it runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived (wall clock)
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.times.append(time.time())
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "".join(self.lines[-40:]))

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.e2e
def test_real_prometheus_scrapes_a_real_run(tmp_path: Path) -> None:
    """`convoy monitor` (a real Prometheus with the shipped config; only Ray's temp dir and a 1 s
    scrape interval substituted) scrapes a real 2-collector `convoy train`, in which one
    collector is SIGKILLed and replaced. Every dashboard query returns series."""
    _need("prometheus")
    ray_tmp = tempfile.mkdtemp(prefix="cvm", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "SDL_VIDEODRIVER": "offscreen",
        "RAY_TMPDIR": ray_tmp,
        # Ray's agents refresh values every 10 s by default; 1 s keeps this test short.
        "RAY_metrics_report_interval_ms": "1000",
    }
    procs: list[subprocess.Popen[str]] = []
    family: dict[int, str] = {}  # every process the run started (Ray's included), to clean up
    try:
        mon = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "monitor", f"--port={port}", f"--data={tmp_path / 'prom'}",
             f"--ray-temp-dir={ray_tmp}", "--scrape-interval=1s"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        procs.append(mon)
        mon_out = _Lines(mon)
        mon_out.wait_for(rf"Prometheus: {re.escape(base)}", timeout=60)
        assert "grafana/provisioning" in mon_out.wait_for(r"docker run .*provisioning", timeout=5).group(0)

        train = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "train", "--config", "deploy/configs/local.yaml",
             "run.total_env_steps=2000", "collector.num_collectors=2", "collector.start_steps=300",
             "collector.steps_per_call=50", "learner.batch_size=32", "learner.hidden_dim=32",
             "learner.updates_per_call=4", "learner.publish_every=4", "run.progress_every_s=1",
             # A CPU learner here makes ~4 updates/s: a low replay ratio keeps collectors going.
             "replay.samples_per_insert=4",
             "run.eval_every_updates=4", "run.eval_episodes=1", "env.max_episode_steps=100",
             "run.name=montest", f"run.out_dir={run_dir}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        procs.append(train)
        out = _Lines(train)
        out.wait_for(r"env_steps +([6-9]\d\d|1\d\d\d) ", timeout=240)

        # Mid-run, straight from the node's metrics agent: convoy's series pass promtool.
        sd = json.loads((Path(ray_tmp) / "ray" / "prom_metrics_service_discovery.json").read_text())
        exposition = ""
        for target in sd[0]["targets"]:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as r:
                exposition += r.read().decode()
        ours = [RAY_LABELS.sub("", ln) for ln in exposition.splitlines() if "ray_convoy_" in ln]
        assert ours, "no convoy series at the Ray metrics agent"
        check = subprocess.run([_need("promtool"), "check", "metrics"], input="\n".join(ours) + "\n",
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr

        # SIGKILL one collector's worker process; the supervisor replaces it under the same index.
        family.update({p: _cmdline(p) for p in _descendants(train.pid)})
        victims = [p for p, cmd in family.items() if cmd.startswith("ray::CollectorActor")]
        assert victims, "no collector process found under the run's driver"
        killed_at = time.time()
        os.kill(victims[0], signal.SIGKILL)
        index = out.wait_for(r"collector (\d+) replacement acting", timeout=120).group(1)

        assert train.wait(timeout=300) == 0, out.text[-4000:]
        # Evaluated as of the last progress line, while the run was up: once its Ray cluster
        # is gone, Prometheus marks every series stale and instant queries return nothing.
        timed = list(zip(out.times, out.lines, strict=True))
        last_progress = max(t for t, ln in timed if "] env_steps" in ln)
        first_eval = min((t for t, ln in timed if ln.startswith("eval @")), default=math.inf)
        assert first_eval + 4 < last_progress, "no evaluation finished while the run was up:\n" + out.text[-3000:]
        at = str(last_progress - 1.0)
        time.sleep(2)  # the scrape after that moment is in

        queries = dashboard_queries("montest", "5m")
        results: list[tuple[str, str, int]] = []
        for title, legend, expr in queries:
            series = _api(base, "query", query=expr, time=at)["result"]
            results.append((title, legend, len(series)))
        report = "\n".join(f"{n:3d}  {t} / {lg}" for t, lg, n in results)
        (tmp_path / "scrape-results.txt").write_text(report + "\n")
        print("\nseries per dashboard query:\n" + report)
        empty = [(t, lg) for t, lg, n in results if n == 0]
        assert not empty, f"dashboard queries without series: {empty}\n{report}"

        # The replaced collector's series continue under the same label, counting on.
        end = time.time()
        rng = _api(
            base,
            "query_range",
            start=str(killed_at - 60),
            end=str(end),
            step="1",
            query=f'max by (collector) (ray_convoy_collector_env_steps_total{{run="montest",collector="{index}"}})',
        )
        (series,) = rng["result"]  # fmt: skip
        values = [float(v) for _, v in series["values"]]
        before = [float(v) for t, v in series["values"] if float(t) <= killed_at]
        after = [float(v) for t, v in series["values"] if float(t) > killed_at + 5]
        assert before and after and max(after) > max(before), "the replacement's steps add to the same series"
        assert values == sorted(values), "the counter never goes back when its collector is replaced"
        restarts = _api(base, "query", query='max(ray_convoy_run_collector_restarts_total{run="montest"})', time=at)[
            "result"
        ]
        assert float(restarts[0]["value"][1]) >= 1

        # Curves of the same run, and the report.
        from deploy.run.curves import read_curves

        curves = read_curves(run_dir)
        for tag in (
            "return/train",
            "route_completion/train",
            "throughput/env_steps_per_s",
            "throughput/updates_per_s",
            "loss/critic",
            "loss/actor",
            "q/mean",
            "grad_norm/critic",
        ):
            assert curves.get(tag), f"TensorBoard events lack {tag}"  # fmt: skip
        assert max(s for s, _ in curves["throughput/env_steps_per_s"]) >= 1000, "indexed by env steps"
        rep = subprocess.run([sys.executable, "-m", "deploy.cli", "report", str(run_dir)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert rep.returncode == 0, rep.stderr
        assert (run_dir / "curves.png").stat().st_size > 10_000
    finally:
        for p in reversed(procs):
            family.update({c: _cmdline(c) for c in _descendants(p.pid)})
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p is not procs[0] else signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pid, cmd in family.items():  # Ray processes orphaned by a driver that did not shut down
            if cmd and _cmdline(pid) == cmd:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
