"""The verifier's collateral cache: Intel DCAP collateral per TEE kind and FMSPC, AMD VCEK
certificates per chip and TCB, kept in a state directory and used offline.

Everything here is signed by Intel or AMD and checked by the verifiers against pinned roots,
so the cache needs integrity only against accidents, not secrecy; a damaged file is a clear
refusal, never a crash. ``ppml-serve attest collateral fetch`` fills it from a PCCS / Intel
PCS and AMD's KDS (``collateral_fetch``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dcap_qvl

from ppml_serve.crypto.attestation.base import AttestationRefused
from ppml_serve.private_files import read_protected, write_private

_SAFE = re.compile(r"^[0-9A-Fa-f]{1,128}$")


def _expiry(collateral: dict[str, Any]) -> dt.datetime | None:
    try:
        stamp = json.loads(str(collateral["tcb_info"]))["nextUpdate"]
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except (KeyError, ValueError, TypeError):
        return None


class CollateralStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"CollateralStore({self.directory})"

    def _path(self, tee: str, fmspc: str) -> Path:
        if tee not in ("sgx", "tdx") or not _SAFE.match(fmspc):
            raise AttestationRefused("no collateral for this platform")
        return self.directory / f"{tee}-{fmspc.upper()}.json"

    def put(self, tee: str, fmspc: str, collateral: dict[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(tee, fmspc)
        write_private(path, json.dumps(collateral, indent=1).encode())
        return path

    def _snp_path(self, chip_id: str, tcb: dict[str, int]) -> Path:
        if not _SAFE.match(chip_id):
            raise AttestationRefused("no VCEK for this chip")
        level = "-".join(f"{name}{value}" for name, value in sorted(tcb.items()))
        return self.directory / f"snp-{chip_id[:32]}-{level}.json"

    def put_snp(self, chip_id: str, tcb: dict[str, int], vcek: bytes, ask: bytes,
                ark: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._snp_path(chip_id, tcb)
        write_private(path, json.dumps({name: value.hex() for name, value in
                                        (("vcek", vcek), ("ask", ask), ("ark", ark))}).encode())
        return path

    def snp_certificates(self, chip_id: str, tcb: dict[str, int]) -> dict[str, bytes]:
        path = self._snp_path(chip_id, tcb)
        try:
            document = json.loads(read_protected(path, secret=False))
            return {name: bytes.fromhex(document[name]) for name in ("vcek", "ask", "ark")}
        except FileNotFoundError:
            raise AttestationRefused("no VCEK cached for this chip at its reported TCB: run "
                                     "'ppml-serve attest collateral fetch --kds'") from None
        except (ValueError, KeyError, TypeError):
            raise AttestationRefused(f"the cached VCEK {path.name} is damaged") from None

    def for_quote(self, quote: bytes, tee: str) -> dict[str, Any]:
        try:
            fmspc = dcap_qvl.parse_quote(quote).fmspc()
        except ValueError:
            raise AttestationRefused("the quote names no platform (FMSPC)") from None
        path = self._path(tee, fmspc)
        try:
            document = json.loads(read_protected(path, secret=False))
        except FileNotFoundError:
            raise AttestationRefused(
                f"no collateral cached for {tee.upper()} platform {fmspc}: run 'ppml-serve "
                "attest collateral fetch'") from None
        except ValueError:
            raise AttestationRefused(f"the cached collateral {path.name} is damaged") from None
        if not isinstance(document, dict):
            raise AttestationRefused(f"the cached collateral {path.name} is damaged")
        return document

    def expiries(self) -> Iterator[tuple[str, dt.datetime]]:
        """(file name, next update) of each cached DCAP collateral, for the expiry gauge."""
        for path in sorted(self.directory.glob("[st][gd]x-*.json")) \
                if self.directory.is_dir() else ():
            try:
                expiry = _expiry(json.loads(read_protected(path, secret=False)))
            except (OSError, ValueError):
                continue
            if expiry is not None:
                yield path.name, expiry
