"""Atomic checkpoints: weights as safetensors, everything else readable with weights_only.

A checkpoint is a directory ``<run>/checkpoints/ckpt-<updates:010d>/``::

    actor.safetensors critic.safetensors actor_target.safetensors critic_target.safetensors
    optimizers.pt   optimizer state dicts, loaded with torch.load(weights_only=True)
    rng.pt          torch RNG states (uint8 tensors), loaded the same way
    state.json      counters, weight version, numpy RNG state
    config.yaml     the resolved run config

It is written under a temporary name and renamed into place, so a reader sees either the
whole checkpoint or none of it; the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"
NETWORKS = ("actor", "critic", "actor_target", "critic_target")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message says where and why."""


@dataclass
class CheckpointData:
    networks: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    config_yaml: str = ""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, updates: int, data: CheckpointData, keep: int = 3) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{updates:010d}"
    tmp = root / f".tmp-{PREFIX}{updates:010d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, state in data.networks.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(data.optimizers, tmp / "optimizers.pt")
        torch.save(data.rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"updates": updates, **data.state}, indent=2, sort_keys=True))
        (tmp / "config.yaml").write_text(data.config_yaml)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    )


def prune(root: str | Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (then its newest checkpoint)."""
    p = Path(path)
    if (p / "state.json").is_file() and (p / "actor.safetensors").is_file():
        return p
    for root in (p / "checkpoints", p):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(
        f"no checkpoint at {str(p)!r}: expected a checkpoint directory or a run directory with checkpoints/"
    )


def load_checkpoint(path: str | Path, networks: tuple[str, ...] = NETWORKS, full: bool = True) -> CheckpointData:
    """Load weights only: safetensors for networks, ``weights_only=True`` for the rest."""
    ckpt = resolve_checkpoint(path)
    try:
        nets = {name: load_file(str(ckpt / f"{name}.safetensors")) for name in networks}
        state = json.loads((ckpt / "state.json").read_text())
        config_yaml = (ckpt / "config.yaml").read_text()
        optim: dict[str, Any] = {}
        rng: dict[str, torch.Tensor] = {}
        if full:
            optim = torch.load(ckpt / "optimizers.pt", weights_only=True, map_location="cpu")
            rng = torch.load(ckpt / "rng.pt", weights_only=True, map_location="cpu")
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is unreadable: {exc}") from None
    return CheckpointData(networks=nets, optimizers=optim, rng=rng, state=state, config_yaml=config_yaml)
