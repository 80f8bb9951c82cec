"""Learning curves in the run directory: TensorBoard event files indexed by env steps.

``<run.out_dir>/tensorboard/`` holds the events, so ``tensorboard --logdir RUN`` works on a
local run directory. The step of every scalar is the run's env step count (what RL curves
are plotted against); ``time/wall_seconds`` records the run's elapsed time at that step, so
curves can also be drawn against wall-clock time (``convoy report``).

For a run URI that is not local (``s3://``, ``gs://``, ``memory://``), events are written to
a local temporary directory and uploaded through common/storage.py every
``upload_every_s`` and on :meth:`CurveWriter.close` (whole objects: an object store has no
append).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common import storage

log = logging.getLogger(__name__)

TB_DIR = "tensorboard"
WALL_TAG = "time/wall_seconds"


class CurveWriter:
    """Scalars of one run, written as TensorBoard events under ``<run_uri>/tensorboard``."""

    def __init__(self, run_uri: str | Path, upload_every_s: float = 60.0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_uri = str(run_uri)
        self.uri = storage.join(self.run_uri, TB_DIR)
        self.local = storage.protocol(self.run_uri) == "local"
        if self.local:
            self._dir = storage.LocalStore(self.uri).root
            self._tmp: Path | None = None
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="convoy-tb-"))
            self._dir = self._tmp
        self._dir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = SummaryWriter(log_dir=str(self._dir), flush_secs=10)
        self.upload_every_s = upload_every_s
        self._next_upload = time.monotonic() + upload_every_s
        self.points = 0

    def add(self, scalars: Mapping[str, float], env_steps: int, wall_seconds: float) -> None:
        """One point of every finite scalar at step ``env_steps``; NaN (no value yet) is skipped."""
        for tag, value in scalars.items():
            v = float(value)
            if math.isfinite(v):
                self._writer.add_scalar(tag, v, global_step=int(env_steps))
        self._writer.add_scalar(WALL_TAG, float(wall_seconds), global_step=int(env_steps))
        self.points += 1
        if not self.local and time.monotonic() >= self._next_upload:
            self.upload()

    def upload(self) -> None:
        """Copy the event files to the run URI (non-local runs); a failed upload is retried later."""
        if self.local:
            return
        self._next_upload = time.monotonic() + self.upload_every_s
        self._writer.flush()
        store = storage.open_store(self.uri)
        try:
            store.write_many({p.name: p.read_bytes() for p in self._dir.iterdir() if p.is_file()})
        except Exception as exc:  # storage outage: curves are kept locally and uploaded next time
            log.warning("uploading TensorBoard events to %s failed: %s", storage.redact(self.uri), exc)

    def close(self) -> None:
        self._writer.close()
        try:
            self.upload()
        finally:
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)


def read_curves(run_uri: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's TensorBoard events: tag -> [(env_steps, value), ...] by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = storage.join(str(run_uri), TB_DIR)
    with tempfile.TemporaryDirectory(prefix="convoy-tb-read-") as tmp:
        if storage.protocol(uri) == "local":
            src = storage.LocalStore(uri).root
            if not src.is_dir():
                raise FileNotFoundError(f"{uri}: no TensorBoard events (is {run_uri} a convoy run directory?)")
            files = [p for p in src.iterdir() if p.is_file()]
            for p in files:
                shutil.copy(p, Path(tmp) / p.name)
        else:
            store = storage.open_store(uri)
            names = store.list()
            if not names:
                raise FileNotFoundError(f"{storage.redact(uri)}: no TensorBoard events")
            for name in names:
                if store.list(name):  # a folder: another TensorBoard run (eval_video/), no scalars
                    continue
                (Path(tmp) / Path(name).name).write_bytes(store.read_bytes(name))
        acc = EventAccumulator(tmp, size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        out: dict[str, list[tuple[int, float]]] = {}
        for tag in acc.Tags().get("scalars", []):
            points = sorted((e.step, e.value) for e in acc.Scalars(tag))
            out[tag] = points
        return out
