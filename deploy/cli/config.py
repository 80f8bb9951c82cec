"""``convoy config``, and the config a command runs with when none is given."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from common.config import ConfigError, ConvoyConfig, describe_keys, from_dict, load_config
from deploy.cli.base import Subparsers


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


def register(sub: Subparsers) -> None:
    c = sub.add_parser("config", help="print the resolved config, or every key with --keys")
    c.add_argument("--config", default=None)
    c.add_argument("--keys", action="store_true", help="list every key with its type, default and meaning")
    c.add_argument("--markdown", action="store_true", help="with --keys: a Markdown table (the docs)")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
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
    return 0
