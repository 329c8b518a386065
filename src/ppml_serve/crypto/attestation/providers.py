"""Worker-side attestation providers that obtain hardware evidence through the documented
file interfaces, so a worker needs no vendor SDK:

- ``gramine``: an SGX enclave under Gramine. ``/dev/attestation/attestation_type`` must say
  ``dcap``; writing 64 bytes to ``user_report_data`` and reading ``quote`` gives a DCAP quote
  whose report_data is those bytes.
- ``tdx`` and ``snp``: a confidential VM through Linux configfs-tsm
  (``/sys/kernel/config/tsm/report``, Documentation/ABI/testing/configfs-tsm): ``mkdir`` a
  report directory, check ``provider`` (``tdx_guest`` / ``sev_guest``), read ``generation``,
  write exactly 64 bytes to ``inblob``, read ``outblob`` (and, for SEV-SNP, ``auxblob``: the
  VCEK, ASK and ARK certificate table), check that ``generation`` moved by exactly one (else
  another writer raced us: try again), ``rmdir``.
- ``auto``: whichever of those the machine has.

The hardware decides the measurement; the ``measurement`` argument is not reported. None of
this can run without a TEE: tests drive it through ``Files`` over a fake tree that enforces
the same rules (a declared stand-in).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import struct
import uuid
from pathlib import Path
from typing import Protocol

from ppml_serve.crypto.attestation.base import AttestationRefused, Provider
from ppml_serve.crypto.attestation.dcap import evidence_document
from ppml_serve.errors import ConfigError

GRAMINE_ROOT = Path("/dev/attestation")
TSM_ROOT = Path("/sys/kernel/config/tsm/report")
TSM_PROVIDERS = {"tdx": "tdx_guest", "snp": "sev_guest"}
RACE_RETRIES = 3

# GUIDs of the SEV-SNP certificate table (AMD GHCB spec, "Certificate table").
SNP_CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le: "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1").bytes_le: "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782").bytes_le: "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae").bytes_le: "ark",
}


class Files(Protocol):
    """The few file operations the providers need (the host's, or a test's fake tree)."""

    def read(self, path: Path) -> bytes: ...

    def write(self, path: Path, data: bytes) -> None: ...

    def mkdir(self, path: Path) -> None: ...

    def rmdir(self, path: Path) -> None: ...

    def exists(self, path: Path) -> bool: ...


class HostFiles:
    def read(self, path: Path) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}")
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o700)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return path.exists()


def _report_data(report_data: str) -> bytes:
    """The 64 bytes the hardware signs: SHA-256(public key || nonce), then 32 zeros."""
    data = bytes.fromhex(report_data)
    if len(data) != 32:
        raise ConfigError("report data to attest is a 32-byte digest")
    return data + bytes(32)


class GramineProvider:
    name = "dcap"

    def __init__(self, files: Files | None = None, root: Path = GRAMINE_ROOT) -> None:
        self._files = files or HostFiles()
        self._root = root
        try:
            kind = self._files.read(root / "attestation_type").decode().strip()
        except OSError:
            raise ConfigError(f"security.attestation: gramine: {root} is not there (is this "
                              "worker running inside a Gramine SGX enclave?)") from None
        if kind != "dcap":
            raise ConfigError(f"security.attestation: gramine reports attestation type "
                              f"{kind!r}; set sgx.remote_attestation = \"dcap\" in the manifest")

    def __repr__(self) -> str:
        return f"GramineProvider({self._root})"

    def evidence(self, measurement: str, report_data: str, nonce: str | None) -> str:
        self._files.write(self._root / "user_report_data", _report_data(report_data))
        return evidence_document(self._files.read(self._root / "quote"), None)


def snp_certificates(auxblob: bytes) -> dict[str, bytes]:
    """The certificates in an SEV-SNP extended report's certificate table, by name."""
    found: dict[str, bytes] = {}
    for index in range(0, min(len(auxblob), 24 * 64), 24):
        guid, offset, length = struct.unpack_from("<16sII", auxblob, index)
        if guid == bytes(16):
            break
        name = SNP_CERT_GUIDS.get(guid)
        if name is not None and offset + length <= len(auxblob):
            found[name] = auxblob[offset:offset + length]
    return found


class TsmProvider:
    """TDX or SEV-SNP evidence through configfs-tsm."""

    def __init__(self, kind: str, files: Files | None = None, root: Path = TSM_ROOT) -> None:
        if kind not in TSM_PROVIDERS:
            raise ConfigError(f"configfs-tsm provider for {kind!r}: tdx or snp")
        self.kind = kind
        self.name = "dcap" if kind == "tdx" else "snp"
        self._files = files or HostFiles()
        self._root = root
        if not self._files.exists(root):
            raise ConfigError(f"security.attestation: {kind}: {root} is not there (configfs "
                              "not mounted, or not a confidential VM with a TSM driver)")

    def __repr__(self) -> str:
        return f"TsmProvider({self.kind}, {self._root})"

    def evidence(self, measurement: str, report_data: str, nonce: str | None) -> str:
        inblob = _report_data(report_data)
        for _ in range(RACE_RETRIES):
            report = self._root / f"ppml-{secrets.token_hex(6)}"
            self._files.mkdir(report)
            try:
                provider = self._files.read(report / "provider").decode().strip()
                if provider != TSM_PROVIDERS[self.kind]:
                    raise AttestationRefused(f"configfs-tsm offers {provider!r} evidence, not "
                                             f"{TSM_PROVIDERS[self.kind]!r}")
                before = int(self._files.read(report / "generation"))
                self._files.write(report / "inblob", inblob)
                outblob = self._files.read(report / "outblob")
                auxblob = self._files.read(report / "auxblob") if self.kind == "snp" else b""
                if int(self._files.read(report / "generation")) != before + 1:
                    continue  # someone else wrote inblob meanwhile: this outblob is not ours
            finally:
                self._files.rmdir(report)
            if self.kind == "tdx":
                return evidence_document(outblob, None)
            certs = snp_certificates(auxblob)
            return json.dumps({"report": base64.b64encode(outblob).decode(),
                               **{name: base64.b64encode(certs[name]).decode()
                                  for name in ("vcek", "ask", "ark") if name in certs}})
        raise AttestationRefused("configfs-tsm report raced with another writer "
                                 f"{RACE_RETRIES} times")


def auto_provider(files: Files | None = None, gramine_root: Path = GRAMINE_ROOT,
                  tsm_root: Path = TSM_ROOT) -> Provider:
    """The provider this machine offers: Gramine's device, or configfs-tsm's report type."""
    files = files or HostFiles()
    if files.exists(gramine_root / "quote"):
        return GramineProvider(files, gramine_root)
    if files.exists(tsm_root):
        probe = tsm_root / f"ppml-probe-{secrets.token_hex(4)}"
        files.mkdir(probe)
        try:
            offered = files.read(probe / "provider").decode().strip()
        finally:
            files.rmdir(probe)
        for kind, name in TSM_PROVIDERS.items():
            if offered == name:
                return TsmProvider(kind, files, tsm_root)
        raise ConfigError(f"security.attestation: auto: configfs-tsm offers {offered!r}, "
                          "which ppml-serve does not verify")
    raise ConfigError("security.attestation: auto found no TEE (no /dev/attestation, no "
                      "configfs-tsm): use dcap-test or simulated for development")
