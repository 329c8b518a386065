"""Protected models and attested key release, end to end, on AWS KMS (a local moto server).

The stack serves the demo model from an *encrypted* file; workers get the model key and the
record keys only from the key broker, after attestation with DCAP quotes from the state
directory's TEST PKI (the default; a declared stand-in for SGX hardware) against a policy file.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from moto.server import ThreadedMotoServer

from ppml_serve.client import Client
from ppml_serve.codecs import record
from ppml_serve.crypto.attestation.base import AttestationRefused, report_data
from ppml_serve.crypto.attestation.dcap import DcapVerifier
from ppml_serve.crypto.attestation.policy import Policy
from ppml_serve.crypto.attestation.test_pki import ROOT_FILE, TestPkiProvider
from ppml_serve.crypto.keys import open_kms
from ppml_serve.crypto.kms.aws import AwsKMS
from ppml_serve.crypto.model_file import encrypt_model
from ppml_serve.crypto.sealed_box import public_bytes
from ppml_serve.engines import load_engine
from ppml_serve.errors import IntegrityError
from ppml_serve.local_stack import LocalStack
from ppml_serve.models import demo_model_path, demo_samples
from ppml_serve.settings import Settings
from ppml_serve.state import prepare_state
from ppml_serve.worker.runner import release_entry, worker_measurement

from .conftest import RedisCommands, Stack, stack_settings

IMAGES, _ = demo_samples()
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def protected(tmp_path_factory: pytest.TempPathFactory, moto_url: str) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("protected")
    key_id = AwsKMS(None, "us-east-1", moto_url).create_primary_key()
    security = {"kms": "aws", "aws_kms_key_id": key_id, "aws_endpoint_url": moto_url,
                "policy_file": str(state / "policy.yaml")}
    settings = stack_settings(state, security=security)
    prepare_state(settings)
    encrypted = state / "demo.enc"
    encrypt_model(demo_model_path(), encrypted, open_kms(settings))
    settings = stack_settings(state, security=security,
                              models={"demo": encrypted, "locked": demo_model_path()})
    (state / "policy.yaml").write_text(yaml.safe_dump({
        "allowed_providers": ["dcap"], "allow_test_root": True, "max_evidence_age_s": 60,
        "releases": [release_entry(settings, "demo", encrypted)]}))
    local = LocalStack(settings, workers=1, log_level="INFO", unserved=frozenset({"locked"}))
    try:
        local.start()
        yield Stack(local)
    finally:
        local.stop()


def stack_quote_verifier(settings: Settings) -> DcapVerifier:
    """What a client of this development stack verifies workers' quotes with: the real DCAP
    verifier, rooted at the stack's TEST PKI (never Intel's root: no hardware here)."""
    return DcapVerifier(test_root_der=(settings.attestation_dir / ROOT_FILE).read_bytes())


def run_worker(stack: Stack, model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ppml_serve", "worker", "--config",
         str(stack.settings.state_dir / "run-config.yaml"), "--model", model, *extra],
        capture_output=True, text=True, timeout=60, check=False)


def test_encrypted_model_serves_correct_answers(protected: Stack) -> None:
    expected = load_engine("demo", demo_model_path().read_bytes()).infer(
        {"image": IMAGES[:16]})["probabilities"]
    with Client(protected.url, api_key=protected.api_key, ca_file=protected.ca_file) as client:
        got = client.infer("demo", IMAGES[:16])["probabilities"]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_no_plaintext_model_on_disk_or_open(protected: Stack,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    plaintext = hashlib.sha256(demo_model_path().read_bytes()).hexdigest()
    size = demo_model_path().stat().st_size
    since = protected.settings.state_dir.stat().st_ctime - 1  # files written by this stack
    roots = [protected.settings.state_dir, Path(tempfile.gettempdir())]
    for root in roots:
        for path in root.rglob("*"):
            # other tests' own files (e.g. an owner's 'model decrypt'), this run's or those of
            # another pytest run beside it (the parent holds every run's base directory)
            if path.is_relative_to(tmp_path_factory.getbasetemp().parent) and \
                    not path.is_relative_to(protected.settings.state_dir):
                continue
            try:
                info = path.stat()
                if path.is_file() and info.st_size == size and info.st_mtime >= since:
                    assert hashlib.sha256(path.read_bytes()).hexdigest() != plaintext, path
            except OSError:
                continue
    worker = protected.workers[0].process
    assert worker is not None
    for fd in Path(f"/proc/{worker.pid}/fd").iterdir():
        target = os.path.realpath(fd)
        assert not target.endswith(".onnx"), f"worker holds {target} open"


def test_worker_with_other_configuration_gets_no_keys(protected: Stack) -> None:
    encrypted = protected.settings.models["demo"]
    done = run_worker(protected, f"demo={encrypted}", "--max-batch-size", "3")
    assert done.returncode == 3, done.stderr[-1500:]
    assert "not allowed by the policy" in done.stderr
    assert "code, configuration or model differs" in done.stderr


def test_worker_with_other_model_gets_no_keys(protected: Stack, tmp_path: Path) -> None:
    tweaked = tmp_path / "tweaked.enc"
    other = tmp_path / "other.onnx"
    other.write_bytes(demo_model_path().read_bytes() + b"\n")
    encrypt_model(other, tweaked, open_kms(protected.settings))
    done = run_worker(protected, f"demo={tweaked}")
    assert done.returncode == 3 and "not allowed by the policy" in done.stderr


def test_model_without_keyed_worker_answers_503(protected: Stack) -> None:
    done = run_worker(protected, f"locked={demo_model_path()}")
    assert done.returncode == 3 and "no keys released" in done.stderr
    before = protected.native_answers()
    with protected.http() as http:
        response = http.post("/v2/models/locked/infer", json={"inputs": [
            {"name": "image", "datatype": "UINT8", "shape": [1, 8, 8], "data": [0] * 64}]})
        ready = http.get("/v2/models/locked/ready")
    assert response.status_code == 503
    assert response.json()["error"].startswith(
        "model 'locked' version 1 has no worker that holds its keys")
    assert ready.status_code == 503
    assert protected.native_answers() == before + 1  # the front's refusal, in the app's words


def test_key_broker_refuses_replayed_evidence_over_https(protected: Stack) -> None:
    settings = protected.settings
    broker_url = settings.keybroker_url()
    provider = TestPkiProvider(settings.attestation_dir)
    measurement = worker_measurement(settings, "demo", settings.models["demo"]).value
    key = X25519PrivateKey.generate()
    with httpx.Client(base_url=broker_url, verify=str(settings.ca_file)) as http:
        nonce = http.post("/v1/nonce").json()["nonce"]
        body = {"provider": "dcap", "model": "demo", "nonce": nonce,
                "evidence": provider.evidence(measurement, report_data(public_bytes(key), nonce),
                                              nonce),
                "public_key": base64.b64encode(public_bytes(key)).decode()}
        first = http.post("/v1/release", json=body)
        second = http.post("/v1/release", json=body)
        junk = http.post("/v1/release", json={"provider": "dcap"})
    assert first.status_code == 200 and "sealed_keys" in first.json()
    assert second.status_code == 403 and "replayed" in second.json()["error"]
    assert junk.status_code == 400


def _gateway_memory_contains(stack: Stack, marker: bytes) -> bool:
    gateway = stack.local.gateway
    assert gateway is not None and gateway.process is not None
    pid = gateway.process.pid
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as memory:
        for line in maps:
            match = re.match(r"([0-9a-f]+)-([0-9a-f]+) rw", line)
            if not match:
                continue
            start, end = int(match.group(1), 16), int(match.group(2), 16)
            try:
                memory.seek(start)
                if marker in memory.read(end - start):
                    found = True
                    break
            except (OSError, ValueError, OverflowError):
                continue
    return found


def test_end_to_end_sealed_inference_hides_input_from_gateway_and_redis(
        protected: Stack) -> None:
    settings = protected.settings
    measurement = worker_measurement(settings, "demo", settings.models["demo"]).value
    verifier = stack_quote_verifier(settings)
    policy = Policy(allowed_providers=["dcap"], allow_test_root=True, max_evidence_age_s=300,
                    allowed_measurements=[measurement])
    marker = os.urandom(8).hex().encode()  # 16 printable bytes, fresh for this run
    image = np.frombuffer((marker * 4)[:64], dtype=np.uint8).reshape(1, 8, 8)
    with Client(protected.url, api_key=protected.api_key, ca_file=protected.ca_file) as client:
        with RedisCommands(protected.admin()) as captured:
            outputs = client.infer_sealed("demo", {"image": image}, verifier, policy)
        expected = load_engine("demo", demo_model_path().read_bytes()).infer({"image": image})
        np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)
        commands = captured.text
        assert "ppml:{demo}:req" in commands
        assert marker.decode() not in commands
        assert not _gateway_memory_contains(protected, marker), "gateway saw the plaintext"
        # found: a bare array (as infer takes) raised AttributeError
        bare = client.infer_sealed("demo", image, verifier, policy)
        np.testing.assert_allclose(bare["probabilities"], expected["probabilities"], rtol=1e-6)

        # Control: the same probe finds a marker that was sent the ordinary way.
        control = os.urandom(8).hex().encode()
        client.infer("demo", np.frombuffer((control * 4)[:64], np.uint8).reshape(1, 8, 8))
        assert _gateway_memory_contains(protected, control)

        stranger = Policy(allowed_providers=["dcap"], allow_test_root=True,
                          allowed_measurements=["0" * 64])
        with pytest.raises(AttestationRefused, match="not allowed by the policy"):
            client.infer_sealed("demo", {"image": image}, verifier, stranger)


def test_aws_kms_unwrap_and_tamper(moto_url: str) -> None:
    kms = AwsKMS(None, "us-east-1", moto_url)
    kms.create_primary_key()
    key = kms.generate_data_key()
    assert kms.unwrap(key.wrapped) == key.plaintext and len(key.plaintext) == 32
    assert "enabled" in kms.rotate()
    assert kms.unwrap(key.wrapped) == key.plaintext
    tampered = bytearray(key.wrapped)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(IntegrityError):
        kms.unwrap(bytes(tampered))
    assert "testing" not in repr(kms)


def test_a_poisoned_end_to_end_record_is_named_for_what_it_is(protected: Stack) -> None:
    """Sealed to the attested workers (so it opens) but no request record inside: the error
    says it opened and what is wrong, not that it 'could not be opened'."""
    from ppml_serve.crypto.e2e import ClientSession

    settings = protected.settings
    measurement = worker_measurement(settings, "demo", settings.models["demo"]).value
    verifier = stack_quote_verifier(settings)
    policy = Policy(allowed_providers=["dcap"], allow_test_root=True, max_evidence_age_s=300,
                    allowed_measurements=[measurement])
    with Client(protected.url, api_key=protected.api_key, ca_file=protected.ca_file) as client:
        session = ClientSession(client.worker_key("demo", verifier, policy))
    poisoned = session.seal_request(b"not a request record at all", "demo")
    garbage_blob = os.urandom(80)
    good = session.seal_request(record.pack({"image": IMAGES[:1]}), "demo")
    before = protected.native_answers()
    with protected.http() as http:
        response = http.post("/v2/models/demo/infer-sealed", content=poisoned,
                             headers={"Content-Type": "application/octet-stream"})
        garbage = http.post("/v2/models/demo/infer-sealed", content=garbage_blob,
                            headers={"Content-Type": "application/octet-stream"})
        answered = http.post("/v2/models/demo/infer-sealed", content=good,
                             headers={"Content-Type": "application/octet-stream"})
        # compressed, as tritonclient may send it: the same, on the same path
        packed = http.post("/v2/models/demo/infer-sealed", content=gzip.compress(garbage_blob),
                           headers={"Content-Type": "application/octet-stream",
                                    "Content-Encoding": "gzip"})
    # the app's words (gateway/dataplane.py's infer_sealed), to the letter
    assert (response.status_code, response.json()) == (400, {"error": (
        "the sealed request was opened by the model's workers, but what it holds is not a "
        "valid inference request record (check the client's encoding)")})
    assert (garbage.status_code, garbage.json()) == (400, {"error": (
        "the sealed request could not be opened by the model's workers (not sealed to their "
        "attested key, or damaged)")})
    assert (packed.status_code, packed.json()) == (400, garbage.json())
    # the front answered the sealed requests itself (end-to-end sealed: opaque to it)
    assert answered.status_code == 200, answered.text
    assert answered.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(
        record.unpack(session.open_reply(answered.content, "demo"))[1]["probabilities"],
        load_engine("demo", demo_model_path().read_bytes()).infer(
            {"image": IMAGES[:1]})["probabilities"], rtol=1e-6)
    assert protected.native_answers() == before + 4


def test_a_replayed_end_to_end_request_is_refused(protected: Stack) -> None:
    """Found from outside: 3/3 replayed sealed requests were answered. The sealed blob binds
    its time, and workers remember it (in Redis, for every worker) for that window."""
    from ppml_serve.crypto.e2e import ClientSession

    settings = protected.settings
    measurement = worker_measurement(settings, "demo", settings.models["demo"]).value
    policy = Policy(allowed_providers=["dcap"], allow_test_root=True, max_evidence_age_s=300,
                    allowed_measurements=[measurement])
    with Client(protected.url, api_key=protected.api_key, ca_file=protected.ca_file) as client:
        session = ClientSession(client.worker_key("demo", stack_quote_verifier(settings),
                                                  policy))
    sealed = session.seal_request(record.pack({"image": IMAGES[:1]}), "demo")
    with protected.http() as http:
        answers = [http.post("/v2/models/demo/infer-sealed", content=sealed,
                             headers={"Content-Type": "application/octet-stream"})
                   for _ in range(3)]
    assert answers[0].status_code == 200, answers[0].text
    for replay in answers[1:]:
        assert replay.status_code == 400 and "replayed" in replay.json()["error"], replay.text


def test_the_client_takes_only_its_models_fresh_worker_key(protected: Stack) -> None:
    """Found from outside: a client asking for 'demo' accepted another model's worker
    document. The published evidence binds the key to the model and the time."""
    settings = protected.settings
    measurement = worker_measurement(settings, "demo", settings.models["demo"]).value
    verifier = stack_quote_verifier(settings)
    policy = Policy(allowed_providers=["dcap"], allow_test_root=True, max_evidence_age_s=300,
                    allowed_measurements=[measurement])
    with protected.http() as http:
        (document, *_) = http.get("/v2/models/demo/attestation").json()["workers"]
    now = time.time()
    assert policy.check_worker_key(document, verifier, now, "demo")
    with pytest.raises(AttestationRefused, match="attested for model 'demo', not 'rep'"):
        policy.check_worker_key(document, verifier, now, "rep")
    relabelled = {**document, "model": "rep"}  # the document edited to claim another model
    with pytest.raises(AttestationRefused, match="does not bind"):
        policy.check_worker_key(relabelled, verifier, now, "rep")
    with pytest.raises(AttestationRefused, match="stale"):
        policy.check_worker_key(document, verifier, now + 301, "demo")
    older = {**document, "issued_at": float(document["issued_at"]) - 5}  # another time claimed
    with pytest.raises(AttestationRefused, match="does not bind"):
        policy.check_worker_key(older, verifier, now, "demo")
