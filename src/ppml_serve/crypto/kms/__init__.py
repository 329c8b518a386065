"""Key management: primary keys that wrap data keys."""

from ppml_serve.crypto.kms.local import DataKey, LocalKMS

__all__ = ["DataKey", "LocalKMS"]
