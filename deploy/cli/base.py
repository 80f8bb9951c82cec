"""What every command module of the ``convoy`` CLI shares."""

from __future__ import annotations

import argparse

# The object ``add_subparsers`` returns; each command module registers its parser(s) on it.
Subparsers = argparse._SubParsersAction


class CommandFailed(Exception):
    """An expected failure of a command (a run that is not there, a missing binary, a run
    without curves): ``convoy`` prints its message on one line and exits with 1."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value
