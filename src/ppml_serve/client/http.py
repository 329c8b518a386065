"""httpx-based clients; ``Client`` and ``AsyncClient`` share request building and decoding."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ppml_serve.codecs import record
from ppml_serve.codecs.tensors import (
    BYTES,
    as_tensor,
    datatype_name,
    deserialize_bytes,
    numpy_dtype,
    tensor_bytes,
)
from ppml_serve.crypto.attestation.base import AttestationRefused, Verifier
from ppml_serve.crypto.attestation.policy import Policy
from ppml_serve.crypto.e2e import ClientSession

Arrays = dict[str, np.ndarray[Any, Any]]


class ClientError(Exception):
    """The server answered with an error; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


_REPOSITORY_TIMEOUT = 180.0
"""Loads wait for attestation, key release and engine compilation; unloads for a drain."""


def _model_path(model: str, version: str | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")


def _tls(ca_file: str | Path | None, verify: bool,
         client_cert: tuple[str | Path, str | Path] | None = None) -> ssl.SSLContext | bool:
    if not verify:
        return False
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_cert is not None:  # for gateways that require mutual TLS
        context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
    return context


def encode_inputs(inputs: Arrays) -> tuple[bytes, dict[str, str]]:
    described = []
    chunks = []
    for name, given in inputs.items():
        array = as_tensor(given, f"input {name!r}")  # text (str/bytes) becomes BYTES
        data = tensor_bytes(array)
        described.append({"name": name, "datatype": datatype_name(array.dtype),
                          "shape": list(array.shape),
                          "parameters": {"binary_data_size": len(data)}})
        chunks.append(data)
    header = json.dumps({"inputs": described, "parameters": {"binary_data_output": True}},
                        separators=(",", ":")).encode()
    return header + b"".join(chunks), {
        "Inference-Header-Content-Length": str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def _decode(response: httpx.Response) -> Arrays:
    _raise_for_status(response)
    body = response.content
    header_size = int(response.headers.get("inference-header-content-length", len(body)))
    document = json.loads(body[:header_size])
    offset = header_size
    outputs: Arrays = {}
    for item in document["outputs"]:
        dtype = numpy_dtype(item["datatype"])
        shape = tuple(item["shape"])
        size = item.get("parameters", {}).get("binary_data_size")
        if item["datatype"] == BYTES:
            data = (memoryview(body)[offset:offset + size] if size is not None
                    else b"".join(len(text.encode()).to_bytes(4, "little") + text.encode()
                                  for text in np.ravel(item["data"])))
            outputs[item["name"]] = deserialize_bytes(data, shape, f"output {item['name']!r}")
            offset += size or 0
        elif size is None:
            outputs[item["name"]] = np.asarray(item["data"], dtype=dtype).reshape(shape)
        else:
            outputs[item["name"]] = np.frombuffer(body, dtype=dtype, count=size // dtype.itemsize,
                                                  offset=offset).reshape(shape)
            offset += size
    return outputs


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        message = str(response.json().get("error", response.text))
    except ValueError:
        message = response.text
    raise ClientError(response.status_code, message)


def _trusted_key(document: dict[str, Any], verifier: Verifier, policy: Policy,
                 model: str) -> bytes:
    reasons = []
    for worker in document.get("workers", []):
        try:
            return policy.check_worker_key(worker, verifier, time.time(), model)
        except AttestationRefused as exc:
            reasons.append(str(exc))
    raise AttestationRefused("no worker key passed the client's policy: "
                             + ("; ".join(reasons) or "no worker published one"))


SEALED_HEADERS = {"Content-Type": "application/octet-stream"}


def _sealed_request(session: ClientSession, model: str, inputs: Arrays) -> bytes:
    tensors = {name: as_tensor(array, f"input {name!r}") for name, array in inputs.items()}
    return session.seal_request(record.pack(tensors), model)


def _sealed_answer(session: ClientSession, model: str, response: httpx.Response) -> Arrays:
    _raise_for_status(response)
    _, outputs = record.unpack(session.open_reply(response.content, model))
    return {name: np.array(array) for name, array in outputs.items()}


class _Base:
    def __init__(self, api_key: str | None) -> None:
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._input_names: dict[str, str] = {}

    def __repr__(self) -> str:  # never show the API key
        return f"{type(self).__name__}()"

    def _named(self, model: str, inputs: np.ndarray[Any, Any] | Arrays) -> Arrays | None:
        if isinstance(inputs, dict):
            return inputs
        if model in self._input_names:
            return {self._input_names[model]: inputs}
        return None

    def _remember(self, model: str, metadata: dict[str, Any]) -> None:
        if len(metadata["inputs"]) != 1:
            raise ValueError(f"model {model!r} has several inputs: pass a dict of arrays")
        self._input_names[model] = metadata["inputs"][0]["name"]


class Client(_Base):
    """Synchronous client. ``infer`` takes an array (single-input models) or a dict."""

    def __init__(self, url: str, api_key: str | None = None, ca_file: str | Path | None = None,
                 verify: bool = True, timeout_s: float = 60.0,
                 client_cert: tuple[str | Path, str | Path] | None = None) -> None:
        super().__init__(api_key)
        self._http = httpx.Client(base_url=url, verify=_tls(ca_file, verify, client_cert),
                                  timeout=timeout_s, headers=self._headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _inputs(self, model: str, inputs: np.ndarray[Any, Any] | Arrays) -> Arrays:
        """Named inputs; a bare array goes to the model's only input."""
        named = self._named(model, inputs)
        if named is None:
            self._remember(model, self.metadata(model))
            named = self._named(model, inputs)
        return named or {}

    def _encoded(self, model: str, inputs: np.ndarray[Any, Any] | Arrays
                 ) -> tuple[bytes, dict[str, str]]:
        """The binary request body."""
        return encode_inputs(self._inputs(model, inputs))

    def ready(self) -> bool:
        return self._http.get("/v2/health/ready").status_code == 200

    def model_ready(self, model: str, version: str | None = None) -> bool:
        return self._http.get(f"{_model_path(model, version)}/ready").status_code == 200

    def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        response = self._http.get(_model_path(model, version))
        _raise_for_status(response)
        result: dict[str, Any] = response.json()
        return result

    def infer(self, model: str, inputs: np.ndarray[Any, Any] | Arrays,
              version: str | None = None) -> Arrays:
        """Outputs of ``model`` (its newest ready version, or ``version``)."""
        body, headers = self._encoded(model, inputs)
        return _decode(self._http.post(f"{_model_path(model, version)}/infer", content=body,
                                       headers=headers))

    def repository_index(self) -> list[dict[str, str]]:
        """Every model and version the workers' repositories hold, with state (admin key)."""
        response = self._http.post("/v2/repository/index", json={})
        _raise_for_status(response)
        result: list[dict[str, str]] = response.json()
        return result

    def load_model(self, model: str) -> None:
        """Have the workers read ``model`` again and serve it (admin key); returns when a
        version is ready, raises ``ClientError`` with the reasons when none is."""
        _raise_for_status(self._http.post(f"/v2/repository/models/{model}/load",
                                          timeout=_REPOSITORY_TIMEOUT))

    def unload_model(self, model: str) -> None:
        """Stop serving ``model`` once its queued requests are answered (admin key)."""
        _raise_for_status(self._http.post(f"/v2/repository/models/{model}/unload",
                                          timeout=_REPOSITORY_TIMEOUT))

    def submit(self, model: str, inputs: np.ndarray[Any, Any] | Arrays) -> str:
        """Enqueue a job now; fetch its answer later with ``result`` (from any gateway)."""
        body, headers = self._encoded(model, inputs)
        response = self._http.post(f"/v2/models/{model}/jobs", content=body, headers=headers)
        _raise_for_status(response)
        return str(response.json()["job_id"])

    def result(self, model: str, job_id: str, wait_s: float = 0.0) -> Arrays | None:
        """The job's outputs, or ``None`` if it is still pending after ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            response = self._http.get(f"/v2/models/{model}/jobs/{job_id}")
            if response.status_code != 202:
                return _decode(response)
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def worker_key(self, model: str, verifier: Verifier, policy: Policy) -> bytes:
        """The model's end-to-end public key, after checking its evidence against ``policy``."""
        response = self._http.get(f"/v2/models/{model}/attestation")
        _raise_for_status(response)
        return _trusted_key(response.json(), verifier, policy, model)

    def infer_sealed(self, model: str, inputs: np.ndarray[Any, Any] | Arrays,
                     verifier: Verifier, policy: Policy) -> Arrays:
        """End-to-end sealed inference: only an attested worker can read inputs and outputs;
        the gateway and Redis see ciphertext only. A bare array goes to the model's only
        input, as with ``infer``."""
        named = self._inputs(model, inputs)
        session = ClientSession(self.worker_key(model, verifier, policy))
        response = self._http.post(f"/v2/models/{model}/infer-sealed",
                                   content=_sealed_request(session, model, named),
                                   headers=SEALED_HEADERS)
        return _sealed_answer(session, model, response)


class AsyncClient(_Base):
    """asyncio client with the same API as ``Client``."""

    def __init__(self, url: str, api_key: str | None = None, ca_file: str | Path | None = None,
                 verify: bool = True, timeout_s: float = 60.0,
                 client_cert: tuple[str | Path, str | Path] | None = None) -> None:
        super().__init__(api_key)
        self._http = httpx.AsyncClient(base_url=url, verify=_tls(ca_file, verify, client_cert),
                                       timeout=timeout_s, headers=self._headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _inputs(self, model: str, inputs: np.ndarray[Any, Any] | Arrays) -> Arrays:
        named = self._named(model, inputs)
        if named is None:
            self._remember(model, await self.metadata(model))
            named = self._named(model, inputs)
        return named or {}

    async def _encoded(self, model: str, inputs: np.ndarray[Any, Any] | Arrays
                       ) -> tuple[bytes, dict[str, str]]:
        return encode_inputs(await self._inputs(model, inputs))

    async def ready(self) -> bool:
        return (await self._http.get("/v2/health/ready")).status_code == 200

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        response = await self._http.get(f"{_model_path(model, version)}/ready")
        return response.status_code == 200

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        response = await self._http.get(_model_path(model, version))
        _raise_for_status(response)
        result: dict[str, Any] = response.json()
        return result

    async def infer(self, model: str, inputs: np.ndarray[Any, Any] | Arrays,
                    version: str | None = None) -> Arrays:
        body, headers = await self._encoded(model, inputs)
        return _decode(await self._http.post(f"{_model_path(model, version)}/infer",
                                             content=body, headers=headers))

    async def repository_index(self) -> list[dict[str, str]]:
        response = await self._http.post("/v2/repository/index", json={})
        _raise_for_status(response)
        result: list[dict[str, str]] = response.json()
        return result

    async def load_model(self, model: str) -> None:
        _raise_for_status(await self._http.post(f"/v2/repository/models/{model}/load",
                                                timeout=_REPOSITORY_TIMEOUT))

    async def unload_model(self, model: str) -> None:
        _raise_for_status(await self._http.post(f"/v2/repository/models/{model}/unload",
                                                timeout=_REPOSITORY_TIMEOUT))

    async def submit(self, model: str, inputs: np.ndarray[Any, Any] | Arrays) -> str:
        body, headers = await self._encoded(model, inputs)
        response = await self._http.post(f"/v2/models/{model}/jobs", content=body,
                                         headers=headers)
        _raise_for_status(response)
        return str(response.json()["job_id"])

    async def result(self, model: str, job_id: str, wait_s: float = 0.0) -> Arrays | None:
        deadline = time.monotonic() + wait_s
        while True:
            response = await self._http.get(f"/v2/models/{model}/jobs/{job_id}")
            if response.status_code != 202:
                return _decode(response)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def worker_key(self, model: str, verifier: Verifier, policy: Policy) -> bytes:
        """The model's end-to-end public key, after checking its evidence against ``policy``."""
        response = await self._http.get(f"/v2/models/{model}/attestation")
        _raise_for_status(response)
        return _trusted_key(response.json(), verifier, policy, model)

    async def infer_sealed(self, model: str, inputs: np.ndarray[Any, Any] | Arrays,
                           verifier: Verifier, policy: Policy) -> Arrays:
        """End-to-end sealed inference (see ``Client.infer_sealed``)."""
        named = await self._inputs(model, inputs)
        session = ClientSession(await self.worker_key(model, verifier, policy))
        response = await self._http.post(f"/v2/models/{model}/infer-sealed",
                                         content=_sealed_request(session, model, named),
                                         headers=SEALED_HEADERS)
        return _sealed_answer(session, model, response)
