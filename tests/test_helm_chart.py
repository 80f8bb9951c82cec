"""The Helm chart (helm/convoy/): rendered and linted by Helm v4's Go SDK, validated against Kubernetes and KubeRay.

- Rendering and lint: `helm_python` (PyPI helm-python-sdk), Helm's own engine and linter, offline.
- Built-in objects: `kubernetes-validate`'s strict schemas for Kubernetes KUBE_VERSION (the
  oldest minor the chart's kubeVersion admits that KubeRay 1.5-1.7 also supports).
- RayJob / RayCluster: the published KubeRay v1 CRD schemas of each targeted release
  (tests/data/kuberay/, see SOURCE.md), made strict: CRD schemas leave additionalProperties
  out, which lets any field through, so `strict_crd_schema` closes every object that lists its
  properties (an unknown field then fails, as kubectl's server-side field validation would).
"""

from __future__ import annotations

import base64
import copy
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "convoy"
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "dashboards" / "convoy.json"
KUBERAY_SCHEMAS = ROOT / "tests" / "data" / "kuberay"
KUBERAY_RELEASES = ("v1.5.1", "v1.7.0")
KUBE_VERSION = "1.29"
RELEASE, NAMESPACE = "exp1", "rl"
URI = "s3://convoy-runs/exp1"

DEFAULT_VALUES: dict[str, Any] = {"storage": {"uri": URI}}  # the one value without a default
SCALED_VALUES: dict[str, Any] = {
    "storage": {"uri": URI, "credentialsSecret": "s3-creds", "s3EndpointUrl": "https://minio.example:9000"},
    "carla": {"replicas": 8, "minReplicas": 2, "maxReplicas": 16, "serversPerWorker": 2, "gpusPerWorker": 2},
    "replay": {"shards": 4, "persistence": {"enabled": True, "size": "100Gi"}},
    "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "train": {"extraArgs": ["run.total_env_steps=5000000"]},
}

helm_python.disable_logging()


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm_python.Chart, values: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Rendered objects and NOTES.txt."""
    out = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    notes = ""
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects, notes


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def strict_crd_schema(node: Any) -> Any:
    """A CRD openAPI v3 schema as JSON Schema that rejects unknown fields.

    Objects that list `properties` get additionalProperties: false unless the CRD marks them
    x-kubernetes-preserve-unknown-fields; `nullable` becomes an extra "null" type.
    """
    if isinstance(node, list):
        return [strict_crd_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k == "required" else strict_crd_schema(v)) for k, v in node.items() if k != "properties"}
    if "properties" in node:
        out["properties"] = {name: strict_crd_schema(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("nullable") and isinstance(node.get("type"), str):
        out["type"] = [node["type"], "null"]
    return out


def kuberay_validator(release: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERAY_SCHEMAS / release / f"{kind.lower()}-v1.json").read_text())
    return jsonschema.Draft7Validator(strict_crd_schema(schema))


def crd_errors(obj: dict[str, Any], release: str) -> list[str]:
    validator = kuberay_validator(release, obj["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def cluster_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    for o in objects:
        if o["kind"] == "RayJob":
            return dict(o["spec"]["rayClusterSpec"])
        if o["kind"] == "RayCluster":
            return dict(o["spec"])
    raise AssertionError("no RayJob or RayCluster rendered")


def test_lint_strict_reports_no_errors() -> None:
    for values in (DEFAULT_VALUES, SCALED_VALUES, {**DEFAULT_VALUES, "mode": "cluster"}):
        report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_lint_catches_a_broken_chart(tmp_path: Path) -> None:
    # Same linter on a copy with a template error: the lint above is able to fail.
    broken = tmp_path / "convoy"
    with helm_python.Chart.load(CHART) as loaded:
        loaded.save_dir(tmp_path)
    (broken / "templates" / "broken.yaml").write_text("{{ .Values.nope.deeper }}\n")
    report = helm_python.lint(broken, DEFAULT_VALUES, strict=True)
    assert report["errors"], report


@pytest.mark.parametrize("values", [DEFAULT_VALUES, SCALED_VALUES], ids=["default", "scaled"])
@pytest.mark.parametrize("mode", ["job", "cluster"])
def test_rendered_objects_validate(chart: helm_python.Chart, values: dict[str, Any], mode: str) -> None:
    objects, _ = render(chart, {**values, "mode": mode})
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ConfigMap", "RayJob" if mode == "job" else "RayCluster", "Secret", "Service", "StatefulSet"]
    if values is SCALED_VALUES:
        expected.append("PodMonitor")
    assert kinds == sorted(expected)
    for obj in objects:
        if obj["apiVersion"] == "ray.io/v1":
            for release in KUBERAY_RELEASES:
                assert crd_errors(obj, release) == [], (release, obj["kind"])
        elif obj["kind"] == "PodMonitor":
            # Prometheus Operator CRD, not a built-in: checked by test_pod_monitor_selects_ray_pods.
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_crd_validation_rejects_unknown_and_bad_fields(chart: helm_python.Chart) -> None:
    objects, _ = render(chart, DEFAULT_VALUES)
    job = one(objects, "RayJob")
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    deep = copy.deepcopy(job)
    deep["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    bad_enum = copy.deepcopy(job)
    bad_enum["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    for release in KUBERAY_RELEASES:
        assert any("maxReplica" in e for e in crd_errors(typo, release))
        assert any("imagePullPolice" in e for e in crd_errors(deep, release))
        assert crd_errors(wrong_type, release)
        assert crd_errors(bad_enum, release)
    secret = copy.deepcopy(one(objects, "Secret"))
    secret["metadata"]["nmae"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(secret, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"storage": {"uri": URI}, "carla": {"replicas": -1}}, "/carla/replicas"),
        ({"storage": {"uri": URI}, "replay": {"shards": -2}}, "/replay/shards"),
        ({"storage": {"uri": URI}, "carla": {"replica": 4}}, "replica"),
        ({"storage": {"uri": URI}, "shards": 4}, "shards"),
        ({}, "/storage/uri"),
        ({"storage": {"uri": "/local/runs"}}, "/storage/uri"),
        ({"storage": {"uri": URI}, "image": {"learner": {"tag": "latest"}}}, "/image/learner/tag"),
        ({"storage": {"uri": URI}, "mode": "deployment"}, "/mode"),
    ],
)
def test_values_schema_rejects_bad_values(chart: helm_python.Chart, values: dict[str, Any], needle: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=needle):
        chart.validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError, match=needle):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_replica_bounds_are_checked(chart: helm_python.Chart) -> None:
    values = {"storage": {"uri": URI}, "carla": {"replicas": 1, "minReplicas": 3}}
    with pytest.raises(helm_python.HelmError, match="minReplicas <= replicas <= maxReplicas"):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


@pytest.mark.parametrize("values", [DEFAULT_VALUES, SCALED_VALUES], ids=["default", "scaled"])
def test_train_arguments_match_shards_and_workers(chart: helm_python.Chart, values: dict[str, Any]) -> None:
    objects, notes = render(chart, values)
    argv = shlex.split(one(objects, "RayJob")["spec"]["entrypoint"])
    assert argv[:4] == ["convoy", "train", "--config", "/opt/src/convoy/deploy/configs/carla.yaml"]
    overrides = argv[4:]
    args = dict(o.split("=", 1) for o in overrides)
    assert args["run.ray_address"] == "auto"
    assert args["run.out_dir"] == URI

    spec = cluster_spec(objects)
    workers = spec["workerGroupSpecs"]
    slots = sum(g["replicas"] * int(g["resources"].get("carla", 0)) for g in workers)
    assert int(args["collector.num_collectors"]) == slots > 0
    carla = values.get("carla", {})
    assert slots == carla.get("replicas", 2) * carla.get("serversPerWorker", 1)
    assert workers[0]["minReplicas"] <= workers[0]["replicas"] <= workers[0]["maxReplicas"]
    for group in workers:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] >= 1

    # The learner's {learner: 1} exists only on the head, next to its GPU.
    assert args["learner.resources"] == "learner:1"
    assert spec["headGroupSpec"]["resources"] == {"learner": "1"}
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1

    sts, svc = one(objects, "StatefulSet"), one(objects, "Service")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port = svc["spec"]["ports"][0]["port"]
    name = sts["metadata"]["name"]
    expected = [
        f"redis://{name}-{i}.{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}/0"
        for i in range(sts["spec"]["replicas"])
    ]
    assert args["replay.shard_urls"].split(",") == expected
    assert sts["spec"]["replicas"] == values.get("replay", {}).get("shards", 2)

    # The password: one Secret, read by the shards and handed to every Ray pod as an env var.
    secret = one(objects, "Secret")
    assert len(base64.b64decode(secret["data"]["password"])) == 32
    assert "password" not in one(objects, "RayJob")["spec"]["entrypoint"].lower()
    ray_containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in workers
    ]
    for container in [*ray_containers, sts["spec"]["template"]["spec"]["containers"][0]]:
        refs = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert {"name": secret["metadata"]["name"], "key": "password"} in refs, container["name"]
    assert "CONVOY_REPLAY_PASSWORD" in {e["name"] for e in ray_containers[0]["env"]}

    # convoy's own config loader accepts the rendered command line.
    cfg = load_config(ROOT / "deploy" / "configs" / "carla.yaml", overrides)
    assert cfg.collector.num_collectors == slots
    assert list(cfg.replay.shard_urls) == expected
    assert f"convoy checkpoints pull {URI}" in notes


def test_storage_credentials_and_persistence(chart: helm_python.Chart) -> None:
    objects, _ = render(chart, DEFAULT_VALUES)
    sts = one(objects, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert "--appendonly no" in sts["spec"]["template"]["spec"]["containers"][0]["command"][2]
    head = cluster_spec(objects)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in head

    objects, _ = render(chart, SCALED_VALUES)
    sts = one(objects, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "--appendonly yes" in sts["spec"]["template"]["spec"]["containers"][0]["command"][2]
    head = cluster_spec(objects)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "CONVOY_S3_ENDPOINT_URL", "value": "https://minio.example:9000"} in head["env"]


def test_pod_monitor_switched_by_value(chart: helm_python.Chart) -> None:
    objects, _ = render(chart, DEFAULT_VALUES)
    assert not [o for o in objects if o["kind"] == "PodMonitor"]
    objects, _ = render(chart, SCALED_VALUES)
    monitor = one(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # KubeRay adds ray.io/is-ray-node=yes and the `metrics` port (8080) to every Ray pod; the
    # chart's own labels must be on the head and every worker pod for the selector to match.
    selector = monitor["spec"]["selector"]["matchLabels"]
    spec = cluster_spec(objects)
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for template in templates:
        labels = {**template["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        assert selector.items() <= labels.items()


def test_dashboard_configmap_is_the_monitoring_json(chart: helm_python.Chart) -> None:
    link = CHART / "dashboards" / "convoy.json"
    assert link.is_symlink() and link.resolve() == DASHBOARD.resolve(), "one source: a symlink, never a copy"
    objects, _ = render(chart, DEFAULT_VALUES)
    cm = one(objects, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["convoy.json"].encode() == DASHBOARD.read_bytes()
    json.loads(cm["data"]["convoy.json"])


def test_cluster_mode_notes_give_the_same_command(chart: helm_python.Chart) -> None:
    job_objects, _ = render(chart, SCALED_VALUES)
    entrypoint = one(job_objects, "RayJob")["spec"]["entrypoint"]
    objects, notes = render(chart, {**SCALED_VALUES, "mode": "cluster"})
    assert one(objects, "RayCluster")["spec"] == one(job_objects, "RayJob")["spec"]["rayClusterSpec"]
    assert f"ray job submit -- {entrypoint}" in notes
