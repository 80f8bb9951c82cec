"""``convoy checkpoints list|pull``: plain reads of a run's storage URI, safe while it trains."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from common.storage import redact
from learner.checkpoint import MANIFEST, CheckpointError, CheckpointInfo, pull_checkpoint, scan_checkpoints


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + "Z"


def format_table(infos: list[CheckpointInfo]) -> str:
    rows = [("NAME", "UPDATES", "ENV STEPS", "WEIGHTS", "TIME (UTC)", "SIZE", "")]
    for c in infos:
        rows.append(
            (
                c.name,
                str(c.updates),
                str(c.env_steps),
                f"v{c.weights_version}",
                _when(c.time),
                _size(c.size_bytes),
                "best" if c.best else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 2, 5}
    lines = []
    for r in rows:
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def list_command(run: str, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        infos, incomplete = scan_checkpoints(run)
    except OSError as exc:  # unreachable store, no permission, missing bucket...
        raise CheckpointError(f"cannot read run {redact(run)!r}: {exc}") from None
    if as_json:
        print(json.dumps([asdict(c) for c in infos], indent=2), file=out)
    elif infos:
        print(format_table(infos), file=out)
    else:
        print(f"no complete checkpoint in {redact(run)} yet", file=err)
    if incomplete:
        print(
            f"incomplete (being written, or left by a writer that died; not listed): {', '.join(incomplete)}",
            file=err,
        )
    return 0


def pull_command(run: str, name: str, to: str, out: TextIO = sys.stdout) -> int:
    try:
        target = pull_checkpoint(run, name, Path(to))
    except OSError as exc:
        raise CheckpointError(f"cannot pull from {redact(run)!r}: {exc}") from None
    pulled = json.loads((target / MANIFEST).read_text())["name"]
    print(f"pulled {pulled} of {redact(run)} to {target} (every sha256 matches its manifest)", file=out)
    return 0
