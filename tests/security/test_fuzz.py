"""Fuzz the running gateway from its own OpenAPI document (schemathesis): no input a client
can send gets a 5xx other than 503/504, and the gateway logs no traceback. Also: the document
names every route the gateway serves."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from starlette.routing import Route

from ppml_serve.gateway.openapi import openapi_document

from ..conftest import Stack

SCHEMA = schemathesis.openapi.from_dict(openapi_document())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
EXAMPLES = 30


def test_openapi_document_lists_every_route(stack: Stack) -> None:
    with requests.Session() as session:
        document = session.get(f"{stack.url}/v2/openapi.json",
                               verify=str(stack.ca_file), timeout=10).json()
    assert document == openapi_document()
    served = {route.path for route in _routes()}
    assert served == set(document["paths"]), served ^ set(document["paths"])


def _routes() -> list[Route]:
    """The routes of an app that is built but never started (its parts are not called)."""
    from unittest.mock import MagicMock

    from ppml_serve.gateway.app import Metrics, create_app

    app = create_app(MagicMock(), MagicMock(), Metrics(), None)
    return [route for route in app.routes if isinstance(route, Route)]


CASES = [(operation, model) for operation in OPERATIONS
         for model in ([None, "demo"] if "{model}" in operation.path else [None])]


@pytest.mark.parametrize(("operation", "model"), CASES,
                         ids=[f"{op.label}-{model or 'any'}" for op, model in CASES])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_no_server_error_for_any_client_input(stack: Stack, operation: object,
                                              model: str | None, mode: GenerationMode,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    """``model``: fuzz the path too, or aim every request at the served model."""
    fixed = {"model": model} if model else None
    statuses: list[int] = []
    with requests.Session() as session:

        @given(case=operation.as_strategy(  # type: ignore[attr-defined]
            generation_mode=mode, path_parameters=fixed))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case: schemathesis.Case) -> None:
            headers = dict(case.headers or {})
            headers.setdefault("Authorization", f"Bearer {stack.api_key}")
            response = case.call(base_url=stack.url, session=session, headers=headers,
                                 verify=str(stack.ca_file), timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500 or response.status_code in (503, 504), (
                f"{case.method} {case.formatted_path}: {response.status_code} "
                f"{response.text[:200]}")

        try:
            call()
        except Unsatisfiable:
            pytest.skip("the operation has no input that could be made invalid")
        finally:
            if "/repository/models/" in operation.path:  # type: ignore[attr-defined]
                _serve_demo_again(stack, session)
    assert statuses
    logged = capfd.readouterr().err
    assert "Traceback" not in logged, logged[-2000:]
    assert "ERROR ppml_serve.gateway" not in logged, logged[-2000:]


def _serve_demo_again(stack: Stack, session: requests.Session) -> None:
    """A fuzzed unload of the served model is a real one: load it again for the tests that
    share this stack (and check that a model unloaded this way comes back)."""
    key = {"Authorization": f"Bearer {stack.api_key}"}
    response = session.post(f"{stack.url}/v2/repository/models/demo/load", json={},
                            headers=key, verify=str(stack.ca_file), timeout=180)
    assert response.status_code == 200, response.text
    ready = session.get(f"{stack.url}/v2/models/demo/ready", headers=key,
                        verify=str(stack.ca_file), timeout=10)
    assert ready.status_code == 200, "demo must serve again after the fuzzed unloads"
