"""The ``convoy`` command line: one module per command group (train, evaluate, bench,
checkpoints, scale, monitor, report, config), each registering its subparser(s) with the
function that runs it; :func:`main` parses and runs it."""

from deploy.cli.app import main
from deploy.cli.config import default_config_path, load_run_config

__all__ = ["default_config_path", "load_run_config", "main"]
