"""Latency histograms that components keep on their hot path.

A :class:`Latency` lives inside a collector, the learner or a replay client and is carried in
that component's flat metric dict as Prometheus histogram parts (``<key>_bucket{le="..."}``,
``<key>_sum``, ``<key>_count``, in seconds). Components never talk to Prometheus themselves:
the driver's exporter (deploy/run/exporter.py) turns those parts into one histogram.
"""

from __future__ import annotations

import bisect

# Seconds; from a 100 µs Redis round trip to a 30 s CARLA tick that is about to time out.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Latency:
    """A cumulative histogram of durations in seconds, kept by a component on its hot path
    and carried in its flat metric dict as Prometheus histogram parts.

    ``observe`` is one bisect and two additions. :meth:`metrics` returns
    ``<key>_bucket{le="0.01"}`` (cumulative counts), ``<key>_sum`` and ``<key>_count``.
    """

    def __init__(self, key: str) -> None:
        if not key.endswith("_seconds"):
            raise ValueError(f"latency key {key!r} must end in _seconds (Prometheus base unit)")
        self.key = key
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._bucket_keys = [f'{key}_bucket{{le="{b:g}"}}' for b in LATENCY_BUCKETS]

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound falls in that bucket (Prometheus' le is inclusive).
        self._counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sum += seconds

    @property
    def count(self) -> int:
        return sum(self._counts)

    def metrics(self) -> dict[str, float]:
        counts, total = list(self._counts), self._sum  # one snapshot: count == the +Inf bucket
        out: dict[str, float] = {}
        cumulative = 0
        for key, n in zip(self._bucket_keys, counts, strict=False):
            cumulative += n
            out[key] = cumulative
        out[f"{self.key}_count"] = cumulative + counts[-1]
        out[f"{self.key}_sum"] = total
        return out
