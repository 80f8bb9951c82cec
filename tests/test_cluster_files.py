"""`ray up` cluster files (deploy/cluster/): Ray's own offline checks, and resources that fit convoy's run configs.

`ray up` (ray.autoscaler._private.commands._bootstrap_config) does, before any cloud call:
  1. prepare_config: fills every missing key from the provider's defaults.yaml, merges the setup
     commands, checks the docker section, fills each node type's min/max workers;
  2. provider.fillout_available_node_types_resources: AWS asks EC2 for instance sizes (a cloud
     call; a failure is only a warning there and our files declare all resources anyway), GCP
     fills TPU resources only;
  3. validate_config: ray-schema.json plus the head-node-type and min_workers checks;
  4. provider.bootstrap_config: AWS and GCP first run offline checks (legacy fields, launch
     templates, network interfaces, the AMI lookup; the GCE/TPU node-type check), then call the
     cloud (IAM, key pairs, subnets, security groups).
`ray_up_offline_checks` runs 1, 3 and the offline parts of 4 with Ray's own functions; only the
cloud calls are left out.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.aws import config as aws_config
from ray.autoscaler._private.gcp import config as gcp_config
from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

from common.config import ConvoyConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "deploy" / "cluster"
CLUSTER_FILES = sorted(CLUSTER_DIR.glob("*.yaml"))
RUN_CONFIGS = sorted((ROOT / "deploy" / "configs").glob("*.yaml"))

# What the docs' `ray job submit ... -- convoy train` adds on a `ray up` cluster: the learner
# pinned to the head's `learner` resource and shards to the `replay` node type.
SUBMIT_OVERRIDES = ("run.ray_address=auto", "learner.resources=learner:1", "replay.shard_resources=replay:1")


def ray_up_offline_checks(raw: dict[str, Any]) -> dict[str, Any]:
    """Everything `ray up` checks before its first cloud call; raises what `ray up` would raise."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    check_legacy_fields(config)
    provider = config["provider"]["type"]
    if provider == "aws":
        config = aws_config._configure_from_launch_template(config)  # no template: no API call
        config = aws_config._configure_from_network_interfaces(config)
        aws_config._check_ami(config)  # resolves `latest_dlami` from Ray's per-region table
    elif provider == "gcp":
        for name, node_type in config["available_node_types"].items():
            try:
                gcp_config.get_node_type(node_type["node_config"])
            except ValueError as exc:
                raise ValueError(f"node type {name}: {exc}") from exc
    else:
        raise AssertionError(f"no offline checks written for provider {provider!r}")
    return config


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def collector_resources(cfg: ConvoyConfig) -> dict[str, float]:
    """Custom resources one collector asks for; null means the backend's default (documented in CollectorConfig)."""
    if cfg.collector.resources is not None:
        return dict(cfg.collector.resources)
    return {"carla": 1.0} if cfg.env.backend == "carla" else {}


def actor_demands(cfg: ConvoyConfig) -> dict[str, dict[str, float]]:
    """Per-actor resource bundles a run asks Ray for; each must fit one node type."""
    learner: dict[str, float] = dict(cfg.learner.resources)
    if cfg.learner.num_gpus != 0:
        # 'auto' asks for one GPU on a cluster that has any; a number asks for that many.
        learner["GPU"] = 1.0 if cfg.learner.num_gpus == "auto" else float(cfg.learner.num_gpus)
    return {
        "collector": {"CPU": cfg.collector.num_cpus, **collector_resources(cfg)},
        "learner": learner,
        "replay shard": dict(cfg.replay.shard_resources),
    }


def unplaceable(cluster: dict[str, Any], cfg: ConvoyConfig) -> list[str]:
    """Actors of `cfg` that no node type of `cluster` can hold, with what they lack."""
    node_types = cluster["available_node_types"]
    problems = []
    for actor, demand in actor_demands(cfg).items():
        wanted = {k: v for k, v in demand.items() if v > 0}
        if not any(all(nt["resources"].get(k, 0) >= v for k, v in wanted.items()) for nt in node_types.values()):
            offered = [nt["resources"] for nt in node_types.values()]
            problems.append(f"{actor} needs {wanted}; node types offer {offered}")
    return problems


def test_cluster_files_cover_aws_and_gcp() -> None:
    providers = {_load(p)["provider"]["type"] for p in CLUSTER_FILES}
    assert {"aws", "gcp"} <= providers, f"cluster files in {CLUSTER_DIR}: {[p.name for p in CLUSTER_FILES]}"
    assert RUN_CONFIGS, "no run configs in deploy/configs"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_cluster_file_passes_ray_up_checks(path: Path) -> None:
    config = ray_up_offline_checks(_load(path))
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) >= 1, "the head runs the GPU learner"
    assert head["max_workers"] == 0
    carla = [n for n in node_types.values() if n["resources"].get("carla", 0) >= 1 and n is not head]
    assert carla, "an autoscaling CARLA worker type with a `carla` resource"
    raw_types = _load(path)["available_node_types"]
    for name, raw in raw_types.items():
        if name != config["head_node_type"]:
            # Autoscaling bounds are written in the file, not left to Ray's defaults.
            assert "min_workers" in raw and "max_workers" in raw, name
            assert raw["min_workers"] <= raw["max_workers"] <= config["max_workers"], name
    if config["provider"]["type"] == "aws":
        # _check_ami resolved `latest_dlami` to this region's Deep Learning AMI, offline.
        assert all(n["node_config"]["ImageId"].startswith("ami-") for n in node_types.values())
    for n in carla:
        assert n["resources"].get("GPU", 0) >= 1, "CARLA workers declare the GPUs the servers render on"
        assert n["max_workers"] > n["min_workers"], "the CARLA worker type autoscales"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_ray_defaults_do_not_leak_commands(path: Path) -> None:
    # prepare_config fills missing keys from Ray's defaults.yaml, whose setup commands
    # pip-install another Ray; the files must say every command themselves.
    config = ray_up_offline_checks(_load(path))
    commands = [
        c
        for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
        for c in config[key]
    ]
    assert not any("pip install" in c for c in commands), commands
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2, "head and workers start with Ray token auth"
    assert "--metrics-export-port=8080" in start
    # The one file mount is the shared Ray token; code travels in the images.
    assert set(config["file_mounts"]) <= {"~/.ray/auth_token"}, config["file_mounts"]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("run_config", RUN_CONFIGS, ids=lambda p: p.name)
def test_node_types_provide_what_run_configs_request(path: Path, run_config: Path) -> None:
    cluster = ray_up_offline_checks(_load(path))
    for overrides in ((), SUBMIT_OVERRIDES):
        cfg = load_config(run_config, overrides)
        assert unplaceable(cluster, cfg) == [], (run_config.name, overrides)


def test_shipped_carla_config_places_on_carla_nodes() -> None:
    # The resource check above must be able to fail: a cluster without the carla resource,
    # or a learner resource nobody declares, leaves actors unplaceable.
    cluster = ray_up_offline_checks(_load(CLUSTER_DIR / "aws.yaml"))
    cfg = load_config(ROOT / "deploy" / "configs" / "carla.yaml", SUBMIT_OVERRIDES)
    no_carla = copy.deepcopy(cluster)
    for nt in no_carla["available_node_types"].values():
        nt["resources"].pop("carla", None)
    assert any(p.startswith("collector") for p in unplaceable(no_carla, cfg))
    greedy = load_config(ROOT / "deploy" / "configs" / "carla.yaml", ("learner.resources=tpu_pod:1",))
    assert any(p.startswith("learner") for p in unplaceable(cluster, greedy))
    too_big = load_config(ROOT / "deploy" / "configs" / "carla.yaml", ("collector.num_cpus=64",))
    assert any(p.startswith("collector") for p in unplaceable(cluster, too_big))


def test_ray_checks_reject_broken_cluster_files() -> None:
    raw = _load(CLUSTER_DIR / "aws.yaml")
    unknown = copy.deepcopy(raw)
    unknown["available_node_types"]["carla_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        ray_up_offline_checks(unknown)
    fractional = copy.deepcopy(raw)
    fractional["available_node_types"]["carla_worker"]["resources"]["carla"] = -1
    with pytest.raises(jsonschema.ValidationError):
        ray_up_offline_checks(fractional)
    too_many = copy.deepcopy(raw)
    too_many["available_node_types"]["carla_worker"]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        ray_up_offline_checks(too_many)
    no_head = copy.deepcopy(raw)
    no_head["head_node_type"] = "learner"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_up_offline_checks(no_head)
    gcp = _load(CLUSTER_DIR / "gcp.yaml")
    gcp["available_node_types"]["replay"]["node_config"].pop("machineType")
    with pytest.raises(ValueError, match=r"replay.*machineType"):
        ray_up_offline_checks(gcp)
