"""A worker's measurement: digest of its code, its configuration and the model it serves.

In a TEE the code part is measured by hardware (MRENCLAVE / TD measurement); here it is the
SHA-256 of every source file of the ppml_serve package, which is what the simulated provider
reports.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import ppml_serve


@lru_cache(maxsize=1)
def code_digest() -> str:
    root = Path(ppml_serve.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class Measurement:
    code: str
    config: str
    model: str

    @property
    def value(self) -> str:
        return hashlib.sha256(json.dumps([self.code, self.config, self.model]).encode()).hexdigest()

    def describe(self) -> dict[str, str]:
        return {"measurement": self.value, "code": self.code, "config": self.config,
                "model": self.model}


def measure(model_name: str, model_sha256: str, config: dict[str, Any]) -> Measurement:
    config_digest = hashlib.sha256(
        json.dumps({"model_name": model_name, **config}, sort_keys=True).encode()).hexdigest()
    return Measurement(code_digest(), config_digest, model_sha256)
