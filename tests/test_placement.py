"""Placement and secrets decided from config and cluster resources (no Ray needed)."""

from __future__ import annotations

import pytest
import yaml

from common.config import ConfigError, ConvoyConfig, load_config
from deploy.run.control import namespace_for
from deploy.run.placement import collector_resources, learner_gpus, local_resources
from deploy.run.resolve import resolve_secrets, run_name


def test_collector_resources_default_by_backend_and_override() -> None:
    assert collector_resources(ConvoyConfig()) == {}
    carla = ConvoyConfig().replace("env.backend=carla")
    assert collector_resources(carla) == {"carla": 1.0}
    assert collector_resources(carla.replace("collector.resources=collector:1,gpu_slot:0.5")) == {
        "collector": 1.0,
        "gpu_slot": 0.5,
    }
    # An explicit empty mapping means "no custom resources", even for CARLA.
    assert collector_resources(carla.replace("collector.resources={}")) == {}


def test_resource_values_are_checked_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"collector.resources.carla=-1: must be >= 0"):
        ConvoyConfig().replace("collector.resources=carla:-1")
    with pytest.raises(ConfigError, match=r"learner.resources"):
        ConvoyConfig().replace("learner.resources=gpu")
    with pytest.raises(ConfigError, match=r"learner.num_gpus='two': allowed: 'auto' or a number >= 0"):
        ConvoyConfig().replace("learner.num_gpus=two")


def test_learner_gpus_come_from_the_cluster_not_this_machine() -> None:
    cfg = ConvoyConfig()
    assert learner_gpus(cfg, {"CPU": 16.0}) == 0.0
    assert learner_gpus(cfg, {"CPU": 16.0, "GPU": 4.0}) == 1.0
    assert learner_gpus(cfg.replace("learner.num_gpus=0"), {"GPU": 4.0}) == 0.0
    assert learner_gpus(cfg.replace("learner.num_gpus=2"), {"GPU": 4.0}) == 2.0


def test_a_local_cluster_declares_what_the_run_config_asks_for() -> None:
    cfg = ConvoyConfig().replace(
        "collector.num_collectors=3",
        "collector.resources=collector:1",
        "learner.resources=learner:1",
        "replay.num_shards=2",
        "replay.shard_resources=replay:1",
    )
    assert local_resources(cfg) == {"collector": 3.0, "learner": 1.0, "replay": 2.0}
    # With CARLA the evaluator owns a server too: one slot more than collectors.
    carla = ConvoyConfig().replace("env.backend=carla", "collector.num_collectors=3")
    assert local_resources(carla) == {"carla": 4.0}
    assert local_resources(carla.replace("run.eval_every_updates=0")) == {"carla": 3.0}


def test_password_precedence_and_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVOY_REPLAY_PASSWORD", raising=False)
    local, source = resolve_secrets(ConvoyConfig(), shards_on_node_addresses=False)
    # Shards on loopback get a password too: another user of the machine must not reach them.
    assert len(local.replay.password) >= 24 and "loopback" in source and "generated" in source
    given_urls, source = resolve_secrets(ConvoyConfig().replace("replay.shard_urls=redis://h:1/0"), False)
    assert given_urls.replay.password == "" and "shard_urls" in source
    cluster, source = resolve_secrets(ConvoyConfig(), shards_on_node_addresses=True)
    assert len(cluster.replay.password) >= 24 and "generated" in source
    again, _ = resolve_secrets(ConvoyConfig(), shards_on_node_addresses=True)
    assert again.replay.password != cluster.replay.password  # one per run
    monkeypatch.setenv("CONVOY_REPLAY_PASSWORD", "from-env")
    env, source = resolve_secrets(ConvoyConfig(), shards_on_node_addresses=True)
    assert env.replay.password == "from-env" and source == "$CONVOY_REPLAY_PASSWORD"
    given, source = resolve_secrets(ConvoyConfig().replace("replay.password=given"), shards_on_node_addresses=True)
    assert given.replay.password == "given" and source == "replay.password"


def test_secrets_are_redacted_in_yaml_and_read_back_as_unset() -> None:
    cfg = ConvoyConfig().replace("replay.password=s3cret", "replay.shard_urls=redis://:pw2@h:1/0,redis://h2:2/0")
    text = cfg.to_yaml()
    assert "s3cret" not in text and "pw2" not in text
    data = yaml.safe_load(text)
    assert data["replay"]["password"] == "***"
    assert data["replay"]["shard_urls"] == ["redis://:***@h:1/0", "redis://h2:2/0"]
    # Every URL form, in any field: user and password, the query parameter, the run's storage.
    urls = ConvoyConfig().replace(
        "replay.shard_urls=redis://convoy:pw3@h:1/0,redis://h:2/0?password=pw4&db=0",
        "run.out_dir=s3://AKIA:pw5@bucket/run",
    )
    text = urls.to_yaml()
    assert not any(pw in text for pw in ("pw3", "pw4", "pw5")), text
    assert "redis://convoy:***@h:1/0" in text and "password=***&db=0" in text
    assert cfg.to_dict()["replay"]["password"] == "s3cret"  # what actors' constructors get
    assert ConvoyConfig().replace("replay.password='***'").replay.password == ""


def test_run_name_and_namespace() -> None:
    assert run_name(ConvoyConfig().replace("run.out_dir=s3://bucket/runs/town03-a/")) == "town03-a"
    assert run_name(ConvoyConfig().replace("run.out_dir=runs/x", "run.name=exp 1")) == "exp 1"
    assert namespace_for("exp 1") == "convoy-exp_1"


def test_shipped_carla_config_places_collectors_on_carla_slots() -> None:
    cfg = load_config("deploy/configs/carla.yaml")
    assert collector_resources(cfg) == {"carla": 1.0}
