"""Verifier for attestation tokens (JWT) issued by an attestation service.

Microsoft Azure Attestation (MAA) and Intel Trust Authority return a signed JWT after checking
an SGX/TDX quote. This verifier checks the token's signature against the service's published
signing keys (a JWKS document), its issuer and expiry, and maps its claims:

- measurement: ``x-ms-sgx-mrenclave`` (MAA SGX), Intel Trust Authority's nested
  ``sgx.sgx_mrenclave`` / ``tdx.tdx_mrtd``, or ``measurement``
- report data: ``x-ms-sgx-report-data``, ``sgx.sgx_report_data`` / ``tdx.tdx_report_data``,
  or ``report_data`` (hex)
- debug: ``x-ms-sgx-is-debuggable``, ``sgx.sgx_is_debuggable`` / ``tdx.tdx_is_debuggable``, or
  ``debug``; TCB status: ITA's ``attester_tcb_status``
- issued at: ``iat``; the nonce is carried inside the report data binding.

A JWKS entry may carry its key as JWK parameters or only as an ``x5c`` certificate (Azure
Attestation publishes them so); an entry that holds neither usable form is skipped, logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims

NAME = "jwt"
ALGORITHMS = ("RS256", "RS384", "PS256", "PS384", "ES256", "ES384")

log = logging.getLogger("ppml_serve.attestation")


def _signing_key(entry: dict[str, Any]) -> Any:
    """The public key of one JWKS entry: its JWK parameters, else its x5c certificate."""
    if any(name in entry for name in ("n", "x", "crv")):
        return jwt.PyJWK(entry).key
    chain = entry.get("x5c")
    if isinstance(chain, list) and chain and isinstance(chain[0], str):
        return x509.load_der_x509_certificate(base64.b64decode(chain[0])).public_key()
    raise ValueError("no key parameters and no x5c certificate")


class JwtVerifier:
    name = NAME

    def __init__(self, jwks: dict[str, Any], issuer: str,
                 algorithms: tuple[str, ...] = ALGORITHMS) -> None:
        self._keys: dict[str, Any] = {}
        entries = jwks.get("keys", []) if isinstance(jwks, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                continue
            try:
                self._keys[entry["kid"]] = _signing_key(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, binascii.Error,
                    TypeError) as exc:
                log.warning("JWKS key %r skipped: %s", entry["kid"][:64],
                            str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
        if not self._keys:
            raise AttestationRefused("the attestation service's JWKS holds no usable key")
        self._issuer = issuer
        self._algorithms = list(algorithms)

    @classmethod
    def from_file(cls, path: Path, issuer: str) -> JwtVerifier:
        return cls(json.loads(path.read_text()), issuer)

    def verify(self, evidence: str) -> Claims:
        try:
            kid = jwt.get_unverified_header(evidence).get("kid")
            key = self._keys.get(str(kid))
            if key is None:
                raise AttestationRefused("token is signed by a key the service did not publish")
            claims = jwt.decode(evidence, key=key, algorithms=self._algorithms,
                                issuer=self._issuer, options={"require": ["exp", "iat", "iss"]})
        except jwt.ExpiredSignatureError:
            raise AttestationRefused("attestation token has expired") from None
        except jwt.InvalidIssuerError:
            raise AttestationRefused("attestation token is from an untrusted issuer") from None
        except jwt.PyJWTError as exc:
            raise AttestationRefused(f"attestation token is not valid ({type(exc).__name__})"
                                     ) from None
        tee, measurement, data, debug = _tee_claims(claims)
        if not isinstance(measurement, str) or not isinstance(data, str):
            raise AttestationRefused("attestation token lacks measurement or report data")
        data = data.lower()
        if len(data) == 128 and data[64:] != "0" * 64:
            data = data[:64]  # a service that reports only the key binding's 32 bytes
        return Claims(provider=NAME, measurement=measurement.lower(), report_data=data,
                      issued_at=float(claims["iat"]), debug=bool(debug),
                      nonce=claims.get("nonce"), hardware_protected=True, tee=tee,
                      tcb_status=str(claims.get("attester_tcb_status", "")))


def _tee_claims(claims: dict[str, Any]) -> tuple[str, object, object, object]:
    """(tee, measurement, report data, debug) from MAA's flat or ITA's nested claims."""
    for tee, measured in (("sgx", "sgx_mrenclave"), ("tdx", "tdx_mrtd")):
        nested = claims.get(tee)
        if isinstance(nested, dict) and measured in nested:
            return (tee, nested.get(measured), nested.get(f"{tee}_report_data"),
                    nested.get(f"{tee}_is_debuggable", False))
    for tee, measured in (("sgx", "sgx_mrenclave"), ("tdx", "tdx_mrtd")):
        if measured in claims:  # ITA's older flat layout
            return (tee, claims.get(measured), claims.get(f"{tee}_report_data"),
                    claims.get(f"{tee}_is_debuggable", False))
    return ("sgx" if "x-ms-sgx-mrenclave" in claims else "",
            claims.get("x-ms-sgx-mrenclave", claims.get("measurement")),
            claims.get("x-ms-sgx-report-data", claims.get("report_data")),
            claims.get("x-ms-sgx-is-debuggable", claims.get("debug", False)))
