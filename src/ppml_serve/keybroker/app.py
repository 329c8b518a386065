"""HTTPS endpoints of the key broker."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ppml_serve.crypto.attestation.base import AttestationRefused
from ppml_serve.crypto.attestation.collateral import CollateralStore
from ppml_serve.errors import NotReady
from ppml_serve.keybroker.service import KeyBroker, ReleaseRequest
from ppml_serve.keybroker.wire import NonceAnswer, ReleaseAnswer, ReleaseAsk

log = logging.getLogger("ppml_serve.keybroker")
EXPIRY_WARNING = dt.timedelta(days=7)
CHECK_EVERY_S = 3600.0


def warn_of_expiry(store: CollateralStore) -> None:
    """A log line before expiry bites (and one while it does)."""
    now = dt.datetime.now(dt.timezone.utc)
    for name, expiry in store.expiries():
        if expiry < now:
            log.error("collateral %s expired at %s: quotes of that platform are refused; run "
                      "'ppml-serve attest collateral fetch'", name, expiry.isoformat())
        elif expiry - now < EXPIRY_WARNING:
            log.warning("collateral %s expires in %.1f days (%s): run 'ppml-serve attest "
                        "collateral fetch'", name, (expiry - now).total_seconds() / 86400,
                        expiry.isoformat())


def create_app(broker: KeyBroker, collateral: CollateralStore | None = None) -> Starlette:
    registry = CollectorRegistry()
    expiry_gauge = Gauge("ppml_attestation_collateral_expiry_seconds",
                         "Seconds until cached DCAP collateral expires (negative: expired; "
                         "quotes of that platform are refused)", ["file"], registry=registry)

    async def metrics(request: Request) -> Response:
        now = dt.datetime.now(dt.timezone.utc)
        for name, expiry in collateral.expiries() if collateral is not None else ():
            expiry_gauge.labels(name).set((expiry - now).total_seconds())
        return Response(generate_latest(registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def watch() -> None:
            while collateral is not None:
                warn_of_expiry(collateral)
                await asyncio.sleep(CHECK_EVERY_S)
        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            task.cancel()

    async def nonce(request: Request) -> Response:
        return JSONResponse(NonceAnswer(nonce=broker.issue_nonce()).model_dump())

    async def release(request: Request) -> Response:
        try:
            ask = ReleaseAsk.model_validate_json(await request.body())
        except (ValidationError, RecursionError):
            return JSONResponse({"error": "malformed key-release request"}, status_code=400)
        release_request = ReleaseRequest(
            provider=ask.provider, evidence=ask.evidence, public_key=ask.public_key,
            model=ask.model, model_key=ask.model_key, nonce=ask.nonce,
            peer=request.client.host if request.client else "")
        try:
            # verification and KMS unwraps block: off the event loop
            sealed = await run_in_threadpool(broker.release, release_request)
        except AttestationRefused as exc:
            return JSONResponse({"error": f"key release refused: {exc}"}, status_code=403)
        except NotReady as exc:  # the KMS is down: the worker retries, it is not refused
            return JSONResponse({"error": f"keys unavailable: {exc}"}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse(ReleaseAnswer(sealed_keys=sealed).model_dump(mode="json"))

    async def health(request: Request) -> Response:
        return JSONResponse({"live": True})

    return Starlette(routes=[
        Route("/v1/nonce", nonce, methods=["POST"]),
        Route("/v1/release", release, methods=["POST"]),
        Route("/v1/health", health),
        Route("/v1/metrics", metrics),
    ], lifespan=lifespan)
