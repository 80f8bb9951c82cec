"""``--json`` output of the benchmarks: stdout holds the one JSON object, whatever else is
printed meanwhile (Ray forwards its raylet's warnings to the driver's stdout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, subprocess, sys
from deploy.cli.base import json_stdout, print_json, print_runs
with json_stdout(True):
    print("(raylet) WARNING: a line Ray forwards")
    os.write(1, b"written to file descriptor 1\\n")
    subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
    print_runs({"runs": [{"x": 1}]}, True)
print("after: stdout is stdout again")
with json_stdout(False):
    print_json({"plain": True})
"""


def test_json_stdout_keeps_stdout_for_the_result_and_sends_the_rest_to_stderr() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    lines = proc.stdout.splitlines()
    assert [json.loads(lines[0]), lines[1], json.loads(lines[2])] == [
        {"runs": [{"x": 1}]},
        "after: stdout is stdout again",
        {"plain": True},
    ], proc.stdout
    for noise in ("a line Ray forwards", "file descriptor 1", "a child process"):
        assert noise in proc.stderr and noise not in proc.stdout
