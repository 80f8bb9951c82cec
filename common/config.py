"""Run configuration: one frozen dataclass per component, composed into :class:`ConvoyConfig`.

Configs are loaded from YAML (``deploy/configs/*.yaml``) and patched with dotted overrides
(``learner.batch_size=128``). Every field is validated on load from its type and the
constraints in its metadata (``choices``, ``min``, ``max``), so a bad value fails at start
with a :class:`ConfigError` that names the key, the value and what is allowed.

This module is the schema (every key with its default, doc and constraints, which is why it
runs to about 400 lines), the checks across sections, and loading; turning raw values into
typed fields is the engine in common/coerce.py.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common import coerce
from common.coerce import ConfigError, opt

__all__ = [
    "REDACTED",
    "CarlaConfig",
    "CollectorConfig",
    "ConfigError",
    "ConvoyConfig",
    "EnvConfig",
    "LearnerConfig",
    "ReplayConfig",
    "RunConfig",
    "describe_keys",
    "from_dict",
    "load_config",
    "parse_override",
    "redact_url",
]

REDACTED = "***"


# The one rule for credentials in URLs, whatever the scheme: the password of ``user:pw@``
# (also ``:pw@``) and the value of a secret-looking query parameter (``?password=``).
_URL_CREDENTIALS = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<cred>[^/]*)@")
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:password|passwd|pass|secret|token|auth|access_key|secret_key)=)[^&;#]*")


def _hide_password(m: re.Match[str]) -> str:
    user, colon, _ = m.group("cred").partition(":")
    return f"{m.group('scheme')}{user}{colon}{REDACTED if colon else ''}@"


def redact_url(url: str) -> str:
    """``url`` with every credential replaced by ``***`` (the user name stays): for anything
    printed, logged or saved. ``redis://:pw@h`` -> ``redis://:***@h``, ``redis://u:pw@h`` ->
    ``redis://u:***@h``, ``redis://h/0?password=pw`` -> ``redis://h/0?password=***``."""
    return _SECRET_PARAM.sub(rf"\1{REDACTED}", _URL_CREDENTIALS.sub(_hide_password, url))


def _redact_urls(value: Any) -> Any:
    """``value`` with :func:`redact_url` applied to every string in it that holds a URL."""
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, list | tuple):
        return [_redact_urls(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_urls(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class RunConfig:
    total_env_steps: int = opt(200_000, "Stop after this many env steps summed over collectors.", min=1)
    max_seconds: float = opt(
        0.0,
        "Also stop after this many wall seconds of supervision (0 = no time limit); the run ends as at its "
        "env-step budget, with a final checkpoint and evaluation, and exit reason `time`.",
        min=0.0,
    )
    out_dir: str = opt(
        "",
        "Run storage: a local path or an fsspec URI (file://, s3://, gs://, memory://) for config.yaml, "
        "checkpoints/, summary.json and curves; every node writes there directly. Empty: a new directory "
        "runs/<config name>/<YYYYmmdd-HHMMSS> per run (with --resume: the resumed run's). A fresh run refuses "
        "a directory that holds another run.",
    )
    run_id: str = opt(
        "",
        "Id of the run's lineage, recorded in every checkpoint manifest; set by `convoy train` (a new random id "
        "for a fresh run, the resumed checkpoint's id on --resume), any value given is replaced.",
    )
    seed: int = opt(0, "Base seed; collector i uses seed + 1000 * (i + 1).", min=0)
    checkpoint_every_updates: int = opt(5_000, "Write a checkpoint every this many learner updates.", min=1)
    keep_checkpoints: int = opt(
        3, "How many checkpoints of the run stay on disk (oldest removed first; other runs' are never touched).", min=1
    )
    max_checkpoint_failures: int = opt(
        3,
        "Checkpoint writes that may fail in a row (each is logged and counted); one more stops the learner with "
        "an error, keeping the last good checkpoint.",
        min=1,
    )
    progress_every_s: float = opt(2.0, "Seconds between progress lines.", min=0.1)
    metrics: bool = opt(
        True,
        "Export Prometheus metrics through Ray's metrics agent (and start a local cluster with Ray's dashboard, "
        "whose service-discovery file `convoy monitor` reads). TensorBoard curves are written either way.",
    )
    ray_address: str = opt("", "Ray cluster to join ('auto' on a `ray up` cluster); empty starts a local one.")
    name: str = opt(
        "",
        "Run name: the Ray namespace `convoy scale` finds the run in, and the `run` metric label; empty = the last "
        "path component of out_dir.",
    )
    max_learner_restarts: int = opt(
        3,
        "Learner deaths the run survives (each restarts it from the newest checkpoint); one more ends the run.",
        min=0,
    )
    eval_every_updates: int = opt(
        5_000,
        "Evaluate a checkpoint of the newest weights (deterministic policy, fixed seeds, its own actor) every this "
        "many learner updates; the best by route completion, then return, is kept as checkpoint 'best'. 0 = never.",
        min=0,
    )
    eval_hold: bool = opt(
        False,
        "Hold collection and learning while an evaluation is due or running, so evaluations land exactly every "
        "run.eval_every_updates (convoy bench learning sets it). Off: training never waits, and a due evaluation "
        "is skipped while one runs (counted as eval/skipped_total).",
    )
    eval_episodes: int = opt(10, "Episodes per evaluation (seeds eval_seed, eval_seed + 1, ...).", min=1)
    eval_seed: int = opt(1_000_003, "Seed of the first evaluation episode; the same seeds every evaluation.", min=0)
    video_every_evals: int = opt(
        1,
        "Record the first episode of every this many evaluations (starting with the first) as "
        "`<out_dir>/videos/eval-<env steps>.mp4` and TensorBoard's `eval/video` (an animated GIF). 0 = no videos.",
        min=0,
    )


@dataclass(frozen=True)
class EnvConfig:
    backend: str = opt("embedded", "Simulator behind the collectors.", choices=("embedded", "carla"))
    max_episode_steps: int = opt(400, "Time limit per episode (ends with truncated=True).", min=1)
    route_length_m: float = opt(300.0, "Route length; driving it ends the episode as route_completed.", min=1.0)
    target_speed: float = opt(10.0, "Speed (m/s) the speed term of the reward is centred on.", min=0.1)
    other_vehicles: int = opt(1, "Other vehicles on the embedded track.", min=0, max=10)
    off_road_m: float = opt(4.0, "Lateral distance from the lane centre that counts as leaving the road.", min=0.5)
    collision_penalty: float = opt(5.0, "Reward subtracted on collision or leaving the road.", min=0.0)
    step_hz: float = opt(
        0.0,
        "Pace the embedded simulator and the CARLA stand-in: each env step takes at least 1/step_hz wall seconds, "
        "the rest slept (no CPU), as with a server-bound simulator (CARLA runs at about 15). 0 = off. A test and "
        "benchmark aid (`convoy bench scale`); never needed for training.",
        min=0.0,
    )


@dataclass(frozen=True)
class CarlaConfig:
    """CARLA server and world settings (used when env.backend is 'carla').

    A collector either launches and owns its own server (``host`` empty: ports leased from
    ``port_base`` on its node, see actors/carla/ports.py) or attaches to a running one
    (``host`` set). Reward weights here scale the same terms the embedded env uses
    (actors/envs/driving.py); env.collision_penalty is the collision / off-road penalty.
    """

    host: str = opt("", "Attach to a running CARLA server at this host instead of launching one.")
    port: int = opt(
        2000,
        "RPC port of an attached server; collector i attaches to port + 4 * i (a synchronous server takes "
        "ticks from one client only). Launched servers lease free ports from port_base instead.",
        min=1,
        max=65535,
    )
    root: str = opt("", "CARLA install dir with CarlaUE4.sh / CarlaUnreal.sh; empty reads $CARLA_ROOT.")
    town: str = opt("Town01", "Map to load.")
    fixed_delta_seconds: float = opt(0.05, "Synchronous-mode tick length (s).", min=0.001, max=1.0)
    scenario: int = opt(0, "NPC traffic preset: 0 none, 1 light, 2 dense.", choices=(0, 1, 2))
    timeout_s: float = opt(20.0, "RPC and tick timeout; a tick slower than this counts as a hung server.", min=0.1)
    recycle_episodes: int = opt(
        200, "Restart the server every this many episodes (CARLA leaks memory over resets); 0 never.", min=0
    )
    npc_vehicles_light: int = opt(20, "NPC vehicles (traffic-manager autopilot) in scenario 1.", min=0, max=500)
    npc_vehicles_dense: int = opt(80, "NPC vehicles (traffic-manager autopilot) in scenario 2.", min=0, max=500)
    ego_blueprint: str = opt("vehicle.tesla.model3", "Blueprint id of the ego vehicle.")
    camera_fov: float = opt(90.0, "Horizontal field of view of the front camera (deg).", min=10.0, max=170.0)
    reward_progress: float = opt(
        1.0, "Weight of progress along the route (per step, capped at target_speed * dt).", min=0.0
    )
    reward_centering: float = opt(
        0.2, "Weight of the lane-centring penalty (lateral offset in half-lane units, squared).", min=0.0
    )
    reward_speed: float = opt(
        0.0, "Weight of the speed term (1 at env.target_speed, 0 at standstill or twice the target).", min=0.0
    )
    reward_comfort: float = opt(
        0.0, "Weight of the comfort penalty (mean absolute change of steering and throttle).", min=0.0
    )
    port_base: int = opt(
        2000,
        "First RPC port a launched server may lease; blocks of 4 ports (RPC, streaming, secondary, traffic manager).",
        min=1024,
        max=65000,
    )
    max_servers: int = opt(64, "Port blocks per node (servers one node may run at once).", min=1, max=4096)
    lock_dir: str = opt(
        "", "Directory of the port-lease lock files shared by all collectors of a node; empty: <tmp>/convoy-carla."
    )
    gpus: tuple[int, ...] = opt(
        (), "GPU indices servers may render on (server in port block k uses gpus[k % len]); empty: all detected."
    )
    quality_level: str = opt("Low", "Server graphics quality (-quality-level).", choices=("Low", "Epic"))
    render_offscreen: bool = opt(True, "Launch with -RenderOffScreen (no window; cameras still render).")
    extra_args: tuple[str, ...] = opt((), "Extra command-line arguments for launched servers.")
    start_timeout_s: float = opt(
        180.0, "How long a launched server may take to answer before the launch counts as failed.", min=1.0
    )
    restart_backoff_s: float = opt(
        2.0, "Wait before the first restart after a crash; doubles per consecutive crash.", min=0.0
    )
    restart_backoff_max_s: float = opt(60.0, "Cap of the restart wait.", min=0.0)
    max_restarts: int = opt(
        5, "Consecutive crashes (without a finished episode between) before the collector gives up.", min=0
    )
    stand_in: bool = opt(
        False,
        "Drive convoy's in-process CARLA stand-in (a ring road with kinematic cars, actors/carla/fake.py) instead of "
        "a server: tests and dry runs of a CARLA config on machines without CARLA. Never for training.",
    )


@dataclass(frozen=True)
class CollectorConfig:
    num_collectors: int = opt(2, "Collector actors, each owning one simulator.", min=1, max=512)
    start_steps: int = opt(
        5_000, "Uniform random actions (and no learner updates) until the run has this many transitions.", min=0
    )
    noise_std: float = opt(0.1, "Gaussian exploration noise of collector 0.", min=0.0)
    noise_std_max: float = opt(
        0.3, "Noise of the last collector; others are spread linearly between (Ape-X style).", min=0.0
    )
    segment_length: int = opt(64, "Steps per replay segment; longer amortises the 4 boundary frames.", min=1, max=4096)
    steps_per_call: int = opt(64, "Env steps per collect() call (each call also carries the newest weights).", min=1)
    weights_every_s: float = opt(
        0.5,
        "A collector in the middle of a collect() call is offered newer weights at most this often (they load "
        "before its next step, so weight fan-out does not wait for the call to end); 0 = weights only with each call.",
        min=0.0,
    )
    num_cpus: float = opt(1.0, "Ray CPUs reserved per collector.", min=0.0)
    resources: dict[str, float] | None = opt(  # noqa: RUF009 - _opt gives dicts a default_factory
        None,
        "Custom Ray resources each collector requests, e.g. {collector: 1}; null = the backend's default: {} for "
        "embedded, {carla: 1} for carla (a CARLA collector runs only where a server slot is declared).",
    )
    max_failures: int = opt(
        5, "Collector failures in a row (no finished episode between) before the run gives up.", min=1
    )


@dataclass(frozen=True)
class ReplayConfig:
    num_shards: int = opt(1, "Redis shards started by convoy (ignored when shard_urls is set).", min=1, max=256)
    capacity: int = opt(100_000, "Transitions kept over all shards; FIFO eviction beyond.", min=1)
    shard_urls: tuple[str, ...] = opt((), "redis:// URLs of existing shards; empty starts num_shards locally.")
    bind: str = opt(
        "auto",
        "Where convoy-started shards listen: auto = loopback on a local Ray cluster, the node's own address when "
        "joining a cluster (run.ray_address set; then always with a password); loopback or node to force either.",
        choices=("auto", "loopback", "node"),
    )
    password: str = opt(
        "",
        "Password of the ACL user `convoy` on convoy-started shards (also of given shard_urls without one). "
        "Empty: $CONVOY_REPLAY_PASSWORD, else a random one per run (also on loopback). Never printed or saved "
        "(shown as ***).",
    )
    shard_resources: dict[str, float] = opt(  # noqa: RUF009 - _opt gives dicts a default_factory
        {}, "Custom Ray resources each convoy-started shard actor requests (multi-node runs), e.g. {replay: 1}."
    )
    redis_server: str = opt("redis-server", "redis-server executable used to start shards.")
    max_shard_restarts: int = opt(
        10,
        "Times a convoy-started shard actor that died (its node or process) is replaced, with a backoff of 1 s "
        "doubling to 30 s; the replacement may land on another node, and writers and the learner follow its new "
        "address. Past it the run goes on with the other shards, and gives up when none is left.",
        min=0,
    )
    codec: str = opt(
        "zstd",
        "Per-frame compression (zstd-6: ~4x smaller than lz4 on driving frames, see replay_service/codec.py).",
        choices=("lz4", "zstd", "none"),
    )
    prefetch_batches: int = opt(4, "Ready batches the sampler keeps queued.", min=1)
    sampler_threads: int = opt(
        -1,
        "Background threads sampling batches (byte-range decoding releases the GIL); 0 = on the learner's own "
        "thread (measured faster for a CPU learner with the resident mirror); -1 = auto: 4 for a CUDA learner; "
        "for a CPU learner 0 with the mirror, 1 with replay.mirror=off.",
        min=-1,
        max=32,
    )
    index_refresh_s: float = opt(0.25, "How often the sampler refreshes its view of the shards' contents.", min=0.0)
    mirror: str = opt(
        "auto",
        "Learner-resident replay: every stored segment is pulled once, decoded once and kept in a ring on the "
        "learner, and a batch is a gather from it. device = GPU memory, host = host memory, auto = device on a "
        "GPU learner else host, off = fetch and decode each sampled transition's bytes per batch (little memory, "
        "~10x slower). Needs about replay.capacity x (1 + 8 / collector.segment_length) x 7,176 bytes (a 7,056-byte "
        "frame plus its step record per slot; T + 4 frames per segment of T steps, with room for segments half as "
        "long on average): 0.8 GB for 100,000 transitions in 64-step segments. Checked when the learner starts.",
        choices=("auto", "device", "host", "off"),
    )
    samples_per_insert: float = opt(
        256.0,
        "Rate limiter (Reverb SampleToInsertRatio): sampled transitions per inserted transition, the replay ratio; "
        "0 = off. learner.batch_size = one update per env step, as TD3's reference (Fujimoto et al. 2018).",
        min=0.0,
    )
    spi_tolerance: float = opt(
        65_536.0, "Rate limiter slack in sampled transitions either side of the ratio; >= batch_size / 2.", min=1.0
    )
    min_size_to_sample: int = opt(
        0, "Transitions stored before the first batch; 0 = max(collector.start_steps, learner.batch_size).", min=0
    )


@dataclass(frozen=True)
class LearnerConfig:
    batch_size: int = opt(256, "Transitions per TD3 update.", min=1)
    device: str = opt("auto", "Torch device: auto (cuda if present), cpu, cuda or cuda:N.")
    num_gpus: float | str = opt(
        "auto",
        "GPUs the learner actor requests from Ray: auto = 1 when the cluster has a GPU, else 0 (decided from the "
        "cluster's resources, never from the driver's machine).",
    )
    resources: dict[str, float] = opt(  # noqa: RUF009 - _opt gives dicts a default_factory
        {}, "Custom Ray resources the learner requests, e.g. {learner: 1}."
    )
    encoder: str = opt(
        "nature",
        "CNN of actor and critic (each its own copy); 'none' is vector-only.",
        choices=("nature", "nature_maxpool", "none"),
    )
    hidden_dim: int = opt(256, "Width of the MLP heads after the CNN.", min=1)
    gamma: float = opt(0.99, "Discount.", min=0.0, max=1.0)
    n_step: int = opt(
        3,
        "Steps of the TD target: the discounted sum of n rewards plus gamma^n times the target Q n steps on "
        "(DrQ-v2 uses 3); a termination inside the window ends it without bootstrapping, a time limit or the end "
        "of a replay segment ends it with one (replay_service/window.py). 1 = one-step TD3.",
        min=1,
        max=64,
    )
    tau: float = opt(0.005, "Polyak rate of every target network (TD3 paper: 0.005).", min=0.0, max=1.0)
    policy_delay: int = opt(2, "Critic updates per actor and target update (TD3 paper: 2).", min=1)
    target_noise: float = opt(0.2, "Std of target policy smoothing noise (TD3 paper: 0.2).", min=0.0)
    target_noise_clip: float = opt(0.5, "Clip of target policy smoothing noise (TD3 paper: 0.5).", min=0.0)
    actor_lr: float = opt(3e-4, "Adam learning rate of the actor head.", min=0.0)
    critic_lr: float = opt(3e-4, "Adam learning rate of the critic heads.", min=0.0)
    actor_encoder_lr: float = opt(3e-4, "Adam learning rate of the actor's CNN.", min=0.0)
    critic_encoder_lr: float = opt(3e-4, "Adam learning rate of the critic's CNN.", min=0.0)
    actor_grad_clip: float = opt(1.0, "Max gradient norm of the actor (CNN + head).", min=0.0)
    critic_grad_clip: float = opt(10.0, "Max gradient norm of the critic (CNN + heads).", min=0.0)
    publish_every: int = opt(50, "Publish actor weights (new version) every this many updates.", min=1)
    updates_per_call: int = opt(8, "Updates per train() call between progress reports.", min=1)
    num_threads: int = opt(
        0,
        "Torch intra-op threads on CPU; 0 = tuned: the learner times its updates with 1, half and all usable "
        "cores, keeps the fastest and retunes every 5,000 updates (learner/threads.py).",
        min=0,
    )
    precision: str = opt(
        "auto",
        "Autocast dtype of forward passes: auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), "
        "else fp32. Only the CNN encoders run in bf16; heads, Q values, targets, losses and parameters are fp32.",
        choices=("auto", "fp32", "bf16"),
    )
    channels_last: bool = opt(True, "NHWC memory format for the CNNs (faster convolutions on CPU and GPU).")
    augment: str = opt(
        "none",
        "Image augmentation of sampled batches: shift = DrQ's random shift by up to 4 pixels (Kostrikov et al. "
        "2020), the same shift for obs and next obs of a transition. The pixel profiles (local.yaml, carla.yaml) "
        "turn it on; it does nothing with encoder none.",
        choices=("none", "shift"),
    )
    compile: bool = opt(False, "torch.compile the networks (CUDA graphs on CUDA via mode reduce-overhead).")
    max_nonfinite: int = opt(
        10,
        "Stop the run (with a checkpoint of the last good state) after this many consecutive non-finite updates.",
        min=1,
    )


@dataclass(frozen=True)
class ConvoyConfig:
    run: RunConfig = field(default_factory=RunConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    carla: CarlaConfig = field(default_factory=CarlaConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for section in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            out[section.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def to_yaml(self, redact: bool = True) -> str:
        """YAML of the resolved config; secrets (the shard password, credentials in any URL)
        are shown as ``***`` unless ``redact`` is False. Printed and saved configs are redacted."""
        data = self.to_dict()
        if redact:
            if data["replay"]["password"]:
                data["replay"]["password"] = REDACTED
            data = _redact_urls(data)  # shard URLs, out_dir, ray_address: any URL with credentials
        return yaml.safe_dump(data, sort_keys=False)

    def min_size_to_sample(self) -> int:
        """``replay.min_size_to_sample`` resolved: transitions stored before the first batch
        (the warm-up that writers, the sampler and the measured replay ratio leave out)."""
        return self.replay.min_size_to_sample or max(self.collector.start_steps, self.learner.batch_size)

    def replace(self, *overrides: str) -> ConvoyConfig:
        """A copy with dotted overrides applied and validated."""
        return from_dict(self.to_dict(), overrides)


_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(ConvoyConfig)}  # type: ignore[misc]
_SECTION_TYPES = typing.get_type_hints(ConvoyConfig)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``'learner.batch_size=128'`` -> ``('learner', 'batch_size', 128)`` (value parsed as YAML)."""
    return coerce.parse_override(text, _SECTIONS)


def from_dict(data: typing.Mapping[str, Any] | None, overrides: typing.Iterable[str] = ()) -> ConvoyConfig:
    """Build and validate a config from a nested mapping plus dotted overrides."""
    data = dict(data or {})
    merged: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown section {section!r}; sections: {', '.join(_SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping of keys to values, got {values!r}")
        merged[section].update(values)
    for text in overrides:
        section, key, value = parse_override(text)
        merged[section][key] = value
    sections = {name: coerce.build_dataclass(name, _SECTION_TYPES[name], merged[name]) for name in _SECTIONS}
    if sections["replay"].password == REDACTED:
        # A saved (redacted) config: the secret was never stored, so it counts as unset.
        sections["replay"] = dataclasses.replace(sections["replay"], password="")
    cfg = ConvoyConfig(**sections)
    _check_cross_field(cfg)
    return cfg


def _check_cross_field(cfg: ConvoyConfig) -> None:
    if cfg.collector.noise_std_max < cfg.collector.noise_std:
        raise ConfigError(
            f"collector.noise_std_max={cfg.collector.noise_std_max!r}: must be >= collector.noise_std "
            f"({cfg.collector.noise_std!r})"
        )
    shards = len(cfg.replay.shard_urls) or cfg.replay.num_shards
    if cfg.replay.capacity < shards * cfg.collector.segment_length:
        raise ConfigError(
            f"replay.capacity={cfg.replay.capacity!r}: must hold at least one segment per shard "
            f"(>= {shards * cfg.collector.segment_length} with {shards} shard(s) of "
            f"collector.segment_length={cfg.collector.segment_length})"
        )
    ng = cfg.learner.num_gpus
    if (isinstance(ng, str) and ng != "auto") or (not isinstance(ng, str) and ng < 0):
        raise ConfigError(f"learner.num_gpus={ng!r}: allowed: 'auto' or a number >= 0")
    dev = cfg.learner.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"learner.device={dev!r}: allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if cfg.carla.restart_backoff_max_s < cfg.carla.restart_backoff_s:
        raise ConfigError(
            f"carla.restart_backoff_max_s={cfg.carla.restart_backoff_max_s!r}: must be >= carla.restart_backoff_s "
            f"({cfg.carla.restart_backoff_s!r})"
        )
    for url in cfg.replay.shard_urls:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"replay.shard_urls: {url!r} is not a redis://, rediss:// or unix:// URL")


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ConvoyConfig:
    """Load a YAML run config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = coerce.load_yaml(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
        data = loaded or {}
    return from_dict(data, overrides)


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every key; used by ``convoy config --keys`` and docs/reference/config.md."""
    return coerce.describe_fields(_SECTION_TYPES)
