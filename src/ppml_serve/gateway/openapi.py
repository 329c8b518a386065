"""The REST API as an OpenAPI 3 document (served at ``/v2/openapi.json``).

Kept beside the routes and checked against them by a test, so that it cannot drift; the fuzz
tests generate their requests from it.
"""

from __future__ import annotations

from typing import Any

from ppml_serve import __version__

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/Error"}}}}
_ERRORS = {code: _ERROR for code in ("400", "401", "403", "404", "413", "429", "503", "504")}

_TENSOR = {
    "type": "object", "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": {"type": "object"},
        "data": {"type": "array", "items": {}},
    },
}
_INFER_REQUEST = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"},
                                                              "parameters": {"type": "object"}}}},
    },
    "example": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8],
                            "data": [0] * 64}]},
}


def _json(schema: dict[str, Any] | None = None, description: str = "OK") -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _param(name: str, example: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string"}, "example": example}


def _get(summary: str, *params: dict[str, Any], public: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "parameters": list(params),
                                 "responses": {"200": _json(), **_ERRORS}}
    if public:
        operation["security"] = []
    return {"get": operation}


def _page(summary: str, media_type: str, *params: dict[str, Any]) -> dict[str, Any]:
    """A public GET answering a file of ``media_type`` (the browsable API page)."""
    return {"get": {"summary": summary, "parameters": list(params), "security": [],
                    "responses": {"200": {"description": "OK", "content": {
                                      media_type: {"schema": {"type": "string"}}}},
                                  "404": _json(description="No such file")}}}


def _repository_change(summary: str, *params: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "parameters": list(params),
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"parameters": {
                "type": "object", "properties": {"unload_dependents": {"type": "boolean"}},
                "additionalProperties": False}}}}}},
        "responses": {"200": _json(), **_ERRORS}}}


def _infer(summary: str, *params: dict[str, Any]) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "parameters": list(params),
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": _json(description="The inference response (JSON, or the binary "
                                               "tensor extension)"), **_ERRORS}}}


def openapi_document() -> dict[str, Any]:
    model, version, job = _param("model", "demo"), _param("version", "1"), _param("job", "0")
    return {
        "openapi": "3.0.3",
        "info": {"title": "ppml-serve", "version": __version__,
                 "description": "KServe v2 (Open Inference Protocol) over HTTPS; every "
                                "payload is sealed before it reaches the queue."},
        "security": [{"bearer": []}],
        "paths": {
            "/v2": _get("Server metadata and security posture", public=True),
            "/v2/health/live": _get("Liveness", public=True),
            "/v2/health/ready": _get("Readiness (queue reachable, every model served)",
                                     public=True),
            "/v2/openapi.json": _get("This document", public=True),
            "/v2/docs": _page("This document, browsable (Swagger UI)", "text/html"),
            "/v2/docs/init.js": _page("The browsable page's script", "text/javascript"),
            "/v2/docs/{name}": _page("Swagger UI's files (served here, no CDN)", "*/*",
                                     _param("name", "swagger-ui.css")),
            "/v2/models/{model}": _get("Model metadata", model),
            "/v2/models/{model}/ready": _get("Model readiness", model),
            "/v2/models/{model}/versions/{version}": _get("Model metadata", model, version),
            "/v2/models/{model}/versions/{version}/ready": _get("Model readiness", model,
                                                                version),
            "/v2/models/{model}/config": _get("Model configuration (Triton's shape)", model),
            "/v2/models/{model}/versions/{version}/config": _get(
                "Model configuration (Triton's shape)", model, version),
            "/v2/models/stats": _get("Inference statistics of every model version served "
                                     "(Triton's shape)"),
            "/v2/models/{model}/stats": _get("Inference statistics (Triton's shape)", model),
            "/v2/models/{model}/versions/{version}/stats": _get(
                "Inference statistics (Triton's shape)", model, version),
            "/v2/repository/index": {"post": {
                "summary": "Models and their state (a key with the 'admin' scope)",
                "responses": {"200": _json({"type": "array", "items": {"type": "object"}}),
                              **_ERRORS}}},
            "/v2/repository/models/{model}/load": _repository_change(
                "Have the workers read the model again and serve it; answers once a version "
                "is ready (a key with the 'admin' scope)", model),
            "/v2/repository/models/{model}/unload": _repository_change(
                "Stop serving the model once its queued requests are answered (a key with "
                "the 'admin' scope)", model),
            "/v2/models/{model}/infer": _infer("Inference", model),
            "/v2/models/{model}/versions/{version}/infer": _infer("Inference", model, version),
            "/v2/models/{model}/infer-sealed": {"post": {
                "summary": "End-to-end sealed inference (body sealed to the workers' key)",
                "parameters": [model],
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": {"description": "The sealed answer"}, **_ERRORS}}},
            "/v2/models/{model}/attestation": _get("Workers' attested end-to-end keys", model),
            "/v2/models/{model}/jobs": {"post": {
                **_infer("Submit a job; fetch the answer later", model)["post"],
                "responses": {"202": _json(description="Accepted, with the job id"),
                              **_ERRORS}}},
            "/v2/models/{model}/jobs/{job}": _get("A job's answer (202 while pending)",
                                                  model, job),
            "/metrics": _get("Prometheus metrics (a key with the 'metrics' scope)"),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                "Tensor": _TENSOR,
                "InferenceRequest": _INFER_REQUEST,
            },
        },
    }
