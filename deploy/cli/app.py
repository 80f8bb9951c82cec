"""The ``convoy`` parser, and the one place a command's failure becomes a message and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from common.config import ConfigError
from deploy.cli import bench, checkpoints, config, evaluate, monitor, report, scale, train
from deploy.cli.base import CommandFailed

# In the order ``convoy --help`` lists them.
COMMANDS = (train, evaluate, bench, checkpoints, scale, monitor, report, config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convoy", description="Distributed TD3 for driving: collectors, Redis replay, a learner."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``convoy`` command; exit code 2 on a config error, 1 on a known failure."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CONVOY_LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"convoy: config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if isinstance(exc, _known_failures()):
            print(f"convoy: {exc}", file=sys.stderr)
            return 1
        raise


def _known_failures() -> tuple[type[Exception], ...]:
    """Failures that need no traceback; imported only when a command failed (they pull in torch)."""
    from common.storage import StorageError
    from learner.checkpoint import CheckpointError
    from learner.loop import NonFiniteError
    from replay_service.errors import ShardError

    return (CommandFailed, CheckpointError, ShardError, NonFiniteError, StorageError)
