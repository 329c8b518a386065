"""Verifier for attestation tokens (JWT) issued by an attestation service.

Microsoft Azure Attestation (MAA) and Intel Trust Authority return a signed JWT after checking
an SGX/TDX quote. This verifier checks the token's signature against the service's published
signing keys (a JWKS document), its issuer and expiry, and maps its claims:

- measurement: ``x-ms-sgx-mrenclave`` (MAA SGX) or ``measurement``
- report data: ``x-ms-sgx-report-data`` or ``report_data`` (hex; first 32 bytes compared)
- debug: ``x-ms-sgx-is-debuggable`` or ``debug``
- issued at: ``iat``; the nonce is carried inside the report data binding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims

NAME = "jwt"


class JwtVerifier:
    name = NAME

    def __init__(self, jwks: dict[str, Any], issuer: str,
                 algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256")) -> None:
        self._keys = {key["kid"]: jwt.PyJWK(key) for key in jwks.get("keys", []) if "kid" in key}
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
            key = self._keys.get(kid)
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
        measurement = claims.get("x-ms-sgx-mrenclave", claims.get("measurement"))
        data = claims.get("x-ms-sgx-report-data", claims.get("report_data"))
        if not isinstance(measurement, str) or not isinstance(data, str):
            raise AttestationRefused("attestation token lacks measurement or report data")
        return Claims(provider=NAME, measurement=measurement.lower(),
                      report_data=data.lower()[:64], issued_at=float(claims["iat"]),
                      debug=bool(claims.get("x-ms-sgx-is-debuggable", claims.get("debug", False))),
                      nonce=claims.get("nonce"), hardware_protected=True)
