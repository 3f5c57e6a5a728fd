"""The example Kubernetes manifests (ops/deploy) validate against the Kubernetes schemas, offline
(kubernetes-validate bundles them), strictly (unknown fields fail), and agree with each other."""

import copy
from dataclasses import fields
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.config import ServerConfig, env_name

DEPLOY = Path(__file__).resolve().parents[2] / "ops" / "deploy"
K8S_VERSION = "1.33.0"


def _docs() -> list[dict]:
    return [doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


DOCS = _docs()


def _one(kind: str) -> dict:
    (doc,) = [d for d in DOCS if d["kind"] == kind]
    return doc


def test_every_kind_is_there():
    assert sorted(d["kind"] for d in DOCS) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Namespace", "NetworkPolicy",
        "PodDisruptionBudget", "Service", "ServiceAccount"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_strictly(doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.33"


def test_the_validator_refuses_bad_manifests():
    bad = copy.deepcopy(_one("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    typo = copy.deepcopy(_one("Deployment"))
    typo["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_probes_ports_and_security():
    pod = _one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("8000", "/metrics")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert set(container["resources"]["requests"]) >= {"cpu", "memory", "nvidia.com/gpu"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]


def test_configmap_holds_only_real_settings():
    known = {env_name(f.name) for f in fields(ServerConfig)}
    data = _one("ConfigMap")["data"]
    assert set(data) <= known, sorted(set(data) - known)
    config = ServerConfig.from_sources(environ=data)  # parses: every value is well formed
    assert (config.host, config.port, config.dtype) == ("0.0.0.0", 8000, "bfloat16")
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert config.drain_timeout_s + 5 < grace  # the drain ends before the kubelet's SIGKILL


def test_resources_point_at_each_other():
    deployment, service, ingress, hpa = (_one(k) for k in ("Deployment", "Service", "Ingress",
                                                           "HorizontalPodAutoscaler"))
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (rule,) = ingress["spec"]["rules"]
    (tls,) = ingress["spec"]["tls"]
    assert tls["hosts"] == [rule["host"]] and tls["secretName"] == "tessera-tls"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": service["spec"]["ports"][0]["name"]}}
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    assert {d["metadata"]["namespace"] for d in DOCS if d["kind"] != "Namespace"} == {"tessera"}
