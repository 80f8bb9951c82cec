"""``convoy scale RUN --collectors N``: change the number of collectors of a running run."""

from __future__ import annotations

import argparse

from deploy.cli.base import CommandFailed, Subparsers, positive_int


def register(sub: Subparsers) -> None:
    sc = sub.add_parser("scale", help="change the number of collectors of a running run")
    sc.add_argument("run", help="the run's name (run.name, or the last part of run.out_dir)")
    sc.add_argument("--collectors", type=positive_int, required=True, help="collectors wanted (>= 1)")
    sc.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the local cluster)")
    sc.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds until they are live")
    sc.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from deploy.run.control import RunNotFound, scale

    try:
        status = scale(args.run, args.collectors, address=args.address, wait_s=args.wait)
    except RunNotFound as exc:
        raise CommandFailed(str(exc)) from exc
    live = status.get("collectors_live", "?")
    print(f"run {args.run!r}: collectors wanted {args.collectors}, live {live}")
    return 0
