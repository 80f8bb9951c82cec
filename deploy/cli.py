"""The ``convoy`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from common.config import ConfigError, describe_keys, load_config


def default_config_path() -> str:
    local = Path("deploy/configs/local.yaml")
    if local.is_file():
        return str(local)
    return str(resources.files("deploy").joinpath("configs/local.yaml"))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convoy", description="Distributed TD3 for driving: collectors, Redis replay, a learner."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on the configured simulator")
    t.add_argument("--config", default=None, help="run config YAML (default: deploy/configs/local.yaml)")
    t.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest checkpoint (config from RUN_DIR/config.yaml unless --config)",
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.batch_size=128")

    e = sub.add_parser("evaluate", help="run a checkpoint's deterministic policy")
    e.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (newest checkpoint)")
    e.add_argument("--episodes", type=_positive_int, default=5, help="evaluation episodes (>= 1)")
    e.add_argument("--seed", type=int, default=1_000_003, help="seed of the first evaluation episode")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    b = sub.add_parser("bench", help="benchmarks: `convoy bench replay|learner [--json] ...`")
    b.add_argument("target", choices=("replay", "learner"))
    b.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options of the benchmark (see --help after the target)"
    )

    c = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    c.add_argument("--config", default=None)
    c.add_argument("--keys", action="store_true", help="list every key with its type, default and meaning")
    c.add_argument("--markdown", action="store_true", help="with --keys: as a Markdown table (the README's)")
    c.add_argument("overrides", nargs="*")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CONVOY_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "train":
            from deploy.driver import train

            if args.resume:
                config_path = args.config or str(Path(args.resume) / "config.yaml")
                train(load_config(config_path, args.overrides), resume=args.resume)
            else:
                train(load_config(args.config or default_config_path(), args.overrides))
        elif args.command == "evaluate":
            from deploy.evaluate import evaluate

            result = evaluate(args.checkpoint, args.episodes, seed=args.seed)
            if args.json:
                print(json.dumps(result))
            else:
                for k, v in result.items():
                    print(f"{k}: {v}")
        elif args.command == "bench":
            import importlib

            bench = importlib.import_module(f"deploy.bench_{args.target}")
            return int(bench.main(args.bench_args) or 0)
        elif args.command == "config":
            if args.keys and args.markdown:
                print("| key | type | default | meaning |\n|---|---|---|---|")
                for key, tp, default, doc in describe_keys():
                    shown = list(default) if isinstance(default, tuple) else default
                    print(f"| `{key}` | {tp} | `{shown!r}` | {doc} |")
            elif args.keys:
                for key, tp, default, doc in describe_keys():
                    print(f"{key} ({tp}, default {default!r}): {doc}")
            else:
                print(load_config(args.config or default_config_path(), args.overrides).to_yaml(), end="")
    except ConfigError as exc:
        print(f"convoy: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from learner.checkpoint import CheckpointError
        from learner.loop import NonFiniteError
        from replay_service.shards import ShardError

        if isinstance(exc, (CheckpointError, ShardError, NonFiniteError)):
            print(f"convoy: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
