"""Key release logic, free of HTTP: nonces, evidence checks, keys sealed to the worker."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims, Verifier
from ppml_serve.crypto.attestation.policy import Policy, PolicyFile
from ppml_serve.crypto.envelope import model_keys
from ppml_serve.crypto.kms.base import KMS
from ppml_serve.crypto.sealed_box import public_bytes, seal_to
from ppml_serve.errors import IntegrityError, NotReady
from ppml_serve.keybroker.wire import ReleasedKeysPayload
from ppml_serve.private_files import read_protected, write_private

log = logging.getLogger("ppml_serve.keybroker")
audit = logging.getLogger("ppml_serve.audit")

RELEASE_INFO = b"ppml-serve key release v1"
NONCE_TTL_S = 60.0


@dataclass(frozen=True)
class ReleaseRequest:
    provider: str
    evidence: str = field(repr=False)
    public_key: bytes
    model: str
    model_key: bytes | None = field(default=None, repr=False)
    peer: str = ""
    """Network address of the caller (for the audit log)."""
    nonce: str | None = None
    """The broker's nonce the evidence binds (hardware quotes carry it only hashed)."""


def _escaped(value: str) -> str:
    """A caller-chosen value as it may appear inside a log line: control characters (a CR/LF
    would start a forged line) and quotes escaped, at most 128 characters."""
    return json.dumps(value[:128])[1:-1]


class InferenceKeys:
    """One X25519 key pair per model for end-to-end sealed requests, stored KMS-wrapped."""

    def __init__(self, path: Path, kms: KMS) -> None:
        self._path = path
        self._kms = kms
        self._wrapped: dict[str, str] = (json.loads(read_protected(path, secret=False))
                                         if path.exists() else {})

        self._plain: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"InferenceKeys(models={sorted(self._wrapped)})"

    def private_key(self, model: str) -> bytes:
        """The model's key, unwrapped by the KMS once per broker process."""
        with self._lock:
            if model not in self._plain:
                if model not in self._wrapped:
                    key = self._kms.generate_data_key()  # 32 random bytes: an X25519 key
                    self._wrapped[model] = base64.b64encode(key.wrapped).decode()
                    write_private(self._path, json.dumps(self._wrapped, indent=2).encode())
                self._plain[model] = self._kms.unwrap(base64.b64decode(self._wrapped[model]))
            return self._plain[model]


class KeyBroker:
    def __init__(self, kms: KMS, record_keys: dict[str, bytes], active_record_key: str,
                 policy: Policy | PolicyFile, verifiers: dict[str, Verifier],
                 inference_keys: InferenceKeys,
                 clock: Callable[[], float] = time.time) -> None:
        self._kms = kms
        self._record_keys = record_keys
        self._active = active_record_key
        self._policy = policy
        self._verifiers = verifiers
        self._inference_keys = inference_keys
        self._clock = clock
        self._nonces: dict[str, float] = {}
        self._lock = threading.Lock()  # releases run on a thread pool
        self._model_keys: dict[bytes, bytes] = {}

    def _unwrap_once(self, wrapped: bytes) -> bytes:
        """A model's file key: the KMS unwraps each wrapped key once per broker process
        (the policy already bound the wrapped key to the model before this is reached)."""
        digest = hashlib.sha256(wrapped).digest()
        with self._lock:
            cached = self._model_keys.get(digest)
        if cached is None:
            cached = self._kms.unwrap(wrapped)
            with self._lock:
                self._model_keys[digest] = cached
        return cached

    def __repr__(self) -> str:
        return f"KeyBroker(providers={sorted(self._verifiers)})"

    def issue_nonce(self) -> str:
        now = self._clock()
        nonce = secrets.token_urlsafe(24)
        with self._lock:
            self._nonces = {n: t for n, t in self._nonces.items() if t > now}
            self._nonces[nonce] = now + NONCE_TTL_S
        return nonce

    def _consume_nonce(self, nonce: str | None) -> None:
        with self._lock:
            expiry = self._nonces.pop(nonce, None) if nonce else None
        if expiry is None:
            raise AttestationRefused("nonce unknown or already used (replayed evidence)")
        if expiry < self._clock():
            raise AttestationRefused("nonce expired (stale evidence)")

    def _audit(self, request: ReleaseRequest, outcome: str, reason: str,
               claims: Claims | None = None) -> None:
        """One entry per release decision: who asked for which model, on what evidence, and
        what happened. Caller-chosen fields are escaped (no forged lines)."""
        level = logging.INFO if outcome == "released" else logging.WARNING
        measurement = claims.measurement if claims is not None else ""
        fields: dict[str, object] = {
            "decision": outcome, "model": request.model, "provider": request.provider,
            "peer": request.peer, "reason": reason, "measurement": measurement,
            "evidence_sha256": hashlib.sha256(request.evidence.encode()).hexdigest()}
        if claims is not None:
            fields.update(tee=claims.tee, tcb_status=claims.tcb_status,
                          advisories=list(claims.advisories),
                          collateral_sha256=claims.collateral_sha256,
                          hardware_protected=claims.hardware_protected)
        audit.log(level, "key release %s: model=%r measurement=%s provider=%s peer=%s%s",
                  outcome, request.model, measurement or "-",
                  _escaped(request.provider), _escaped(request.peer) or "-",
                  f" ({reason})" if reason else "", extra={"audit": fields})

    def release(self, request: ReleaseRequest) -> bytes:
        """The keys sealed to ``request.public_key``; ``AttestationRefused`` says why not."""
        claims: Claims | None = None
        try:
            verifier = self._verifiers.get(request.provider)
            if verifier is None:
                raise AttestationRefused(f"no verifier for provider {request.provider!r}")
            claims = verifier.verify(request.evidence)
            if claims.provider != request.provider:
                raise AttestationRefused("evidence is from another provider than claimed")
            if request.nonce and claims.nonce and request.nonce != claims.nonce:
                raise AttestationRefused("evidence carries another nonce than the request")
            nonce = request.nonce or claims.nonce
            self._consume_nonce(nonce)
            if not claims.binds(request.public_key, nonce):
                raise AttestationRefused("evidence does not bind the presented public key "
                                         "and the broker's nonce (report_data differs)")
            policy = self._policy.current() if isinstance(self._policy, PolicyFile) \
                else self._policy
            policy.check_release(claims, request.model, request.model_key, self._clock())
            model_key = self._unwrap_once(request.model_key) if request.model_key else None
        except AttestationRefused as exc:
            self._audit(request, "refused", str(exc), claims)
            raise
        except IntegrityError:
            self._audit(request, "refused", "the model's wrapped key is not valid", claims)
            raise AttestationRefused("the model's wrapped key is not valid") from None
        except NotReady as exc:
            self._audit(request, "unavailable", str(exc), claims)
            raise
        inference_private = self._inference_keys.private_key(request.model)
        inference = X25519PrivateKey.from_private_bytes(inference_private)
        payload = ReleasedKeysPayload(
            # this model's derivations only: a worker never holds another model's record keys
            record_keys=model_keys(self._record_keys, request.model), active=self._active,
            model_key=model_key, inference_key=inference_private,
            inference_public_key=public_bytes(inference))
        self._audit(request, "released", "" if claims.hardware_protected
                    else "NO hardware protection", claims)
        return seal_to(request.public_key, payload.model_dump_json().encode(), RELEASE_INFO)
