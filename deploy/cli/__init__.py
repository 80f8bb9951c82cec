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

from common.config import ConfigError, ConvoyConfig, describe_keys, from_dict, load_config

CPU_PROFILE_NOTE = (
    "no CUDA GPU: using the CPU profile deploy/configs/local-cpu.yaml (vector-only lane following, which learns "
    "within minutes on a few cores; pixels need a GPU: --config deploy/configs/local.yaml)"
)


def default_config_path(gpu: bool | None = None) -> str:
    """local.yaml (pixels) where a CUDA GPU exists, else the CPU profile local-cpu.yaml."""
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    name = "local.yaml" if gpu else "local-cpu.yaml"
    local = Path("deploy/configs") / name
    if local.is_file():
        return str(local)
    return str(resources.files("deploy").joinpath(f"configs/{name}"))


def load_run_config(run: str, overrides: Sequence[str]) -> ConvoyConfig:
    """The config a run (or checkpoint) saved, path or URI, with overrides applied."""
    import yaml

    from common import storage

    uri = storage.join(run, "config.yaml")
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ConfigError(f"no config.yaml at {storage.redact(uri)!r}: is {run!r} a run or checkpoint?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{storage.redact(uri)!r} is not valid YAML: {exc}") from None
    return from_dict(data, overrides)


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
        help="continue a run from its newest checkpoint (config from RUN_DIR/config.yaml unless --config)",
    )
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.batch_size=128")

    e = sub.add_parser("evaluate", help="run a checkpoint's deterministic policy")
    e.add_argument(
        "--checkpoint",
        required=True,
        metavar="URI",
        help="a checkpoint, or a run (then --name picks one); a local path or a URI (s3://, gs://, file://)",
    )
    e.add_argument("--name", default="latest", help="in a run: latest (default), best, or ckpt-<updates>")
    e.add_argument("--episodes", type=_positive_int, default=5, help="evaluation episodes (>= 1)")
    e.add_argument("--seed", type=int, default=1_000_003, help="seed of the first evaluation episode")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument(
        "--video", default=None, metavar="PATH.mp4", help="record every episode to this MP4 (local path or URI)"
    )

    b = sub.add_parser("bench", help="benchmarks: `convoy bench replay|learner|learning [--json] ...`")
    b.add_argument("target", choices=("replay", "learner", "learning"))
    b.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="options of the benchmark (see --help after the target)"
    )

    ck = sub.add_parser("checkpoints", help="list or pull a run's checkpoints (also while it trains)")
    ck_sub = ck.add_subparsers(dest="checkpoints_command", required=True)
    ckl = ck_sub.add_parser("list", help="complete checkpoints of a run: name, updates, env steps, time, size")
    ckl.add_argument("run", metavar="RUN", help="run storage URI (run.out_dir): a local path, s3://, gs://, file://")
    ckl.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    ckp = ck_sub.add_parser("pull", help="download a checkpoint and verify every sha256 against its manifest")
    ckp.add_argument("run", metavar="RUN", help="run storage URI (run.out_dir), or a checkpoint URI")
    ckp.add_argument("--checkpoint", default="latest", metavar="NAME", help="latest (default), best, or ckpt-<updates>")
    ckp.add_argument(
        "--to", required=True, metavar="DIR", help="local target: DIR/<name> if DIR is a directory, else DIR itself"
    )

    sc = sub.add_parser("scale", help="change the number of collectors of a running run")
    sc.add_argument("run", help="the run's name (run.name, or the last part of run.out_dir)")
    sc.add_argument("--collectors", type=_positive_int, required=True, help="collectors wanted (>= 1)")
    sc.add_argument("--address", default="auto", help="Ray cluster address (default: auto, the local cluster)")
    sc.add_argument("--wait", type=float, default=0.0, metavar="S", help="wait up to S seconds until they are live")

    mo = sub.add_parser("monitor", help="run Prometheus for the local Ray cluster (deploy/monitoring/prometheus.yml)")
    mo.add_argument("--port", type=_positive_int, default=9090, help="Prometheus listen port (default 9090)")
    mo.add_argument("--host", default="127.0.0.1", help="Prometheus listen address (default 127.0.0.1)")
    mo.add_argument("--data", default="runs/prometheus", metavar="D", help="Prometheus data (default: runs/prometheus)")
    mo.add_argument("--ray-temp-dir", default=None, metavar="DIR", help="Ray's temp dir (default $RAY_TMPDIR or /tmp)")
    mo.add_argument("--scrape-interval", default=None, metavar="DUR", help="e.g. 2s (default: the shipped 10s)")

    rp = sub.add_parser("report", help="write a PNG of a run's learning curves (from RUN/tensorboard)")
    rp.add_argument("run", metavar="RUN", help="run storage URI (run.out_dir): a local path, s3://, gs://, file://")
    rp.add_argument("--out", default=None, metavar="PNG", help="where to write it (default RUN/curves.png)")

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
            from deploy.run.driver import train

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
                summary = train(load_config(config_path, args.overrides))
            if str(summary.get("exit_reason", "")).startswith("gave_up"):
                return 1
        elif args.command == "scale":
            from deploy.run.control import RunNotFound, scale

            try:
                status = scale(args.run, args.collectors, address=args.address, wait_s=args.wait)
            except RunNotFound as exc:
                print(f"convoy: {exc}", file=sys.stderr)
                return 1
            live = status.get("collectors_live", "?")
            print(f"run {args.run!r}: collectors wanted {args.collectors}, live {live}")
        elif args.command == "evaluate":
            from deploy.cli.evaluate import evaluate

            result = evaluate(args.checkpoint, args.episodes, seed=args.seed, name=args.name, video=args.video)
            if args.json:
                print(json.dumps(result))
            else:
                for k, v in result.items():
                    print(f"{k}: {v}")
        elif args.command == "checkpoints":
            from deploy.cli.checkpoints import list_command, pull_command

            if args.checkpoints_command == "list":
                return list_command(args.run, args.json)
            return pull_command(args.run, args.checkpoint, args.to)
        elif args.command == "monitor":
            from deploy.cli.monitor import MonitorError, monitor

            try:
                return monitor(args.port, args.host, args.data, args.ray_temp_dir, args.scrape_interval)
            except MonitorError as exc:
                print(f"convoy: {exc}", file=sys.stderr)
                return 1
        elif args.command == "report":
            from deploy.cli.report import write_report

            try:
                print(f"wrote {write_report(args.run, args.out)}")
            except (FileNotFoundError, ValueError) as exc:
                print(f"convoy: {exc}", file=sys.stderr)
                return 1
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
        from common.storage import StorageError
        from learner.checkpoint import CheckpointError
        from learner.loop import NonFiniteError
        from replay_service.shards import ShardError

        if isinstance(exc, (CheckpointError, ShardError, NonFiniteError, StorageError)):
            print(f"convoy: {exc}", file=sys.stderr)
            return 1
        raise
    return 0
