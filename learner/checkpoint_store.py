"""Checkpoint storage on any run storage (a local path or an fsspec URI): files first,
manifest last. learner.checkpoint encodes the training state into these files.

Layout under ``<run>/checkpoints/``::

    ckpt-<updates:010d>/
        the files learner.checkpoint writes (networks, optimizers, RNG, state.json, config.yaml)
        manifest.json   written last: every file's size and sha256, the counters, the time
    best.json           the checkpoint an evaluator found best, with its metrics (mark_best)

A checkpoint exists for readers only once its manifest does; list, resolve, load and pull
ignore the rest. Object stores have no rename, so there the files are uploaded into the
final prefix and the manifest (one PUT, atomic) commits them. On a local filesystem the whole
directory, manifest included, is written under ``.tmp-ckpt-...`` and renamed into place.

Reading verifies the size and sha256 of every file against the manifest (hashing is about
1 GB/s, small next to reading the bytes from object storage), so a corrupt or tampered file
is an error naming that file, never silently loaded.

Pruning keeps the newest ``keep`` complete checkpoints and the ``best`` one. Debris of a
writer that died (files without a manifest) is removed once a newer checkpoint is complete;
an incomplete checkpoint newer than the newest complete one may still be uploading, so it
is left alone. Local staging directories carry a flock held by their writer, so only those
of dead writers are removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.storage import LocalStore, Store, basename, join, open_store, redact

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
BEST = "best.json"
FORMAT = 1
_NAME = re.compile(rf"{PREFIX}(\d+)")
# A manifest names plain files of its own directory, nothing that could point elsewhere.
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_STAGING = f".tmp-{PREFIX}"

# Writes a checkpoint's files (all but the manifest) into the directory it is given:
# learner.checkpoint's encoder of the training state.
Stager = Callable[[Path], None]
# The same, returning every file's bytes with the manifest added.
_Staged = Callable[[Path], dict[str, bytes]]


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected; the message says where and why."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint as its manifest describes it."""

    name: str
    uri: str
    updates: int
    env_steps: int
    weights_version: int
    time: float  # unix seconds when it was committed
    size_bytes: int
    best: bool = False


def _updates_of(name: str) -> int:
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else -1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- writing ---------------------------------------------------------------------------


def dir_name(updates: int) -> str:
    return f"{PREFIX}{updates:010d}"


def _staged(directory: Path, stage: Stager, updates: int, env_steps: int, weights_version: int) -> dict[str, bytes]:
    """Stage the files into ``directory``; returns them all by name, the manifest included."""
    stage(directory)
    files: dict[str, bytes] = {}
    for f in sorted(directory.iterdir()):
        if f.name != MANIFEST and not f.name.startswith("."):
            files[f.name] = f.read_bytes()
    manifest = {
        "format": FORMAT,
        "name": dir_name(updates),
        "updates": updates,
        "env_steps": env_steps,
        "weights_version": weights_version,
        "time": time.time(),
        "files": {name: {"size": len(b), "sha256": _sha256(b)} for name, b in files.items()},
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return files


def _commit_local(store: LocalStore, name: str, updates: int, staged: _Staged) -> None:
    store.root.mkdir(parents=True, exist_ok=True)
    staging = f"{_STAGING}{updates:010d}-{uuid.uuid4().hex[:8]}"
    lock_path = store.path(staging + ".lock")
    # The lock exists before the directory and is held until it is renamed: a pruner that
    # can take it knows the writer is dead (the kernel drops the lock with the process).
    with open(lock_path, "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            tmp = store.path(staging)
            tmp.mkdir()
            files = staged(tmp)
            store.write_bytes(f"{staging}/{MANIFEST}", files[MANIFEST])
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            old = None
            if store.path(name).exists():
                old = f"{staging}-replaced"
                store.rename(name, old)
            store.rename(staging, name)
            if old is not None:
                store.remove(old)
        except BaseException:
            store.remove(staging)
            raise
        finally:
            lock_path.unlink(missing_ok=True)


def _commit_object_store(store: Store, name: str, staged: _Staged) -> None:
    with tempfile.TemporaryDirectory(prefix="convoy-ckpt-") as tmp:
        files = staged(Path(tmp))
    manifest = files.pop(MANIFEST)
    # Rewriting a checkpoint of the same name: it stops existing for readers first, so no
    # reader pairs the old manifest with new files.
    store.remove(f"{name}/{MANIFEST}")
    store.write_many({f"{name}/{f}": b for f, b in files.items()})
    store.write_bytes(f"{name}/{MANIFEST}", manifest)


def commit_checkpoint(
    root: str | Path, updates: int, stage: Stager, env_steps: int = 0, weights_version: int = 0, keep: int = 3
) -> str:
    """Write ``<root>/ckpt-<updates>`` with the files ``stage`` writes (``root`` is the run's
    ``checkpoints`` URI), commit it with its manifest, then prune. Returns its URI."""
    store = open_store(root)
    name = dir_name(updates)

    def staged(directory: Path) -> dict[str, bytes]:
        return _staged(directory, stage, updates, env_steps, weights_version)

    if isinstance(store, LocalStore):
        _commit_local(store, name, updates, staged)
    else:
        _commit_object_store(store, name, staged)
    _prune(store, keep)
    return store.url(name)


# ----- pruning ---------------------------------------------------------------------------


def _remove_dead_staging(store: LocalStore) -> None:
    for entry in store.list():
        if not entry.startswith(_STAGING):
            continue
        base = entry.removesuffix(".lock")
        lock_path = store.path(base + ".lock")
        try:
            with open(lock_path, "rb") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                store.remove(base)
                lock_path.unlink(missing_ok=True)
        except FileNotFoundError:
            store.remove(base)  # no lock: its writer is gone


def _prune(store: Store, keep: int) -> None:
    if keep < 1:
        raise ValueError(f"keep={keep}: must be >= 1 (the newest complete checkpoint is never removed)")
    names = sorted((n for n in store.list() if _NAME.fullmatch(n)), key=_updates_of)
    complete = [n for n in names if store.exists(f"{n}/{MANIFEST}")]
    if complete:
        try:
            best = _read_best(store)
        except CheckpointError as exc:
            log.warning("pruning as if there were no best checkpoint: %s", exc)
            best = None
        kept = set(complete[-keep:]) | ({best[0]} if best is not None else set())
        newest = _updates_of(complete[-1])
        for n in names:
            if n in complete and n not in kept:
                # Manifest first: a half-removed checkpoint is incomplete, never a broken one.
                store.remove(f"{n}/{MANIFEST}")
                store.remove(n)
            elif n not in complete and _updates_of(n) < newest:
                store.remove(n)
    if isinstance(store, LocalStore):
        _remove_dead_staging(store)


def prune(root: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints and the best one under ``root``."""
    _prune(open_store(root), keep)


# ----- reading ---------------------------------------------------------------------------


def _checkpoints_store(uri: str | Path) -> Store:
    """The ``checkpoints`` store of a run URI (or ``uri`` itself if it already is one)."""
    store = open_store(uri)
    children = store.list()
    if CHECKPOINTS not in children and (basename(uri) == CHECKPOINTS or any(_NAME.fullmatch(c) for c in children)):
        return store
    return open_store(join(uri, CHECKPOINTS))


def read_manifest(store: Store) -> dict[str, Any]:
    """The validated manifest of the checkpoint ``store``; CheckpointError if incomplete."""
    url = store.url(MANIFEST)
    try:
        raw = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {redact(store.uri)!r} is incomplete: it has no {MANIFEST} "
            "(still being written, or its writer died)"
        ) from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        ok = (
            isinstance(files, dict)
            and isinstance(manifest["updates"], int)
            and all(
                isinstance(n, str)
                and _FILE.fullmatch(n)
                and n != MANIFEST
                and isinstance(e.get("size"), int)
                and isinstance(e.get("sha256"), str)
                for n, e in files.items()
            )
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{redact(url)!r} is not a valid checkpoint manifest")
    return dict(manifest)


def read_verified(store: Store, manifest: dict[str, Any], name: str) -> bytes:
    """One file's bytes, checked against the manifest's size and sha256."""
    url = redact(store.url(name))
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{url} is not listed in the checkpoint's manifest")
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        raise CheckpointError(f"{url} is missing (listed in the manifest; was the checkpoint pruned?)") from None
    if len(data) != entry["size"]:
        raise CheckpointError(f"{url}: size {len(data)} bytes, the manifest says {entry['size']} (corrupt or tampered)")
    digest = _sha256(data)
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{url}: sha256 {digest} does not match the manifest's {entry['sha256']} (corrupt or tampered)"
        )
    return data


def _read_best(cstore: Store) -> tuple[str, dict[str, Any]] | None:
    try:
        raw = cstore.read_bytes(BEST)
    except FileNotFoundError:
        return None
    try:
        best = json.loads(raw)
        name, metrics = best["name"], best.get("metrics", {})
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{redact(cstore.url(BEST))!r} is not a valid best-checkpoint pointer") from None
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not isinstance(metrics, dict):
        raise CheckpointError(f"{redact(cstore.url(BEST))!r} is not a valid best-checkpoint pointer")
    return name, metrics


def scan_checkpoints(run_uri: str | Path) -> tuple[list[CheckpointInfo], list[str]]:
    """(complete checkpoints oldest first, names of incomplete ones) of a run.

    CheckpointError if nothing is stored at ``run_uri``.
    """
    run_store = open_store(run_uri)
    if not run_store.list():
        raise CheckpointError(f"no run at {redact(str(run_uri))!r}: nothing is stored there")
    cstore = _checkpoints_store(run_uri)
    best = _read_best(cstore)
    complete: list[CheckpointInfo] = []
    incomplete: list[str] = []
    for name in sorted((n for n in cstore.list() if _NAME.fullmatch(n)), key=_updates_of):
        try:
            m = read_manifest(open_store(cstore.url(name)))
        except CheckpointError:
            incomplete.append(name)
            continue
        complete.append(
            CheckpointInfo(
                name=name,
                uri=cstore.url(name),
                updates=int(m["updates"]),
                env_steps=int(m.get("env_steps", 0)),
                weights_version=int(m.get("weights_version", 0)),
                time=float(m.get("time", 0.0)),
                size_bytes=sum(int(e["size"]) for e in m["files"].values()),
                best=best is not None and best[0] == name,
            )
        )
    return complete, incomplete


def list_checkpoints(run_uri: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (or of its ``checkpoints`` URI), oldest first; [] if none."""
    if not open_store(run_uri).list():
        return []
    return scan_checkpoints(run_uri)[0]


def best_checkpoint(run_uri: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(name, metrics) that ``mark_best`` recorded for the run, or None."""
    return _read_best(_checkpoints_store(run_uri))


def mark_best(run_uri: str | Path, checkpoint_name: str, metrics: dict[str, Any]) -> None:
    """Record ``checkpoint_name`` (a name or a checkpoint URI) as the run's best, with ``metrics``.

    One small object replaced whole; pruning keeps the checkpoint it names.
    """
    name = basename(checkpoint_name)
    if not _NAME.fullmatch(name):
        raise CheckpointError(f"{checkpoint_name!r} is not a checkpoint name (expected {PREFIX}<updates>)")
    cstore = _checkpoints_store(run_uri)
    if not cstore.exists(f"{name}/{MANIFEST}"):
        raise CheckpointError(f"no complete checkpoint {name!r} in {redact(cstore.uri)!r}")
    payload = {"name": name, "metrics": metrics, "time": time.time()}
    # default=float: numpy scalars in metrics are written as numbers.
    cstore.write_bytes(BEST, json.dumps(payload, indent=2, sort_keys=True, default=float).encode())


def resolve_checkpoint(path: str | Path, name: str = "latest") -> str:
    """The URI of a complete checkpoint.

    ``path`` is a checkpoint URI (``name`` is then ignored), or a run URI (or its
    ``checkpoints`` URI) in which ``name`` picks ``latest``, ``best`` or ``ckpt-<updates>``.
    """
    uri = str(path).rstrip("/") or str(path)
    store = open_store(uri)
    children = store.list()
    if MANIFEST in children:
        return store.uri
    if _NAME.fullmatch(basename(uri)) and children:
        read_manifest(store)  # raises: incomplete
    if not children:
        raise CheckpointError(
            f"no checkpoint at {redact(uri)!r}: nothing is stored there "
            "(expected a checkpoint, or a run with checkpoints/)"
        )
    cstore = _checkpoints_store(uri)
    if name == "best":
        best = _read_best(cstore)
        if best is None:
            raise CheckpointError(f"run {redact(uri)!r} has no best checkpoint yet ({BEST} is written by mark_best)")
        name = best[0]
    if name == "latest":
        for candidate in sorted((n for n in cstore.list() if _NAME.fullmatch(n)), key=_updates_of, reverse=True):
            if cstore.exists(f"{candidate}/{MANIFEST}"):
                return cstore.url(candidate)
        raise CheckpointError(
            f"no checkpoint at {redact(uri)!r}: no complete checkpoint under {redact(cstore.uri)!r} "
            "(expected a checkpoint, or a run with checkpoints/)"
        )
    if not _NAME.fullmatch(name):
        raise CheckpointError(f"checkpoint name {name!r}: expected latest, best or {PREFIX}<updates>")
    target = open_store(cstore.url(name))
    if not target.list():
        available = ", ".join(n for n in cstore.list() if _NAME.fullmatch(n)) or "none"
        raise CheckpointError(f"no checkpoint {name!r} in {redact(cstore.uri)!r} (there: {available})")
    read_manifest(target)  # raises if incomplete
    return target.uri
