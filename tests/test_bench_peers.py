"""convoy bench peers: the config mapping to SB3's TD3, the target finding, a tiny SB3 run."""

from __future__ import annotations

import argparse
import importlib.util
import math

import numpy as np
import pytest

from common.config import ConfigError, ConvoyConfig, load_config
from deploy.bench.learning import summarize_run
from deploy.bench.peers import (
    PeerUnavailable,
    add_parser,
    buffer_size,
    exploration_noise_std,
    rllib_sac_config,
    run_peers,
    sb3_differences,
    sb3_td3_kwargs,
    transition_bytes,
)

CPU_PROFILE = "deploy/configs/local-cpu.yaml"
GIB = 1 << 30


def _cfg(*overrides: str) -> ConvoyConfig:
    return load_config(CPU_PROFILE, list(overrides))


def test_sb3_kwargs_follow_the_run_config() -> None:
    cfg = _cfg(
        "learner.batch_size=128",
        "learner.critic_lr=0.001",
        "learner.actor_lr=0.001",
        "learner.tau=0.01",
        "learner.gamma=0.98",
        "learner.policy_delay=3",
        "learner.target_noise=0.25",
        "learner.target_noise_clip=0.4",
        "learner.hidden_dim=64",
        "collector.start_steps=1234",
        "collector.num_collectors=3",
        "collector.noise_std=0.1",
        "collector.noise_std_max=0.4",
        "replay.samples_per_insert=32",
        "replay.capacity=5000",
    )
    kw = sb3_td3_kwargs(cfg, available_bytes=64 * GIB)
    assert kw["policy"] == "MlpPolicy"  # the CPU profile is vector-only
    assert kw["batch_size"] == 128
    assert kw["learning_rate"] == 1e-3
    assert kw["tau"] == 0.01 and kw["gamma"] == 0.98
    assert kw["policy_delay"] == 3
    assert kw["target_policy_noise"] == 0.25 and kw["target_noise_clip"] == 0.4
    assert kw["learning_starts"] == 1234
    assert kw["buffer_size"] == 5000
    # 32 sampled per inserted transition at batch 128: one update every 4 env steps.
    assert kw["train_freq"] == (4, "step") and kw["gradient_steps"] == 1
    assert kw["policy_kwargs"] == {"net_arch": [64, 64], "share_features_extractor": False}
    mean, std = kw["action_noise"]
    # Noise 0.1, 0.25, 0.4 over three collectors: their mean.
    np.testing.assert_allclose(std, [0.25, 0.25])
    np.testing.assert_allclose(mean, [0.0, 0.0])


def test_sb3_kwargs_pixels_and_replay_ratio_above_one() -> None:
    cfg = _cfg("learner.encoder=nature", "learner.batch_size=64", "replay.samples_per_insert=192")
    kw = sb3_td3_kwargs(cfg, available_bytes=64 * GIB)
    assert kw["policy"] == "MultiInputPolicy"
    assert kw["policy_kwargs"]["share_features_extractor"] is False
    assert kw["policy_kwargs"]["features_extractor_kwargs"] == {"cnn_output_dim": 512}
    assert kw["train_freq"] == (1, "step") and kw["gradient_steps"] == 3


def test_buffer_fits_memory() -> None:
    # obs and next obs: 2 * (23 floats + 4*84*84 bytes), plus action, reward, done, timeout.
    assert transition_bytes("nature") == 2 * (23 * 4 + 4 * 84 * 84) + 2 * 4 + 12
    assert transition_bytes("none") == 2 * 23 * 4 + 2 * 4 + 12
    pixels = _cfg("learner.encoder=nature", "replay.capacity=100000")
    assert buffer_size(pixels, available_bytes=GIB) == (GIB // 2) // transition_bytes("nature")
    assert buffer_size(pixels, available_bytes=64 * GIB) == 100_000
    # Never below one batch.
    assert buffer_size(pixels, available_bytes=0) == pixels.learner.batch_size


def test_replay_ratio_must_be_set() -> None:
    with pytest.raises(ConfigError, match="samples_per_insert"):
        sb3_td3_kwargs(_cfg("replay.samples_per_insert=0"), available_bytes=GIB)


def test_single_collector_noise_and_differences() -> None:
    cfg = _cfg("collector.num_collectors=1", "collector.noise_std=0.15")
    assert math.isclose(exploration_noise_std(cfg), 0.15)
    diffs = sb3_differences(_cfg("learner.actor_lr=0.0001", "learner.encoder=nature_maxpool"))
    assert any("learning rate" in d for d in diffs)
    assert any("max-pool" in d for d in diffs)
    assert not any("n_step" in d for d in diffs)  # the CPU profile's one-step targets
    assert "one-step targets, not learner.n_step=3" in sb3_differences(_cfg("learner.n_step=3"))


def _record(steps: int, seconds: float, rc: float) -> dict[str, float]:
    return {
        "env_steps": steps,
        "elapsed_s": seconds,
        "eval/route_completion": rc,
        "eval/success_rate": 1.0 if rc >= 1.0 else 0.0,
        "eval/return": 10 * rc,
        "eval/collision_rate": 0.0,
    }


def test_target_is_the_first_evaluation_at_or_above_it() -> None:
    history = [_record(1000, 10.0, 0.3), _record(2000, 21.0, 0.9), _record(3000, 30.0, 0.5), _record(4000, 41.0, 1.0)]
    figures = summarize_run(history, target=0.9)
    assert figures["steps_to_target"] == 2000
    assert figures["seconds_to_target"] == 21.0
    assert figures["final_route_completion"] == 1.0
    assert figures["final_success_rate"] == 1.0
    assert summarize_run(history, target=0.95)["steps_to_target"] == 4000


def test_target_never_reached() -> None:
    figures = summarize_run([_record(1000, 10.0, 0.2), _record(2000, 20.0, 0.89)], target=0.9)
    assert figures["steps_to_target"] is None and figures["seconds_to_target"] is None
    assert figures["final_route_completion"] == 0.89


def test_rllib_refuses_pixels_with_a_message() -> None:
    pytest.importorskip("ray.rllib")
    with pytest.raises(PeerUnavailable, match="pixels are not supported"):
        rllib_sac_config(_cfg("learner.encoder=nature"), seed=0, env_name="unused")


def test_parser_registers_peers() -> None:
    parser = argparse.ArgumentParser(prog="convoy bench")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["peers", "--peers", "sb3-td3,rllib-sac", "--env-steps", "10", "learner.encoder=none"])
    assert args.peers == ["sb3-td3", "rllib-sac"]
    assert args.env_steps == 10 and args.overrides == ["learner.encoder=none"]
    assert callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["peers", "--peers", "sb3-ppo"])


@pytest.mark.skipif(
    importlib.util.find_spec("stable_baselines3") is None,
    reason="stable_baselines3 is not installed (pip install 'convoy[peers]')",
)
def test_tiny_sb3_run_reports_sane_figures() -> None:
    result = run_peers(
        ["sb3-td3"],
        [
            "learner.encoder=none",
            "learner.batch_size=32",
            "learner.hidden_dim=32",
            "learner.num_threads=1",
            "learner.device=cpu",
            "collector.start_steps=200",
            "replay.samples_per_insert=8",
            "env.other_vehicles=0",
            "env.max_episode_steps=60",
        ],
        env_steps=600,
        seeds=1,
        eval_every=300,
        eval_episodes=1,
        config=CPU_PROFILE,
    )
    assert result["unavailable"] == {}
    (run,) = result["runs"]
    assert run["peer"] == "sb3-td3" and run["seed"] == 0
    assert [e["env_steps"] for e in run["evaluations"]] == [300, 600]
    assert 0.0 <= run["final_route_completion"] <= 1.0
    assert run["final_success_rate"] in (0.0, 1.0)
    assert run["steps_to_target"] is None or run["steps_to_target"] in (300, 600)
    assert run["env_steps_per_s"] > 0
    # One update every 4 env steps (8 per inserted / batch 32) after the 200-step warm-up.
    assert run["updates"] == pytest.approx(100, abs=2)
    assert run["updates_per_s"] > 0
    assert result["medians"]["sb3-td3"]["median_final_route_completion"] == run["final_route_completion"]
    assert result["device"] == "cpu" and isinstance(result["cpu_flags"], list)
    assert result["overrides"][0] == "learner.encoder=none"
