"""``convoy bench replay|learner|learning|peers|collector|scale [--json] ...``: the benchmarks of deploy/bench.

Each benchmark parses its own options, so only the one asked for is imported (they pull in
torch, Redis and the simulators).
"""

from __future__ import annotations

import argparse
import importlib

from deploy.cli.base import Subparsers, json_stdout

BENCHMARKS = {
    "replay": "deploy.bench.replay",
    "learner": "deploy.bench.learner",
    "learning": "deploy.bench.learning",
    "peers": "deploy.bench.peers",
    "collector": "deploy.bench.collector",
    "scale": "deploy.bench.scale",
}


def register(sub: Subparsers) -> None:
    b = sub.add_parser(
        "bench", help="benchmarks: `convoy bench replay|learner|learning|peers|collector|scale [--json] ...`"
    )
    b.add_argument("target", choices=tuple(BENCHMARKS))
    b.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options of the benchmark (see --help after the target)"
    )
    b.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    bench = importlib.import_module(BENCHMARKS[args.target])
    with json_stdout("--json" in args.bench_args):
        return int(bench.main(args.bench_args) or 0)
