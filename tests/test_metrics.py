"""Metric export: translation rules, counters across restarts, promtool on real component
output, and Ray's metrics export through a real local Ray cluster."""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from common.config import load_config
from common.metrics import LATENCY_BUCKETS, Latency
from deploy.run.exporter import MetricsExporter, MetricStore, series_name

_RAY_LABELS = re.compile(r'(Component|NodeAddress|SessionName|Version|WorkerId)="[^"]*",?')


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _promtool_check(text: str) -> None:
    assert shutil.which("promtool"), "promtool is missing: run deploy/scripts/ensure-prometheus.sh"
    res = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def _samples(text: str, name: str) -> dict[str, float]:
    """{labels text: value} of the samples of ``name`` in an exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, value = line.rsplit(" ", 1)
            out[head[len(name) :]] = float(value)
    return out


def test_latency_is_a_cumulative_histogram_with_inclusive_bounds() -> None:
    lat = Latency("learner/update_seconds")
    for v in (0.0001, 0.0003, 0.003, 0.003, 100.0):
        lat.observe(v)
    m = lat.metrics()
    assert m['learner/update_seconds_bucket{le="0.0001"}'] == 1  # le is inclusive
    assert m['learner/update_seconds_bucket{le="0.0005"}'] == 2
    assert m['learner/update_seconds_bucket{le="0.005"}'] == 4
    assert m['learner/update_seconds_bucket{le="30"}'] == 4  # 100 s only in +Inf
    assert m["learner/update_seconds_count"] == 5
    assert m["learner/update_seconds_sum"] == pytest.approx(100.0064)
    assert len(m) == len(LATENCY_BUCKETS) + 2
    with pytest.raises(ValueError, match="_seconds"):
        Latency("learner/update_ms")


def test_entities_become_labels_not_names() -> None:
    assert series_name("replay_sampler/shard12/bytes_stored") == (
        "convoy_replay_sampler_shard_bytes_stored",
        {"shard": "12"},
    )
    assert series_name("collector/env_steps_total") == ("convoy_collector_env_steps_total", {})
    store = MetricStore("r")
    store.update({"replay_writer/shard0/up": 1, "replay_writer/shard1/up": 0}, {"collector": "3"})
    (fam,) = store.families()
    assert fam.name == "convoy_replay_writer_shard_up" and fam.kind == "gauge"
    assert fam.label_names == ("collector", "run", "shard")
    assert set(fam.samples.values()) == {0.0, 1.0}


def test_counters_and_histograms_continue_across_a_component_restart() -> None:
    store = MetricStore("r")
    lat = Latency("collector/env_step_seconds")
    lat.observe(0.01)
    lat.observe(0.01)
    store.update({"collector/env_steps_total": 100, **lat.metrics()}, {"collector": "0"})
    store.update({"collector/env_steps_total": 150, **lat.metrics()}, {"collector": "0"})
    # The collector is replaced: its totals start again from 0. Its first report is the new
    # baseline; what it counts after that adds to the same labelled series.
    fresh = Latency("collector/env_step_seconds")
    fresh.observe(0.2)
    store.update({"collector/env_steps_total": 30, **fresh.metrics()}, {"collector": "0"})
    fresh.observe(0.2)
    store.update({"collector/env_steps_total": 80, **fresh.metrics()}, {"collector": "0"})
    fams = {f.name: f for f in store.families()}
    ((labels, total),) = fams["convoy_collector_env_steps_total"].samples.items()
    assert dict(labels) == {"collector": "0", "run": "r"} and total == 200
    ((_, (cum, hsum)),) = fams["convoy_collector_env_step_seconds"].samples.items()
    assert cum[-1] == 3 and hsum == pytest.approx(0.22)
    assert cum[LATENCY_BUCKETS.index(0.01)] == 2 and cum[LATENCY_BUCKETS.index(0.25)] == 3


def test_a_learner_restored_from_a_checkpoint_does_not_count_twice() -> None:
    store = MetricStore("r")
    for updates in (800, 1000, 800, 900):  # dies at 1000, resumes from its checkpoint at 800
        store.update({"learner/updates_total": updates}, {"component": "learner"})
    ((_, total),) = store.families()[0].samples.items()
    assert total == 1100, "1000 before the failure, 100 after the restore"


def test_rates_nan_and_stale_gauges_are_not_exported() -> None:
    store = MetricStore("r", stale_after_s=0.2)
    store.update({"learner/updates_per_s": 5.0, "collector/mean_return": math.nan, "x/gauge": 1.0}, {})
    assert [f.name for f in store.families()] == ["convoy_x_gauge"]
    time.sleep(0.3)
    assert store.families() == [], "a gauge nobody reports any more (removed collector) is dropped"
    store.update({"x/count_total": 0}, {})
    assert [f.name for f in store.families()] == ["convoy_x_count_total"], "a counter exists from 0"


def test_inconsistent_labels_name_the_metric() -> None:
    store = MetricStore("r")
    store.update({"collector/noise_std": 0.1}, {"collector": "0"})
    with pytest.raises(ValueError, match="convoy_collector_noise_std"):
        store.update({"collector/noise_std": 0.1}, {"component": "collector"})


def test_every_component_output_passes_promtool(redis_url: str, tmp_path: Path) -> None:
    """Real dicts from a collector (with its replay writer), the learner (with its sampler) and
    the driver's summary, exported the way the driver does, checked by promtool."""
    from actors.collector import Collector
    from deploy.run.progress import Progress
    from deploy.run.telemetry import RunTelemetry
    from learner.loop import Learner
    from replay_service.sampler import ReplaySampler
    from replay_service.writer import ReplayWriter
    from tests.fakes import FakeDrivingEnv

    cfg = load_config(
        None,
        [
            "collector.start_steps=40",
            "collector.segment_length=16",
            "learner.batch_size=8",
            "learner.hidden_dim=8",
            "learner.num_threads=1",
            "learner.publish_every=2",
            f"run.out_dir={tmp_path / 'run'}",
        ],
    )
    collector = Collector(cfg, 0, ReplayWriter([redis_url], capacity=10_000), lambda: FakeDrivingEnv(episode_len=9))
    collector.collect(64)
    sampler = ReplaySampler([redis_url], cfg.learner.batch_size, prefetch=0, min_size=40)
    sampler.refresh_index()  # without prefetch threads, the index is refreshed on demand
    learner = Learner(cfg, sampler, str(tmp_path / "run"))
    try:
        progress = Progress()
        progress.collector[0] = collector.collect(8)
        progress.learner = learner.train(4, env_steps=72)
        learner.flush()
        progress.learner = learner.train(1, env_steps=72)  # now with the publish latency observed
        tele = RunTelemetry(cfg, "promtool-run", backend="http")
        try:
            tele.tick(progress, force=True)
            assert tele.exporter is not None and tele.exporter.url is not None
            text = _scrape(tele.exporter.url)
        finally:
            tele.close()
    finally:
        learner.close()
        collector.close()
    _promtool_check(text)
    for name in (
        "convoy_collector_env_steps_total",
        "convoy_collector_env_step_seconds_bucket",
        "convoy_replay_writer_insert_seconds_bucket",
        "convoy_replay_writer_shard_transitions_total",
        "convoy_replay_sampler_shard_transitions_stored",
        "convoy_learner_update_seconds_bucket",
        "convoy_learner_batch_wait_seconds_bucket",
        "convoy_learner_publish_seconds_count",
        "convoy_learner_critic_loss",
        "convoy_learner_updates_total",
        "convoy_run_env_steps_total",
    ):
        assert _samples(text, name), f"{name} missing from the exposition"
    assert 'collector="0"' in next(iter(_samples(text, "convoy_collector_env_steps_total")))
    assert 'shard="0"' in next(iter(_samples(text, "convoy_replay_sampler_shard_up")))
    assert "_per_s" not in text
    assert all('run="promtool-run"' in k for k in _samples(text, "convoy_learner_updates_total"))


def test_ray_backend_exports_through_the_node_metrics_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real local Ray: counters continue across a restart, a gauge left unchanged does not
    expire, a counter exists at 0, histograms arrive with their buckets; promtool is happy."""
    import ray

    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING, object_store_memory=80 * 1024**2)
    try:
        port = ray.nodes()[0]["MetricsExportPort"]
        exporter = MetricsExporter("ray-test", backend="ray")
        assert exporter.push_every_s <= 0.5
        lat = Latency("collector/env_step_seconds")
        lat.observe(0.003)
        exporter.update(
            {
                "collector/env_steps_total": 100,
                "collector/simulator_restarts_total": 0,
                "collector/noise_std": 0.25,
                **lat.metrics(),
            },
            component="collector",
            collector="1",
        )
        exporter.flush()
        # The replacement collector reports from 0 again: a new baseline, then 20 more steps.
        for steps in (20, 40):
            exporter.update(
                {"collector/env_steps_total": steps, "collector/noise_std": 0.25}, collector="1", component="collector"
            )
            exporter.flush()
        wanted = {"ray_convoy_collector_env_steps_total": 120.0, "ray_convoy_collector_simulator_restarts_total": 0.0}
        t_start = time.monotonic()
        deadline = t_start + 40
        text = ""
        while time.monotonic() < deadline:
            exporter.flush()  # what the driver's ticks do: keeps the gauge alive past Ray's expiry
            text = _scrape(f"http://127.0.0.1:{port}/metrics")
            got = {n: list(_samples(text, n).values()) for n in wanted}
            if all(got[n] == [v] for n, v in wanted.items()) and _samples(text, "ray_convoy_collector_noise_std"):
                print(f"series arrived after {time.monotonic() - t_start:.1f} s")
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"series never arrived: {[ln for ln in text.splitlines() if 'convoy' in ln]}")
        time.sleep(3)  # > 2 report intervals: an unchanged gauge that is re-set stays
        exporter.flush()
        time.sleep(1.5)
        text = _scrape(f"http://127.0.0.1:{port}/metrics")
        assert list(_samples(text, "ray_convoy_collector_noise_std").values()) == [0.25]
        (labels,) = _samples(text, "ray_convoy_collector_env_steps_total")
        assert 'collector="1"' in labels and 'run="ray-test"' in labels
        buckets = _samples(text, "ray_convoy_collector_env_step_seconds_bucket")
        assert [v for k, v in buckets.items() if 'le="0.005"' in k] == [1.0]
        # Ray's agent adds its own labels in CamelCase (Component, NodeAddress, SessionName,
        # Version, WorkerId), which promtool's lint flags; they are Ray's, the same on every Ray
        # metric. convoy's own names and labels must pass untouched.
        ours = [_RAY_LABELS.sub("", ln) for ln in text.splitlines() if "ray_convoy_" in ln]
        _promtool_check("\n".join(ours) + "\n")
        exporter.close()
    finally:
        ray.shutdown()
