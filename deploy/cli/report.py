"""``convoy report RUN``: a PNG of a run's learning curves, from its TensorBoard events.

Top row against env steps, bottom row against wall-clock time: episode return and route
completion (training episodes, and evaluations where the run has them), env steps per
second and learner updates per second.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

from deploy.cli.base import CommandFailed, Subparsers

PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("episode return", [("return/train", "training"), ("return/eval", "evaluation")]),
    ("route completion", [("route_completion/train", "training"), ("route_completion/eval", "evaluation")]),
    ("env steps / s", [("throughput/env_steps_per_s", "all collectors")]),
    ("learner updates / s", [("throughput/updates_per_s", "learner")]),
]


def register(sub: Subparsers) -> None:
    rp = sub.add_parser("report", help="write a PNG of a run's learning curves (from RUN/tensorboard)")
    rp.add_argument("run", metavar="RUN", help="run storage URI (run.out_dir): a local path, s3://, gs://, file://")
    rp.add_argument("--out", default=None, metavar="PNG", help="where to write it (default RUN/curves.png)")
    rp.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        print(f"wrote {write_report(args.run, args.out)}")
    except (FileNotFoundError, ValueError) as exc:
        raise CommandFailed(str(exc)) from exc
    return 0


def write_report(run_uri: str | Path, out: str | Path | None = None) -> str:
    """Plot the curves of ``run_uri``; writes ``out`` (default ``<run>/curves.png``) and returns it."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from common import storage
    from deploy.run.curves import WALL_TAG, read_curves

    curves = read_curves(run_uri)
    plotted = [tag for _, series in PANELS for tag, _ in series if curves.get(tag)]
    if not plotted:
        raise ValueError(
            f"{storage.redact(str(run_uri))}: the TensorBoard events hold none of "
            f"{', '.join(tag for _, s in PANELS for tag, _ in s)}; was the run too short for a progress tick?"
        )
    wall = dict(curves.get(WALL_TAG, []))  # env steps -> elapsed seconds
    fig, axes = plt.subplots(2, len(PANELS), figsize=(4.2 * len(PANELS), 7), squeeze=False)
    for col, (title, series) in enumerate(PANELS):
        top, bottom = axes[0][col], axes[1][col]
        for tag, label in series:
            points = [(s, v) for s, v in curves.get(tag, []) if math.isfinite(v)]
            if not points:
                continue
            style = {"marker": "o", "linestyle": "-"} if tag.endswith("/eval") else {}
            top.plot([s for s, _ in points], [v for _, v in points], label=label, **style)
            timed = [(wall[s], v) for s, v in points if s in wall]
            bottom.plot([t for t, _ in timed], [v for _, v in timed], label=label, **style)
        top.set_title(title)
        top.set_xlabel("env steps")
        bottom.set_xlabel("wall-clock time (s)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.ticklabel_format(axis="y", useOffset=False)  # a steady rate reads as 50, not 1e-4 + 5e1
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
    fig.suptitle(f"convoy run {storage.basename(str(run_uri))}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    target = str(out) if out is not None else storage.join(str(run_uri), "curves.png")
    storage.write_bytes(target, buf.getvalue())
    return target
