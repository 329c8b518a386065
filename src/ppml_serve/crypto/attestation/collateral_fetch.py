"""Filling the collateral cache (``ppml-serve attest collateral fetch``): Intel DCAP
collateral from a PCCS or Intel's PCS (through ``dcap-qvl``'s own client, which keeps the
signed JSON byte for byte), and AMD SEV-SNP VCEK certificates and the ASK/ARK chain from
AMD's Key Distribution Service. Run where the network reaches them; the broker then verifies
offline. Nothing fetched is trusted until the verifiers check it against the pinned roots.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import dcap_qvl
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ppml_serve.crypto.attestation.base import AttestationRefused
from ppml_serve.crypto.attestation.collateral import CollateralStore
from ppml_serve.crypto.attestation.dcap import quote_measurements
from ppml_serve.crypto.attestation.snp import Report
from ppml_serve.errors import ConfigError

AMD_KDS = "https://kdsintf.amd.com"


def fetch_dcap(store: CollateralStore, pccs_url: str, quote: bytes) -> tuple[Path, str]:
    """Fetch and cache the collateral this quote's platform needs; (file, next update)."""
    tee = quote_measurements(quote)[0]

    async def fetch() -> Any:  # dcap-qvl's client needs a running event loop
        return await dcap_qvl.get_collateral(pccs_url.rstrip("/"), quote)
    try:
        collateral = asyncio.run(fetch())
        fmspc = dcap_qvl.parse_quote(quote).fmspc()
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"collateral fetch from {pccs_url} failed: "
                          f"{str(exc).splitlines()[0][:200]}") from None
    document: dict[str, Any] = json.loads(collateral.to_json())
    path = store.put(tee, fmspc, document)
    return path, str(json.loads(document["tcb_info"]).get("nextUpdate", "?"))


def fetch_snp(store: CollateralStore, kds_url: str, report: bytes, product: str) -> Path:
    """Fetch this report's VCEK (by chip id and reported TCB) and the product's ASK/ARK."""
    parsed = Report.parse(report)
    tcb = parsed.tcb(product)
    base = f"{kds_url.rstrip('/')}/vcek/v1/{product}"
    params = {"blSPL": tcb["bootloader"], "teeSPL": tcb["tee"], "snpSPL": tcb["snp"],
              "ucodeSPL": tcb["microcode"]}
    try:
        with httpx.Client(timeout=30) as http:
            vcek = http.get(f"{base}/{parsed.chip_id.hex()}", params=params)
            vcek.raise_for_status()
            chain = http.get(f"{base}/cert_chain")
            chain.raise_for_status()
    except httpx.HTTPError as exc:
        raise ConfigError(f"VCEK fetch from {kds_url} failed ({exc})") from None
    try:
        ask, ark = x509.load_pem_x509_certificates(chain.content)[:2]
    except ValueError:
        raise AttestationRefused("the KDS cert_chain is not an ASK and an ARK") from None
    der = serialization.Encoding.DER
    return store.put_snp(parsed.chip_id.hex(), tcb, vcek.content,
                         ask.public_bytes(der), ark.public_bytes(der))
