"""The scale-out manifests (ops/deploy/scaleout): strict schema validation offline, and the
names, ports and settings they share agree with each other and with ServerConfig."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.config import ServerConfig, env_name

SCALEOUT = Path(__file__).resolve().parents[2] / "ops" / "deploy" / "scaleout"
K8S_VERSION = "1.33.0"
DOCS = [doc for path in sorted(SCALEOUT.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
SETTINGS = {env_name(f.name) for f in fields(ServerConfig)}


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(name: str) -> dict:
    (container,) = _one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    config = _one("ConfigMap", "tessera-scaleout-config")["data"]
    return {**config, **{e["name"]: e.get("value") for e in container.get("env", [])}}


def test_every_resource_is_there():
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in DOCS) == [
        "ConfigMap/tessera-scaleout-config", "Deployment/tessera-gateway", "Deployment/tessera-worker",
        "HorizontalPodAutoscaler/tessera-gateway", "HorizontalPodAutoscaler/tessera-worker",
        "NetworkPolicy/tessera-etcd", "NetworkPolicy/tessera-worker-grpc", "PodDisruptionBudget/tessera-etcd",
        "PodDisruptionBudget/tessera-worker", "Service/tessera-etcd", "Service/tessera-etcd-peers",
        "Service/tessera-gateway", "StatefulSet/tessera-etcd"]
    assert {d["metadata"]["namespace"] for d in DOCS} == {"tessera"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_validates_strictly(doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.33"


def test_settings_are_real_and_parse_for_both_roles():
    for name in ("tessera-worker", "tessera-gateway"):
        env = {k: v for k, v in _env(_container(name)).items() if k.startswith("TESSERA_")}
        assert set(env) <= SETTINGS, sorted(set(env) - SETTINGS)
        resolved = {k: v.replace("$(POD_IP)", "10.1.2.3") for k, v in env.items() if v is not None}
        config = ServerConfig.from_sources(environ=resolved)
        assert (config.etcd, config.grpc_port, config.route_policy) == ("tessera-etcd.tessera.svc:2379", 50051, "kv")
    worker = _env(_container("tessera-worker"))
    assert worker["TESSERA_ADVERTISE_ADDRESS"] == "$(POD_IP):50051"


def test_the_etcd_endpoint_is_the_client_service():
    service = _one("Service", "tessera-etcd")
    host, port = _one("ConfigMap", "tessera-scaleout-config")["data"]["TESSERA_ETCD"].split(":")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert int(port) == service["spec"]["ports"][0]["port"] == 2379
    etcd = _one("StatefulSet", "tessera-etcd")
    args = " ".join(etcd["spec"]["template"]["spec"]["containers"][0]["args"])
    members = re.findall(r"(tessera-etcd-\d)=http://\1\.tessera-etcd-peers\.tessera\.svc:2380", args)
    assert members == [f"tessera-etcd-{i}" for i in range(etcd["spec"]["replicas"])]
    assert _one("PodDisruptionBudget", "tessera-etcd")["spec"]["minAvailable"] == etcd["spec"]["replicas"] // 2 + 1


def test_worker_ports_probes_and_gpu():
    worker = _container("tessera-worker")
    assert worker["args"] == ["worker"]
    assert worker["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
    assert worker["readinessProbe"]["grpc"] == {"port": 50051, "service": "tessera.v1.Worker"}
    assert worker["livenessProbe"]["grpc"] == {"port": 50051}
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    grace = _one("Deployment", "tessera-worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert float(_env(worker)["TESSERA_DRAIN_TIMEOUT_S"]) + 5 < grace


def test_gateway_serves_http_and_only_gateways_reach_workers():
    gateway = _container("tessera-gateway")
    assert gateway["args"] == ["gateway"]
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert "nvidia.com/gpu" not in gateway["resources"]["requests"]
    service = _one("Service", "tessera-gateway")
    pod_labels = _one("Deployment", "tessera-gateway")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    policy = _one("NetworkPolicy", "tessera-worker-grpc")
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "gateway"}
    assert rule["ports"] == [{"port": 50051, "protocol": "TCP"}]


def test_worker_autoscaler_follows_the_gateways_hint():
    hpa = _one("HorizontalPodAutoscaler", "tessera-worker")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tessera-worker"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["name"] == "tessera_autoscale_desired_replicas"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert hpa["spec"]["maxReplicas"] == 64


def test_mig_example_runs_one_worker_per_slice_uuid():
    mig = SCALEOUT / "mig"
    unit = (mig / "tessera-worker@.service").read_text()
    assert "--mig-device %i" in unit and "EnvironmentFile=/etc/tessera/mig/%i.env" in unit
    common = dict(line.split("=", 1) for line in (mig / "common.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    slices = sorted(mig.glob("MIG-*.env"))
    assert len(slices) == 2
    ports = []
    for path in slices:
        uuid = path.stem
        assert re.fullmatch(r"MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", uuid)
        own = dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
        env = {**common, **own, "TESSERA_MIG_DEVICE": uuid}
        assert set(env) <= SETTINGS, sorted(set(env) - SETTINGS)
        config = ServerConfig.from_sources(environ=env)
        assert config.mig_device == uuid and config.advertise_address.endswith(f":{config.grpc_port}")
        ports.append(config.grpc_port)
    assert ports == sorted(set(ports))  # one port per slice on the host
