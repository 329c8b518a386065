"""``ppml-serve model …`` and ``ppml-serve keys …`` and ``ppml-serve attest …``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ppml_serve.crypto.keys import data_key_table, open_kms
from ppml_serve.crypto.model_file import (
    decrypt_model,
    encrypt_model,
    is_encrypted,
    read_header,
)
from ppml_serve.errors import ConfigError
from ppml_serve.settings import Settings


def _bar(total: int, label: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr,
                leave=False)


def model_encrypt(settings: Settings, args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise ConfigError(f"model encrypt: no such file: {source}")
    if is_encrypted(source):
        raise ConfigError(f"model encrypt: {source} is already encrypted")
    if target.exists() and not args.force:
        raise ConfigError(f"model encrypt: {target} exists (use --force to replace it)")
    kms = open_kms(settings)
    with _bar(source.stat().st_size, "encrypting") as bar:
        header = encrypt_model(source, target, kms, args.key_id, progress=bar.update)
    print(json.dumps({"file": str(target), **header.describe()}, indent=2))
    return 0


def model_decrypt(settings: Settings, args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if target.exists() and not args.force:
        raise ConfigError(f"model decrypt: {target} exists (use --force to replace it)")
    with source.open("rb") as handle:
        size = read_header(handle, str(source)).size
    with _bar(size, "decrypting") as bar:
        plaintext = decrypt_model(source, kms=open_kms(settings), progress=bar.update)
    target.write_bytes(plaintext)
    print(f"wrote the plaintext model to {target} (keep it safe: it is not encrypted)",
          file=sys.stderr)
    return 0


def model_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    with path.open("rb") as handle:
        header = read_header(handle, str(path))
    print(json.dumps({"file": str(path), **header.describe()}, indent=2))
    return 0


def keys_rotate(settings: Settings) -> int:
    kms = open_kms(settings)
    primary = kms.rotate()
    data_key = data_key_table(settings).rotate(kms)
    print(f"primary key: {primary}")
    print(f"active record data key: {data_key} (older keys still open existing records; "
          "restart the key broker, gateways and workers to use it)")
    return 0


def attest_measure(settings: Settings, model: str, path: Path) -> int:
    from ppml_serve.worker.runner import worker_measurement

    print(json.dumps(worker_measurement(settings, model, path).describe(), indent=2))
    return 0
