"""What a run is before anything is placed: its name, its directory and lineage id, its shard
password, its config as written to ``<run.out_dir>/config.yaml``, and (on resume) the
counters it continues from.

A run directory belongs to one run. :func:`resolve` validates everything first (the resume
target, and that ``run.out_dir`` holds no other run) and writes nothing; the driver calls
:func:`write_config` only once the run is also known not to be running already.

Lineage: a fresh run gets a new random ``run.run_id``; a resumed run keeps the id of the
checkpoint it resumes from, so a run and all its resumptions share one id, which every
checkpoint manifest records. Pruning, ``latest``, ``best`` and learner restarts look only at
that id's checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import TextIO

from common import storage
from common.config import ConfigError, ConvoyConfig
from deploy.run.progress import Progress

PASSWORD_ENV = "CONVOY_REPLAY_PASSWORD"
RUNS_ROOT = "runs"


def run_name(cfg: ConvoyConfig) -> str:
    """``run.name``, else the last path component of ``run.out_dir``."""
    return cfg.run.name or storage.basename(cfg.run.out_dir) or "run"


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def default_out_dir(config_name: str, root: str | Path = RUNS_ROOT, now: float | None = None) -> str:
    """A new directory ``<root>/<config_name>/<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken).

    Created empty here, with an exclusive mkdir: two runs started in the same second get
    two directories."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    parent = Path(root) / config_name
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return str(candidate)
    raise ConfigError(f"no free run directory for {stamp} under {parent}")


def with_out_dir(cfg: ConvoyConfig, config_name: str) -> ConvoyConfig:
    """The config with a new run directory when ``run.out_dir`` is empty."""
    if cfg.run.out_dir:
        return cfg
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=default_out_dir(config_name)))


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


@dataclasses.dataclass
class ResumeTarget:
    checkpoint: str  # a checkpoint whose every file verifies
    run_id: str  # its lineage
    skipped: list[str]  # newer checkpoints that failed verification, and why


def resume_target(resume: str | Path) -> ResumeTarget:
    """The newest checkpoint of ``resume`` that verifies (CheckpointError if none does)."""
    from learner.checkpoint import newest_verified, read_manifest

    checkpoint, skipped = newest_verified(resume)
    manifest = read_manifest(storage.open_store(checkpoint))
    return ResumeTarget(checkpoint, str(manifest.get("run_id", "")), skipped)


def resume_progress(cfg: ConvoyConfig, checkpoint: str | None) -> Progress:
    """The run's progress counters, continued from ``checkpoint`` (None: a new run)."""
    from learner.checkpoint import load_checkpoint

    progress = Progress()
    if checkpoint is None:
        return progress
    state = load_checkpoint(checkpoint, networks=(), full=False).state
    progress.resumed_from(int(state.get("env_steps", 0)), int(state["updates"]))
    if progress.base_env_steps >= cfg.run.total_env_steps:
        raise ConfigError(
            f"run.total_env_steps={cfg.run.total_env_steps} is already reached by the checkpoint "
            f"({progress.base_env_steps} env steps); raise it to train further, e.g. "
            f"run.total_env_steps={progress.base_env_steps + 100_000}"
        )
    return progress


def _run_dir_of(checkpoint: str) -> str | None:
    """``<run>`` of ``<run>/checkpoints/ckpt-...``; None for a checkpoint outside a run."""
    parent = checkpoint.rstrip("/").rsplit("/", 1)[0]
    if storage.basename(parent) != "checkpoints" or "/" not in parent:
        return None
    return parent.rsplit("/", 1)[0]


def check_out_dir(out_dir: str, run_id: str, fresh: bool) -> None:
    """Refuse a run directory that holds another run: any run for a fresh run, another
    lineage than ``run_id`` for a resumed one. Reads only."""
    import yaml

    from learner.checkpoint import scan_checkpoints

    where = storage.redact(out_dir)
    held: list[str] = []
    config_uri = storage.join(out_dir, "config.yaml")
    if storage.open_store(out_dir).list():
        try:
            saved = yaml.safe_load(storage.read_text(config_uri)) or {}
            saved_id = str((saved.get("run") or {}).get("run_id", ""))
            if fresh or saved_id != run_id:
                held.append("config.yaml" + (f" of run id {saved_id}" if saved_id else ""))
        except FileNotFoundError:
            pass
        except (yaml.YAMLError, AttributeError):
            held.append("an unreadable config.yaml")
        infos, incomplete = scan_checkpoints(out_dir)
        others = [c for c in infos if fresh or c.run_id != run_id]
        if others:
            ids = sorted({c.run_id or "(none)" for c in others})
            held.append(f"{len(others)} checkpoint(s) of run id {', '.join(ids)}")
        elif fresh and incomplete:
            held.append(f"{len(incomplete)} incomplete checkpoint(s)")
    if not held:
        return
    if fresh:
        raise ConfigError(
            f"run.out_dir {where} already holds a run ({'; '.join(held)}): continue it with "
            f"`convoy train --resume {where}`, or give another run.out_dir (or none: each run then gets a new "
            f"directory under {RUNS_ROOT}/). Nothing was written."
        )
    raise ConfigError(
        f"run.out_dir {where} holds another run than the one resumed (run id {run_id or '(none)'}): "
        f"{'; '.join(held)}. Resume into that run's own directory or an empty one "
        f"(`convoy train --resume CHECKPOINT run.out_dir=NEW_DIR`). Nothing was written."
    )


@dataclasses.dataclass
class Resolved:
    cfg: ConvoyConfig  # with the shard password, run directory and run id filled in
    name: str
    bind: str  # where convoy-started shards listen: "node" or "loopback"
    progress: Progress
    resume: str | None  # the checkpoint to resume from
    password_source: str = ""


def resolve(cfg: ConvoyConfig, resume: str | Path | None, out: TextIO) -> Resolved:
    """Validate the run and fill in what the config leaves open; writes nothing."""
    target = resume_target(resume) if resume is not None else None
    checkpoint = target.checkpoint if target is not None else None
    for reason in target.skipped if target is not None else []:
        print(f"resume: {reason}", file=out, flush=True)
    out_dir = cfg.run.out_dir or (_run_dir_of(checkpoint) if checkpoint else None) or ""
    run_id = target.run_id if target is not None else new_run_id()
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_id=run_id, out_dir=out_dir))
    cfg = with_out_dir(cfg, "run")
    check_out_dir(cfg.run.out_dir, run_id, fresh=target is None)
    progress = resume_progress(cfg, checkpoint)
    joined = bool(cfg.run.ray_address)
    bind = cfg.replay.bind if cfg.replay.bind != "auto" else ("node" if joined else "loopback")
    cfg, password_source = resolve_secrets(cfg, shards_on_node_addresses=bind == "node")
    return Resolved(cfg, run_name(cfg), bind, progress, checkpoint, password_source)


def write_config(run: Resolved, out: TextIO) -> None:
    """Write ``config.yaml`` to the run and say where the run writes."""
    cfg = run.cfg
    storage.write_text(storage.join(cfg.run.out_dir, "config.yaml"), cfg.to_yaml())
    print("resolved config:\n" + "\n".join("  " + ln for ln in cfg.to_yaml().splitlines()), file=out, flush=True)
    where = storage.redact(cfg.run.out_dir)
    print(f"run {run.name!r}: storage {where}; shard password: {run.password_source}", file=out, flush=True)


def newest_checkpoint(cfg: ConvoyConfig) -> str | None:
    """Where a replacement learner restores from: the run (its learner picks the newest
    checkpoint of the run's lineage that verifies), or None while it has none."""
    from learner.checkpoint import CheckpointError, list_checkpoints

    try:
        infos = list_checkpoints(cfg.run.out_dir, run_id=cfg.run.run_id)
    except (CheckpointError, OSError, storage.StorageError):
        return None
    return cfg.run.out_dir if infos else None
