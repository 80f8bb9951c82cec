"""Container images (deploy/docker/): hadolint, pins, users, and agreement with the cluster files and the chart.

Neither image can be built here: this machine has no container runtime (no docker, podman or
buildkit daemon), and the CARLA base image is several GB. What a build would show (that the pinned
apt and pip versions still resolve, that CARLA's server starts as user `carla` with the installed
collector, that torch sees the GPU) is left to a machine with Docker; these tests check
everything that can be read from the files.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
# Keyed by file name: a test id of plain "carla" would take the `carla` marker (needs a live server).
DOCKERFILES = {p.name: p for p in (DOCKER / "learner.Dockerfile", DOCKER / "carla.Dockerfile")}
HADOLINT = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hadolint"


def hadolint_findings(dockerfile: Path, tmp_path: Path) -> list[dict[str, Any]]:
    """hadolint's findings, with an empty config so no user or repository config can hide a rule."""
    exe = shutil.which("hadolint") or str(HADOLINT)
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    proc = subprocess.run(
        [exe, "--config", str(config), "--format", "json", "--no-fail", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    findings: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
    return findings


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip()] = version.strip()
    return pins


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_reports_no_errors_or_warnings(name: str, tmp_path: Path) -> None:
    findings = hadolint_findings(DOCKERFILES[name], tmp_path)
    assert [f for f in findings if f["level"] in ("error", "warning")] == []


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    original = DOCKERFILES["learner.Dockerfile"].read_text()
    bad.write_text(original.replace("python:3.11.14-slim-bookworm", "python:latest"))
    with bad.open("a") as f:
        f.write("USER root\nRUN apt-get install curl\n")
    codes = {f["code"] for f in hadolint_findings(bad, tmp_path) if f["level"] in ("error", "warning")}
    assert {"DL3007", "DL3002", "DL3008"} <= codes, codes


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_pinned_and_non_root(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    for word, args in steps:
        if word == "FROM":
            image = args.split()[0]
            assert re.search(r":[0-9][\w.-]*$", image), f"{name}: base image {image} not pinned by version"
        if word == "RUN":
            for command in args.split("&&"):
                tokens = command.split()
                torch = [t for t in tokens if re.match(r"[\"']?torch\b", t)]
                if "install" in tokens and torch:
                    assert torch == ["torch==2.13.0"], command
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{name} must end as a non-root user: {users}"
    assert any(w == "COPY" and "constraints.txt" in a for w, a in steps), "installs through the shared pins"


def test_images_share_python_and_ray() -> None:
    # Every node of one Ray cluster must run the same Python and Ray, and `ray up` / `ray job
    # submit` from this machine must match the cluster's Ray.
    learner = DOCKERFILES["learner.Dockerfile"].read_text()
    carla = DOCKERFILES["carla.Dockerfile"].read_text()
    learner_py = re.search(r"FROM python:(\d+\.\d+\.\d+)-", learner)
    carla_py = re.search(r"ARG PYTHON_VERSION=(\d+\.\d+\.\d+)", carla)
    assert learner_py and carla_py and learner_py.group(1) == carla_py.group(1)
    pins = constraints()
    assert pins["ray"] == ray.__version__, "deploy/docker/constraints.txt pins another Ray than this venv's"
    assert pins["torch"] == "2.13.0" and pins["carla"] == "0.9.16"
    assert "FROM carlasim/carla:0.9.16" in carla
    head_reqs = (DOCKER / "requirements-head.txt").read_text()
    assert f"ray[default]=={pins['ray']}" in head_reqs
    assert f'"ray[default]=={pins["ray"]}"' in carla
    chart = yaml.safe_load((ROOT / "helm" / "convoy" / "values.yaml").read_text())
    assert chart["rayVersion"] == pins["ray"]


def test_cluster_files_and_chart_use_these_images() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    learner, carla = f"convoy/learner:{version}", f"convoy/carla-collector:{version}"
    for path in sorted((ROOT / "deploy" / "cluster").glob("*.yaml")):
        cluster = yaml.safe_load(path.read_text())
        assert cluster["docker"]["head_image"].endswith(learner), path.name
        for type_name, node_type in cluster["available_node_types"].items():
            if type_name == cluster["head_node_type"]:
                continue
            image = node_type.get("docker", {}).get("worker_image", cluster["docker"]["worker_image"])
            wanted = carla if node_type["resources"].get("carla") else learner
            assert image.endswith(wanted), (path.name, image)
    values = yaml.safe_load((ROOT / "helm" / "convoy" / "values.yaml").read_text())["image"]
    assert f"{values['learner']['repository']}:{values['learner']['tag']}".endswith(learner)
    assert f"{values['carla']['repository']}:{values['carla']['tag']}".endswith(carla)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_build_context_holds_what_copy_needs(name: str) -> None:
    # The per-Dockerfile .dockerignore lets in only what the image installs; every COPY
    # source must exist and be let in, or the build would fail.
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("*").rstrip("/") for p in ignore if p.startswith("!")]
    for word, args in instructions(DOCKERFILES[name]):
        if word == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                if src.startswith("--"):
                    continue
                assert (ROOT / src).exists(), src
                assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is not in the build context"
    # The chart runs `convoy train --config /opt/src/convoy/deploy/configs/...` from this tree.
    if name == "learner.Dockerfile":
        assert ("WORKDIR", "/opt/src/convoy") in instructions(DOCKERFILES[name])
