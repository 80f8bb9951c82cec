"""What every command module of the ``convoy`` CLI shares."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

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


def print_result(result: Mapping[str, Any], as_json: bool, line: str = "{}: {}") -> None:
    """A command's result on stdout: one JSON object with ``--json`` (for scripts), else one
    ``line`` per key (``line`` formats the key and the value)."""
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(line.format(k, v))


def print_runs(result: Mapping[str, Any], as_json: bool) -> None:
    """A benchmark's result on stdout: one JSON object with ``--json``, else each of its
    ``runs`` on a line of its own."""
    if as_json:
        print(json.dumps(result))
    else:
        for r in result["runs"]:
            print(r)
