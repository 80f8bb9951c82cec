"""The README front door, the MkDocs site under docs/, and what the docs may cite."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import describe_keys

REPO = Path(__file__).resolve().parents[1]
CONFIG_PAGE = REPO / "docs" / "reference" / "config.md"
HARNESS = REPO / "docs" / "harness" / "replay_ratio.py"
README_MAX_LINES = 200

# Citations a user of the repository cannot follow: a design file and issue numbers that are
# not in the repository, and paths on a developer's machine. Spelled in pieces so that this
# file does not flag itself.
FORBIDDEN = [
    ("DESIGN" + ".md", re.compile(re.escape("DESIGN" + ".md"))),
    ("issue <digit>", re.compile(r"\bissue\s+\d", re.IGNORECASE)),
    ("/work" + "/", re.compile(re.escape("/work" + "/"))),
    (".." + "/shared", re.compile(re.escape(".." + "/shared"))),
]
SKIP_DIRS = {".git", ".venv", "site"}


def test_config_page_documents_every_config_key() -> None:
    page = CONFIG_PAGE.read_text()
    missing = [key for key, *_ in describe_keys() if f"`{key}`" not in page]
    assert not missing, f"{CONFIG_PAGE.relative_to(REPO)} lacks {missing}; run deploy/scripts/update-config-keys.sh"


def test_readme_quick_start_is_two_make_commands() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert commands == ["make train", "make test"]
    assert "make test" in (REPO / ".ci/run").read_text()


def test_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail into docs/"
    )


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    """A broken link or anchor, or a page missing from mkdocs.yml's nav, fails the build."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (it is in the dev extra)")
    # Not -q: with -q mkdocs 1.6 drops warnings before strict mode counts them, so a
    # broken link would pass. The output is only shown when the build fails.
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


def _text_files() -> list[Path]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += [Path(root) / f for f in sorted(files) if f.endswith((".md", ".py"))]
    return found


def test_no_citations_users_do_not_have() -> None:
    hits = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name, pattern in FORBIDDEN:
                if pattern.search(line):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {name}: {line.strip()[:100]}")
    assert not hits, "write the fact itself instead of citing what users do not have:\n" + "\n".join(hits)


def test_replay_ratio_harness_imports_and_shows_help() -> None:
    spec = importlib.util.spec_from_file_location("replay_ratio_harness", HARNESS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--samples-per-insert", "256,64", "learner.device=cpu"])
    assert args.samples_per_insert == [256.0, 64.0] and args.overrides == ["learner.device=cpu"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(HARNESS), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for option in ("--samples-per-insert", "--env-steps", "--eval-every", "--eval-episodes", "--json"):
        assert option in proc.stdout
