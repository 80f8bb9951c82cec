"""Where a run's pieces go: Ray's options, the control actor, the replay shards, the learner
and the collectors' factories (in the spirit of Acme's ``make_distributed_experiment``: one
small function per piece, each returning what the supervisor needs to make it again).

Placement is by Ray resources, never by the driver's machine: collectors ask for
``collector.resources`` (``{carla: 1}`` for CARLA), the learner for ``learner.num_gpus``
(``auto``: one when the cluster has a GPU) and ``learner.resources``, shard actors for
``replay.shard_resources`` and spread over nodes. Nothing assumes that two pieces share a
machine: shards advertise their node's address (loopback only on a local single-node Ray).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from common.config import ConfigError, ConvoyConfig
from deploy.run.evaluation import evaluator_resources
from deploy.run.supervisor import Factories
from replay_service.launcher import maxmemory_for
from replay_service.sampler import ReplaySampler
from replay_service.shards import check_shard, redact
from replay_service.table import ShardTable
from replay_service.writer import ReplayWriter


def sink_factory(
    cfg: ConvoyConfig, urls: list[str], collector_id: int, shard_table: ShardTable | None = None
) -> functools.partial[ReplayWriter]:
    """A collector's writer; with ``shard_table`` it follows shards replaced at new addresses."""
    return functools.partial(
        ReplayWriter,
        urls,
        cfg.replay.capacity,
        cfg.replay.codec,
        cfg.replay.password,
        collector_id,
        samples_per_insert=cfg.replay.samples_per_insert,
        spi_tolerance=cfg.replay.spi_tolerance,
        min_size_to_sample=cfg.min_size_to_sample(),
        shard_table=shard_table,
    )


def source_factory(
    cfg: ConvoyConfig, urls: list[str], pin_memory: bool, shard_table: ShardTable | None = None
) -> functools.partial[ReplaySampler]:
    """The learner's sampler; ``pin_memory`` is True exactly when the learner runs on a GPU."""
    threads = sampler_threads(cfg, cuda=pin_memory)
    frames = cfg.learner.encoder != "none"
    return functools.partial(
        ReplaySampler,
        urls,
        cfg.learner.batch_size,
        password=cfg.replay.password,
        prefetch=cfg.replay.prefetch_batches if threads else 0,
        threads=threads,
        index_refresh_s=cfg.replay.index_refresh_s,
        seed=cfg.run.seed,
        pin_memory=pin_memory,
        min_size=cfg.min_size_to_sample(),
        samples_per_insert=cfg.replay.samples_per_insert,
        spi_tolerance=cfg.replay.spi_tolerance,
        mirror=cfg.replay.mirror,
        capacity=cfg.replay.capacity,
        segment_length=cfg.collector.segment_length,
        device=(cfg.learner.device if cfg.learner.device != "auto" else "cuda") if pin_memory else "cpu",
        shard_table=shard_table,
        n_step=cfg.learner.n_step,
        gamma=cfg.learner.gamma,
        frames=frames,
        # Frameless batches: the draw's Python work dominates, so it is shared by 8 batches.
        bulk=1 if frames else 8,
    )


def sampler_threads(cfg: ConvoyConfig, cuda: bool) -> int:
    """``replay.sampler_threads``, or its auto value (-1): 4 on a CUDA learner; on a CPU
    learner 0 (it samples on its own thread) with the resident mirror, 1 without it. A CPU
    learner's update keeps every core busy (learner/threads.py), so a sampler thread beside it
    only competes: for the cores, and for the GIL between the update's many small operations.
    Measured on a 2-core AVX2 CPU (``convoy bench learner``), the batch-128 pixel learner made
    4.03 fed updates/s with one sampler thread and 4.70 sampling on its own thread (4.94 on
    ready batches); a draw from the resident mirror costs 0.1-2.5 ms there. Byte-range
    sampling (``replay.mirror=off``) waits on the network, which a thread hides; a CUDA
    learner's device work overlaps the host's."""
    if cfg.replay.sampler_threads >= 0:
        return cfg.replay.sampler_threads
    if cuda:
        return 4
    return 1 if cfg.replay.mirror == "off" else 0


def collector_resources(cfg: ConvoyConfig) -> dict[str, float]:
    """``collector.resources``, or the backend's default: a CARLA collector needs a server slot."""
    if cfg.collector.resources is not None:
        return dict(cfg.collector.resources)
    return {"carla": 1.0} if cfg.env.backend == "carla" else {}


def learner_gpus(cfg: ConvoyConfig, cluster: dict[str, float]) -> float:
    """``learner.num_gpus``; ``auto`` is decided from the cluster's resources, not from torch here."""
    if cfg.learner.num_gpus == "auto":
        return 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    return float(cfg.learner.num_gpus)


def local_resources(cfg: ConvoyConfig) -> dict[str, float]:
    """Custom resources a local (single-machine) Ray cluster declares, so that a run config
    written for a cluster (``{carla: 1}`` per collector, ``{replay: 1}`` per shard) also runs
    on one machine."""
    out: dict[str, float] = {}

    def add(res: dict[str, float], times: int) -> None:
        for k, v in res.items():
            out[k] = out.get(k, 0.0) + v * times

    add(collector_resources(cfg), cfg.collector.num_collectors)
    if cfg.run.eval_every_updates:
        add(evaluator_resources(cfg), 1)
    add(dict(cfg.learner.resources), 1)
    if not cfg.replay.shard_urls:
        add(dict(cfg.replay.shard_resources), cfg.replay.num_shards)
    return out


def ray_init_options(cfg: ConvoyConfig, namespace: str) -> dict[str, Any]:
    """``ray.init`` arguments: join ``run.ray_address``, or start a local cluster sized for the run."""
    if cfg.run.ray_address:
        return {"address": cfg.run.ray_address, "namespace": namespace, "logging_level": logging.WARNING}
    needed_cpus = math.ceil(cfg.collector.num_collectors * cfg.collector.num_cpus) + 1
    return {
        # Logical CPUs: on a small machine collectors and learner share cores by design.
        "num_cpus": max(needed_cpus, os.cpu_count() or 1),
        # Ray's dashboard head writes the Prometheus service-discovery file that
        # deploy/monitoring/prometheus.yml (`convoy monitor`) finds this cluster by.
        "include_dashboard": cfg.run.metrics,
        "logging_level": logging.WARNING,
        "object_store_memory": 256 * 1024**2,
        "namespace": namespace,
        "resources": local_resources(cfg) or None,
    }


def make_control(namespace: str, wanted: int) -> Any:
    """The run's named control actor, on the driver's own node: it must not go away with a
    worker node (its state is the wanted collector count, which the supervisor also holds)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from deploy.run.control import CONTROL_NAME, RunControl

    here = ray.get_runtime_context().get_node_id()
    return RunControl.options(  # type: ignore[attr-defined]
        name=CONTROL_NAME,
        namespace=namespace,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(wanted)


def check_run_is_new(name: str, namespace: str) -> None:
    """A run's control actor is named; a second run of the same name on one cluster is refused."""
    import ray

    from deploy.run.control import CONTROL_NAME

    try:
        ray.get_actor(CONTROL_NAME, namespace=namespace)
    except ValueError:
        return
    raise ConfigError(
        f"a run named {name!r} is already running on this cluster (namespace {namespace!r}); "
        "set run.name or run.out_dir to another name"
    )


def wait_placed(refs: list[Any], what: str, out: TextIO, say_every_s: float = 15.0) -> list[Any]:
    """ray.get that says what it waits for (a node the autoscaler is still starting)."""
    import ray

    t0 = time.monotonic()
    while True:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=say_every_s)
        if len(ready) == len(refs):
            return list(ray.get(refs))
        print(f"waiting for {what} to be placed ({time.monotonic() - t0:.0f}s)", file=out, flush=True)


def shard_factory(cfg: ConvoyConfig, bind: str, namespace: str) -> Callable[[int, int], Any]:
    """``(index, port) -> ShardActor``: spread over nodes; a replacement asks for its predecessor's port
    first (port 0: any free one). Each shard's memory is bounded from its share of ``replay.capacity``."""
    from replay_service.remote import ShardActor

    maxmemory = maxmemory_for(cfg.replay.capacity // cfg.replay.num_shards)

    def make_shard(index: int, port: int) -> Any:
        return ShardActor.options(  # type: ignore[attr-defined]
            resources=dict(cfg.replay.shard_resources) or None,
            scheduling_strategy="SPREAD",
            name=f"shard-{index}",
            namespace=namespace,
        ).remote(index, bind, port, cfg.replay.password, cfg.replay.redis_server, maxmemory)

    return make_shard


def place_shards(cfg: ConvoyConfig, make_shard: Callable[[int, int], Any], out: TextIO) -> tuple[list[str], list[Any]]:
    """The shards' URLs and the shard actors convoy started (none when ``replay.shard_urls`` is given)."""
    import ray

    if cfg.replay.shard_urls:
        urls = list(cfg.replay.shard_urls)
        for url in urls:
            check_shard(url, cfg.replay.password)
        print(f"replay shards (given): {', '.join(redact(u) for u in urls)}", file=out, flush=True)
        return urls, []
    shards = [make_shard(i, 0) for i in range(cfg.replay.num_shards)]
    urls = wait_placed([s.url.remote() for s in shards], "replay shards", out)
    nodes = ray.get([s.node.remote() for s in shards])
    for i, (url, node) in enumerate(zip(urls, nodes, strict=True)):
        print(f"placement: shard {i} -> node {node['address']} ({redact(url)})", file=out, flush=True)
    for url in urls:
        check_shard(url, cfg.replay.password)
    return urls, shards


def learner_factory(
    cfg: ConvoyConfig, urls: list[str], config: dict[str, Any], gpus: float, shard_table: ShardTable | None = None
) -> Callable[[], Any]:
    from learner.remote import LearnerActor

    def make_learner() -> Any:
        source = source_factory(cfg, urls, pin_memory=gpus > 0, shard_table=shard_table)
        return LearnerActor.options(  # type: ignore[attr-defined]
            num_cpus=1, num_gpus=gpus, resources=dict(cfg.learner.resources) or None
        ).remote(config, source, cfg.run.out_dir)

    return make_learner


def place_learner(make_learner: Callable[[], Any], gpus: float, resume: str | None, out: TextIO) -> Any:
    """The first learner, placed and (with ``resume``) restored before any collector starts."""
    import ray

    learner = make_learner()
    (node,) = wait_placed([learner.node.remote()], "the learner", out)
    print(f"placement: learner -> node {node['address']} ({node['device']}, {gpus:g} GPU)", file=out, flush=True)
    if resume is not None:
        info = ray.get(learner.restore.remote(resume))
        print(
            f"resumed from {info['checkpoint']}: updates {info['updates']}, env_steps {info['env_steps']}",
            file=out,
            flush=True,
        )
    return learner


def collector_factory(
    cfg: ConvoyConfig, urls: list[str], config: dict[str, Any], shard_table: ShardTable | None = None
) -> Callable[[int, int], Any]:
    """``(index, incarnation) -> CollectorActor``, placed as resources allow (the run starts with the first)."""
    from actors.remote import CollectorActor

    resources = collector_resources(cfg)

    def make_collector(index: int, incarnation: int) -> Any:
        return CollectorActor.options(  # type: ignore[attr-defined]
            num_cpus=cfg.collector.num_cpus, resources=resources or None
        ).remote(config, index, sink_factory(cfg, urls, index, shard_table), incarnation)

    return make_collector


@dataclass
class Placement:
    """Everything placed for a run, and how the supervisor makes each piece again."""

    control: Any
    urls: list[str]
    shards: list[Any]  # the shard actors convoy started; empty with ``replay.shard_urls``
    learner: Any
    factories: Factories

    @property
    def shard_ports(self) -> list[int]:
        """The port of each started shard, so that a replacement listens where its URL points."""
        return [int(u.rsplit(":", 1)[1].split("/", 1)[0]) for u in self.urls] if self.shards else []


def place(cfg: ConvoyConfig, name: str, bind: str, namespace: str, resume: str | None, out: TextIO) -> Placement:
    """Control actor, shards, learner (restored with ``resume``), and the collectors' factory."""
    import ray

    from deploy.run.control import ShardTableView

    check_run_is_new(name, namespace)
    control = make_control(namespace, cfg.collector.num_collectors)
    config = cfg.to_dict()  # unredacted: constructor arguments are the one way secrets travel
    make_shard = shard_factory(cfg, bind, namespace)
    urls, shards = place_shards(cfg, make_shard, out)
    # Shards convoy started may be replaced at new addresses: writers and the sampler read the
    # table the supervisor keeps, through the control actor (a pull: see ShardTableView).
    table = ShardTableView(namespace) if shards else None
    if shards:
        ray.get(control.set_shard_table.remote(urls))
    gpus = learner_gpus(cfg, ray.cluster_resources())
    make_learner = learner_factory(cfg, urls, config, gpus, table)
    learner = place_learner(make_learner, gpus, resume, out)
    factories = Factories(
        collector=collector_factory(cfg, urls, config, table),
        learner=make_learner,
        shard=make_shard if shards else None,
        shard_urls=list(urls) if shards else [],
    )
    return Placement(control, urls, shards, learner, factories)
