"""``convoy bench peers``: convoy next to Stable-Baselines3's TD3 and RLlib's SAC on the same task.

Every peer trains on the same task (convoy's embedded driving simulator, the gymnasium id
``convoy/EmbeddedDriving-v0`` registered in actors/envs, built from the run config's ``env.*``
overrides), on the same hardware (``learner.device``), one peer after another, and is scored
by the same evaluator (actors/evaluator.py: the deterministic policy on the fixed episode
seeds ``run.eval_seed + k``) every ``--eval-every`` env steps and once at the end of the
budget. Each run reports the env steps and wall seconds at which evaluation route completion
first reached ``--target`` (0.9), the final route completion, success rate and return, and
its env steps and updates per second; then per-peer medians over seeds.

``convoy``   a real ``convoy train`` through deploy/bench/learning.py (Ray, collectors, a Redis
             shard, the learner); its evaluations run next to training in their own actor.
``sb3-td3``  Stable-Baselines3's ``TD3`` (one env, one process). Pixels: ``MultiInputPolicy``
             with a NatureCNN per actor and critic (``share_features_extractor=False``, 512
             features as convoy's); ``learner.encoder=none``: the vector alone and ``MlpPolicy``.
             Hyperparameters follow the run config (:func:`sb3_td3_kwargs`); what SB3 cannot
             express (separate actor/critic learning rates, gradient clipping, LayerNorm+tanh
             after the CNN, the max-pool encoder, per-collector noise) is listed in the run's
             ``differences``. Evaluation happens in a callback and its time is not counted.
``rllib-sac`` RLlib's SAC on its new API stack (RLlib no longer has TD3 or DDPG), vector only.
             Pixels are refused with a message: the observation is a Dict of a uint8 image and a
             vector, and RLlib's default SAC catalog builds no encoder for Dict spaces; it would
             take a custom SAC RLModule with two CNNs and twin Q heads, more than a benchmark
             adapter should own. Same batch, learning rates, tau, gamma, warm-up and replay ratio
             (``training_intensity`` = samples_per_insert); SAC explores by its entropy term, so
             convoy's exploration noise and TD3's policy delay and target smoothing do not apply.

Wall seconds of SB3 and RLlib exclude the time spent evaluating (inline there); convoy's
evaluator runs in parallel with training, so its seconds are plain wall time from the start.
This module is over 400 lines because each peer's adapter (config mapping, evaluation hook,
figures) belongs with the others it is compared to.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from actors.evaluator import Evaluator
from common.config import ConfigError, ConvoyConfig, load_config
from deploy.bench.learning import (
    TARGET_ROUTE_COMPLETION,
    _median,
    _say,
    learning_run_config,
    run_one,
    summarize_run,
)
from deploy.cli.base import print_json

PEERS = ("convoy", "sb3-td3", "rllib-sac")
ENV_ID = "convoy/EmbeddedDriving-v0"
# Share of available memory SB3's replay buffer may take (it stores obs and next obs apart).
BUFFER_MEMORY_SHARE = 0.5
# Env steps per RLlib train() call (evaluations fall at most this many steps after their mark).
RLLIB_STEPS_PER_ITERATION = 100


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (library missing, unsupported setting); the message says why."""


def _peer_list(text: str) -> list[str]:
    peers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if not peers or unknown:
        raise argparse.ArgumentTypeError(f"--peers {text!r}: choose from {', '.join(PEERS)} (comma-separated)")
    return peers


# ----------------------------------------------------------------------------- the task


class VectorOnly(gym.ObservationWrapper[np.ndarray, np.ndarray, np.ndarray]):
    """The driving vector alone (``learner.encoder=none``): a Box instead of the Dict."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        space = env.observation_space
        assert isinstance(space, gym.spaces.Dict)
        self.observation_space = space["vector"]

    def observation(self, observation: Any) -> np.ndarray:
        return np.asarray(observation["vector"], dtype=np.float32)


def make_task(cfg: ConvoyConfig, vector_only: bool) -> gym.Env:
    """The embedded driving env through its registered id, with the run's ``env.*`` settings."""
    if cfg.env.backend != "embedded":
        raise ConfigError(f"env.backend={cfg.env.backend!r}: convoy bench peers runs on the embedded simulator only")
    import actors.envs  # noqa: F401 - registers ENV_ID (RLlib calls this where nothing else imported it)

    env = gym.make(ENV_ID, config=cfg.env)
    return VectorOnly(env) if vector_only else env


class PolicyEvaluator(Evaluator):
    """convoy's Evaluator (same env, seeds, episodes and metrics) acting with another library's policy."""

    def __init__(self, cfg: ConvoyConfig, act: Callable[[dict[str, np.ndarray]], np.ndarray]) -> None:
        super().__init__(cfg, lambda: make_task(cfg, vector_only=False))
        self._act = act

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(self._act(obs), dtype=np.float32).reshape(-1)

    def evaluate_at(self, env_steps: int, train_seconds: float) -> dict[str, Any]:
        """One evaluation as an ``eval.jsonl``-style record (what summarize_run reads)."""
        self.weights_version = env_steps
        metrics = self.evaluate()
        _say(
            f"  eval @ {env_steps} env steps ({train_seconds:.0f} s): route_completion "
            f"{metrics['eval/route_completion']:.3f} | success {metrics['eval/success_rate']:.2f} | "
            f"return {metrics['eval/return']:.2f}"
        )
        return {"env_steps": env_steps, "elapsed_s": train_seconds, **metrics}


# ----------------------------------------------------------------------------- SB3 TD3


def replay_ratio_schedule(cfg: ConvoyConfig) -> tuple[int, int]:
    """(env steps per training round, gradient steps per round) holding convoy's replay ratio
    samples_per_insert / batch_size updates per env step."""
    spi = cfg.replay.samples_per_insert
    if spi <= 0:
        raise ConfigError("replay.samples_per_insert=0: the peers need a replay ratio to match (set it > 0)")
    ratio = spi / cfg.learner.batch_size
    if ratio >= 1:
        return 1, round(ratio)
    return max(1, round(1 / ratio)), 1


def transition_bytes(encoder: str) -> int:
    """Bytes SB3's replay buffer holds per transition (obs and next obs stored separately)."""
    from common.schema import ACTION_DIM, IMAGE_SHAPE, VECTOR_DIM

    obs = VECTOR_DIM * 4 + (0 if encoder == "none" else math.prod(IMAGE_SHAPE))
    return 2 * obs + ACTION_DIM * 4 + 4 + 4 + 4  # + action, reward, done, timeout


def buffer_size(cfg: ConvoyConfig, available_bytes: int) -> int:
    """convoy's replay capacity, or fewer transitions if that would not fit in memory."""
    fits = int(available_bytes * BUFFER_MEMORY_SHARE) // transition_bytes(cfg.learner.encoder)
    return max(cfg.learner.batch_size, min(cfg.replay.capacity, fits))


def exploration_noise_std(cfg: ConvoyConfig) -> float:
    """One env stands for all collectors: the mean of their noise levels."""
    from actors.collector import collector_noise_std

    n = cfg.collector.num_collectors
    return sum(collector_noise_std(cfg, i) for i in range(n)) / n


def sb3_td3_kwargs(cfg: ConvoyConfig, available_bytes: int) -> dict[str, Any]:
    """Keyword arguments of ``stable_baselines3.TD3`` matched to convoy's run config (the action
    noise as ``(mean, std)`` arrays; :func:`run_sb3_td3` wraps it in NormalActionNoise)."""
    from common.schema import ACTION_DIM

    lc = cfg.learner
    pixels = lc.encoder != "none"
    every, grad_steps = replay_ratio_schedule(cfg)
    policy_kwargs: dict[str, Any] = {"net_arch": [lc.hidden_dim, lc.hidden_dim], "share_features_extractor": False}
    if pixels:
        policy_kwargs["features_extractor_kwargs"] = {"cnn_output_dim": 512}
    return {
        "policy": "MultiInputPolicy" if pixels else "MlpPolicy",
        "learning_rate": lc.critic_lr,
        "buffer_size": buffer_size(cfg, available_bytes),
        "learning_starts": cfg.collector.start_steps,
        "batch_size": lc.batch_size,
        "tau": lc.tau,
        "gamma": lc.gamma,
        "train_freq": (every, "step"),
        "gradient_steps": grad_steps,
        "action_noise": (np.zeros(ACTION_DIM), np.full(ACTION_DIM, exploration_noise_std(cfg))),
        "policy_delay": lc.policy_delay,
        "target_policy_noise": lc.target_noise,
        "target_noise_clip": lc.target_noise_clip,
        "policy_kwargs": policy_kwargs,
    }


def sb3_differences(cfg: ConvoyConfig) -> list[str]:
    """What SB3's TD3 cannot match of this config (reported with every SB3 run)."""
    lc = cfg.learner
    out = []
    if len({lc.actor_lr, lc.critic_lr, lc.actor_encoder_lr, lc.critic_encoder_lr}) > 1:
        out.append(f"one learning rate for all networks: learner.critic_lr={lc.critic_lr}")
    if lc.actor_grad_clip > 0 or lc.critic_grad_clip > 0:
        out.append("no gradient clipping")
    if lc.encoder != "none":
        out.append("NatureCNN features are ReLU, not LayerNorm+tanh")
        if lc.augment != "none":
            out.append(f"no image augmentation (learner.augment={lc.augment})")
    if lc.encoder == "nature_maxpool":
        out.append("NatureCNN instead of the max-pool encoder")
    if lc.n_step > 1:
        out.append(f"one-step targets, not learner.n_step={lc.n_step}")
    if cfg.collector.num_collectors > 1 and cfg.collector.noise_std != cfg.collector.noise_std_max:
        out.append(f"one noise level, the collectors' mean {exploration_noise_std(cfg):.3g}")
    return out


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def run_sb3_td3(
    cfg: ConvoyConfig, seed: int, env_steps: int, eval_every: int, max_seconds: float, target: float
) -> dict[str, Any]:
    try:
        import torch
        from stable_baselines3 import TD3
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.noise import NormalActionNoise
    except ImportError as e:
        raise PeerUnavailable(f"sb3-td3 needs stable-baselines3 (pip install 'convoy[peers]'): {e}") from None
    from learner.agent import resolve_device

    pixels = cfg.learner.encoder != "none"
    kwargs = sb3_td3_kwargs(cfg, _available_bytes())
    mean, std = kwargs.pop("action_noise")
    policy = kwargs.pop("policy")
    device = resolve_device(cfg.learner.device)
    model = TD3(
        policy,
        make_task(cfg, vector_only=not pixels),
        action_noise=NormalActionNoise(mean, std),
        seed=seed,
        device=device,
        verbose=0,
        **kwargs,
    )

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        action, _ = model.predict(obs if pixels else obs["vector"], deterministic=True)
        return np.asarray(action)

    evaluator = PolicyEvaluator(cfg, act)
    clock = _TrainClock()
    history: list[dict[str, Any]] = []

    class EvalEvery(BaseCallback):  # SB3's hook: called after every env step
        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0:
                with clock.paused():
                    history.append(evaluator.evaluate_at(self.num_timesteps, clock.seconds()))
            return not (max_seconds and clock.seconds() >= max_seconds)

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    if cfg.learner.num_threads:  # as convoy's learner: 0 leaves torch's default (every core)
        torch.set_num_threads(cfg.learner.num_threads)
    clock.start()
    try:
        model.learn(total_timesteps=env_steps, callback=EvalEvery())
    finally:
        torch.set_num_threads(threads)
    seconds = clock.seconds()
    if not history or history[-1]["env_steps"] != model.num_timesteps:
        history.append(evaluator.evaluate_at(model.num_timesteps, seconds))
    evaluator.close()
    train_env = model.get_env()
    if train_env is not None:
        train_env.close()
    return _figures(history, target, model.num_timesteps, int(model._n_updates), seconds, sb3_differences(cfg))


class _TrainClock:
    """Wall seconds of training: excludes the spans run inside :meth:`paused` (evaluations)."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._paused = 0.0

    def start(self) -> None:
        self._start, self._paused = time.monotonic(), 0.0

    def seconds(self) -> float:
        return time.monotonic() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._paused += time.monotonic() - t0


def _figures(
    history: list[dict[str, Any]], target: float, env_steps: int, updates: int, seconds: float, differences: list[str]
) -> dict[str, Any]:
    """A peer run's figures: summarize_run's plus its training speed."""
    return {
        **summarize_run(history, target),
        "wall_seconds": round(seconds, 1),
        "env_steps_per_s": round(env_steps / seconds, 1),
        "updates": updates,
        "updates_per_s": round(updates / seconds, 2),
        "differences": differences,
    }


# ----------------------------------------------------------------------------- RLlib SAC


def rllib_sac_config(cfg: ConvoyConfig, seed: int, env_name: str) -> Any:
    """RLlib's SACConfig matched to convoy's run config (vector only)."""
    from ray.rllib.algorithms.sac import SACConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    lc = cfg.learner
    if lc.encoder != "none":
        raise PeerUnavailable(
            f"rllib-sac: learner.encoder={lc.encoder}: pixels are not supported (RLlib's SAC builds no encoder for "
            "the Dict image+vector observation); run it with learner.encoder=none"
        )
    replay_ratio_schedule(cfg)  # the same check: a replay ratio must be set
    return (
        SACConfig()
        .environment(env_name)
        .framework("torch")
        .env_runners(num_env_runners=0, num_envs_per_env_runner=1)
        .learners(num_learners=0, num_gpus_per_learner=1 if _cuda(cfg) else 0)
        .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[lc.hidden_dim, lc.hidden_dim]))
        .training(
            actor_lr=lc.actor_lr,
            critic_lr=lc.critic_lr,
            tau=lc.tau,
            gamma=lc.gamma,
            n_step=1,
            train_batch_size_per_learner=lc.batch_size,
            num_steps_sampled_before_learning_starts=cfg.collector.start_steps,
            training_intensity=cfg.replay.samples_per_insert,
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": cfg.replay.capacity},
        )
        # One env step per training_step(); an iteration (what train() returns, where the
        # evaluations are scheduled) gathers RLLIB_STEPS_PER_ITERATION of them.
        .reporting(min_sample_timesteps_per_iteration=RLLIB_STEPS_PER_ITERATION, min_time_s_per_iteration=0)
        .debugging(seed=seed)
    )


def _cuda(cfg: ConvoyConfig) -> bool:
    from learner.agent import resolve_device

    return resolve_device(cfg.learner.device).type == "cuda"


def _rllib_counts(result: dict[str, Any]) -> tuple[int, int]:
    """(env steps sampled, transitions trained on) so far, from an Algorithm.train() result."""
    steps = int(result.get("env_runners", {}).get("num_env_steps_sampled_lifetime", 0))
    # Module steps trained are reported per module (one here, "default_policy").
    trained = sum(
        int(stats.get("num_module_steps_trained_lifetime", 0))
        for name, stats in result.get("learners", {}).items()
        if name != "__all_modules__" and isinstance(stats, dict)
    )
    return steps, trained


def _build_rllib_sac(cfg: ConvoyConfig, seed: int) -> tuple[Any, bool]:
    """(the SAC Algorithm, whether this call started Ray); any failure is a PeerUnavailable."""
    import ray
    from ray.tune.registry import register_env

    env_name = "convoy-vector-only"
    register_env(env_name, lambda _: make_task(cfg, vector_only=True))
    sac = rllib_sac_config(cfg, seed, env_name)
    started_ray = not ray.is_initialized()
    try:
        if started_ray:
            ray.init(include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count() or 1)
        return sac.build_algo(), started_ray
    except Exception as e:  # RLlib raises many kinds; the peer must fail with a message, not a traceback
        if started_ray:
            ray.shutdown()
        raise PeerUnavailable(f"rllib-sac could not start RLlib here: {type(e).__name__}: {e}") from None


def run_rllib_sac(
    cfg: ConvoyConfig, seed: int, env_steps: int, eval_every: int, max_seconds: float, target: float
) -> dict[str, Any]:
    try:
        import ray
        import torch
        from ray.rllib.core.columns import Columns
    except ImportError as e:
        raise PeerUnavailable(f"rllib-sac needs ray[rllib]: {e}") from None
    algo, started_ray = _build_rllib_sac(cfg, seed)
    module = algo.get_module()
    dist_cls = module.get_inference_action_dist_cls()

    def act(obs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = module.forward_inference({Columns.OBS: torch.from_numpy(obs["vector"])[None]})
            action = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS]).to_deterministic().sample()
        return np.clip(action[0].cpu().numpy(), -1.0, 1.0)

    evaluator = PolicyEvaluator(cfg, act)
    clock, history = _TrainClock(), []
    steps = trained = 0
    next_eval = eval_every
    try:
        while steps < env_steps and not (max_seconds and clock.seconds() >= max_seconds):
            steps, trained = _rllib_counts(algo.train())
            if steps >= next_eval:
                with clock.paused():
                    history.append(evaluator.evaluate_at(steps, clock.seconds()))
                next_eval = (steps // eval_every + 1) * eval_every
        seconds = clock.seconds()
        if not history or history[-1]["env_steps"] != steps:
            history.append(evaluator.evaluate_at(steps, seconds))
    finally:
        evaluator.close()
        algo.stop()
        if started_ray:
            ray.shutdown()
    updates = trained // cfg.learner.batch_size
    return _figures(history, target, steps, updates, seconds, ["SAC (entropy-regularised, stochastic policy), not TD3"])


# ----------------------------------------------------------------------------- convoy


def run_convoy(
    config_path: str,
    overrides: Sequence[str],
    seed: int,
    env_steps: int,
    eval_every: int,
    max_seconds: float,
    target: float,
    root: Path,
) -> dict[str, Any]:
    run_dir = root / f"convoy-s{seed}"
    cfg = learning_run_config(config_path, overrides, seed, env_steps, max_seconds, eval_every, run_dir)
    summary, history = run_one(cfg, Path(f"{run_dir}.log"))
    wall = float(summary.get("bench_wall_seconds") or 0.0)
    updates = int(summary.get("updates") or 0)
    return {
        **summarize_run(history, target),
        "wall_seconds": wall,
        "env_steps_per_s": summary.get("env_steps_per_s"),
        "updates": updates,
        "updates_per_s": round(updates / wall, 2) if wall else None,
        "exit_reason": summary.get("exit_reason"),
    }


# ----------------------------------------------------------------------------- the benchmark


def _cpu_flags() -> list[str]:
    """The SIMD features that decide CPU training speed (from /proc/cpuinfo where present)."""
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "asimd")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            present = set(line.split(":", 1)[1].split())
            return [f for f in wanted if f in present]
    return []


MEDIAN_KEYS = (
    "steps_to_target",
    "seconds_to_target",
    "final_route_completion",
    "final_success_rate",
    "final_return",
    "env_steps_per_s",
    "updates_per_s",
)


def _medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    return {f"median_{k}": _median([r[k] for r in runs]) for k in MEDIAN_KEYS}


def _run_peer(
    peer: str,
    cfg: ConvoyConfig,
    config_path: str,
    cfg_overrides: Sequence[str],
    seed: int,
    env_steps: int,
    eval_every: int,
    max_seconds: float,
    target: float,
    root: Path,
) -> dict[str, Any]:
    """One run of ``peer`` with ``seed``: its figures (raises PeerUnavailable)."""
    if peer == "convoy":
        return run_convoy(config_path, cfg_overrides, seed, env_steps, eval_every, max_seconds, target, root)
    if peer == "sb3-td3":
        return run_sb3_td3(cfg, seed, env_steps, eval_every, max_seconds, target)
    return run_rllib_sac(cfg, seed, env_steps, eval_every, max_seconds, target)


def run_peers(
    peers: Sequence[str] = ("convoy", "sb3-td3", "rllib-sac"),
    overrides: Sequence[str] = (),
    env_steps: int = 40_000,
    seeds: int = 3,
    eval_every: int = 4_000,
    eval_episodes: int = 10,
    max_seconds: float = 0.0,
    config: str | None = None,
    out_dir: str | None = None,
    target: float = TARGET_ROUTE_COMPLETION,
) -> dict[str, Any]:
    """Each peer for each seed, one after another; a peer that cannot run here is reported
    under ``unavailable`` with the reason (and its runs are skipped)."""
    from deploy.cli import default_config_path
    from learner.agent import resolve_device

    root = Path(out_dir or tempfile.mkdtemp(prefix="convoy-bench-peers-"))
    root.mkdir(parents=True, exist_ok=True)
    config_path = config or default_config_path()
    cfg_overrides = [f"run.eval_episodes={eval_episodes}", *overrides]
    runs: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    for peer in peers:
        for seed in range(seeds):
            cfg = load_config(config_path, [*cfg_overrides, f"run.seed={seed}"])
            _say(f"{peer} seed={seed}: {env_steps} env steps" + (f" or {max_seconds:g} s" if max_seconds else ""))
            try:
                figures = _run_peer(
                    peer, cfg, config_path, cfg_overrides, seed, env_steps, eval_every, max_seconds, target, root
                )
            except PeerUnavailable as e:
                _say(f"  {peer} unavailable: {e}")
                unavailable[peer] = str(e)
                break
            runs.append({"peer": peer, "seed": seed, **figures})
            _say(
                f"  -> steps_to_target {figures['steps_to_target']}, seconds_to_target {figures['seconds_to_target']}, "
                f"final route_completion {figures['final_route_completion']:.3f}"
            )
    base = load_config(config_path, cfg_overrides)
    medians = {p: _medians(rs) for p in peers if (rs := [r for r in runs if r["peer"] == p])}
    return {
        "runs": runs,
        "medians": medians,
        "unavailable": unavailable,
        "target_route_completion": target,
        "env_steps": env_steps,
        "max_seconds": max_seconds,
        "seeds": seeds,
        "eval_every_env_steps": eval_every,
        "eval_episodes": eval_episodes,
        "encoder": base.learner.encoder,
        "device": str(resolve_device(base.learner.device)),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "config": config_path,
        "overrides": list(overrides),
        "out_dir": str(root),
    }


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``peers`` on a ``bench`` subparsers object (``set_defaults(func=...)``)."""
    p = subparsers.add_parser("peers", help="convoy vs SB3 TD3 vs RLlib SAC on the same task and evaluation")
    p.add_argument("--peers", type=_peer_list, default=list(PEERS), help="comma-separated: convoy,sb3-td3,rllib-sac")
    p.add_argument("--config", default=None, help="run config (default: the one `convoy train` picks)")
    p.add_argument("--env-steps", type=int, default=40_000, help="env-step budget of each run")
    p.add_argument("--max-seconds", type=float, default=0.0, help="also end each run after this many seconds")
    p.add_argument("--seeds", type=int, default=3, help="runs per peer, seeds 0..K-1")
    p.add_argument("--eval-every", type=int, default=4_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation (fixed seeds)")
    p.add_argument("--target", type=float, default=TARGET_ROUTE_COMPLETION, help="route completion to reach")
    p.add_argument("--out-dir", default=None, help="where convoy's runs go (default: a new temporary directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. learner.encoder=none")
    p.set_defaults(func=command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``convoy bench peers ...``: the same entry point as the other benchmarks."""
    parser = argparse.ArgumentParser(prog="convoy bench")
    add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["peers", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


def command(args: argparse.Namespace) -> int:
    for name in ("env_steps", "seeds", "eval_every", "eval_episodes"):
        if getattr(args, name) < 1:
            _say(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
            return 2
    if args.max_seconds < 0:
        _say(f"--max-seconds={args.max_seconds}: must be >= 0 (0 = no time limit)")
        return 2
    result = run_peers(
        args.peers,
        args.overrides,
        args.env_steps,
        args.seeds,
        args.eval_every,
        args.eval_episodes,
        args.max_seconds,
        args.config,
        args.out_dir,
        args.target,
    )
    if args.json:
        print_json(result)
    else:
        for peer, figures in result["medians"].items():
            print(f"{peer}: {figures}")
        for peer, why in result["unavailable"].items():
            print(f"{peer}: unavailable: {why}")
        for r in result["runs"]:
            print({k: v for k, v in r.items() if k != "evaluations"})
    return 0 if result["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
