"""``convoy train``: a run from a config, or the continuation of one from its newest checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import load_config
from deploy.cli.base import Subparsers
from deploy.cli.config import default_config_path, load_run_config

CPU_PROFILE_NOTE = (
    "no CUDA GPU: using the CPU profile deploy/configs/local-cpu.yaml (vector-only lane following, which learns "
    "within minutes on a few cores; pixels need a GPU: --config deploy/configs/local.yaml)"
)


def register(sub: Subparsers) -> None:
    t = sub.add_parser("train", help="train on the configured simulator")
    t.add_argument(
        "--config",
        default=None,
        help="run config YAML (default: deploy/configs/local.yaml with a CUDA GPU, else the CPU profile "
        "local-cpu.yaml)",
    )
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest checkpoint that verifies, in the same directory and lineage "
        "(config from RUN_DIR/config.yaml unless --config)",
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.batch_size=128")
    t.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    """Exit code 0 when the run ended on its budget or by Ctrl-C/SIGTERM (``summary.json`` says
    which), 1 when it gave up (a component kept failing) or failed, 130 when a signal came
    before the run was placed (nothing to summarize)."""
    from deploy.run.driver import train
    from deploy.run.resolve import with_out_dir

    try:
        if args.resume:
            cfg = (
                load_config(args.config, args.overrides)
                if args.config
                else load_run_config(args.resume, args.overrides)
            )
            summary = train(cfg, resume=args.resume)
        else:
            config_path = args.config or default_config_path()
            if config_path.endswith("local-cpu.yaml") and not args.config:
                print(CPU_PROFILE_NOTE, flush=True)
            cfg = load_config(config_path, args.overrides)
            # Each fresh run gets its own directory unless run.out_dir names one; nothing resumes
            # implicitly (a directory that holds a run is refused, naming --resume).
            cfg = with_out_dir(cfg, Path(config_path).stem)
            summary = train(cfg)
    except KeyboardInterrupt:
        print("interrupted before the run started; nothing to summarize", file=sys.stderr, flush=True)
        return 130
    return 1 if str(summary.get("exit_reason", "")).startswith("gave_up") else 0
