"""A model-based test of run storage (hypothesis stateful testing): random sequences of
saves, writer kills, prunes, bit flips, run starts, resumes, listings and pulls against a
local path, ``memory://`` and (shorter) a real S3-protocol server, checking after every step:

1. every checkpoint a reader sees as complete verifies, unless the model flipped a bit in
   it, and then verification names it;
2. the newest complete checkpoint of every run is still there (only a run's own pruning
   removes its checkpoints, and never its newest); another run's checkpoints are untouched;
3. ``latest`` of each run is that run's newest, and the newest that verifies skips exactly
   the run's newer corrupt ones.

A killed writer is a store that raises after ``k`` of its writes, renames and removals (a
process that dies runs no more of them). Several runs write to the same directory: a second
fresh run is refused by the directory check (asserted), and the model then lets it write
anyway, as a racing starter or an old convoy would, to check that runs stay isolated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from common import storage
from common.config import ConfigError
from common.storage import FsspecStore, LocalStore, Store, open_store
from deploy.run.resolve import check_out_dir
from learner.checkpoint import pull_checkpoint
from learner.checkpoint_store import (
    MANIFEST,
    CheckpointError,
    commit_checkpoint,
    newest_verified,
    prune,
    resolve_checkpoint,
    scan_checkpoints,
    verify,
)
from tests.s3server import S3Endpoint


class Killed(Exception):
    """The simulated writer process died."""


class Budget:
    def __init__(self, writes: int | None) -> None:
        self.left = writes

    def spend(self) -> None:
        if self.left is None:
            return
        if self.left <= 0:
            raise Killed
        self.left -= 1


class KillableLocal(LocalStore):
    def __init__(self, root: str, budget: Budget) -> None:
        super().__init__(root)
        self.budget = budget

    def write_bytes(self, key: str, data: bytes) -> None:
        self.budget.spend()
        super().write_bytes(key, data)

    def rename(self, src: str, dst: str) -> None:
        self.budget.spend()
        super().rename(src, dst)

    def remove(self, key: str) -> None:
        self.budget.spend()
        super().remove(key)


class KillableFsspec(FsspecStore):
    def __init__(self, uri: str, budget: Budget) -> None:
        super().__init__(uri)
        self.budget = budget

    def write_bytes(self, key: str, data: bytes) -> None:
        self.budget.spend()
        super().write_bytes(key, data)

    def write_many(self, items: dict[str, bytes]) -> None:
        for key, data in items.items():  # one at a time, so a kill can land between any two
            self.write_bytes(key, data)

    def remove(self, key: str) -> None:
        self.budget.spend()
        super().remove(key)


def _payload(run_id: str, updates: int, variant: int) -> dict[str, bytes]:
    return {
        "weights.bin": uuid.uuid5(uuid.NAMESPACE_OID, f"{run_id}/{updates}/{variant}").bytes * 8,
        "state.json": json.dumps({"run": run_id, "updates": updates, "variant": variant}).encode(),
    }


def _stager(files: dict[str, bytes]) -> Callable[[Path], None]:
    def stage(directory: Path) -> None:
        for name, data in files.items():
            (directory / name).write_bytes(data)

    return stage


def machine(new_root: Callable[[], str], drop_root: Callable[[str], None]) -> type[RuleBasedStateMachine]:
    class RunStorage(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.root = new_root()
            self.ckpts = storage.join(self.root, "checkpoints")
            self.runs: dict[str, int] = {}  # run id -> the updates its writer is at
            self.model: dict[str, tuple[str, int, int]] = {}  # name -> (run id, updates, commit order)
            self.corrupt: set[str] = set()
            self.seq = 0

        def teardown(self) -> None:
            drop_root(self.root)

        # ----- helpers -------------------------------------------------------------------

        def _store(self, budget: Budget) -> Store:
            if storage.protocol(self.ckpts) == "local":
                return KillableLocal(self.ckpts, budget)
            return KillableFsspec(self.ckpts, budget)

        def _actual(self) -> dict[str, str]:
            if not open_store(self.root).list():
                return {}
            infos, _ = scan_checkpoints(self.root)
            return {c.name: c.run_id for c in infos}

        def _newest(self, run_id: str, exclude: set[str] | None = None) -> str | None:
            """The run's last committed checkpoint (not one in ``exclude``)."""
            own = [(s, n) for n, (r, _, s) in self.model.items() if r == run_id and n not in (exclude or set())]
            return max(own)[1] if own else None

        def _sync(self, actor: str | None) -> None:
            """Compare storage with the model after an operation by run ``actor``, then adopt it."""
            actual = self._actual()
            for name, (run_id, _, _) in self.model.items():
                if run_id != actor:
                    assert actual.get(name) == run_id, f"{name} of run {run_id} changed by run {actor}"
            for run_id in self.runs:
                newest = self._newest(run_id)
                # Only the run's own save may retire its newest, by committing a newer one first.
                replaced = run_id == actor and any(r == run_id and n not in self.model for n, r in actual.items())
                assert newest is None or actual.get(newest) == run_id or replaced, f"newest {newest} of {run_id} gone"
            for name, run_id in actual.items():
                if name not in self.model:
                    assert run_id == actor, f"{name} of {run_id} appeared in an operation of {actor}"
                    manifest = open_store(storage.join(self.ckpts, name)).read_bytes(MANIFEST)
                    updates = int(json.loads(manifest)["updates"])
                    self.seq += 1
                    self.model[name] = (run_id, updates, self.seq)
            self.model = {n: v for n, v in self.model.items() if n in actual}
            self.corrupt &= set(self.model)

        def _check_refused_fresh(self, run_id: str) -> None:
            try:
                check_out_dir(self.root, run_id, fresh=True)
            except ConfigError as exc:
                assert "--resume" in str(exc)
                return
            assert not self.model, "a fresh run accepted a directory that holds a run"

        # ----- operations ----------------------------------------------------------------

        @initialize()
        def first_run(self) -> None:
            self._check_refused_fresh("first")
            self.runs["first"] = 0

        @rule()
        def start_second_run(self) -> None:
            run_id = f"run{len(self.runs)}"
            self._check_refused_fresh(run_id)
            self.runs[run_id] = 0  # and it writes anyway (a racing starter): runs stay isolated

        @rule(
            pick=st.integers(0, 10),
            step=st.integers(0, 3),
            variant=st.integers(0, 1),
            kill_after=st.none() | st.integers(0, 7),
            keep=st.integers(1, 3),
        )
        def save(self, pick: int, step: int, variant: int, kill_after: int | None, keep: int) -> None:
            run_id = sorted(self.runs)[pick % len(self.runs)]
            updates = self.runs[run_id] + step
            files = _payload(run_id, updates, variant)
            try:
                store = self._store(Budget(kill_after))
                uri = commit_checkpoint(store, updates, _stager(files), keep=keep, run_id=run_id)
            except Killed:
                self._sync(run_id)
                return
            self.runs[run_id] = updates
            self._sync(run_id)
            # What was written (or was already there, identical) is the run's newest.
            name = storage.basename(uri)
            assert self._newest(run_id) == name
            if name not in self.corrupt:
                store = open_store(uri)
                assert {f: store.read_bytes(f) for f in files} == files

        @rule(pick=st.integers(0, 10), keep=st.integers(1, 3))
        def prune_run(self, pick: int, keep: int) -> None:
            run_id = sorted(self.runs)[pick % len(self.runs)]
            before = sorted((s, n) for n, (r, _, s) in self.model.items() if r == run_id)
            prune(self.ckpts, keep, run_id)
            self._sync(run_id)
            after = sorted((s, n) for n, (r, _, s) in self.model.items() if r == run_id)
            assert after == before[-keep:]

        @rule(pick=st.integers(0, 1000), byte=st.integers(0, 10_000), bit=st.integers(0, 7))
        def flip_a_bit(self, pick: int, byte: int, bit: int) -> None:
            if not self.model:
                return
            name = sorted(self.model)[pick % len(self.model)]
            store = open_store(storage.join(self.ckpts, name))
            file = sorted(_payload("", 0, 0))[pick % 2]
            data = bytearray(store.read_bytes(file))
            data[byte % len(data)] ^= 1 << bit
            store.write_bytes(file, bytes(data))
            self.corrupt.add(name)
            self._sync(None)

        @rule(pick=st.integers(0, 10))
        def resume(self, pick: int) -> None:
            run_id = sorted(self.runs)[pick % len(self.runs)]
            others = {r for r, _, _ in self.model.values() if r != run_id}
            try:
                check_out_dir(self.root, run_id, fresh=False)
                assert not others, "a resume accepted a directory that holds other runs"
            except ConfigError:
                assert others
            expected = self._newest(run_id, exclude=self.corrupt)
            try:
                uri, skipped = newest_verified(self.root, run_id=run_id)
            except CheckpointError:
                assert expected is None
                return
            assert storage.basename(uri) == expected
            newer_corrupt = {
                n for n in self.corrupt if self.model[n][0] == run_id and self.model[n][2] > self.model[expected][2]
            }
            assert {s.split(":", 1)[0].removeprefix("skipped ") for s in skipped} == newer_corrupt
            self.runs[run_id] = self.model[expected][1]  # the resumed writer continues from there

        @rule()
        def list_all(self) -> None:
            names = [] if not open_store(self.root).list() else [c.name for c in scan_checkpoints(self.root)[0]]
            assert sorted(names) == sorted(self.model)
            for run_id in self.runs:
                if names:
                    own = [c.name for c in scan_checkpoints(self.root, run_id)[0]]
                    assert sorted(own) == sorted(n for n, (r, _, _) in self.model.items() if r == run_id)

        @rule(pick=st.integers(0, 1000))
        def pull(self, pick: int) -> None:
            if not self.model:
                return
            name = sorted(self.model)[pick % len(self.model)]
            with tempfile.TemporaryDirectory() as tmp:
                target = Path(tmp) / "pulled"
                try:
                    pull_checkpoint(self.root, name, target)
                except CheckpointError:
                    assert name in self.corrupt
                    assert not target.exists() and len(list(Path(tmp).iterdir())) == 0
                    return
                assert name not in self.corrupt
                source = open_store(storage.join(self.ckpts, name))
                for file in _payload("", 0, 0):
                    assert (target / file).read_bytes() == source.read_bytes(file)

        # ----- invariants ----------------------------------------------------------------

        @invariant()
        def complete_checkpoints_verify_unless_corrupted(self) -> None:
            for name in self.model:
                try:
                    verify(storage.join(self.ckpts, name))
                    assert name not in self.corrupt, f"{name} has a flipped bit but verifies"
                except CheckpointError as exc:
                    assert name in self.corrupt, f"{name} fails verification: {exc}"
                    assert name in str(exc)

        @invariant()
        def latest_of_each_run_is_its_own(self) -> None:
            for run_id in self.runs:
                newest = self._newest(run_id)
                if newest is None:
                    continue
                assert storage.basename(resolve_checkpoint(self.root, run_id=run_id)) == newest

    return RunStorage


def _settings(examples: int, steps: int) -> Any:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )


def test_run_storage_model_local(tmp_path: Path) -> None:
    def new_root() -> str:
        return str(Path(tempfile.mkdtemp(dir=tmp_path)) / "run")

    def drop(root: str) -> None:
        shutil.rmtree(Path(root).parent, ignore_errors=True)

    run_state_machine_as_test(machine(new_root, drop), settings=_settings(40, 25))


def test_run_storage_model_memory() -> None:
    def new_root() -> str:
        return f"memory://convoy-model-{uuid.uuid4().hex[:8]}/run"

    def drop(root: str) -> None:
        open_store(root).remove("")

    run_state_machine_as_test(machine(new_root, drop), settings=_settings(40, 25))


@pytest.mark.usefixtures("s3_endpoint")
def test_run_storage_model_s3(s3_endpoint: S3Endpoint) -> None:
    def new_root() -> str:
        return f"{s3_endpoint.uri}/model-{uuid.uuid4().hex[:8]}"

    def drop(root: str) -> None:
        open_store(root).remove("")

    run_state_machine_as_test(machine(new_root, drop), settings=_settings(4, 12))
