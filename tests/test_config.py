from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, ConvoyConfig, describe_keys, from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = (
    "run.total_env_steps",
    "run.out_dir",
    "collector.num_collectors",
    "collector.start_steps",
    "replay.num_shards",
    "replay.capacity",
    "learner.batch_size",
    "learner.device",
)


def test_required_keys_exist() -> None:
    keys = {row[0] for row in describe_keys()}
    assert set(REQUIRED_KEYS) <= keys


def test_local_yaml_loads_and_overrides_apply() -> None:
    cfg = load_config(REPO / "deploy/configs/local.yaml", ["learner.batch_size=128", "run.out_dir=/tmp/x"])
    assert cfg.learner.batch_size == 128
    assert cfg.run.out_dir == "/tmp/x"
    assert cfg.env.backend == "embedded"


def test_config_is_frozen() -> None:
    cfg = ConvoyConfig()
    with pytest.raises(AttributeError):
        cfg.learner.batch_size = 3  # type: ignore[misc]


def test_round_trip_through_yaml() -> None:
    cfg = load_config(None, ["replay.shard_urls=[redis://a:1/0, redis://b:2/0]", "learner.tau=0.01"])
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert again.replay.shard_urls == ("redis://a:1/0", "redis://b:2/0")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("learner.bach_size=3", "did you mean learner.batch_size"),
        ("learner.batch_size=0", "learner.batch_size=0: must be >= 1"),
        ("learner.batch_size=abc", "learner.batch_size='abc': expected int"),
        ("learner.batch_size=1.5", "expected int"),
        ("replay.codec=gzip", "allowed: 'lz4', 'zstd', 'none'"),
        ("learner.device=tpu", "learner.device='tpu'"),
        ("nosuch.key=1", "unknown section 'nosuch'"),
        ("learner.batch_size", "expected section.key=value"),
        ("learner.gamma=1.5", "learner.gamma=1.5: must be <= 1.0"),
        ("run.metrics=maybe", "expected bool"),
        ("replay.shard_urls=[http://x]", "not a redis://"),
        # NaN passes every min/max comparison; non-finite floats are refused by type.
        ("learner.gamma=.nan", "learner.gamma=nan: must be a finite number"),
        ("run.max_seconds=.inf", "run.max_seconds=inf: must be a finite number"),
        ("learner.tau=-.inf", "learner.tau=-inf: must be a finite number"),
        ("collector.resources=carla:.nan", "collector.resources.carla=nan: must be a finite number"),
        ("learner.gamma=nan", "learner.gamma=nan: must be a finite number"),
        ("learner.actor_lr=fast", "learner.actor_lr='fast': expected float"),
    ],
)
def test_bad_values_name_key_value_and_allowed(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


def test_floats_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as a string; a learning rate is written that way.
    assert load_config(None, ["learner.actor_lr=1e-3"]).learner.actor_lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  critic_lr: 3e-4\n")
    assert load_config(path).learner.critic_lr == 0.0003


def test_on_off_yes_no_are_words_for_text_fields_and_booleans_for_bool_fields(tmp_path: Path) -> None:
    # YAML 1.1 reads off/on/yes/no as booleans: replay.mirror=off used to be refused as False.
    cfg = load_config(None, ["replay.mirror=off", "learner.compile=yes", "learner.channels_last=off"])
    assert (cfg.replay.mirror, cfg.learner.compile, cfg.learner.channels_last) == ("off", True, False)
    path = tmp_path / "c.yaml"
    path.write_text("replay:\n  mirror: off\nlearner:\n  compile: on\n  channels_last: false\n")
    cfg = load_config(path)
    assert (cfg.replay.mirror, cfg.learner.compile, cfg.learner.channels_last) == ("off", True, False)
    assert (
        load_config(None, [f"replay.mirror={cfg.replay.mirror}"]).replace("replay.mirror=host").replay.mirror == "host"
    )
    with pytest.raises(ConfigError, match=r"learner\.compile='maybe'"):
        load_config(None, ["learner.compile=maybe"])


def test_unknown_key_in_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key learner\.lr"):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=r"collector\.noise_std_max"):
        load_config(None, ["collector.noise_std=0.5", "collector.noise_std_max=0.1"])
    with pytest.raises(ConfigError, match=r"replay\.capacity"):
        load_config(None, ["replay.capacity=10", "collector.segment_length=64"])


def test_parse_override_types_values() -> None:
    assert parse_override("learner.tau=0.01") == ("learner", "tau", 0.01)
    assert parse_override("run.out_dir=runs/a") == ("run", "out_dir", "runs/a")
