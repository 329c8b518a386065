"""Attestation policy: which providers and measurements are trusted, debug or not, how fresh.

The key broker applies one before releasing keys; a client applies its own before sealing
its input to a worker's key (end-to-end mode).

The default (no policy file) is the strict production policy: only hardware evidence (DCAP
quotes, SEV-SNP reports, tokens of an attestation service), verified against the vendors'
pinned roots, on a platform whose TCB is ``UpToDate``, no debug enclaves, and no measurement
allowed until one is listed, so simulated and test-root evidence get nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims, Verifier
from ppml_serve.crypto.attestation.policy_signing import (
    PolicyUnsigned,
    check_signatures,
    signature_path,
)
from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected

Hex = str


class Release(BaseModel):
    """One key release the broker may make: a worker with these measurements gets this
    model's keys. Every field that is set must match; ``measurement`` is the TEE's primary
    one (MRENCLAVE, MRTD, SNP MEASUREMENT, or the simulated digest)."""

    model_config = ConfigDict(extra="forbid")

    measurement: Hex | None = None
    """Hex primary measurement (``ppml-serve attest measure``); may be left out for SGX
    when ``mrsigner`` and ``isv_prod_id`` name the enclave instead."""
    tee: Literal["sgx", "tdx", "snp"] | None = None
    """Only evidence of this TEE kind (any, when unset)."""
    mrsigner: Hex | None = None
    """SGX: the enclave signer's key hash."""
    isv_prod_id: int | None = Field(None, ge=0, le=0xFFFF)
    """SGX: the enclave's product id (with ``mrsigner``)."""
    min_isv_svn: int | None = Field(None, ge=0, le=0xFFFF)
    """SGX: the lowest security version of the enclave accepted."""
    rtmr: list[Hex] | None = Field(None, min_length=4, max_length=4)
    """TDX: RTMR0-3 (firmware, OS loader, kernel, application), each 48 bytes hex."""
    host_data: Hex | None = None
    """SNP: the HOST_DATA the VM was launched with (32 bytes hex)."""
    min_tcb: dict[str, int] | None = None
    """SNP: lowest reported TCB components accepted (bootloader, tee, snp, microcode)."""
    model: str
    """The model (name) whose keys it may receive: its file key and end-to-end key."""
    model_sha256: str
    """SHA-256 of the plaintext model. It is part of the measurement too; kept here so that
    a reader of the policy sees which model file is meant."""
    model_key_sha256: str | None = None
    """For an encrypted model: SHA-256 of its wrapped file key (``model inspect``), the only
    model key the broker unwraps for this release."""
    version: str | None = None
    """The repository version this entry was written for (for readers of the policy; the
    measurement already binds the model file)."""

    @model_validator(mode="after")
    def _names_a_worker(self) -> Release:
        if self.measurement is None and (self.mrsigner is None or self.isv_prod_id is None):
            raise ValueError("a release needs 'measurement', or 'mrsigner' with 'isv_prod_id'")
        return self

    def mismatch(self, claims: Claims) -> str | None:
        """Why this entry does not describe the attested worker (None: it does)."""
        values = claims.measurements
        if self.tee is not None and claims.tee != self.tee:
            return f"the entry is for {self.tee.upper()} evidence"
        if self.measurement is not None and \
                self.measurement.lower() != claims.measurement.lower():
            return "measurement differs"
        expected: dict[str, str | None] = {"mrsigner": self.mrsigner,
                                           "host_data": self.host_data}
        for index, register in enumerate(self.rtmr or []):
            expected[f"rtmr{index}"] = register
        for name, wanted in expected.items():
            if wanted is not None and values.get(name, "").lower() != wanted.lower():
                return f"{name} differs"
        if self.isv_prod_id is not None and values.get("isv_prod_id") != str(self.isv_prod_id):
            return "isv_prod_id differs"
        if self.min_isv_svn is not None and \
                int(values.get("isv_svn", "-1")) < self.min_isv_svn:
            return f"isv_svn is below {self.min_isv_svn}"
        for component, least in (self.min_tcb or {}).items():
            if int(values.get(f"tcb_{component}", "-1")) < least:
                return f"reported TCB {component} is below {least}"
        return None


def publication_binding(queue: str, issued_at: float) -> str:
    """What a worker's published attestation binds beside its key (the "nonce" hashed into
    report_data): the model version it serves and when, to the second."""
    return f"publish|{queue}|{int(issued_at)}"


def key_fingerprint(wrapped_key: bytes) -> str:
    return hashlib.sha256(wrapped_key).hexdigest()


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_providers: list[str] = Field(default_factory=lambda: ["dcap", "snp", "jwt"])
    """Evidence kinds accepted: ``dcap`` (SGX/TDX quotes), ``snp``, ``jwt`` (an attestation
    service's token); ``simulated`` gives no hardware protection."""
    allowed_tcb_statuses: list[str] = Field(default_factory=lambda: ["UpToDate"])
    """DCAP: the platform TCB statuses accepted (Intel's names: UpToDate, SWHardeningNeeded,
    ConfigurationNeeded, ConfigurationAndSWHardeningNeeded, OutOfDate, ...). Revoked never."""
    refused_advisories: list[str] = Field(default_factory=list)
    """DCAP: Intel security advisories (INTEL-SA-xxxxx) that refuse a platform outright."""
    max_collateral_age_days: float | None = Field(None, gt=0)
    """DCAP: refuse a quote judged by TCB info issued longer ago than this (expired
    collateral is always refused)."""
    allow_test_root: bool = False
    """Accept DCAP quotes verified against a TEST root (``test_pki``): development only,
    no hardware protection."""
    max_vmpl: int = Field(0, ge=0, le=3)
    """SNP: the least privileged VM privilege level whose report is accepted."""
    allow_migration_agent: bool = False
    """SNP: accept guests whose policy allows a migration agent."""
    allowed_measurements: list[str] = Field(default_factory=list)
    """Hex measurements (``ppml-serve attest measure``) of workers a client trusts with its
    input (end-to-end mode). The key broker does not release keys on this list alone."""
    releases: list[Release] = Field(default_factory=list)
    """Key broker: which measurement may receive which model's keys."""
    allow_debug: bool = False
    """Accept debug enclaves (and simulated evidence, which is always debug)."""
    max_evidence_age_s: float = Field(60.0, gt=0)
    """Evidence older than this is stale."""

    @classmethod
    def load(cls, path: str | Path | None) -> Policy:
        path = Path(path) if path is not None else None
        if path is None or not path.exists():
            return cls()
        return cls.parse(read_protected(path, secret=False), path)

    @classmethod
    def parse(cls, data: bytes, path: Path) -> Policy:
        try:
            return cls.model_validate(yaml.safe_load(data) or {})
        except (ValidationError, yaml.YAMLError) as exc:
            raise ConfigError(f"security.policy_file: {path} is not a valid policy: "
                              f"{str(exc).splitlines()[0]}") from None

    def check_worker_key(self, document: dict[str, object], verifier: Verifier,
                         now: float, model: str) -> bytes:
        """A worker's published end-to-end key for ``model``, if its evidence passes: the
        raw public key. The evidence must bind the key, the model it serves and the time it
        was made (``publication_binding``), so neither another model's key nor an old
        attestation of a key is taken."""
        try:
            public_key = base64.b64decode(str(document["public_key"]), validate=True)
            evidence = str(document["evidence"])
            served = str(document["model"])
            issued_at = float(str(document["issued_at"]))
        except (KeyError, ValueError, binascii.Error):
            raise AttestationRefused("worker attestation document is malformed (or from a "
                                     "worker too old to bind its model and time)") from None
        if served.partition("@")[0] != model:
            raise AttestationRefused(f"the worker key is attested for model "
                                     f"{served.partition('@')[0]!r}, not {model!r}")
        age = now - issued_at
        if age > self.max_evidence_age_s or age < -5:
            raise AttestationRefused(f"the worker's attestation is stale ({age:.0f} s old)")
        claims = verifier.verify(evidence)
        if not claims.binds(public_key, publication_binding(served, issued_at)):
            raise AttestationRefused("evidence does not bind the published public key to "
                                     "this model and time")
        self.check(claims, now)
        return public_key

    def check(self, claims: Claims, now: float) -> None:
        """Evidence a client may trust: provider, debug, freshness and measurement."""
        self.check_evidence(claims, now)
        allowed = {m.lower() for m in self.allowed_measurements}
        if claims.measurement.lower() not in allowed and \
                all(release.mismatch(claims) is not None for release in self.releases):
            raise AttestationRefused(
                f"measurement {claims.measurement[:16]}… is not allowed by the policy "
                "(the worker's code, configuration or model differs)")

    def check_release(self, claims: Claims, model: str, model_key: bytes | None,
                      now: float) -> Release:
        """The release entry that lets this worker have ``model``'s keys (and, for an
        encrypted model, unwrap ``model_key``); ``AttestationRefused`` says why not."""
        self.check_evidence(claims, now)
        bound = [r for r in self.releases if r.mismatch(claims) is None]
        if not bound:
            measurement = claims.measurement.lower()
            near = [r for r in self.releases if r.model == model and r.measurement is not None
                    and r.measurement.lower() == measurement]
            if near:
                raise AttestationRefused(f"the worker's measurement is model {model!r}'s but "
                                         f"{near[0].mismatch(claims)}")
            if measurement in {m.lower() for m in self.allowed_measurements}:
                raise AttestationRefused(
                    f"measurement {claims.measurement[:16]}… is not bound to any model: list "
                    "it under 'releases' with the model it may receive keys for")
            raise AttestationRefused(
                f"measurement {claims.measurement[:16]}… is not allowed by the policy "
                "(the worker's code, configuration or model differs)")
        for release in bound:
            if release.model != model:
                continue
            if model_key is None or release.model_key_sha256 == key_fingerprint(model_key):
                return release
            raise AttestationRefused(
                f"the model key presented is not the one bound to model {model!r}")
        models = sorted({release.model for release in bound})
        raise AttestationRefused(
            f"measurement {claims.measurement[:16]}… may receive keys for {models}, "
            f"not for model {model!r}")

    def check_evidence(self, claims: Claims, now: float) -> None:
        if claims.provider not in self.allowed_providers:
            raise AttestationRefused(f"provider {claims.provider!r} is not allowed by the policy")
        if claims.debug and not self.allow_debug:
            raise AttestationRefused("debug (or simulated) evidence is not allowed by the policy")
        if claims.test_root and not self.allow_test_root:
            raise AttestationRefused("the quote is signed by a TEST root, not Intel's: no "
                                     "hardware protection (the policy does not allow_test_root)")
        age = now - claims.issued_at
        if age > self.max_evidence_age_s or age < -5:
            raise AttestationRefused(f"evidence is stale ({age:.0f} s old)")
        # DCAP quotes always carry a TCB judgement; a token only when its service gives one
        if claims.tee in ("sgx", "tdx") and (claims.tcb_status or claims.provider == "dcap"):
            self.check_tcb(claims, now)
        if claims.tee == "snp":
            values = claims.measurements
            if int(values.get("vmpl", "0")) > self.max_vmpl:
                raise AttestationRefused(f"the report is from VMPL {values.get('vmpl')}, above "
                                         f"the policy's {self.max_vmpl}")
            if values.get("migrate_ma") == "true" and not self.allow_migration_agent:
                raise AttestationRefused("the guest allows a migration agent; the policy not")

    def check_tcb(self, claims: Claims, now: float) -> None:
        if claims.tcb_status not in self.allowed_tcb_statuses or claims.tcb_status == "Revoked":
            raise AttestationRefused(
                f"the platform's TCB status is {claims.tcb_status}"
                + (f" ({', '.join(claims.advisories)})" if claims.advisories else "")
                + f"; the policy accepts {', '.join(self.allowed_tcb_statuses)}")
        refused = sorted(set(claims.advisories) & set(self.refused_advisories))
        if refused:
            raise AttestationRefused(f"the platform is affected by {', '.join(refused)}")
        if self.max_collateral_age_days is not None and claims.collateral_issued:
            issued = dt.datetime.fromisoformat(claims.collateral_issued.replace("Z", "+00:00"))
            age_days = (now - issued.timestamp()) / 86400
            if age_days > self.max_collateral_age_days:
                raise AttestationRefused(
                    f"the collateral was issued {age_days:.0f} days ago, more than the "
                    f"policy's {self.max_collateral_age_days:g}: fetch fresh collateral")


class PolicyFile:
    """A policy file re-read when it changes, so that owners can allow a new model or
    version (``ppml-serve model add``) without restarting the key broker. A change that does
    not parse, or (with ``signers``) lacks ``threshold`` valid operator signatures, is
    refused (reported to ``on_error``) and the last good policy stays in force."""

    def __init__(self, path: Path, on_error: Callable[[str], None] | None = None,
                 signers: Mapping[str, str] | None = None, threshold: int = 1,
                 on_accept: Callable[[str, list[str]], None] | None = None) -> None:
        self._path = path
        self._on_error = on_error
        self._on_accept = on_accept
        self._signers = dict(signers or {})
        self._threshold = threshold
        self._stamp = self._read_stamp()
        self._policy = self._load()

    def _read_stamp(self) -> tuple[tuple[int, int] | None, ...]:
        stamps: list[tuple[int, int] | None] = []
        for path in (self._path, signature_path(self._path)):
            try:
                stat = path.stat()
                stamps.append((stat.st_mtime_ns, stat.st_size))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self) -> Policy:
        """Read once, check the signatures of exactly those bytes, then parse them."""
        try:
            data = read_protected(self._path, secret=False)
        except FileNotFoundError:
            if self._signers:
                raise PolicyUnsigned(f"{self._path} does not exist") from None
            return Policy()
        signed_by: list[str] = []
        if self._signers:
            signed_by = check_signatures(data, self._path, self._signers, self._threshold)
        policy = Policy.parse(data, self._path)
        if self._on_accept is not None:
            self._on_accept(hashlib.sha256(data).hexdigest(), signed_by)
        return policy

    def current(self) -> Policy:
        stamp = self._read_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._policy = self._load()
            except ConfigError as exc:
                if self._on_error is not None:
                    self._on_error(str(exc))
        return self._policy
