"""Finding and steering a running run from any machine that reaches its Ray cluster.

The driver registers a named actor, ``control``, in the Ray namespace ``convoy-<run name>``.
`convoy scale RUN --collectors N` connects to the cluster, finds that actor by name and sets
the wanted number of collectors; the driver's supervisor reads it every loop and starts or
stops collectors to match. The actor also holds the driver's latest status, so `convoy
scale` can report what the run is doing.
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
