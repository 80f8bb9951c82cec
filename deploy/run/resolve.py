"""What a run is before anything is placed: its name, its shard password, its config as
written to ``<run.out_dir>/config.yaml``, and (on resume) the counters it continues from."""

from __future__ import annotations

import dataclasses
import os
import secrets
from pathlib import Path
from typing import TextIO

from common import storage
from common.config import ConfigError, ConvoyConfig
from deploy.run.progress import Progress

PASSWORD_ENV = "CONVOY_REPLAY_PASSWORD"


def run_name(cfg: ConvoyConfig) -> str:
    """``run.name``, else the last path component of ``run.out_dir``."""
    return cfg.run.name or storage.basename(cfg.run.out_dir) or "run"


def resolve_secrets(cfg: ConvoyConfig, shards_on_node_addresses: bool) -> tuple[ConvoyConfig, str]:
    """The config with its shard password filled in, and a line saying where it came from.

    Precedence: ``replay.password``, then ``$CONVOY_REPLAY_PASSWORD``, then (for shards convoy
    starts, on node addresses or loopback alike: another user of the machine must not reach
    them) a random one for this run. The password reaches actors only through their
    constructor arguments and is redacted wherever it is shown."""
    password, source = cfg.replay.password, "replay.password"
    if not password and os.environ.get(PASSWORD_ENV):
        password, source = os.environ[PASSWORD_ENV], f"${PASSWORD_ENV}"
    if not password and not cfg.replay.shard_urls:
        where = "node addresses" if shards_on_node_addresses else "loopback"
        password, source = secrets.token_urlsafe(24), f"generated for this run (shards listen on {where})"
    if not password:
        return cfg, "none (the given shard_urls carry their own credentials, if any)"
    return dataclasses.replace(cfg, replay=dataclasses.replace(cfg.replay, password=password)), source


def resume_progress(cfg: ConvoyConfig, resume: str | Path | None) -> tuple[Progress, str | None]:
    """The run's progress counters and the resolved checkpoint to resume from (None: a new run)."""
    from learner.checkpoint import load_checkpoint, resolve_checkpoint

    progress = Progress()
    if resume is None:
        return progress, None
    # Resolved once: the driver's counters and the learner's state come from the same checkpoint.
    checkpoint = str(resolve_checkpoint(resume))
    state = load_checkpoint(checkpoint, networks=(), full=False).state
    progress.resumed_from(int(state.get("env_steps", 0)), int(state["updates"]))
    if progress.base_env_steps >= cfg.run.total_env_steps:
        raise ConfigError(
            f"run.total_env_steps={cfg.run.total_env_steps} is already reached by the checkpoint "
            f"({progress.base_env_steps} env steps); raise it to train further, e.g. "
            f"run.total_env_steps={progress.base_env_steps + 100_000}"
        )
    return progress, checkpoint


@dataclasses.dataclass
class Resolved:
    cfg: ConvoyConfig  # with the shard password filled in
    name: str
    bind: str  # where convoy-started shards listen: "node" or "loopback"
    progress: Progress
    resume: str | None  # the checkpoint to resume from


def resolve(cfg: ConvoyConfig, resume: str | Path | None, out: TextIO) -> Resolved:
    """Fill in what the config leaves open, write it to the run and say where things go."""
    joined = bool(cfg.run.ray_address)
    bind = cfg.replay.bind if cfg.replay.bind != "auto" else ("node" if joined else "loopback")
    cfg, password_source = resolve_secrets(cfg, shards_on_node_addresses=bind == "node")
    name = run_name(cfg)
    storage.write_text(storage.join(cfg.run.out_dir, "config.yaml"), cfg.to_yaml())
    print("resolved config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()), file=out, flush=True)
    where = storage.redact(cfg.run.out_dir)
    print(f"run {name!r}: storage {where}; shard password: {password_source}", file=out, flush=True)
    progress, checkpoint = resume_progress(cfg, resume)
    return Resolved(cfg, name, bind, progress, checkpoint)
