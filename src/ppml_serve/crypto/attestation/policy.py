"""Attestation policy: which providers and measurements are trusted, debug or not, how fresh.

The key broker applies one before releasing keys; a client applies its own before sealing
its input to a worker's key (end-to-end mode).

The default (no policy file) is the strict production policy: only hardware-backed token
evidence (``jwt``), no debug enclaves, and no measurement allowed until one is listed, so
simulated attestation gets nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims, Verifier, report_data
from ppml_serve.errors import ConfigError
from ppml_serve.private_files import read_protected


class Release(BaseModel):
    """One key release the broker may make: this measurement gets this model's keys."""

    model_config = ConfigDict(extra="forbid")

    measurement: str
    """Hex measurement of the worker (``ppml-serve attest measure``)."""
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


def key_fingerprint(wrapped_key: bytes) -> str:
    return hashlib.sha256(wrapped_key).hexdigest()


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_providers: list[str] = Field(default_factory=lambda: ["jwt"])
    """Evidence kinds accepted; ``simulated`` gives no hardware protection."""
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
        try:
            return cls.model_validate(yaml.safe_load(read_protected(path, secret=False)) or {})
        except (ValidationError, yaml.YAMLError) as exc:
            raise ConfigError(f"security.policy_file: {path} is not a valid policy: "
                              f"{str(exc).splitlines()[0]}") from None

    def check_worker_key(self, document: dict[str, object], verifier: Verifier,
                         now: float) -> bytes:
        """A worker's published end-to-end key, if its evidence passes: the raw public key."""
        try:
            public_key = base64.b64decode(str(document["public_key"]), validate=True)
            evidence = str(document["evidence"])
        except (KeyError, ValueError, binascii.Error):
            raise AttestationRefused("worker attestation document is malformed") from None
        claims = verifier.verify(evidence)
        if claims.report_data != report_data(public_key, None):
            raise AttestationRefused("evidence does not bind the published public key")
        self.check(claims, now)
        return public_key

    def check(self, claims: Claims, now: float) -> None:
        """Evidence a client may trust: provider, debug, freshness and measurement."""
        self._check_evidence(claims, now)
        allowed = {m.lower() for m in self.allowed_measurements}
        allowed |= {release.measurement.lower() for release in self.releases}
        if claims.measurement.lower() not in allowed:
            raise AttestationRefused(
                f"measurement {claims.measurement[:16]}… is not allowed by the policy "
                "(the worker's code, configuration or model differs)")

    def check_release(self, claims: Claims, model: str, model_key: bytes | None,
                      now: float) -> Release:
        """The release entry that lets this worker have ``model``'s keys (and, for an
        encrypted model, unwrap ``model_key``); ``AttestationRefused`` says why not."""
        self._check_evidence(claims, now)
        measurement = claims.measurement.lower()
        bound = [r for r in self.releases if r.measurement.lower() == measurement]
        if not bound:
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

    def _check_evidence(self, claims: Claims, now: float) -> None:
        if claims.provider not in self.allowed_providers:
            raise AttestationRefused(f"provider {claims.provider!r} is not allowed by the policy")
        if claims.debug and not self.allow_debug:
            raise AttestationRefused("debug (or simulated) evidence is not allowed by the policy")
        age = now - claims.issued_at
        if age > self.max_evidence_age_s or age < -5:
            raise AttestationRefused(f"evidence is stale ({age:.0f} s old)")


class PolicyFile:
    """A policy file re-read when it changes, so that owners can allow a new model or
    version (``ppml-serve model add``) without restarting the key broker. A change that does
    not parse is refused (logged) and the last good policy stays in force."""

    def __init__(self, path: Path, on_error: Callable[[str], None] | None = None) -> None:
        self._path = path
        self._on_error = on_error
        self._stamp = self._read_stamp()
        self._policy = Policy.load(path)

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self._path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def current(self) -> Policy:
        stamp = self._read_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._policy = Policy.load(self._path)
            except ConfigError as exc:
                if self._on_error is not None:
                    self._on_error(str(exc))
        return self._policy
