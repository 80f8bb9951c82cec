"""Prometheus export at the edge, once: the driver's exporter.

Components return flat metric dicts with namespaced keys (``collector/env_steps_total``,
``replay_sampler/shard0/up``); one :class:`MetricsExporter` per process turns the latest dict
of every component into Prometheus series. Components never talk to Prometheus themselves.

Translation (the one copy of these rules):

* name: ``convoy_`` + the key with ``/`` as ``_``. A path segment ``shard<N>`` becomes the
  label ``shard="N"`` and the word ``shard`` in the name, so ``replay_sampler/shard0/up`` is
  ``convoy_replay_sampler_shard_up{shard="0"}``: the entity is a label, never a name.
* every series carries ``run="<name>"`` plus the labels the edge passes with the dict
  (``component``, ``collector``).
* keys ending in ``_total`` are counters. Components report totals since *they* started; the
  exporter keeps each labelled counter monotonic across a restart of the component: a total
  below the last one starts a new baseline, and only increments after it are added. So a
  replaced collector's ``collector="3"`` series continues (less the steps of its first report),
  and a learner restored from a checkpoint, whose update count goes back to the checkpoint's,
  neither counts those updates twice nor shows them as a burst in ``rate()``.
* histograms: the parts a :class:`common.metrics.Latency` writes (``<key>_bucket{le="..."}``,
  ``<key>_sum``, ``<key>_count``) become one Prometheus histogram, in base units (seconds).
* everything else is a gauge. NaN and infinite values are not exported (no value yet).
* keys ending in ``_per_s`` are rates a process computed for its console line or summary;
  they are not exported: ``rate()`` over the matching ``_total`` counter is their exported form.

Two backends share the translation. Inside Ray (``backend="ray"``), series go through
``ray.util.metrics`` to the node's metrics agent, which Ray's Prometheus service discovery
(a ``ray up`` cluster) and KubeRay's PodMonitor already find: no ports of our own. Ray adds
the prefix ``ray_`` (``ray_convoy_collector_env_steps_total``). Outside Ray
(``backend="http"``: one process, benchmarks, tests) a prometheus_client endpoint serves the
same series without the prefix. See :class:`MetricsExporter` for Ray's behaviours handled here.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from common.metrics import LATENCY_BUCKETS

_LE_INDEX = {f"{b:g}": i for i, b in enumerate(LATENCY_BUCKETS)}

_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_SHARD = re.compile(r"^shard(\d+)$")
_SHARD_IN_KEY = re.compile(r"shard\d+")
_BUCKET = re.compile(r'^(?P<base>.+)_bucket\{le="(?P<le>[^"]+)"\}$')


def series_name(key: str) -> tuple[str, dict[str, str]]:
    """(Prometheus name, entity labels) of a flat key, e.g. ``replay_writer/shard1/up`` ->
    (``convoy_replay_writer_shard_up``, ``{"shard": "1"}``)."""
    labels: dict[str, str] = {}
    parts = []
    for part in key.split("/"):
        m = _SHARD.match(part)
        if m:
            labels["shard"] = m.group(1)
            part = "shard"
        parts.append(part)
    return "convoy_" + _INVALID.sub("_", "_".join(parts)), labels


Labels = tuple[tuple[str, str], ...]


@dataclass
class _Counter:
    raw: float  # the component's own total, as last reported
    total: float  # exported: monotonic across component restarts
    seen: float


@dataclass
class _Histogram:
    raw: list[float]  # the component's cumulative bucket counts, +Inf last
    raw_sum: float
    cum: list[float]  # exported cumulative counts, monotonic across component restarts
    total: float
    seen: float


@dataclass
class Family:
    """One metric name with all its labelled series, ready for either backend."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str
    label_names: tuple[str, ...]
    # gauges and counters: labels -> value; histograms: labels -> (cumulative counts with +Inf, sum)
    samples: dict[Labels, Any] = field(default_factory=dict)


class MetricStore:
    """The translated state of every series; both backends export from it."""

    def __init__(self, run: str, stale_after_s: float = 60.0) -> None:
        self.run = run
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._gauges: dict[tuple[str, Labels], tuple[float, float]] = {}
        self._counters: dict[tuple[str, Labels], _Counter] = {}
        self._hists: dict[tuple[str, Labels], _Histogram] = {}
        self._meta: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # name -> kind, help, label names
        self._buckets: dict[str, tuple[str, int] | None] = {}
        self._names: dict[tuple[str, Labels], tuple[str, Labels]] = {}

    def _register(self, name: str, kind: str, key: str, labels: Labels) -> None:
        names = tuple(k for k, _ in labels)
        meta = self._meta.get(name)
        if meta is None:
            self._meta[name] = (kind, "convoy " + _SHARD_IN_KEY.sub("shard<N>", key), names)
        elif meta[0] != kind or meta[2] != names:
            raise ValueError(
                f"metric {name} (key {key!r}) is a {kind} with labels {names}, "
                f"but was first exported as a {meta[0]} with labels {meta[2]}"
            )

    def _bucket(self, key: str) -> tuple[str, int] | None:
        """(histogram base key, bucket index) of a ``_bucket{le=...}`` key, else None; cached."""
        if key not in self._buckets:
            m = _BUCKET.match(key)
            if m and m["le"] not in _LE_INDEX:
                raise ValueError(f"histogram key {key!r}: le must be one of LATENCY_BUCKETS")
            self._buckets[key] = (m["base"], _LE_INDEX[m["le"]]) if m else None
        return self._buckets[key]

    def _series(self, key: str, edge: Labels, kind: str) -> tuple[str, Labels]:
        """(name, labels) of a key under the edge's labels; cached, as the same keys come every tick."""
        hit = self._names.get((key, edge))
        if hit is None:
            name, entity = series_name(key)
            hit = (name, tuple(sorted({**dict(edge), **entity}.items())))
            self._register(name, kind, key, hit[1])
            self._names[(key, edge)] = hit
        return hit

    def update(self, values: Mapping[str, Any], labels: Mapping[str, str]) -> None:
        now = time.monotonic()
        edge = tuple(sorted({"run": self.run, **labels}.items()))
        hist_parts: dict[str, list[float]] = {}
        plain: dict[str, float] = {}
        with self._lock:
            for key, value in values.items():
                if not isinstance(value, int | float) or key.endswith("_per_s"):
                    continue
                bucket = self._bucket(key)
                if bucket is None:
                    plain[key] = float(value)
                else:
                    hist_parts.setdefault(bucket[0], [0.0] * len(LATENCY_BUCKETS))[bucket[1]] = float(value)
            for key, value in plain.items():
                if key.endswith(("_count", "_sum")) and key.rsplit("_", 1)[0] in hist_parts:
                    continue
                if not math.isfinite(value):
                    continue
                if key.endswith("_total"):
                    series = self._series(key, edge, "counter")
                    c = self._counters.get(series)
                    if c is None:
                        self._counters[series] = _Counter(value, value, now)
                    else:
                        # A total below the last one: the component restarted; a new baseline.
                        c.total += value - c.raw if value >= c.raw else 0.0
                        c.raw, c.seen = value, now
                else:
                    self._gauges[self._series(key, edge, "gauge")] = (value, now)
            for base, buckets in hist_parts.items():
                count, total = plain.get(f"{base}_count"), plain.get(f"{base}_sum")
                if count is None or total is None:
                    raise ValueError(f"histogram {base!r}: buckets without {base}_count and {base}_sum")
                raw = [*buckets, count]
                series = self._series(base, edge, "histogram")
                h = self._hists.get(series)
                if h is None:
                    self._hists[series] = _Histogram(raw, total, list(raw), total, now)
                    continue
                if count >= h.raw[-1]:  # else the component restarted: a new baseline
                    for i, n in enumerate(raw):
                        h.cum[i] += max(0.0, n - h.raw[i])
                    h.total += max(0.0, total - h.raw_sum)
                h.raw, h.raw_sum, h.seen = raw, total, now

    def families(self) -> list[Family]:
        """Every series; a gauge not updated for ``stale_after_s`` (its component is gone) is left out."""
        now = time.monotonic()
        out: dict[str, Family] = {}

        def family(name: str) -> Family:
            if name not in out:
                kind, help_, names = self._meta[name]
                out[name] = Family(name, kind, help_, names)
            return out[name]

        with self._lock:
            for (name, lab), (value, seen) in self._gauges.items():
                if now - seen <= self.stale_after_s:
                    family(name).samples[lab] = value
            for (name, lab), c in self._counters.items():
                family(name).samples[lab] = c.total
            for (name, lab), h in self._hists.items():
                family(name).samples[lab] = (list(h.cum), h.total)
        return sorted(out.values(), key=lambda f: f.name)


# ----- backends --------------------------------------------------------------------------


class _StoreCollector:
    """prometheus_client collector: translates the store at scrape time."""

    def __init__(self, store: MetricStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        for fam in self._store.families():
            metric: Metric
            if fam.kind == "counter":
                metric = CounterMetricFamily(fam.name[: -len("_total")], fam.help, labels=fam.label_names)
                for lab, value in fam.samples.items():
                    metric.add_metric([v for _, v in lab], value)
            elif fam.kind == "gauge":
                metric = GaugeMetricFamily(fam.name, fam.help, labels=fam.label_names)
                for lab, value in fam.samples.items():
                    metric.add_metric([v for _, v in lab], value)
            else:
                metric = HistogramMetricFamily(fam.name, fam.help, labels=fam.label_names)
                for lab, (cum, total) in fam.samples.items():
                    les = [f"{b:g}" for b in LATENCY_BUCKETS] + ["+Inf"]
                    metric.add_metric([v for _, v in lab], list(zip(les, cum, strict=True)), total)
            yield metric


def _ray_midpoints() -> list[float]:
    # The values Ray's metrics agent itself uses for a histogram's sum (it re-records every
    # bucket's count at the bucket's midpoint: ray/_private/telemetry/
    # open_telemetry_metric_recorder.py), so recording them here loses nothing Ray would keep.
    b = LATENCY_BUCKETS
    return [b[0] / 2, *[(b[i - 1] + b[i]) / 2 for i in range(1, len(b))], b[-1] * 2]


class _RayPusher:
    """Records the store into ``ray.util.metrics`` (each node's metrics agent exports them)."""

    def __init__(self, store: MetricStore) -> None:
        self._store = store
        self._metrics: dict[str, Any] = {}
        self._pushed_counters: dict[tuple[str, Labels], float] = {}
        self._pushed_hists: dict[tuple[str, Labels], list[float]] = {}
        self._mid = _ray_midpoints()

    def _metric(self, fam: Family) -> Any:
        from ray.util.metrics import Counter, Gauge, Histogram

        m = self._metrics.get(fam.name)
        if m is None:
            if fam.kind == "counter":
                m = Counter(fam.name, fam.help, tag_keys=fam.label_names)
            elif fam.kind == "gauge":
                m = Gauge(fam.name, fam.help, tag_keys=fam.label_names)
            else:
                m = Histogram(fam.name, fam.help, boundaries=list(LATENCY_BUCKETS), tag_keys=fam.label_names)
            self._metrics[fam.name] = m
        return m

    def push(self) -> None:
        for fam in self._store.families():
            metric = self._metric(fam)
            for lab, value in fam.samples.items():
                tags = dict(lab)
                key = (fam.name, lab)
                if fam.kind == "gauge":
                    # Re-set on every push: Ray's agent drops a gauge not set again within two
                    # report intervals (it would vanish while its value is simply unchanged).
                    metric.set(value, tags)
                elif fam.kind == "counter":
                    before = self._pushed_counters.get(key)
                    if before is None:
                        # Counter.inc() refuses 0, but a counter must exist from 0 on, or rate()
                        # and increase() miss its first increment and a never-failing component's
                        # restart counter has no series at all.
                        metric._record(0.0, tags)
                        before = 0.0
                    if value > before:
                        metric.inc(value - before, tags)
                    self._pushed_counters[key] = max(before, value)
                else:
                    cum, _ = value
                    before_cum = self._pushed_hists.get(key, [0.0] * len(cum))
                    prev = 0.0
                    for i, (now_i, was_i) in enumerate(zip(cum, before_cum, strict=True)):
                        # New observations in bucket i (not cumulative).
                        n = round((now_i - was_i) - prev)
                        prev = now_i - was_i
                        for _ in range(n):
                            metric.observe(self._mid[i], tags)
                    self._pushed_hists[key] = list(cum)


class MetricsExporter:
    """The export edge of one process: ``update`` with each component's latest flat dict.

    ``backend="http"`` serves the series on ``http://host:port/metrics`` (prometheus_client,
    scraped on demand). ``backend="ray"`` records them through ``ray.util.metrics``, at most
    every ``push_every_s`` and on :meth:`flush`; call it in a process connected to Ray.

    Ray's known behaviours and how they are handled: its agent drops gauges not set again
    within two report intervals, so every push re-sets every live gauge; values recorded by
    an actor just before it is killed can be lost, so convoy records everything in the
    driver (which receives every component's dict anyway) and a killed actor loses nothing
    already reported; a replaced actor's counters restart at 0, so the store keeps the
    labelled series monotonic (see the module docstring); ``Counter.inc`` refuses 0, so a counter's series is created at
    0 explicitly. A gauge of a component that stops reporting (removed or dead) is left out
    after ``stale_after_s``, and Ray's agent then expires it.
    """

    def __init__(
        self,
        run: str,
        backend: str = "http",
        host: str = "127.0.0.1",
        port: int = 0,
        push_every_s: float = 2.0,
        stale_after_s: float = 60.0,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if backend not in ("http", "ray"):
            raise ValueError(f"metrics backend must be 'http' or 'ray', got {backend!r}")
        self.backend = backend
        self.labels = dict(labels or {})  # on every series of this exporter, e.g. component
        self.store = MetricStore(run, stale_after_s)
        self.push_every_s = push_every_s
        self._next_push = 0.0
        self._pusher: _RayPusher | None = None
        self._server: Any = None
        self.host, self.port = host, 0
        if backend == "ray":
            import ray

            # At least twice per Ray report interval, so a live gauge never reaches the agent's
            # expiry (two intervals) between two pushes.
            report_s = max(1.0, ray._config.metrics_report_interval_ms() / 1000)
            self.push_every_s = min(push_every_s, report_s / 2)
            self._pusher = _RayPusher(self.store)
        else:
            registry = CollectorRegistry()
            registry.register(_StoreCollector(self.store))
            self._server, _ = start_http_server(port, addr=host, registry=registry)
            self.port = int(self._server.server_port)

    @property
    def url(self) -> str | None:
        return f"http://{self.host}:{self.port}/metrics" if self._server is not None else None

    def update(self, values: Mapping[str, Any], **labels: str) -> None:
        """The latest flat dict of one component; ``labels`` name it (``component="collector",
        collector="3"``)."""
        self.store.update(values, {**self.labels, **labels})
        if self._pusher is not None and time.monotonic() >= self._next_push:
            self.flush()

    def flush(self) -> None:
        if self._pusher is not None:
            self._next_push = time.monotonic() + self.push_every_s
            self._pusher.push()

    def close(self) -> None:
        self.flush()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
