"""Checkpoints of the training state: what each file of a checkpoint holds, and the
conversion between a LearnerState and those files. learner.checkpoint_store commits, lists,
verifies and prunes them on any run storage; its public names are importable from here too.

Files of one checkpoint: the four networks as safetensors; optimizer state dicts in
``optimizers.pt`` and torch RNG states in ``rng.pt`` (both read back with
``torch.load(weights_only=True)``); ``state.json`` with the counters, weight version and
numpy RNG state; ``config.yaml`` with the resolved run config.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.storage import basename, open_store, redact
from learner.checkpoint_store import (
    BEST,
    CHECKPOINTS,
    FORMAT,
    MANIFEST,
    PREFIX,
    CheckpointError,
    CheckpointInfo,
    best_checkpoint,
    commit_checkpoint,
    list_checkpoints,
    mark_best,
    newest_verified,
    prune,
    read_manifest,
    read_verified,
    resolve_checkpoint,
    scan_checkpoints,
    verify,
)
from learner.state import AgentState, LearnerState

if TYPE_CHECKING:
    import torch

__all__ = [
    "BEST",
    "CHECKPOINTS",
    "FORMAT",
    "MANIFEST",
    "NETWORKS",
    "PREFIX",
    "CheckpointData",
    "CheckpointError",
    "CheckpointInfo",
    "best_checkpoint",
    "from_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "mark_best",
    "newest_verified",
    "prune",
    "pull_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_file",
    "scan_checkpoints",
    "to_checkpoint",
    "verify",
]

log = logging.getLogger(__name__)

NETWORKS = ("actor", "critic", "actor_target", "critic_target")


@dataclass
class CheckpointData:
    """The contents of a checkpoint's files. ``state`` is state.json's object without
    ``updates``, which is the checkpoint's name and is passed to save_checkpoint on its own."""

    networks: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    config_yaml: str = ""


def to_checkpoint(state: LearnerState, config_yaml: str) -> CheckpointData:
    """A learner's state as checkpoint contents (save it under ``state.agent.updates``)."""
    return CheckpointData(
        networks=state.agent.networks,
        optimizers=state.agent.optimizers,
        rng=state.agent.rng,
        state={
            "env_steps": state.env_steps,
            "weights_version": state.weights_version,
            "nonfinite_total": state.agent.nonfinite_total,
            **({} if state.numpy_rng is None else {"numpy_rng": state.numpy_rng}),
        },
        config_yaml=config_yaml,
    )


def from_checkpoint(data: CheckpointData) -> LearnerState:
    """The learner's state in a fully loaded checkpoint; counters that older checkpoints lack
    are 0, a missing numpy RNG state is None."""
    return LearnerState(
        agent=AgentState(
            networks=data.networks,
            optimizers=data.optimizers,
            rng=data.rng,
            updates=int(data.state["updates"]),
            nonfinite_total=int(data.state.get("nonfinite_total", 0)),
        ),
        env_steps=int(data.state.get("env_steps", 0)),
        weights_version=int(data.state.get("weights_version", 0)),
        numpy_rng=data.state.get("numpy_rng"),
    )


def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' save_file, imported on first use so `convoy checkpoints` starts without torch."""
    from safetensors.torch import save_file as _save_file

    _save_file(tensors, path)


def _stage(directory: Path, updates: int, data: CheckpointData) -> None:
    """Write the checkpoint's files (all but the manifest) into ``directory``."""
    import torch

    for name, state in data.networks.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / f"{name}.safetensors"))
    torch.save(data.optimizers, directory / "optimizers.pt")
    torch.save(data.rng, directory / "rng.pt")
    (directory / "state.json").write_text(json.dumps({"updates": updates, **data.state}, indent=2, sort_keys=True))
    (directory / "config.yaml").write_text(data.config_yaml)


def save_checkpoint(root: str | Path, updates: int, data: CheckpointData, keep: int = 3, run_id: str = "") -> str:
    """Write ``<root>/ckpt-<updates>`` (``root`` is the run's ``checkpoints`` URI) for the
    lineage ``run_id``, then prune that lineage.

    Returns the checkpoint's URI.
    """
    return commit_checkpoint(
        root,
        updates,
        lambda directory: _stage(directory, updates, data),
        env_steps=int(data.state.get("env_steps", 0)),
        weights_version=int(data.state.get("weights_version", 0)),
        keep=keep,
        run_id=run_id,
    )


def load_checkpoint(
    path: str | Path, networks: tuple[str, ...] = NETWORKS, full: bool = True, name: str = "latest"
) -> CheckpointData:
    """Load weights only: safetensors for networks, ``weights_only=True`` for the rest.

    Every file read is checked against the manifest (size and sha256) first.
    """
    import torch
    from safetensors.torch import load as load_safetensors

    store = open_store(resolve_checkpoint(path, name))
    manifest = read_manifest(store)

    def read(file: str) -> bytes:
        return read_verified(store, manifest, file)

    current = ""
    try:
        nets = {}
        for net in networks:
            current = f"{net}.safetensors"
            nets[net] = load_safetensors(read(current))
        current = "state.json"
        state = json.loads(read(current))
        current = "config.yaml"
        config_yaml = read(current).decode()
        optim: dict[str, Any] = {}
        rng: dict[str, torch.Tensor] = {}
        if full:
            current = "optimizers.pt"
            optim = torch.load(io.BytesIO(read(current)), weights_only=True, map_location="cpu")
            current = "rng.pt"
            rng = torch.load(io.BytesIO(read(current)), weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{redact(store.url(current))} is unreadable: {exc}") from None
    return CheckpointData(networks=nets, optimizers=optim, rng=rng, state=state, config_yaml=config_yaml)


def pull_checkpoint(run_uri: str | Path, name: str, to_dir: str | Path) -> Path:
    """Download a checkpoint to the local ``to_dir`` and return where it landed.

    Like ``cp -r``: into ``to_dir/<checkpoint name>`` if ``to_dir`` is an existing directory,
    else as ``to_dir`` itself. Files go to a temporary directory next to the target, each
    is checked against the manifest, and the directory is renamed into place only when all
    match; on any error nothing is left behind.
    """
    store = open_store(resolve_checkpoint(run_uri, name))
    manifest = read_manifest(store)
    dest = Path(to_dir)
    target = dest / basename(store.uri) if dest.is_dir() else dest
    if target.exists():
        raise CheckpointError(f"{target} already exists: pull into a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.pull-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for file in manifest["files"]:
            (tmp / file).write_bytes(read_verified(store, manifest, file))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pulled %s to %s", redact(store.uri), target)
    return target
