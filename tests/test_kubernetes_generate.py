"""'ppml-serve kubernetes generate': the Secrets and ConfigMaps a deployment needs, made and
then used for real where this machine can (no cluster runs here): every overlay renders with
them and validates, every Secret a pod or KEDA names exists with the keys it reads, checkov
finds nothing, a real redis-server runs on the generated redis.conf and certificate and holds
each ACL user to its part, the KMS opens with its passphrase, the API key authenticates, the
certificates name the services, and the policy releases the model's keys."""

from __future__ import annotations

import base64
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml
from cryptography import x509

from ppml_serve.cluster import KUBERNETES_OVERLAYS
from ppml_serve.cluster.kubernetes import IMAGE, cluster_settings, generate
from ppml_serve.crypto.attestation.policy import Policy
from ppml_serve.crypto.keystore import DATA_KEYS_FILE, DataKeyTable
from ppml_serve.crypto.kms.local import PRIMARY_FILE, LocalKMS
from ppml_serve.errors import ConfigError
from ppml_serve.gateway.auth import ApiKeyStore
from ppml_serve.models import demo_model_path
from ppml_serve.queue.redis_server import free_port
from ppml_serve.worker.runner import release_entry
from tests.test_deploy import K8S_VERSION, KUBE, render

DIGEST = "sha256:" + "0123456789abcdef" * 4
CHECKOV = Path(__file__).parents[1] / ".venv-checkov" / "bin" / "checkov"


def _generate(out: Path, overlay: str) -> None:
    generate(out, overlay, KUBE, {"demo": demo_model_path()},
             image=f"registry.example/ppml-serve@{DIGEST}",
             redis_image=f"redis@{DIGEST}", gateway_hosts=("ml.example.org",),
             redis_address="redis.example.internal:6380" if overlay == "external-redis"
             else None)


def _by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for resource in resources:
        by_kind.setdefault(resource["kind"], {})[resource["metadata"]["name"]] = resource
    return by_kind


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = dict(secret.get("stringData", {}))
    data.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    return data


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kubernetes")
    outputs = {}
    for overlay in KUBERNETES_OVERLAYS:
        _generate(root / overlay, overlay)
        outputs[overlay] = root / overlay
    return outputs


@pytest.mark.parametrize("overlay", KUBERNETES_OVERLAYS)
def test_every_secret_a_pod_reads_is_generated_and_the_render_validates(
        generated: dict[str, Path], overlay: str) -> None:
    out = generated[overlay]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    resources = render(out)
    by_kind = _by_kind(resources)
    for resource in resources:
        if not resource["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    secrets = {name: _secret_data(secret) for name, secret in by_kind["Secret"].items()}
    for workload in [*by_kind["Deployment"].values(), *by_kind.get("StatefulSet", {}).values()]:
        spec = workload["spec"]["template"]["spec"]
        for container in spec["containers"]:
            image = container["image"]
            assert image.endswith("@" + DIGEST), f"not pinned: {image}"
        for volume in spec["volumes"]:
            if "secret" not in volume:
                continue
            name = volume["secret"]["secretName"]
            assert name in secrets, f"{workload['metadata']['name']} mounts missing {name}"
            for item in volume["secret"].get("items", []):
                assert item["key"] in secrets[name], (name, item)
    for auth in by_kind["TriggerAuthentication"].values():
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]], ref

    # every file the parts' settings name is a key of the Secret mounted there
    settings = cluster_settings(KUBE)
    mounts = {"/etc/ppml/api-keys": "ppml-api-keys", "/etc/ppml/kms": "ppml-kms",
              "/etc/ppml/kms-passphrase": "ppml-kms-passphrase", "/etc/ppml/redis":
              "ppml-redis-gateway"}
    for path in (settings.api_keys_file, settings.kms_passphrase_file, settings.redis_url_file,
                 settings.kms_dir / PRIMARY_FILE, settings.kms_dir / DATA_KEYS_FILE):
        assert path is not None
        assert path.name in secrets[mounts[str(path.parent)]], path
    scaled = by_kind["ScaledObject"]["ppml-worker-demo"]
    addresses = {t["metadata"]["address"] for t in scaled["spec"]["triggers"]}
    url = secrets["ppml-redis-worker"]["url"]
    assert len(addresses) == 1 and url.endswith(f"@{addresses.pop()}/0")

    policy = yaml.safe_load(by_kind["ConfigMap"]["ppml-policy"]["data"]["policy.yaml"])
    Policy.model_validate(policy)
    assert policy["releases"] == [release_entry(settings, "demo", demo_model_path())]
    assert policy["allowed_providers"] == (["simulated"] if overlay == "dev" else ["dcap", "snp"])
    assert by_kind["ConfigMap"]["ppml-ca"]["data"]["ca.crt"].startswith("-----BEGIN CERT")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed here")
def test_kubectl_renders_the_generated_kustomization_as_the_tests_do(
        generated: dict[str, Path]) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(generated["dev"])], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rendered = {(r["kind"], r["metadata"]["name"]): r
                for r in yaml.safe_load_all(done.stdout) if r}
    ours = {(r["kind"], r["metadata"]["name"]): r for r in render(generated["dev"])}
    assert rendered.keys() == ours.keys()
    for key in (("ConfigMap", "ppml-policy"), ("Deployment", "ppml-worker-demo")):
        assert rendered[key] == ours[key], key


@pytest.mark.parametrize("overlay", KUBERNETES_OVERLAYS)
def test_checkov_finds_nothing_in_a_generated_deployment(
        generated: dict[str, Path], overlay: str, tmp_path: Path) -> None:
    assert CHECKOV.exists(), "./dev.sh test installs checkov into .venv-checkov"
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(render(generated[overlay])))
    failed = _checkov(manifest)
    assert failed == [], failed


@pytest.mark.parametrize("overlay", KUBERNETES_OVERLAYS)
def test_checkov_on_the_repository_overlays_finds_only_the_unpinned_images(
        overlay: str, tmp_path: Path) -> None:
    """The repository cannot know the digests of images built later: the generator pins
    them (above). Nothing else is accepted."""
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(render(KUBE / "overlays" / overlay)))
    accepted = {"CKV_K8S_43", "CKV_K8S_15"}  # image by digest; pull policy Always without one
    assert {check for check, _ in _checkov(manifest)} <= accepted


def _checkov(manifest: Path) -> list[tuple[str, str]]:
    done = subprocess.run(
        [str(CHECKOV), "-f", str(manifest), "--framework", "kubernetes", "--skip-download",
         "--output", "json", "--quiet"],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": ""})
    report = yaml.safe_load(done.stdout) if done.stdout.strip() else {}
    if isinstance(report, list):
        report = report[0]
    assert report, done.stderr[-2000:]
    return [(check["check_id"], check["resource"])
            for check in report.get("results", {}).get("failed_checks", [])]


def test_redis_runs_on_the_generated_config_and_holds_each_user_to_its_part(
        generated: dict[str, Path], tmp_path: Path) -> None:
    secrets = {name: _secret_data(secret) for name, secret in
               _by_kind(render(generated["dev"]))["Secret"].items()}
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o700)
    for name, text in secrets["ppml-redis-tls"].items():
        (tls / name).write_text(text)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    port = free_port()
    conf = (secrets["ppml-redis-config"]["redis.conf"]
            .replace("/etc/redis/tls", str(tls)).replace("dir /data", f"dir {data}")
            .replace("bind * -::*", "bind 127.0.0.1").replace("tls-port 6379",
                                                               f"tls-port {port}"))
    conf_file = tmp_path / "redis.conf"
    conf_file.write_text(conf)
    conf_file.chmod(0o600)
    server = subprocess.Popen(["redis-server", str(conf_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ca = str(tls / "ca.crt")

    def client(secret: str) -> redis.Redis:
        url = secrets[secret]["url"].replace("ppml-redis.ppml-serve.svc:6379",
                                             f"127.0.0.1:{port}")
        # the certificate names the service (checked below), not 127.0.0.1
        return redis.Redis.from_url(url, ssl_ca_certs=ca, ssl_check_hostname=False,
                                    socket_timeout=5)

    try:
        gateway = client("ppml-redis-gateway")
        for _ in range(100):
            try:
                gateway.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        stream = "ppml:{demo}:req"
        gateway.xadd(stream, {"r": "1"})
        client("ppml-redis-worker").xgroup_create(stream, "workers", id="0")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.set("other:key", "1")  # only the service's keys
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.flushall()
        keda = redis.Redis.from_url(
            f"rediss://keda:{secrets['ppml-redis-keda']['password']}@127.0.0.1:{port}/0",
            ssl_ca_certs=ca, ssl_check_hostname=False, socket_timeout=5)
        assert keda.xinfo_groups(stream)[0]["lag"] == 1
        assert keda.xpending(stream, "workers")["pending"] == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            keda.xadd(stream, {"r": "2"})  # KEDA only reads the queue's size
        admin_url = (generated["dev"] / "redis-admin.url").read_text().strip()
        admin = redis.Redis.from_url(admin_url.replace("ppml-redis.ppml-serve.svc:6379",
                                                       f"127.0.0.1:{port}"),
                                     ssl_ca_certs=ca, ssl_check_hostname=False)
        assert admin.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        server.terminate()
        server.wait(10)


def test_keys_certificates_and_api_key_work(generated: dict[str, Path], tmp_path: Path) -> None:
    out = generated["dev"]
    secrets = {name: _secret_data(secret) for name, secret in
               _by_kind(render(out))["Secret"].items()}
    kms_dir = tmp_path / "kms"
    kms_dir.mkdir(mode=0o700)
    for name, text in secrets["ppml-kms"].items():
        (kms_dir / name).write_text(text)
        (kms_dir / name).chmod(0o600)
    from pydantic import SecretStr
    kms = LocalKMS(kms_dir, SecretStr(secrets["ppml-kms-passphrase"]["passphrase"]))
    keys = DataKeyTable.load(kms_dir / DATA_KEYS_FILE).unwrap_all(kms)
    assert keys and all(len(key) == 32 for key in keys.values())

    key_file = tmp_path / "api-keys.json"
    key_file.write_text(secrets["ppml-api-keys"]["api-keys.json"])
    key_file.chmod(0o600)
    token = (out / "api-key").read_text().strip()
    principal = ApiKeyStore.load(key_file).authenticate(f"Bearer {token}")
    assert principal.name == "admin"
    assert token not in (out / "secrets.yaml").read_text(), "only the key's hash is applied"

    ca = x509.load_pem_x509_certificate(secrets["ppml-gateway-tls"]["ca.crt"].encode())
    for secret, names in (("ppml-gateway-tls", {"ppml-gateway.ppml-serve.svc",
                                                 "ml.example.org"}),
                          ("ppml-keybroker-tls", {"ppml-keybroker.ppml-serve.svc"}),
                          ("ppml-redis-tls", {"ppml-redis.ppml-serve.svc"})):
        cert = x509.load_pem_x509_certificate(secrets[secret]["tls.crt"].encode())
        cert.verify_directly_issued_by(ca)
        sans = set(cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
        assert names <= sans, (secret, sans)
    # the workers' Redis URL names the Service the StatefulSet's Service answers on
    assert "@ppml-redis.ppml-serve.svc:6379/" in secrets["ppml-redis-worker"]["url"]


def test_refusals_name_the_fix(generated: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not empty.*kubernetes policy"):
        _generate(generated["dev"], "dev")
    with pytest.raises(ConfigError, match="never latest"):
        generate(tmp_path / "a", "dev", KUBE, {}, image="registry/ppml-serve:latest")
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        generate(tmp_path / "b", "dev", KUBE, {}, image="ppml-serve@sha256:abc")
    with pytest.raises(ConfigError, match="--redis-address"):
        generate(tmp_path / "c", "external-redis", KUBE, {})
    with pytest.raises(ConfigError, match="serve \\['demo'\\]"):
        generate(tmp_path / "d", "dev", KUBE, {"other": demo_model_path()})
    with pytest.raises(ConfigError, match="deploy/kubernetes"):
        generate(tmp_path / "e", "dev", tmp_path, {})
    assert not any((tmp_path / name).exists() for name in "abcde"), "nothing written"
    assert IMAGE == "ppml-serve"


def test_a_model_encrypted_for_the_deployment_is_released_by_its_policy(tmp_path: Path) -> None:
    """The documented flow: generate, encrypt with the deployment's KMS (OUT/state), measure
    the encrypted file into the policy; the cluster's KMS (the Secret) opens that file."""
    from ppml_serve.crypto.model_file import decrypt_model

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "ppml_serve", "kubernetes", "generate",
                           "--out", str(out), "--manifests", str(KUBE)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "ppml-serve model encrypt --state-dir" in done.stdout
    encrypted = tmp_path / "demo.onnx"
    for argv in (["model", "encrypt", "--state-dir", str(out / "state"),
                  str(demo_model_path()), str(encrypted)],
                 ["kubernetes", "policy", "--out", str(out), "--manifests", str(KUBE),
                  "--model", f"demo={encrypted}"]):
        done = subprocess.run([sys.executable, "-m", "ppml_serve", *argv], capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
    resources = _by_kind(render(out))
    policy = yaml.safe_load(resources["ConfigMap"]["ppml-policy"]["data"]["policy.yaml"])
    (release,) = policy["releases"]
    assert release == release_entry(cluster_settings(KUBE), "demo", encrypted)
    assert release["model_key_sha256"], "bound to the encrypted file's key"

    kms_dir = tmp_path / "cluster-kms"
    kms_dir.mkdir(mode=0o700)
    for name, text in _secret_data(resources["Secret"]["ppml-kms"]).items():
        (kms_dir / name).write_text(text)
        (kms_dir / name).chmod(0o600)
    from pydantic import SecretStr
    kms = LocalKMS(kms_dir, SecretStr(_secret_data(
        resources["Secret"]["ppml-kms-passphrase"])["passphrase"]))
    assert decrypt_model(encrypted, kms=kms) == demo_model_path().read_bytes()


def test_the_model_loader_pod_validates_and_passes_checkov(tmp_path: Path) -> None:
    loader, isolation = [doc for doc in yaml.safe_load_all(
        (KUBE / "tools" / "model-loader.yaml").read_text()) if doc]
    for document in (loader, isolation):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
    assert isolation["spec"]["podSelector"]["matchLabels"] == loader["metadata"]["labels"]
    claim = loader["spec"]["volumes"][0]["persistentVolumeClaim"]
    models = next(doc for doc in yaml.safe_load_all((KUBE / "base" / "models.yaml").read_text())
                  if doc)
    assert claim["claimName"] == models["metadata"]["name"]
    assert "ReadWriteOnce" in models["spec"]["accessModes"], "the loader writes it"
    pinned = dict(loader, spec=dict(loader["spec"], containers=[
        dict(loader["spec"]["containers"][0], image=f"registry.example/ppml-serve@{DIGEST}")]))
    manifest = tmp_path / "loader.yaml"
    manifest.write_text(yaml.safe_dump_all([pinned, isolation]))
    assert _checkov(manifest) == []
