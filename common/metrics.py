"""Prometheus export at the edge.

Components return flat metric dicts with namespaced keys (``learner/critic_loss``); a
:class:`MetricsExporter` in the process that owns the component turns the latest dict into
Prometheus metrics on its own HTTP endpoint. Keys ending in ``_total`` are exported as
counters, everything else as gauges.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


def prom_name(key: str) -> str:
    return "convoy_" + _INVALID.sub("_", key)


class _DictCollector:
    def __init__(self, labels: Mapping[str, str]) -> None:
        self._labels = dict(labels)
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def update(self, values: Mapping[str, float]) -> None:
        with self._lock:
            self._values.update(values)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            items = list(self._values.items())
        names, values = list(self._labels), list(self._labels.values())
        for key, value in items:
            name = prom_name(key)
            family: Metric
            if name.endswith("_total"):
                family = CounterMetricFamily(name[: -len("_total")], key, labels=names)
            else:
                family = GaugeMetricFamily(name, key, labels=names)
            family.add_metric(values, float(value))
            yield family


class MetricsExporter:
    """Serves the latest values of one component's flat metric dict on ``http://host:port/metrics``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, labels: Mapping[str, str] | None = None) -> None:
        self.registry = CollectorRegistry()
        self._collector = _DictCollector(labels or {})
        self.registry.register(self._collector)
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def update(self, values: Mapping[str, Any]) -> None:
        self._collector.update({k: float(v) for k, v in values.items() if isinstance(v, int | float)})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
