"""Cryptography: record envelopes, key management (kms/), TLS material."""
