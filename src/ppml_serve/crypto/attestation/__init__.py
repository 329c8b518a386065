"""Attestation: evidence that binds a worker's key to its measurement, and its verification."""

from ppml_serve.crypto.attestation.base import AttestationRefused, Claims, Provider, Verifier

__all__ = ["AttestationRefused", "Claims", "Provider", "Verifier"]
