"""Kubernetes manifests: valid, and broken copies rejected.

``kubernetes-validate --strict`` checks each manifest against the Kubernetes
API's JSON schemas and ``kubectl kustomize`` renders the kustomization, when
those are installed; the structural checks (selectors match pod labels,
Services reach declared ports, referenced ConfigMap/Secret exist, FOGLINE_*
keys are real settings, secrets are placeholders) always run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ops_validation import (
    K8S_DIR,
    Mutation,
    find_tool,
    k8s_manifest_paths,
    k8s_problems,
    kubernetes_validate_problems,
    kustomize_build,
    overlay_docs,
    pod_scrape_problems,
    replace,
)

MANIFESTS = {p.name: p.read_text() for p in k8s_manifest_paths()}
KUSTOMIZATION = (K8S_DIR / "kustomization.yaml").read_text()


def _problems(manifests: dict[str, str], kustomization: str = KUSTOMIZATION) -> list[str]:
    docs: list[Any] = [
        d for text in manifests.values() for d in yaml.safe_load_all(text) if d is not None
    ]
    return k8s_problems(docs, yaml.safe_load(kustomization), manifests)


def _break(file: str, mutate: Mutation) -> dict[str, str]:
    return {**MANIFESTS, file: mutate(MANIFESTS[file])}


STRUCTURAL_BREAKS: dict[str, tuple[str, Mutation, str]] = {
    "selector does not match pod labels": (
        "daemon-deployment.yaml",
        replace(
            "      app.kubernetes.io/component: daemon\n  template:",
            "      app.kubernetes.io/component: worker\n  template:",
        ),
        "does not match template labels",
    ),
    "service selects no pods": (
        "query-service.yaml",
        replace(
            "    app.kubernetes.io/component: query\n  ports:",
            "    app.kubernetes.io/component: api\n  ports:",
        ),
        "matches no Deployment's pods",
    ),
    "service targets an undeclared port": (
        "query-service.yaml",
        replace("targetPort: http", "targetPort: web"),
        "targetPort web is no container port",
    ),
    "probe on an undeclared port": (
        "daemon-deployment.yaml",
        replace(
            "              port: metrics\n            periodSeconds: 10",
            "              port: 9090\n            periodSeconds: 10",
        ),
        "readinessProbe port 9090 not declared",
    ),
    "missing liveness probe": (
        "query-deployment.yaml",
        replace("          livenessProbe:", "          x-livenessProbe:"),
        "no livenessProbe",
    ),
    "envFrom an unknown ConfigMap": (
        "query-deployment.yaml",
        replace("name: fogline-config", "name: fogline-settings"),
        "configMapRef fogline-settings not defined",
    ),
    "real secret committed": (
        "secret.yaml",
        replace("FOGLINE_API__TOKEN: REPLACE-ME", "FOGLINE_API__TOKEN: 9f8a7c6e5d"),
        "Secret FOGLINE_API__TOKEN: committed value is not a placeholder",
    ),
    "secret in the ConfigMap": (
        "configmap.yaml",
        replace("  FOGLINE_LOG_LEVEL: INFO", "  FOGLINE_REDIS__PASSWORD: REPLACE-ME"),
        "ConfigMap holds secret FOGLINE_REDIS__PASSWORD",
    ),
    "misspelt setting": (
        "configmap.yaml",
        replace("FOGLINE_KAFKA__TOPIC:", "FOGLINE_KAFKA__TOPICS:"),
        "FOGLINE_KAFKA__TOPICS: no such setting",
    ),
    "invalid setting value": (
        "configmap.yaml",
        replace("FOGLINE_DRIFT__POLICY: forget", "FOGLINE_DRIFT__POLICY: forgetful"),
        "drift.policy",
    ),
    "one daemon replica": (
        "daemon-deployment.yaml",
        replace("replicas: 3", "replicas: 1"),
        "no daemon Deployment with several replicas",
    ),
    "no consumer group": (
        "configmap.yaml",
        replace("  FOGLINE_KAFKA__GROUP_ID: fogline\n", ""),
        "exactly one consumer group",
    ),
    "pods may run as root": (
        "query-deployment.yaml",
        replace("runAsNonRoot: true", "runAsNonRoot: false"),
        "pods may run as root",
    ),
    "resource without a name": (
        "query-service.yaml",
        replace("  name: fogline-query\n", "  labels2: {}\n"),
        "without apiVersion/kind/metadata.name",
    ),
}


def test_manifests_structure_is_valid() -> None:
    assert _problems(MANIFESTS) == []


@pytest.mark.parametrize("name", sorted(STRUCTURAL_BREAKS))
def test_manifests_structure_rejects_broken_copy(name: str) -> None:
    file, mutate, expected = STRUCTURAL_BREAKS[name]
    problems = _problems(_break(file, mutate))
    assert any(expected in p for p in problems), (name, problems)


def test_kustomization_lists_every_manifest() -> None:
    dropped = replace("  - daemon-pdb.yaml\n", "")(KUSTOMIZATION)
    problems = _problems(MANIFESTS, dropped)
    assert len(problems) == 1 and "kustomization resources" in problems[0]


# --- schema validation ---------------------------------------------------------------
needs_kv = pytest.mark.skipif(
    find_tool("kubernetes-validate") is None,
    reason="no kubernetes-validate: run ops/install-validators.sh (structural checks still ran)",
)
needs_kubectl = pytest.mark.skipif(find_tool("kubectl") is None, reason="no kubectl for kustomize")


@needs_kv
def test_manifests_match_kubernetes_schemas() -> None:
    assert kubernetes_validate_problems(k8s_manifest_paths()) == []


@needs_kv
@pytest.mark.parametrize(
    ("name", "file", "mutate"),
    [
        (
            "replicas not an integer",
            "daemon-deployment.yaml",
            replace("replicas: 3", "replicas: three"),
        ),
        (
            "misspelt field",
            "daemon-deployment.yaml",
            replace("containerPort: 9400", "containerPrt: 9400"),
        ),
        (
            "unknown field (strict)",
            "query-service.yaml",
            replace("  type: ClusterIP", "  kind2: ClusterIP"),
        ),
        ("port out of type", "query-service.yaml", replace("port: 8000", "port: eight-thousand")),
        (
            "env value not a string",
            "query-deployment.yaml",
            replace('value: "8000"', "value: 8000"),
        ),
        (
            "bad secret data",
            "secret.yaml",
            replace("stringData:", "data:\n  bad: [1]\n  stringData2:"),
        ),
    ],
)
def test_schema_validation_rejects_broken_copy(
    name: str, file: str, mutate: Mutation, tmp_path: Path
) -> None:
    broken = tmp_path / file
    broken.write_text(mutate(MANIFESTS[file]))
    assert kubernetes_validate_problems([broken]), f"kubernetes-validate accepted: {name}"


@needs_kubectl
@needs_kv
def test_kustomize_renders_valid_resources(tmp_path: Path) -> None:
    problems, rendered = kustomize_build(K8S_DIR)
    assert problems == []
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"fogline"}
    out = tmp_path / "rendered.yaml"
    out.write_text(rendered)
    assert kubernetes_validate_problems([out]) == []


@needs_kubectl
def test_kustomize_rejects_missing_resource(tmp_path: Path) -> None:
    for name, text in MANIFESTS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "kustomization.yaml").write_text(
        replace("  - query-service.yaml\n", "  - query-service.yaml\n  - query-hpa.yaml\n")(
            KUSTOMIZATION
        )
    )
    problems, _ = kustomize_build(tmp_path)
    assert problems and "query-hpa.yaml" in problems[0]


@needs_kubectl
def test_keyed_overlay_renders_keyed_settings_that_load() -> None:
    """ops/k8s-keyed: the base stack with keyed mode on; every replica of the daemon
    deployment joins one group (replicas scale: pods clash on no host port)."""
    from ops_validation import settings_problems

    problems, rendered = kustomize_build(K8S_DIR.parent / "k8s-keyed")
    assert problems == []
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["FOGLINE_KEYED__ENABLED"] == "true" and config["FOGLINE_MODEL__KEY"]
    assert settings_problems(config) == []
    daemon = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "fogline-daemon"
    )
    pod = daemon["spec"]["template"]["spec"]
    assert all("hostPort" not in p for c in pod["containers"] for p in c.get("ports", []))


# --- every daemon pod a scrape target (keyed replicas) ---------------------------------------
KEYED_DIR = K8S_DIR.parent / "k8s-keyed"


def test_keyed_overlay_pods_are_scraped_one_by_one() -> None:
    """ops/k8s-keyed (patches applied without kubectl): keyed mode on, and each daemon
    pod a target of its own, by annotation or through the headless Service."""
    docs = overlay_docs(KEYED_DIR)
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert config["FOGLINE_KEYED__ENABLED"] == "true" and config["FOGLINE_MODEL__KEY"]
    assert pod_scrape_problems(docs) == []


POD_SCRAPE_BREAKS: dict[str, tuple[str, Mutation, str]] = {
    "no scrape annotation": (
        "daemon-deployment.yaml",
        replace('        prometheus.io/scrape: "true"\n', ""),
        'pods lack prometheus.io/scrape: "true"',
    ),
    "annotation on another port": (
        "daemon-deployment.yaml",
        replace('prometheus.io/port: "9400"', 'prometheus.io/port: "9401"'),
        "prometheus.io/port '9401', the daemon listens on 9400",
    ),
    "metrics on the pod's loopback": (
        "daemon-deployment.yaml",
        replace("              value: 0.0.0.0\n", "              value: 127.0.0.1\n"),
        "FOGLINE_METRICS_HOST is not 0.0.0.0",
    ),
    "metrics on a host port": (
        "daemon-deployment.yaml",
        replace(
            "              containerPort: 9400\n",
            "              containerPort: 9400\n              hostPort: 9400\n",
        ),
        "metrics on a hostPort",
    ),
    "load-balanced metrics Service": (
        "daemon-service.yaml",
        replace("  clusterIP: None\n", ""),
        "no headless Service (clusterIP: None) selects its pods",
    ),
}


@pytest.mark.parametrize("name", sorted(POD_SCRAPE_BREAKS))
def test_pod_scrape_check_rejects_broken_copy(name: str) -> None:
    file, mutate, expected = POD_SCRAPE_BREAKS[name]
    broken = _break(file, mutate)
    docs = [d for text in broken.values() for d in yaml.safe_load_all(text) if d]
    problems = pod_scrape_problems(docs)
    assert any(expected in p for p in problems), (name, problems)
