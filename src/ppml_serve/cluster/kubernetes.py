"""Everything the Kubernetes manifests need that cannot live in the repository: the Secrets
and ConfigMaps of one deployment, written as files for ``kubectl apply -k``.

``generate`` makes a CA and a certificate per service (their cluster DNS names), the Redis
ACL users with their passwords and ``redis.conf``, an admin API key (its token written
beside, never applied), a local KMS with its passphrase and data keys, the key broker's policy
(releases measured from the model files given, providers the overlay's TEE produces) and, for
``dev``, the simulated platform key. A ``kustomization.yaml`` ties them to an overlay of
``deploy/kubernetes`` and pins the images. Every file is 0600 in a 0700 directory.

The deployment's KMS stays in ``OUT/state`` too, so that ``ppml-serve model encrypt
--state-dir OUT/state`` encrypts models for it; ``write_policy`` then measures the encrypted
files into the policy without touching any key.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from pydantic import SecretStr

from ppml_serve.cluster import KUBERNETES_OVERLAYS
from ppml_serve.crypto.attestation.simulated import PRIVATE_FILE, PUBLIC_FILE, ensure_platform_key
from ppml_serve.crypto.keystore import DATA_KEYS_FILE, DataKeyTable
from ppml_serve.crypto.kms.local import PRIMARY_FILE, LocalKMS
from ppml_serve.crypto.tls import SERVER_CIPHERS, ensure_dev_pki, issue_server_cert
from ppml_serve.errors import ConfigError
from ppml_serve.gateway.auth import add_api_key
from ppml_serve.private_files import read_protected, secure_directory, write_private
from ppml_serve.settings import Settings

NAMESPACE = "ppml-serve"
OVERLAYS = KUBERNETES_OVERLAYS
REDIS_SERVICE = f"ppml-redis.{NAMESPACE}.svc:6379"
REDIS_USERS = ("gateway", "worker", "keda", "admin")
IMAGE = "ppml-serve"


@dataclass(frozen=True)
class Generated:
    directory: Path
    api_key_file: Path
    """The admin API key's token: for the operator, never applied to the cluster."""
    secrets: tuple[str, ...]


def _service_names(service: str) -> list[str]:
    return [service, f"{service}.{NAMESPACE}", f"{service}.{NAMESPACE}.svc",
            f"{service}.{NAMESPACE}.svc.cluster.local"]


def _document(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def cluster_settings(manifests: Path) -> Settings:
    """The settings every part reads in the cluster (the ``ppml-config`` ConfigMap)."""
    for document in _document(manifests / "base" / "config.yaml"):
        if document.get("kind") == "ConfigMap" and document["metadata"]["name"] == "ppml-config":
            return Settings.model_validate(yaml.safe_load(document["data"]["config.yaml"]))
    raise ConfigError(f"{manifests}/base/config.yaml holds no ConfigMap ppml-config")


def checked_settings(manifests: Path, models: dict[str, Path]) -> Settings:
    """The cluster's settings, after checking that it serves ``models`` and their files exist."""
    settings = cluster_settings(manifests)
    for name, path in models.items():
        if name not in settings.models:
            raise ConfigError(f"--model {name}: the manifests serve {sorted(settings.models)}")
        if not path.is_file():
            raise ConfigError(f"--model {name}={path}: no such file")
    return settings


def redis_conf(passwords: dict[str, str], prefix: str) -> str:
    """The in-cluster Redis's ``redis.conf`` (the StatefulSet's mounts): TLS only, an ACL
    user per part, AOF on its volume."""
    return "\n".join([
        "bind * -::*",
        "port 0",
        "tls-port 6379",
        "tls-cert-file /etc/redis/tls/tls.crt",
        "tls-key-file /etc/redis/tls/tls.key",
        "tls-ca-cert-file /etc/redis/tls/ca.crt",
        "tls-auth-clients no",
        'tls-protocols "TLSv1.2 TLSv1.3"',
        f'tls-ciphers "{SERVER_CIPHERS}"',
        "tls-prefer-server-ciphers yes",
        "dir /data",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "maxmemory-policy noeviction",
        "protected-mode yes",
        *redis_users(passwords, prefix),
    ]) + "\n"


def redis_users(passwords: dict[str, str], prefix: str) -> list[str]:
    """ACL lines: gateway and worker reach only the service's keys and no admin command;
    KEDA may only read a stream's groups and pending entries; admin is for operators."""
    return [
        # not "off": Redis 7.0 replays AOF transactions as the default user
        f"user default on >{secrets.token_urlsafe(32)} ~* &* +@all",
        *(f"user {part} on >{passwords[part]} ~{prefix}:* resetchannels +@all -@dangerous "
          "+info" for part in ("gateway", "worker")),
        f"user keda on >{passwords['keda']} ~{prefix}:* resetchannels -@all +xinfo +xpending "
        "+xlen +ping +hello +auth",
        f"user admin on >{passwords['admin']} ~* &* +@all",
    ]


def _secret(name: str, data: dict[str, str], kind: str = "Opaque") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "type": kind,
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"app.kubernetes.io/name": "ppml-serve"}},
            "stringData": data}


def _config_map(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE}, "data": data}


def _image(image: str, reference: str, flag: str) -> dict[str, str]:
    """A kustomize ``images`` entry replacing ``image`` by ``reference`` (by digest when it
    has one)."""
    if "@" in reference:
        name, digest = reference.split("@", 1)
        hexdigits = digest.removeprefix("sha256:")
        if not digest.startswith("sha256:") or len(hexdigits) != 64 \
                or any(c not in "0123456789abcdef" for c in hexdigits):
            raise ConfigError(f"{flag}: {reference!r}: a digest is sha256: and 64 lowercase "
                              "hex digits")
        return {"name": image, "newName": name, "digest": digest}
    name, _, tag = reference.rpartition(":")
    if not name or "/" in tag or tag in ("", "latest"):
        raise ConfigError(f"{flag}: {reference!r}: give a digest (NAME@sha256:...) or at "
                          "least a fixed tag, never latest")
    return {"name": image, "newName": name, "newTag": tag}


def _policy(overlay: str, releases: list[dict[str, str]]) -> str:
    if overlay == "dev":
        head = ("# DEVELOPMENT: simulated attestation, no hardware protection.\n"
                "allowed_providers: [simulated]\nallow_debug: true\n")
    else:
        head = ("# Workers in TDX (dcap quotes) or SEV-SNP guests; add allowed_measurements\n"
                "# from 'ppml-serve attest measure --evidence' to pin the guest image.\n"
                "allowed_providers: [dcap, snp]\nallow_debug: false\n")
    body = yaml.safe_dump({"max_evidence_age_s": 60, "releases": releases}, sort_keys=False)
    return head + body


def generate(out: Path, overlay: str, manifests: Path, models: dict[str, Path],
             image: str | None = None, gateway_hosts: tuple[str, ...] = (),
             redis_address: str | None = None,
             redis_image: str | None = None) -> Generated:
    """Write the Secrets, ConfigMaps and kustomization of one deployment into ``out``."""
    if overlay not in OVERLAYS:
        raise ConfigError(f"--overlay: {overlay!r}; choose one of {', '.join(OVERLAYS)}")
    overlay_dir = manifests / "overlays" / overlay
    if not (overlay_dir / "kustomization.yaml").is_file():
        raise ConfigError(f"--manifests: {manifests} has no overlays/{overlay}: point it at "
                          "the repository's deploy/kubernetes")
    if overlay == "external-redis" and not redis_address:
        raise ConfigError("--redis-address HOST:PORT is needed for external-redis (the "
                          "Redis that gateways, workers and KEDA reach)")
    if out.exists() and any(out.iterdir()):
        # never over a deployment's keys: models encrypted with its KMS would no longer open
        raise ConfigError(f"{out} is not empty: it may hold a deployment's keys, which "
                          "generating again would replace; choose a new directory (to change "
                          "only the policy: ppml-serve kubernetes policy)")
    images = [_image(IMAGE, image, "--image")] if image else []
    if redis_image:
        images.append(_image("redis", redis_image, "--redis-image"))
    settings = checked_settings(manifests, models)
    secure_directory(out)
    # certificates are issued in a scratch directory inside OUT (same owner, same disk),
    # read into the Secrets, and removed with it
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as work_dir:
        documents, api_token = _secrets(Path(work_dir), out, overlay, settings, gateway_hosts,
                                        redis_address)
    write_private(out / "secrets.yaml", yaml.safe_dump_all(documents, sort_keys=False).encode())
    write_policy(out, manifests, models, overlay)
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(overlay_dir.resolve(), out.resolve()), "secrets.yaml"],
        "patches": [{"path": "configmaps.yaml"}],
    }
    if images:
        kustomization["images"] = images
    if redis_address:
        kustomization["patches"] += [{
            "target": {"kind": "ScaledObject", "name": "ppml-worker-demo"},
            "patch": yaml.safe_dump([{"op": "replace",
                                      "path": f"/spec/triggers/{index}/metadata/address",
                                      "value": redis_address} for index in (0, 1)]),
        }]
    write_private(out / "kustomization.yaml",
                  yaml.safe_dump(kustomization, sort_keys=False).encode())
    api_key_file = out / "api-key"
    write_private(api_key_file, (api_token + "\n").encode())
    return Generated(out, api_key_file, tuple(d["metadata"]["name"] for d in documents))


def write_policy(out: Path, manifests: Path, models: dict[str, Path],
                 overlay: str | None = None) -> list[dict[str, str]]:
    """(Re)write ``OUT/configmaps.yaml``: the CA, and the policy releasing the keys of
    ``models`` (plaintext or encrypted files) to workers of this deployment's overlay."""
    if overlay is None:
        kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
        overlay = Path(kustomization["resources"][0]).name
        if overlay not in OVERLAYS:
            raise ConfigError(f"{out}/kustomization.yaml: not made by 'kubernetes generate'")
    settings = checked_settings(manifests, models)
    from ppml_serve.worker.runner import release_entry

    releases = [release_entry(settings, name, path) for name, path in sorted(models.items())]
    ca = read_protected(out / "pki" / "ca.pem", secret=False).decode()
    config_maps = [_config_map("ppml-ca", {"ca.crt": ca}),
                   _config_map("ppml-policy", {"policy.yaml": _policy(overlay, releases)})]
    write_private(out / "configmaps.yaml",
                  yaml.safe_dump_all(config_maps, sort_keys=False).encode())
    return releases


def _secrets(work: Path, out: Path, overlay: str, settings: Settings,
             gateway_hosts: tuple[str, ...], redis_address: str | None
             ) -> tuple[list[dict[str, Any]], str]:
    pki = out / "pki"  # the CA key stays with the operator, to issue more certificates
    ensure_dev_pki(pki)
    ca = read_protected(pki / "ca.pem", secret=False).decode()

    def tls(service: str, extra: tuple[str, ...] = ()) -> dict[str, str]:
        cert, key = issue_server_cert(pki, work / service, service,
                                      [*_service_names(service)[1:], *extra])
        return {"tls.crt": read_protected(cert).decode(), "tls.key": read_protected(key).decode(),
                "ca.crt": ca}

    passphrase = secrets.token_urlsafe(32)
    state = out / "state"  # a state dir for 'model encrypt --state-dir': this KMS, no more
    secure_directory(state)
    write_private(state / "kms-passphrase", passphrase.encode())
    kms_dir = state / "kms"
    kms = LocalKMS.create(kms_dir, SecretStr(passphrase))
    DataKeyTable.create(kms_dir / DATA_KEYS_FILE, kms)
    api_keys = work / "api-keys" / "api-keys.json"
    api_keys.parent.mkdir(mode=0o700)
    token = add_api_key(api_keys, "admin", ["*"], ("infer", "metrics", "admin"))
    passwords = {user: secrets.token_urlsafe(32) for user in REDIS_USERS}
    address = redis_address or REDIS_SERVICE
    prefix = settings.redis.prefix

    def url(user: str) -> str:
        return f"rediss://{user}:{quote(passwords[user])}@{address}/0"

    documents = [
        _secret("ppml-api-keys", {"api-keys.json": read_protected(api_keys).decode()}),
        _secret("ppml-kms", {name: read_protected(kms_dir / name).decode()
                             for name in (PRIMARY_FILE, DATA_KEYS_FILE)}),
        _secret("ppml-kms-passphrase", {"passphrase": passphrase}),
        _secret("ppml-gateway-tls", tls("ppml-gateway", gateway_hosts), "kubernetes.io/tls"),
        _secret("ppml-keybroker-tls", tls("ppml-keybroker"), "kubernetes.io/tls"),
        _secret("ppml-redis-gateway", {"url": url("gateway")}),
        _secret("ppml-redis-worker", {"url": url("worker")}),
        _secret("ppml-redis-keda", {"username": "keda", "password": passwords["keda"],
                                    "tls": "enable", "ca.crt": ca}),
    ]
    if overlay == "external-redis":
        # that Redis is the operator's: these are the users to add to it
        write_private(out / "redis-users.acl",
                      ("\n".join(redis_users(passwords, prefix)) + "\n").encode())
    else:
        documents += [
            _secret("ppml-redis-tls", tls("ppml-redis"), "kubernetes.io/tls"),
            _secret("ppml-redis-config", {"redis.conf": redis_conf(passwords, prefix)}),
        ]
    write_private(out / "redis-admin.url", (url("admin") + "\n").encode())
    if overlay == "dev":
        ensure_platform_key(work / "attestation")
        documents.append(_secret("ppml-simulated-platform-key", {
            name: read_protected(work / "attestation" / name).decode()
            for name in (PRIVATE_FILE, PUBLIC_FILE)}))
    return documents, token
