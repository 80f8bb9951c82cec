from __future__ import annotations

from pathlib import Path

from common.config import describe_keys

REPO = Path(__file__).resolve().parents[1]


def test_readme_documents_every_config_key() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [key for key, *_ in describe_keys() if f"`{key}`" not in readme]
    assert not missing, f"README lacks {missing}; run deploy/scripts/update-readme-keys.sh"


def test_readme_quick_start_is_two_make_commands() -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert commands == ["make train", "make test"]
    assert "make test" in (REPO / ".ci/run").read_text()
