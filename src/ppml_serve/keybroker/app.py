"""HTTPS endpoints of the key broker."""

from __future__ import annotations

import base64
import binascii

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ppml_serve.crypto.attestation.base import AttestationRefused
from ppml_serve.errors import NotReady
from ppml_serve.keybroker.service import KeyBroker, ReleaseRequest


def create_app(broker: KeyBroker) -> Starlette:
    async def nonce(request: Request) -> Response:
        return JSONResponse({"nonce": broker.issue_nonce()})

    async def release(request: Request) -> Response:
        try:
            document = await request.json()
            model_key = document.get("model_key")
            release_request = ReleaseRequest(
                provider=str(document["provider"]), evidence=str(document["evidence"]),
                public_key=base64.b64decode(document["public_key"], validate=True),
                model=str(document["model"]),
                model_key=base64.b64decode(model_key, validate=True) if model_key else None,
                peer=request.client.host if request.client else "",
                nonce=str(document["nonce"]) if document.get("nonce") else None)
            if len(release_request.public_key) != 32:
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, binascii.Error):
            return JSONResponse({"error": "malformed key-release request"}, status_code=400)
        try:
            sealed = broker.release(release_request)
        except AttestationRefused as exc:
            return JSONResponse({"error": f"key release refused: {exc}"}, status_code=403)
        except NotReady as exc:  # the KMS is down: the worker retries, it is not refused
            return JSONResponse({"error": f"keys unavailable: {exc}"}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"sealed_keys": base64.b64encode(sealed).decode()})

    async def health(request: Request) -> Response:
        return JSONResponse({"live": True})

    return Starlette(routes=[
        Route("/v1/nonce", nonce, methods=["POST"]),
        Route("/v1/release", release, methods=["POST"]),
        Route("/v1/health", health),
    ])
