"""Key management: primary keys (in a KMS) that wrap data keys."""

from ppml_serve.crypto.kms.base import KMS, DataKey

__all__ = ["KMS", "DataKey"]
