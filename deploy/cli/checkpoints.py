"""``convoy checkpoints list|pull``: plain reads of a run's storage URI, safe while it trains."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from deploy.cli.base import Subparsers

if TYPE_CHECKING:
    from learner.checkpoint import CheckpointInfo


def register(sub: Subparsers) -> None:
    ck = sub.add_parser("checkpoints", help="list or pull a run's checkpoints (also while it trains)")
    ck_sub = ck.add_subparsers(dest="checkpoints_command", required=True)
    ckl = ck_sub.add_parser("list", help="complete checkpoints of a run: name, updates, env steps, time, size")
    ckl.add_argument("run", metavar="RUN", help="run storage URI (run.out_dir): a local path, s3://, gs://, file://")
    ckl.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    ckl.add_argument(
        "--verify",
        action="store_true",
        help="read every file and check its sha256 against the manifest; a checkpoint that fails is marked "
        "CORRUPT (exit code 1)",
    )
    ckl.set_defaults(func=_list)
    ckp = ck_sub.add_parser("pull", help="download a checkpoint and verify every sha256 against its manifest")
    ckp.add_argument("run", metavar="RUN", help="run storage URI (run.out_dir), or a checkpoint URI")
    ckp.add_argument("--checkpoint", default="latest", metavar="NAME", help="latest (default), best, or ckpt-<updates>")
    ckp.add_argument(
        "--to", required=True, metavar="DIR", help="local target: DIR/<name> if DIR is a directory, else DIR itself"
    )
    ckp.set_defaults(func=_pull)


def _list(args: argparse.Namespace) -> int:
    return list_command(args.run, args.json, verify=args.verify)


def _pull(args: argparse.Namespace) -> int:
    return pull_command(args.run, args.checkpoint, args.to)


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


def format_table(infos: list[CheckpointInfo], problems: dict[str, str] | None = None) -> str:
    problems = problems or {}
    rows = [("NAME", "UPDATES", "ENV STEPS", "WEIGHTS", "TIME (UTC)", "SIZE", "")]
    for c in infos:
        marks = ["best"] if c.best else []
        if c.name in problems:
            marks.append("CORRUPT")
        rows.append(
            (
                c.name,
                str(c.updates),
                str(c.env_steps),
                f"v{c.weights_version}",
                _when(c.time),
                _size(c.size_bytes),
                " ".join(marks),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {1, 2, 5}
    lines = []
    for r in rows:
        cells = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _verify_all(infos: list[CheckpointInfo]) -> dict[str, str]:
    """Why each checkpoint that fails verification fails, by name."""
    from learner.checkpoint import CheckpointError, verify

    problems: dict[str, str] = {}
    for c in infos:
        try:
            verify(c.uri)
        except CheckpointError as exc:
            problems[c.name] = str(exc)
    return problems


def list_command(
    run: str, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr, verify: bool = False
) -> int:
    """Exit code 1 when ``verify`` found a checkpoint whose files do not match its manifest."""
    from common.storage import redact
    from learner.checkpoint import CheckpointError, scan_checkpoints

    try:
        infos, incomplete = scan_checkpoints(run)
        problems = _verify_all(infos) if verify else {}
    except OSError as exc:  # unreachable store, no permission, missing bucket...
        raise CheckpointError(f"cannot read run {redact(run)!r}: {exc}") from None
    if as_json:
        rows = [{**asdict(c), **({"verified": c.name not in problems} if verify else {})} for c in infos]
        print(json.dumps(rows, indent=2), file=out)
    elif infos:
        print(format_table(infos, problems), file=out)
    else:
        print(f"no complete checkpoint in {redact(run)} yet", file=err)
    for name, why in problems.items():
        print(f"CORRUPT {name}: {why}", file=err)
    if incomplete:
        print(
            f"incomplete (being written, or left by a writer that died; not listed): {', '.join(incomplete)}",
            file=err,
        )
    return 1 if problems else 0


def pull_command(run: str, name: str, to: str, out: TextIO = sys.stdout) -> int:
    from common.storage import redact
    from learner.checkpoint import MANIFEST, CheckpointError, pull_checkpoint

    try:
        target = pull_checkpoint(run, name, Path(to))
    except OSError as exc:
        raise CheckpointError(f"cannot pull from {redact(run)!r}: {exc}") from None
    pulled = json.loads((target / MANIFEST).read_text())["name"]
    print(f"pulled {pulled} of {redact(run)} to {target} (every sha256 matches its manifest)", file=out)
    return 0
