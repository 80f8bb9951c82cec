"""Finding and steering a running run from any machine that reaches its Ray cluster.

The driver registers a named actor, ``control``, in the Ray namespace ``convoy-<run name>``.
`convoy scale RUN --collectors N` connects to the cluster, finds that actor by name and sets
the wanted number of collectors; the driver's supervisor reads it every loop and starts or
stops collectors to match. The actor also holds the driver's latest status, so `convoy
scale` can report what the run is doing, and the run's shard table (deploy/run/shardtable.py):
writers and the sampler read it through :class:`ShardTableView` to find a shard replaced at a
new address.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import ray

CONTROL_NAME = "control"


def namespace_for(run_name: str) -> str:
    """The Ray namespace of a run: ``convoy-`` plus the name with unusual characters replaced."""
    return "convoy-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)


@ray.remote(num_cpus=0, max_restarts=0)
class RunControl:
    """Holds what the user wants of a running run (collectors) and the driver's last status."""

    def __init__(self, wanted_collectors: int) -> None:
        self.wanted = wanted_collectors
        self.status: dict[str, Any] = {}
        self.shard_urls: list[str] = []

    def set_wanted(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"collectors must be >= 1, got {n}")
        self.wanted = int(n)
        return self.wanted

    def get_wanted(self) -> int:
        return self.wanted

    def set_status(self, status: dict[str, Any]) -> None:
        self.status = status

    def get_status(self) -> dict[str, Any]:
        return self.status

    def set_shard_table(self, urls: list[str]) -> None:
        self.shard_urls = list(urls)

    def get_shard_table(self) -> list[str]:
        return self.shard_urls


class ShardTableView:
    """``() -> list[str]``: the run's shard URLs as the control actor last published them.

    Given to writers and the sampler (replay_service/table.py polls it). It never waits once it
    has an answer: each call returns the newest table fetched so far and starts the next fetch
    when the last one is done, so a slow or restarting control actor never stalls a collector.
    Picklable (it travels to actors inside their factories); the handle is looked up by name
    in each process, again after a failure (the supervisor replaces a dead control actor).
    """

    def __init__(self, namespace: str, first_wait_s: float = 5.0) -> None:
        self.namespace = namespace
        self.first_wait_s = first_wait_s
        self._handle: Any = None
        self._ref: Any = None
        self._urls: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "first_wait_s": self.first_wait_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["namespace"], state["first_wait_s"])  # type: ignore[misc]

    def __call__(self) -> list[str]:
        try:
            if self._handle is None:
                self._handle = ray.get_actor(CONTROL_NAME, namespace=self.namespace)
            if self._ref is None:
                self._ref = self._handle.get_shard_table.remote()
            wait = 0.0 if self._urls else self.first_wait_s
            ready, _ = ray.wait([self._ref], timeout=wait)
            if ready:
                ref, self._ref = self._ref, None
                self._urls = list(ray.get(ref))
        except Exception:  # the control actor is gone or being replaced: look it up again
            self._handle = self._ref = None
        return list(self._urls)


class RunNotFound(RuntimeError):
    """No running run of that name on the cluster."""


def scale(run_name: str, collectors: int, address: str = "auto", wait_s: float = 0.0) -> dict[str, Any]:
    """Set the wanted collectors of the running run ``run_name``; returns its status.

    With ``wait_s`` > 0 it waits until the run reports that many live collectors (or the
    time is up) and returns the status then."""
    if collectors < 1:
        raise ValueError(f"--collectors must be >= 1, got {collectors}")
    ns = namespace_for(run_name)
    ray.init(address=address, namespace=ns, logging_level=logging.WARNING)
    try:
        try:
            control = ray.get_actor(CONTROL_NAME, namespace=ns)
        except ValueError:
            raise RunNotFound(
                f"no running run named {run_name!r} on the cluster at {address!r} (looked for actor "
                f"{CONTROL_NAME!r} in namespace {ns!r}); the name is run.name, or the last part of run.out_dir"
            ) from None
        ray.get(control.set_wanted.remote(collectors))
        status: dict[str, Any] = ray.get(control.get_status.remote())
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and status.get("collectors_live") != collectors:
            time.sleep(0.5)
            status = ray.get(control.get_status.remote())
        return status
    finally:
        ray.shutdown()
