"""What every command module of the ``convoy`` CLI shares."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

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


_result_out: TextIO | None = None  # where results go while ``json_stdout`` holds stdout


@contextlib.contextmanager
def json_stdout(enabled: bool) -> Iterator[None]:
    """With ``--json``, stdout carries the one JSON object and nothing else: while the command
    runs, everything else written to stdout (Ray forwards its raylet's and workers' lines
    there, child processes inherit file descriptor 1) goes to stderr."""
    global _result_out
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real_stdout, sys.stdout = sys.stdout, sys.stderr
    _result_out = os.fdopen(os.dup(saved), "w")
    try:
        yield
    finally:
        _result_out.close()
        _result_out = None
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = real_stdout


def print_json(result: Mapping[str, Any]) -> None:
    """One JSON object on the real stdout (see :func:`json_stdout`)."""
    out = _result_out or sys.stdout
    print(json.dumps(result), file=out, flush=True)


def print_result(result: Mapping[str, Any], as_json: bool, line: str = "{}: {}") -> None:
    """A command's result on stdout: one JSON object with ``--json`` (for scripts), else one
    ``line`` per key (``line`` formats the key and the value)."""
    if as_json:
        print_json(result)
    else:
        for k, v in result.items():
            print(line.format(k, v))


def print_runs(result: Mapping[str, Any], as_json: bool) -> None:
    """A benchmark's result on stdout: one JSON object with ``--json``, else each of its
    ``runs`` on a line of its own."""
    if as_json:
        print_json(result)
    else:
        for r in result["runs"]:
            print(r)
