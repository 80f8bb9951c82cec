"""Checkpoint storage on any run storage (a local path or an fsspec URI): files first,
manifest last. learner.checkpoint encodes the training state into these files. (Over 400
lines: writing, pruning and reading share one layout and its invariants, kept in one place.)

Layout under ``<run>/checkpoints/``::

    ckpt-<updates:010d>[-<8 hex>]/
        the files learner.checkpoint writes (networks, optimizers, RNG, state.json, config.yaml)
        .writer.json    object stores only, written first: the run id of the writer (debris owner)
        manifest.json   written last: every file's size and sha256, the counters, the run id, the time
    best.json           the checkpoint an evaluator found best, with its metrics (mark_best)

Every manifest carries the id of the run that wrote it. A fresh run gets a new random id; a
resumed run keeps the id of the checkpoint it resumed from, so a lineage (a run and all its
resumptions) is one id. Pruning, ``latest`` and ``best`` given a ``run_id`` consider only
that lineage: another run's checkpoints are never removed or picked.

A name is never reused for different contents: a write under the name of an existing
checkpoint is skipped when that checkpoint holds the same files and verifies, and otherwise
goes under the name with a random ``-<8 hex>`` suffix. No complete checkpoint is removed
except by its own run's pruning.

A checkpoint exists for readers only once its manifest does; list, resolve, load and pull
ignore the rest. Object stores have no rename, so there the files are uploaded into the
final prefix and the manifest (one PUT, atomic) commits them. On a local filesystem the whole
directory, manifest included, is written under ``.tmp-ckpt-...`` and renamed into place.

Reading verifies the size and sha256 of every file against the manifest (hashing is about
1 GB/s, small next to reading the bytes from object storage), so a corrupt or tampered file
is an error naming that file, never silently loaded.

Newest means last committed (the manifest's time): a run resumed past a corrupt checkpoint
writes checkpoints with fewer updates that are still its newest. Pruning keeps the newest
``keep`` complete checkpoints of the lineage and the ``best`` one.
Debris of a writer of the lineage that died (files without a manifest) is removed once a
newer checkpoint of the lineage is complete; an incomplete checkpoint newer than that may
still be uploading, so it is left alone. Local staging directories carry a flock held by their writer, so only those
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
_NAME = re.compile(rf"{PREFIX}(\d+)(?:-[0-9a-f]{{8}})?")
# First object of a checkpoint on an object store: whose debris it is if the writer dies.
WRITER = ".writer.json"
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
    run_id: str = ""  # the lineage that wrote it ("" for checkpoints older than run ids)


def _updates_of(name: str) -> int:
    m = _NAME.fullmatch(name)
    return int(m.group(1)) if m else -1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----- writing ---------------------------------------------------------------------------


def dir_name(updates: int) -> str:
    return f"{PREFIX}{updates:010d}"


def _files_of(manifest: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {n: (int(e["size"]), str(e["sha256"])) for n, e in manifest["files"].items()}


def _staged(
    directory: Path, stage: Stager, name: str, updates: int, env_steps: int, weights_version: int, run_id: str
) -> dict[str, bytes]:
    """Stage the files into ``directory``; returns them all by name, the manifest included."""
    stage(directory)
    files: dict[str, bytes] = {}
    for f in sorted(directory.iterdir()):
        if f.name != MANIFEST and not f.name.startswith("."):
            files[f.name] = f.read_bytes()
    manifest = {
        "format": FORMAT,
        "name": name,
        "updates": updates,
        "env_steps": env_steps,
        "weights_version": weights_version,
        "run_id": run_id,
        "time": time.time(),
        "files": {n: {"size": len(b), "sha256": _sha256(b)} for n, b in files.items()},
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return files


def _same_checkpoint(store: Store, name: str, files: dict[str, bytes]) -> bool:
    """True if ``name`` is the newest complete checkpoint of the same run, with exactly these
    files, every one of which verifies: writing them again would change nothing."""
    try:
        existing = read_manifest(open_store(store.url(name)))
    except CheckpointError:
        return False
    new = json.loads(files[MANIFEST])
    if existing.get("run_id", "") != new["run_id"] or _files_of(existing) != _files_of(new):
        return False
    if _lineage(store, new["run_id"])[-1:] != [name]:
        return False  # an older one: pruning would take it, so the write goes under a new name
    try:
        verify(store.url(name))
    except CheckpointError:
        return False
    return True


def _free_name(store: Store, name: str, files: dict[str, bytes]) -> str | None:
    """Where to write: ``name`` if nothing is there, None if the same checkpoint already is,
    else ``name`` with a random suffix (a complete checkpoint is never replaced in place).
    A suffixed name is also set in the manifest of ``files``."""
    if not store.list(name):
        return name
    if _same_checkpoint(store, name, files):
        return None
    while True:
        candidate = f"{name}-{uuid.uuid4().hex[:8]}"
        if not store.list(candidate):
            manifest = json.loads(files[MANIFEST])
            manifest["name"] = candidate
            files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
            return candidate


def _commit_local(store: LocalStore, updates: int, staged: _Staged) -> str | None:
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
            name = _free_name(store, dir_name(updates), files)
            if name is None:
                store.remove(staging)
                return None
            store.write_bytes(f"{staging}/{MANIFEST}", files[MANIFEST])
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            # rename() fails rather than replace a non-empty directory that appeared meanwhile.
            store.rename(staging, name)
            return name
        except BaseException:
            store.remove(staging)
            raise
        finally:
            lock_path.unlink(missing_ok=True)


def _commit_object_store(store: Store, updates: int, staged: _Staged, run_id: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="convoy-ckpt-") as tmp:
        files = staged(Path(tmp))
    name = _free_name(store, dir_name(updates), files)
    if name is None:
        return None
    manifest = files.pop(MANIFEST)
    store.write_bytes(f"{name}/{WRITER}", json.dumps({"run_id": run_id}).encode())
    store.write_many({f"{name}/{f}": b for f, b in files.items()})
    store.write_bytes(f"{name}/{MANIFEST}", manifest)
    return name


def commit_checkpoint(
    root: str | Path | Store,
    updates: int,
    stage: Stager,
    env_steps: int = 0,
    weights_version: int = 0,
    keep: int = 3,
    run_id: str = "",
) -> str:
    """Write ``<root>/ckpt-<updates>`` with the files ``stage`` writes (``root`` is the run's
    ``checkpoints`` URI, or its store), commit it with its manifest, then prune the lineage
    ``run_id``. Returns its URI: a suffixed name if another checkpoint had that name, the
    existing one if it holds the same files."""
    store = root if not isinstance(root, str | Path) else open_store(root)

    def staged(directory: Path) -> dict[str, bytes]:
        return _staged(directory, stage, dir_name(updates), updates, env_steps, weights_version, run_id)

    if isinstance(store, LocalStore):
        written = _commit_local(store, updates, staged)
    else:
        written = _commit_object_store(store, updates, staged, run_id)
    if written is None:
        log.info("checkpoint %s is unchanged; not written again", redact(store.url(dir_name(updates))))
        written = dir_name(updates)
    _prune(store, keep, run_id)
    return store.url(written)


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


def _writer_of(store: Store, name: str) -> str | None:
    """The run id an incomplete checkpoint's writer recorded, None if it recorded none."""
    try:
        return str(json.loads(store.read_bytes(f"{name}/{WRITER}"))["run_id"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def _manifests(store: Store) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(complete checkpoints with their manifests, oldest commit first; names of incomplete ones)."""
    complete: list[tuple[str, dict[str, Any]]] = []
    incomplete: list[str] = []
    for name in (n for n in store.list() if _NAME.fullmatch(n)):
        try:
            complete.append((name, read_manifest(open_store(store.url(name)))))
        except CheckpointError:
            incomplete.append(name)
    # Commit order: after a resume past a corrupt checkpoint the resumed run's checkpoints
    # are the newest even where they have fewer updates.
    complete.sort(key=lambda c: (float(c[1].get("time", 0.0)), _updates_of(c[0]), c[0]))
    return complete, sorted(incomplete, key=_updates_of)


def _prune(store: Store, keep: int, run_id: str | None = None) -> None:
    if keep < 1:
        raise ValueError(f"keep={keep}: must be >= 1 (the newest complete checkpoint is never removed)")
    complete, incomplete = _manifests(store)
    own = [n for n, m in complete if run_id is None or m.get("run_id", "") == run_id]
    if own:
        try:
            best = _read_best(store)
        except CheckpointError as exc:
            log.warning("pruning as if there were no best checkpoint: %s", exc)
            best = None
        kept = set(own[-keep:]) | ({best[0]} if best is not None else set())
        for n in own:
            if n not in kept:
                # Manifest first: a half-removed checkpoint is incomplete, never a broken one.
                store.remove(f"{n}/{MANIFEST}")
                store.remove(n)
        newest = max(_updates_of(n) for n in own)
        for n in incomplete:
            writer = _writer_of(store, n)
            # Another run's writer may be uploading it; debris of this lineage (or of no
            # recorded run) below the lineage's newest complete checkpoint is a dead writer's.
            if _updates_of(n) < newest and (writer is None or run_id is None or writer == run_id):
                store.remove(n)
    if isinstance(store, LocalStore):
        _remove_dead_staging(store)


def prune(root: str | Path, keep: int, run_id: str | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (of the lineage ``run_id``, or of all
    when None) and the best one under ``root``."""
    _prune(open_store(root), keep, run_id)


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
            and isinstance(manifest.get("run_id", ""), str)
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


def verify(checkpoint_uri: str | Path) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest; returns the manifest.

    CheckpointError naming the first file that is missing, or differs in size or sha256.
    """
    store = open_store(checkpoint_uri)
    manifest = read_manifest(store)
    for file in manifest["files"]:
        read_verified(store, manifest, file)
    return manifest


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


def scan_checkpoints(run_uri: str | Path, run_id: str | None = None) -> tuple[list[CheckpointInfo], list[str]]:
    """(complete checkpoints oldest first, names of incomplete ones) of a run; only those of
    the lineage ``run_id`` unless it is None.

    CheckpointError if nothing is stored at ``run_uri``.
    """
    run_store = open_store(run_uri)
    if not run_store.list():
        raise CheckpointError(f"no run at {redact(str(run_uri))!r}: nothing is stored there")
    cstore = _checkpoints_store(run_uri)
    best = _read_best(cstore)
    complete, incomplete = _manifests(cstore)
    infos = [
        CheckpointInfo(
            name=name,
            uri=cstore.url(name),
            updates=int(m["updates"]),
            env_steps=int(m.get("env_steps", 0)),
            weights_version=int(m.get("weights_version", 0)),
            time=float(m.get("time", 0.0)),
            size_bytes=sum(int(e["size"]) for e in m["files"].values()),
            best=best is not None and best[0] == name,
            run_id=str(m.get("run_id", "")),
        )
        for name, m in complete
        if run_id is None or m.get("run_id", "") == run_id
    ]
    return infos, incomplete


def list_checkpoints(run_uri: str | Path, run_id: str | None = None) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (or of its ``checkpoints`` URI), oldest first; [] if none."""
    if not open_store(run_uri).list():
        return []
    return scan_checkpoints(run_uri, run_id)[0]


def best_checkpoint(run_uri: str | Path, run_id: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """(name, metrics) that ``mark_best`` recorded for the run, or None (also when it names
    a checkpoint of another lineage than ``run_id``, or one that no longer exists)."""
    cstore = _checkpoints_store(run_uri)
    best = _read_best(cstore)
    if best is None or run_id is None:
        return best
    try:
        manifest = read_manifest(open_store(cstore.url(best[0])))
    except CheckpointError:
        return None
    return best if manifest.get("run_id", "") == run_id else None


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


def _named(uri: str, name: str) -> tuple[Store | None, str]:
    """(the run's checkpoints store, the name to pick in it), or (None, the checkpoint URI)
    when ``uri`` itself is a checkpoint."""
    store = open_store(uri)
    children = store.list()
    if MANIFEST in children:
        return None, store.uri
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
    if name != "latest" and not _NAME.fullmatch(name):
        raise CheckpointError(f"checkpoint name {name!r}: expected latest, best or {PREFIX}<updates>")
    return cstore, name


def _lineage(cstore: Store, run_id: str | None) -> list[str]:
    return [n for n, m in _manifests(cstore)[0] if run_id is None or m.get("run_id", "") == run_id]


def _none_complete(uri: str, cstore: Store, run_id: str | None) -> CheckpointError:
    of = "" if run_id is None else f" of run id {run_id}"
    return CheckpointError(
        f"no checkpoint at {redact(uri)!r}: no complete checkpoint{of} under {redact(cstore.uri)!r} "
        "(expected a checkpoint, or a run with checkpoints/)"
    )


def resolve_checkpoint(path: str | Path, name: str = "latest", run_id: str | None = None) -> str:
    """The URI of a complete checkpoint.

    ``path`` is a checkpoint URI (``name`` is then ignored), or a run URI (or its
    ``checkpoints`` URI) in which ``name`` picks ``latest``, ``best`` or ``ckpt-<updates>``;
    ``latest`` is the last committed of the lineage ``run_id`` (of any when None).
    """
    uri = str(path).rstrip("/") or str(path)
    cstore, name = _named(uri, name)
    if cstore is None:
        return name
    if name == "latest":
        lineage = _lineage(cstore, run_id)
        if not lineage:
            raise _none_complete(uri, cstore, run_id)
        return cstore.url(lineage[-1])
    target = open_store(cstore.url(name))
    if not target.list():
        available = ", ".join(n for n in cstore.list() if _NAME.fullmatch(n)) or "none"
        raise CheckpointError(f"no checkpoint {name!r} in {redact(cstore.uri)!r} (there: {available})")
    read_manifest(target)  # raises if incomplete
    return target.uri


def newest_verified(path: str | Path, name: str = "latest", run_id: str | None = None) -> tuple[str, list[str]]:
    """(URI of a checkpoint whose every file verifies, why each newer one was skipped).

    With ``latest`` on a run, a checkpoint that fails verification is skipped for the next
    older one of the lineage; a checkpoint URI or an explicit name must verify itself.
    """
    uri = str(path).rstrip("/") or str(path)
    cstore, picked = _named(uri, name)
    if cstore is None or picked != "latest":
        chosen = resolve_checkpoint(path, name, run_id)
        verify(chosen)
        return chosen, []
    lineage = _lineage(cstore, run_id)
    if not lineage:
        raise _none_complete(uri, cstore, run_id)
    skipped: list[str] = []
    for candidate in reversed(lineage):
        try:
            verify(cstore.url(candidate))
        except CheckpointError as exc:
            skipped.append(f"skipped {candidate}: {exc}")
            continue
        return cstore.url(candidate), skipped
    raise CheckpointError(f"no checkpoint under {redact(cstore.uri)!r} verifies:\n  " + "\n  ".join(skipped))
