"""Which package may import which, checked on the source (parsed with ast; nothing is imported).

Between packages: common/ imports none of the others; actors/, replay_service/ and learner/
import only common/ and themselves (never each other, never deploy/); deploy/ may import
all. Inside actors/ the layers are, lowest first, actors/carla/ (the simulator's client,
server processes, the in-process stand-in), actors/envs/ (gymnasium envs over a simulator),
then the top-level actors modules (collector, evaluator, Ray wrappers); a lower layer never
imports a higher one. Every import counts, including those inside functions and
``TYPE_CHECKING`` blocks: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "actors", "replay_service", "learner", "deploy")
# What each package may import besides itself.
ALLOWED: dict[str, frozenset[str]] = {
    "common": frozenset(),
    "actors": frozenset({"common"}),
    "replay_service": frozenset({"common"}),
    "learner": frozenset({"common"}),
    "deploy": frozenset(PACKAGES),
}
# Layers inside a package, lowest first; a module belongs to the first prefix it starts with.
LAYERS: dict[str, tuple[str, ...]] = {
    "actors": ("actors.carla", "actors.envs", "actors"),
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(root: Path, path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; ``from X import Y`` counts
    as ``X.Y`` where Y is a module of its own."""
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                sub_path = root.joinpath(*sub.split("."))
                is_module = sub_path.with_suffix(".py").is_file() or (sub_path / "__init__.py").is_file()
                yield node.lineno, sub if is_module else base


def layer(module: str) -> int | None:
    top = module.split(".")[0]
    for rank, prefix in enumerate(LAYERS.get(top, ())):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def violations(root: Path) -> list[str]:
    """Every import under ``root``'s packages that breaks the rules of the module docstring."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            source = module_name(root, path)
            where = path.relative_to(root)
            for line, target in imported_modules(root, path):
                top = target.split(".")[0]
                if top not in PACKAGES or top == package:
                    if top == package:
                        low, high = layer(source), layer(target)
                        if low is not None and high is not None and high > low:
                            out.append(f"{where}:{line}: {source} imports {target}, a higher layer")
                    continue
                if top not in ALLOWED[package]:
                    out.append(f"{where}:{line}: {package} may not import {top} ({target})")
    return out


def test_the_packages_keep_their_layers() -> None:
    assert violations(REPO) == []


def test_every_package_is_checked() -> None:
    for package in PACKAGES:
        assert any((REPO / package).rglob("*.py")), package


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_checker_finds_violations(tmp_path: Path) -> None:
    for package in PACKAGES:
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "actors/carla/__init__.py", "")
    _write(tmp_path, "actors/envs/__init__.py", "")
    _write(tmp_path, "actors/envs/sim.py", "X = 1\n")
    _write(tmp_path, "actors/collector.py", "from actors.envs import sim\nimport common.schema\n")
    _write(tmp_path, "deploy/cli.py", "import actors.collector\nfrom learner import loop\n")
    assert violations(tmp_path) == []  # allowed: downward inside actors, common, deploy on top

    _write(tmp_path, "common/schema.py", "def f():\n    from actors import collector\n")
    _write(tmp_path, "learner/loop.py", "import replay_service\nfrom deploy.cli import main\n")
    _write(tmp_path, "actors/carla/fake.py", "from ..envs.sim import X\n")
    _write(tmp_path, "actors/envs/env.py", "from actors import collector\n")
    assert violations(tmp_path) == [
        "common/schema.py:2: common may not import actors (actors.collector)",
        "actors/carla/fake.py:1: actors.carla.fake imports actors.envs.sim, a higher layer",
        "actors/envs/env.py:1: actors.envs.env imports actors.collector, a higher layer",
        "learner/loop.py:1: learner may not import replay_service (replay_service)",
        "learner/loop.py:2: learner may not import deploy (deploy.cli)",
    ]
