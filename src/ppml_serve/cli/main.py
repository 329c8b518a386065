"""The ``ppml-serve`` command."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ppml_serve import __version__
from ppml_serve.cluster import KUBERNETES_OVERLAYS as KUBE_OVERLAYS
from ppml_serve.errors import ConfigError, PPMLError
from ppml_serve.logs import configure_logging
from ppml_serve.settings import Settings, load_settings
from ppml_serve.tracing import configure_tracing

DESCRIPTION = """Privacy-preserving model serving: an HTTPS gateway (KServe v2), an encrypted
Redis Streams queue and inference workers. Start with 'ppml-serve up'."""


def _model_pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML settings file")
    parser.add_argument("--state-dir", type=Path,
                        help="dev CA, keys, managed Redis data (default ./.ppml-serve)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _redis_url(text: str) -> str:
    # A password on the command line would show in every process listing.
    credentials = text.split("://", 1)[-1].split("@", 1)
    if len(credentials) == 2 and ":" in credentials[0]:
        raise argparse.ArgumentTypeError(
            "refusing a password on the command line (visible to every user in ps); put the "
            "URL in a 0600 file and use --redis-url-file, or set PPML_REDIS__URL")
    if not text.startswith(("rediss://", "redis://")):
        raise argparse.ArgumentTypeError("expected rediss://HOST:PORT[/DB]")
    return text


def _redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", type=_redis_url,
                        help="rediss://[USER@]HOST:PORT/DB without a password (certificate or "
                        "network auth); URLs with a password go in --redis-url-file")
    parser.add_argument("--redis-url-file", type=Path,
                        help="file holding the rediss:// URL (or set PPML_REDIS__URL)")
    parser.add_argument("--redis-ca", type=Path, help="CA bundle for the Redis certificate")


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-batch-size", type=int, help="most requests per engine call")
    parser.add_argument("--max-batch-delay-ms", type=float,
                        help="longest wait for a batch to fill")
    parser.add_argument("--threads", type=int, help="engine threads (0 = all cores)")


def _engine_options(parser: argparse.ArgumentParser) -> None:
    _worker_options(parser)
    parser.add_argument("--engine", choices=["onnxruntime", "openvino", "auto"],
                        help="inference engine (auto: OpenVINO on Intel CPUs if installed)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16", "int8"],
                        help="compute precision of float models (bf16: OpenVINO; fp16, int8: "
                        "TensorRT on a GPU)")
    parser.add_argument("--device", help="cpu (default), cuda or cuda:N (ONNX Runtime's "
                        "GPU build)")
    parser.add_argument("--execution-provider", choices=["auto", "cpu", "cuda", "tensorrt"],
                        help="ONNX Runtime provider on a GPU (auto: TensorRT if installed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppml-serve", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"ppml-serve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run everything on this machine (embedded default)",
                             description="Create the state directory if needed (dev CA, API "
                             "key, local KMS), start a managed TLS Redis, workers and the HTTPS "
                             "gateway serving the demo model; Ctrl-C stops them all.")
    _common(up)
    up.add_argument("--host", help="gateway interface (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="gateway port (default 8443; 0 = any free port)")
    up.add_argument("--grpc-port", type=int,
                    help="KServe v2 gRPC port (default: the HTTPS port + 1, so 8444)")
    up.add_argument("--workers", type=int, default=1, help="worker processes per model")
    up.add_argument("--gateways", type=int, metavar="N",
                    help="gateway processes sharing the ports (gateway.processes, default 1; "
                    "more serve more requests where cores are free for them)")
    up.add_argument("--model", action="append", type=_model_pair, default=[],
                    metavar="NAME=PATH", help="also serve this ONNX model (repeatable)")
    up.add_argument("--no-demo", action="store_true", help="do not serve the demo model")
    up.add_argument("--model-repository", type=Path, metavar="DIR",
                    help="also serve the models of this repository (DIR/<model>/<version>/, "
                    "see docs/models.md); --workers worker processes serve them all")
    up.add_argument("--worker-metrics-port", type=int, metavar="PORT",
                    help="serve each worker's Prometheus metrics on PORT, PORT+1, … "
                    "(worker.metrics_host, default 127.0.0.1)")
    _engine_options(up)

    gateway = commands.add_parser("gateway", help="run the HTTPS gateway against a Redis URL")
    _common(gateway)
    _redis_options(gateway)
    gateway.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (default 8443)")
    gateway.add_argument("--grpc-port", type=int,
                         help="also serve KServe v2 gRPC on this port (gateway.grpc_port)")

    worker = commands.add_parser("worker", help="run one inference worker against a Redis URL")
    _common(worker)
    _redis_options(worker)
    worker.add_argument("--model", type=_model_pair, action="append", default=[],
                        metavar="NAME=PATH",
                        help="serve this model file as version 1 (repeatable)")
    worker.add_argument("--model-repository", type=Path, metavar="DIR",
                        help="serve the models of this repository (DIR/<model>/<version>/), "
                        "loading and unloading them as the repository API asks")
    worker.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics on 127.0.0.1:PORT")
    _engine_options(worker)

    redis = commands.add_parser("redis", help="run a managed TLS redis-server in the foreground",
                                description="Writes STATE_DIR/redis.url (0600) for gateways "
                                "and workers; Ctrl-C stops it.")
    _common(redis)
    redis.add_argument("--port", type=int, default=6380, help="TLS port (default 6380)")
    redis.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default 127.0.0.1); its certificate "
                       "(STATE_DIR/server.pem) must name it")

    bench = commands.add_parser(
        "bench", help="measure throughput and latency: pipeline vs raw engine",
        description="Starts its own service per configuration (managed Redis, workers, "
        "gateway), drives a closed-loop HTTPS (or gRPC) load at each concurrency, and "
        "measures the raw engine alone (same model, precision and threads) in the same run.")
    bench.add_argument("--model", action="append", type=_model_pair, default=[],
                       metavar="NAME=PATH", help="model(s) to measure (default: the demo model)")
    bench.add_argument("--null-model", action="store_true",
                       help="also measure a model that does next to nothing with ResNet-50's "
                       "interface (602 KB FP32 input): the pipeline's own cost (needs onnx)")
    bench.add_argument("--configs", default="secure,plain",
                       help="comma list of: secure (TLS + AES-GCM; the co-located Redis over "
                       "a Unix socket, as under 'up'), plain (neither), secure-memory (secure "
                       "with the managed Redis's AOF off: what durability costs), secure-tls "
                       "(secure with TLS to Redis on loopback too)")
    bench.add_argument("--engines", default="onnxruntime",
                       help="comma list of: onnxruntime, openvino")
    bench.add_argument("--precisions", default="fp32",
                       help="comma list of: fp32, bf16 (OpenVINO, float models only), fp16 and "
                       "int8 (TensorRT, with --device cuda); an INT8 model (from 'model "
                       "quantize') is reported as int8")
    bench.add_argument("--device", default="cpu",
                       help="cpu (default), cuda or cuda:N: the raw engine and the workers on "
                       "that GPU (ONNX Runtime's GPU build)")
    bench.add_argument("--streams", type=int, default=1,
                       help="OpenVINO streams = batches in flight in the worker (default 1)")
    bench.add_argument("--protocol", choices=("http", "grpc"), default="http",
                       help="how the load reaches the service: http (REST with the binary "
                       "extension, default) or grpc (ModelInfer with raw contents)")
    bench.add_argument("--concurrency", default="1,8,32", help="comma list of concurrencies")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    bench.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each")
    bench.add_argument("--items", type=int, default=1, help="items (batch rows) per request")
    bench.add_argument("--repeats", type=int, default=3,
                       help="interleaved repeats; medians are reported (default 3)")
    bench.add_argument("--workers", type=int, default=1, help="worker processes")
    bench.add_argument("--gateways", type=int, default=1,
                       help="gateway processes sharing the port (gateway.processes)")
    bench.add_argument("--json", type=Path, help="write the runs as JSON here")
    bench.add_argument("--plot", type=Path, help="write a PNG throughput chart here")
    bench.add_argument("--url", help="measure this running service instead of starting one "
                       "(needs --api-key-file; the raw engine still runs here)")
    bench.add_argument("--api-key-file", type=Path, help="API key for --url")
    bench.add_argument("--ca-file", type=Path, help="CA bundle for an https --url")
    bench.add_argument("--from-json", type=Path, metavar="JSON",
                       help="measure nothing: print the table (and --plot) of an earlier run")
    _worker_options(bench)

    init = commands.add_parser("init", help="create the state directory without starting")
    _common(init)

    keys = commands.add_parser("keys", help="API keys and data keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = key_commands.add_parser("add-api-key", help="create an API key; prints it once")
    _common(add)
    add.add_argument("--name", required=True, help="who the key is for")
    add.add_argument("--models", nargs="+", default=["*"], help="models it may use (* = all)")
    add.add_argument("--scopes", nargs="+", default=["infer"],
                     choices=["infer", "metrics", "admin"],
                     help="what it may do: infer (the inference API, default), metrics "
                     "(read /metrics), admin (the model repository API)")
    listing = key_commands.add_parser("list", help="show API keys (ids, names, models, "
                                      "scopes; never a key or its hash)")
    _common(listing)
    revoke = key_commands.add_parser(
        "revoke", help="delete an API key by name or id; running gateways drop it within "
        "about a second")
    _common(revoke)
    revoke.add_argument("key", help="name or id of the key")
    rotate = key_commands.add_parser(
        "rotate", help="new primary key version and record data key; old ones still open")
    _common(rotate)

    model = commands.add_parser("model", help="convert, encrypt, quantize, inspect or decrypt "
                                "models; allow repository models in the key-release policy")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    encrypt = model_commands.add_parser("encrypt", help="encrypt a model file with a KMS key",
                                        description="Writes an AES-256-GCM encrypted model; "
                                        "workers decrypt it in memory only.")
    _common(encrypt)
    encrypt.add_argument("input", type=Path, help="plaintext model: ONNX, or an OpenVINO IR "
                         "(its .xml, or the directory of model.xml + model.bin: sealed as one "
                         "archive)")
    encrypt.add_argument("output", type=Path, help="encrypted model to write")
    encrypt.add_argument("--key-id", help="KMS primary key id (default: the KMS default)")
    encrypt.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    decrypt = model_commands.add_parser("decrypt", help="write the plaintext model (owner only)")
    _common(decrypt)
    decrypt.add_argument("input", type=Path)
    decrypt.add_argument("output", type=Path)
    decrypt.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    quantize = model_commands.add_parser(
        "quantize", help="static INT8 quantization (QDQ, per-channel) with a quality report",
        description="Calibrates activation ranges on sample inputs and reports top-1 agreement "
        "with the FP32 model on held-out inputs (and accuracy when labels are given). An "
        "encrypted input is decrypted in memory and the INT8 model is written encrypted.")
    _common(quantize)
    quantize.add_argument("input", type=Path, help="FP32 ONNX model (plain or encrypted)")
    quantize.add_argument("output", type=Path, help="INT8 model to write")
    quantize.add_argument("--calibration", type=Path, required=True,
                          help=".npy / .npz (inputs, optional 'labels') or a directory of .npy")
    quantize.add_argument("--eval", type=Path,
                          help="held-out .npy/.npz for the report (default: part of --calibration)")
    quantize.add_argument("--holdout", type=float, default=0.2,
                          help="fraction of --calibration kept for the report (default 0.2)")
    quantize.add_argument("--limit", type=int, help="use at most this many calibration samples")
    quantize.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    inspect = model_commands.add_parser("inspect", help="show an encrypted model's header")
    inspect.add_argument("file", type=Path)
    convert = model_commands.add_parser(
        "convert", help="PyTorch or TensorFlow model -> ONNX or OpenVINO IR (owner's machine)",
        description="Converts a TorchScript file (.pt), a torch exported program (.pt2) or a "
        "TensorFlow SavedModel directory (to OpenVINO IR) into a repository version "
        "directory, then runs both on random inputs and reports the largest difference. "
        "torch/TensorFlow are needed here only, never by a worker.")
    _common(convert)
    convert.add_argument("source", type=Path, help="model to convert")
    convert.add_argument("output_dir", type=Path,
                         help="where to write it, e.g. REPOSITORY/NAME/VERSION")
    convert.add_argument("--to", choices=["onnx", "openvino"], default="onnx",
                         help="target format (default onnx)")
    convert.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE:DTYPE",
                         help="each input, with an example shape (first dimension = batch, "
                         "left dynamic), e.g. image:1,3,224,224:float32 (repeatable)")
    convert.add_argument("--output", action="append", default=[], metavar="NAME",
                         help="names for the outputs, in order (default: the exporter's)")
    convert.add_argument("--encrypt", action="store_true",
                         help="write it encrypted (model.ppml) straight from memory")
    convert.add_argument("--force", action="store_true", help="replace a model already there")
    add = model_commands.add_parser(
        "add", help="allow a repository model's versions in the key-release policy",
        description="Computes the measurement of a worker serving each version present of "
        "each named model (with these settings: use the workers' --config) and writes them "
        "into the key broker's policy (security.policy_file), replacing older entries of "
        "those models. The key broker re-reads the policy without a restart; then load the "
        "model through the repository API.")
    _common(add)
    add.add_argument("repository", type=Path, help="the model repository directory")
    add.add_argument("model", nargs="*", help="models to allow (default: every model there)")

    attest = commands.add_parser("attest", help="attestation helpers")
    attest_commands = attest.add_subparsers(dest="attest_command", required=True,
                                            metavar="ACTION")
    measure = attest_commands.add_parser(
        "measure", help="print the measurement a worker would report (for the policy file)")
    _common(measure)
    measure.add_argument("--model", type=_model_pair, required=True, metavar="NAME=PATH")
    measure.add_argument("--evidence", type=Path, help="a TEE's quote or SEV-SNP report from "
                         "the worker's build: the entry then names its SGX, TDX or SNP "
                         "measurements instead of the software digest")
    measure.add_argument("--collateral", type=Path, help="with --evidence: as 'attest verify'")
    measure.add_argument("--ask", type=Path, help="with an SEV-SNP --evidence")
    measure.add_argument("--ark", type=Path, help="with an SEV-SNP --evidence")
    measure.add_argument("--at", metavar="ISO-8601", help="with --evidence: verify as of then")
    _engine_options(measure)

    verify = attest_commands.add_parser(
        "verify", help="verify TEE evidence (SGX/TDX quote, SEV-SNP report) offline",
        description="Detects the evidence kind, verifies it against Intel's or AMD's pinned "
        "roots at the given time, prints the TEE type, measurements, report_data, TCB status "
        "and advisories, and exits 1 with the reason when the policy (default: the production "
        "one, UpToDate platforms only) refuses it.")
    verify.add_argument("evidence", type=Path, help="raw quote or SEV-SNP report file")
    verify.add_argument("--collateral", type=Path, help="DCAP collateral JSON (SGX/TDX), or "
                        "the VCEK certificate (DER) for SEV-SNP")
    verify.add_argument("--ask", type=Path, help="SEV-SNP: the ASK certificate (DER)")
    verify.add_argument("--ark", type=Path, help="SEV-SNP: the ARK certificate (DER); must be "
                        "one of AMD's pinned roots")
    verify.add_argument("--at", metavar="ISO-8601", help="verify as of this time "
                        "(default now; collateral expires)")
    verify.add_argument("--policy", type=Path, help="judge with this policy file instead")
    verify.add_argument("--test-root", type=Path, help="DEVELOPMENT: a test PKI's root "
                        "certificate (DER) instead of Intel's")
    verify.add_argument("--json", action="store_true", help="print one JSON document")

    policy = commands.add_parser(
        "policy", help="sign key-release policies (k of n operators)",
        description="With keybroker.policy_signers set, the key broker takes a policy only "
        "when keybroker.policy_threshold of those operators signed its exact bytes; an "
        "unsigned or badly signed edit is refused and audited, the old policy stays.")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True,
                                            metavar="ACTION")
    keygen = policy_commands.add_parser("keygen", help="make an operator's signing key")
    keygen.add_argument("name", help="the operator's name in keybroker.policy_signers")
    keygen.add_argument("--out", type=Path, required=True, help="private key file to write")
    sign = policy_commands.add_parser("sign", help="sign a policy file's current bytes")
    sign.add_argument("policy", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="the operator's signing key")
    sign.add_argument("--name", required=True, help="the operator's name")
    check = policy_commands.add_parser(
        "verify", help="check a policy's signatures against the settings' signers")
    _common(check)
    check.add_argument("policy", type=Path, nargs="?",
                       help="policy file (default: security.policy_file)")

    collateral = attest_commands.add_parser(
        "collateral", help="the key broker's cache of Intel/AMD collateral")
    collateral_commands = collateral.add_subparsers(dest="collateral_command", required=True,
                                                    metavar="ACTION")
    fetch = collateral_commands.add_parser(
        "fetch", help="fetch what these quotes/reports need into the collateral cache",
        description="For each DCAP quote, the PCK CRL, TCB info and QE identity of its "
        "platform (from a PCCS or Intel's PCS); for each SEV-SNP report, its chip's VCEK at "
        "its TCB and the ASK/ARK chain (from AMD's KDS). The key broker then verifies "
        "offline; collateral expires (see its next update), so run this regularly.")
    _common(fetch)
    fetch.add_argument("evidence", type=Path, nargs="+", help="quote or report files")
    fetch.add_argument("--pccs", help="PCCS or Intel PCS base URL")
    fetch.add_argument("--kds", help="AMD KDS base URL")
    fetch.add_argument("--product", default="Milan", choices=["Milan", "Genoa", "Turin"],
                       help="SEV-SNP processor product (default Milan)")

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True,
                                          metavar="ACTION")
    audit_check = audit_commands.add_parser(
        "verify", help="check an audit log's hash chain (edits, insertions, truncation)")
    audit_check.add_argument("log", type=Path, help="e.g. STATE/audit/keybroker.jsonl")

    kubernetes = commands.add_parser(
        "kubernetes", help="write the Secrets and ConfigMaps of a Kubernetes deployment")
    kube_commands = kubernetes.add_subparsers(dest="kube_command", required=True,
                                              metavar="ACTION")
    kube = kube_commands.add_parser(
        "generate", help="keys, certificates, Redis users, policy and a kustomization for "
        "'kubectl apply -k'",
        description="Writes into OUT (0700, files 0600) every Secret and ConfigMap the "
        "manifests of deploy/kubernetes need: a CA and a certificate per service, Redis ACL "
        "users and redis.conf, an admin API key (its token in OUT/api-key, never applied), a "
        "local KMS, the key broker's policy with the releases of the models given, and a "
        "kustomization.yaml that pins the image. OUT holds every key of the deployment: keep "
        "it private.")
    kube.add_argument("--out", type=Path, required=True, metavar="DIR",
                      help="a new directory for the files")
    kube.add_argument("--overlay", choices=KUBE_OVERLAYS, default="dev",
                      help="which overlay of the manifests to deploy (default dev)")
    kube.add_argument("--manifests", type=Path, default=Path("deploy/kubernetes"),
                      help="the repository's deploy/kubernetes (default: ./deploy/kubernetes)")
    kube.add_argument("--model", action="append", type=_model_pair, default=[],
                      metavar="NAME=PATH", help="the model file the workers serve as NAME: "
                      "measured into the policy's releases (repeatable)")
    kube.add_argument("--image", metavar="REF",
                      help="image to run, REGISTRY/ppml-serve@sha256:… (or a fixed tag)")
    kube.add_argument("--redis-image", metavar="REF",
                      help="Redis image of the in-cluster Redis, redis@sha256:… (or a tag)")
    kube.add_argument("--gateway-host", action="append", default=[], metavar="NAME",
                      help="a DNS name or address clients reach the gateway by (repeatable)")
    kube.add_argument("--redis-address", metavar="HOST:PORT",
                      help="the Redis of the external-redis overlay")
    kube_policy = kube_commands.add_parser(
        "policy", help="measure model files into a generated deployment's policy",
        description="Rewrites OUT/configmaps.yaml so that the key broker releases the keys of "
        "the models given (e.g. encrypted with 'ppml-serve model encrypt --state-dir "
        "OUT/state') to this deployment's workers; no key changes.")
    kube_policy.add_argument("--out", type=Path, required=True, metavar="DIR",
                             help="the directory 'kubernetes generate' wrote")
    kube_policy.add_argument("--manifests", type=Path, default=Path("deploy/kubernetes"),
                             help="the repository's deploy/kubernetes")
    kube_policy.add_argument("--model", action="append", type=_model_pair, required=True,
                             metavar="NAME=PATH", help="a model file the workers serve")

    ray = commands.add_parser(
        "ray", help="run a model's workers as Ray actors, autoscaled on the queue's backlog",
        description="Each actor is a full worker (its own attestation and keys, read from "
        "its node's state directory); Ray places and restarts them; this driver keeps the "
        "pool between --min-replicas and --max-replicas from the queue's backlog (requests "
        "waiting or being served: lag + pending). "
        "Needs: pip install 'ppml-serve[ray]'.")
    _common(ray)
    ray.add_argument("--address", default="auto", help="Ray cluster address (default auto)")
    ray.add_argument("--model", type=_model_pair, required=True, metavar="NAME=PATH")
    ray.add_argument("--min-replicas", type=int, default=1, help="0 allows scaling to zero")
    ray.add_argument("--max-replicas", type=int, default=4)
    ray.add_argument("--target-backlog", "--target-lag", dest="target_backlog", type=int,
                     default=16, help="unanswered requests (waiting or being served) per "
                     "replica to aim for (default 16); --target-lag is its old name")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor")
    ray.add_argument("--max-restarts", type=int, default=-1,
                     help="restarts of a dead actor by Ray (-1: always)")
    ray.add_argument("--scale-down-cooldown", type=float, default=60.0, metavar="SECONDS")

    keybroker = commands.add_parser(
        "keybroker", help="run the key broker (releases keys to attested workers)",
        description="Serves HTTPS on keybroker.host:keybroker.port; checks worker evidence "
        "against security.policy_file and releases keys sealed to the worker.")
    _common(keybroker)
    keybroker.add_argument("--port", type=int, dest="keybroker_port",
                           help="HTTPS port (default 8444)")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {"gateway": {}, "worker": {}, "redis": {}}
    if args.state_dir is not None:
        values["state_dir"] = args.state_dir
    for flag, section, name in [
        ("host", "gateway", "host"), ("port", "gateway", "port"),
        ("grpc_port", "gateway", "grpc_port"), ("gateways", "gateway", "processes"),
        ("max_batch_size", "worker", "max_batch_size"),
        ("max_batch_delay_ms", "worker", "max_batch_delay_ms"),
        ("threads", "worker", "engine_threads"), ("engine", "worker", "engine"),
        ("precision", "worker", "precision"), ("device", "worker", "device"),
        ("execution_provider", "worker", "execution_provider"),
        ("redis_url_file", "redis", "url_file"), ("redis_ca", "redis", "ca_file"),
        ("redis_url", "redis", "url"), ("metrics_port", "worker", "metrics_port"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            sections[section][name] = value
    for section, items in sections.items():
        if items:
            values[section] = items
    return values


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    """Settings from --config, the environment and this command's flags (and ``extra``);
    logging takes their format from here on."""
    settings = load_settings(args.config, **_overrides(args), **extra)
    configure_logging(getattr(args, "log_level", "INFO"), settings.log.format,
                      settings.log.file, settings.log.file_max_bytes, settings.log.file_backups,
                      part=args.command)
    return settings


def _stop_on_signals(stop: Callable[[], None]) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop())


def run(args: argparse.Namespace) -> int:
    from ppml_serve.cli.supervisor import exit_when_orphaned
    from ppml_serve.memory import tune_allocator

    if args.command == "up":
        from ppml_serve.cli.supervisor import run_up
        from ppml_serve.models import DEMO_NAME, demo_model_path

        base = _settings(args)
        models = {} if args.no_demo else {DEMO_NAME: demo_model_path()}
        models.update(base.models)
        models.update(dict(args.model))
        extra: dict[str, Any] = {"models": models}
        if args.model_repository is not None:
            extra["model_repository"] = args.model_repository.resolve()
        return run_up(_settings(args, **extra), args.workers, args.log_level,
                      args.worker_metrics_port)

    if args.command == "bench":
        return _bench(args)

    if args.command == "init":
        from ppml_serve.state import prepare_state

        settings = _settings(args)
        prepare_state(settings)
        print(f"state directory ready: {settings.state_dir}")
        return 0

    if args.command == "gateway":
        from ppml_serve.gateway.server import build_gateway

        exit_when_orphaned()
        tune_allocator()
        settings = _settings(args)
        configure_tracing(settings.tracing, "ppml-serve-gateway")
        server = build_gateway(settings)
        server.run()
        return 0

    if args.command == "worker":
        from ppml_serve.crypto.attestation.base import AttestationRefused
        from ppml_serve.repository import Repository
        from ppml_serve.worker.host import build_host

        exit_when_orphaned()
        tune_allocator()
        settings = _settings(args)
        root = args.model_repository or settings.model_repository
        if root is None and not args.model:
            raise ConfigError("worker: give --model NAME=PATH or --model-repository DIR")
        repository = Repository(root, dict(args.model))
        configure_tracing(settings.tracing, "ppml-serve-worker")
        metrics_auth = None
        if settings.worker.metrics_auth:
            from ppml_serve.gateway.auth import metrics_authorizer

            metrics_auth = metrics_authorizer(settings.api_keys_file)
        host = build_host(settings, repository, metrics_auth)
        _stop_on_signals(host.stop)
        failures = host.start()
        refused = [exc for exc in failures if isinstance(exc, AttestationRefused)]
        if root is None and failures:  # a worker for named models serves all or nothing
            host.stop()
            host.run()
            print(f"error: {'no keys released, ' if refused else ''}serving nothing: "
                  f"{failures[0]}", file=sys.stderr)
            return 3
        host.run()
        return 0

    if args.command == "redis":
        import threading

        from ppml_serve.crypto.tls import ensure_dev_pki
        from ppml_serve.private_files import write_private
        from ppml_serve.queue.redis_server import ManagedRedis

        settings = _settings(args)
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not settings.server_cert_file.exists():  # Redis needs a certificate, nothing more
            ensure_dev_pki(settings.state_dir)
        redis = ManagedRedis(settings.state_dir / "redis", args.port, settings.server_cert_file,
                             settings.server_key_file, settings.ca_file, settings.redis.prefix,
                             persistence=settings.redis.persistence, host=args.host,
                             max_memory_mb=settings.redis.max_memory_mb,
                             aof_rewrite_min_mb=settings.redis.aof_rewrite_min_mb)
        stopped = threading.Event()
        _stop_on_signals(stopped.set)
        redis.start()
        write_private(settings.redis_url_file, redis.url.get_secret_value().encode() + b"\n")
        print(f"redis ready on {args.host}:{args.port} (TLS); URL in {settings.redis_url_file}",
              flush=True)
        try:
            while not stopped.wait(0.5):
                if redis.process is not None and redis.process.poll() is not None:
                    print("error: redis-server exited", file=sys.stderr)
                    return 1
        finally:
            redis.stop()
        return 0

    if args.command == "keys":
        settings = _settings(args)
        if args.keys_command == "add-api-key":
            from ppml_serve.gateway.auth import add_api_key

            token = add_api_key(settings.api_keys_file, args.name, args.models,
                                tuple(args.scopes))
            print(token)
            print(f"stored its hash in {settings.api_keys_file}; the key is not kept anywhere",
                  file=sys.stderr)
            return 0
        if args.keys_command == "list":
            from ppml_serve.gateway.auth import list_api_keys

            for key in list_api_keys(settings.api_keys_file):
                print(f"{key['id']}  {key['name']:<20} models={','.join(key['models'])} "
                      f"scopes={','.join(key['scopes'])}")
            return 0
        if args.keys_command == "revoke":
            from ppml_serve.gateway.auth import revoke_api_key

            gone = revoke_api_key(settings.api_keys_file, args.key)
            print(f"revoked API key {gone['name']!r} (id {gone['id']})")
            return 0
        from ppml_serve.cli.model_commands import keys_rotate

        return keys_rotate(settings)

    if args.command == "model":
        from ppml_serve.cli import model_commands

        if args.model_command == "inspect":
            return model_commands.model_inspect(args)
        if args.model_command == "encrypt":
            return model_commands.model_encrypt(_settings(args), args)
        if args.model_command == "quantize":
            return model_commands.model_quantize(_settings(args), args)
        if args.model_command == "convert":
            return model_commands.model_convert(_settings(args), args)
        if args.model_command == "add":
            return model_commands.model_add(_settings(args), args)
        return model_commands.model_decrypt(_settings(args), args)

    if args.command == "attest" and args.attest_command == "collateral":
        from ppml_serve.cli.attest_commands import collateral_fetch

        return collateral_fetch(_settings(args).collateral_dir, args.evidence, args.pccs,
                                args.kds, args.product)

    if args.command == "attest" and args.attest_command == "verify":
        from ppml_serve.cli.attest_commands import attest_verify

        return attest_verify(args.evidence, args.collateral, args.ask, args.ark, args.at,
                             args.json, args.policy, args.test_root)

    if args.command == "attest":
        from ppml_serve.cli.model_commands import attest_measure

        name, path = args.model
        hardware = None
        if args.evidence is not None:
            from ppml_serve.cli.attest_commands import hardware_entry

            hardware = hardware_entry(args.evidence, args.collateral, args.ask, args.ark,
                                      args.at)
        return attest_measure(_settings(args), name, path, hardware)

    if args.command == "policy":
        from ppml_serve.cli import attest_commands

        if args.policy_command == "keygen":
            return attest_commands.policy_keygen(args.out, args.name)
        if args.policy_command == "sign":
            return attest_commands.policy_sign(args.policy, args.key, args.name)
        settings = _settings(args)
        return attest_commands.policy_verify(args.policy or settings.policy_file,
                                             settings.keybroker.policy_signers,
                                             settings.keybroker.policy_threshold)

    if args.command == "audit":
        from ppml_serve.cli.attest_commands import audit_verify

        return audit_verify(args.log)

    if args.command == "ray":
        return _ray_pool(args)

    if args.command == "kubernetes" and args.kube_command == "policy":
        from ppml_serve.cluster.kubernetes import write_policy

        releases = write_policy(args.out, args.manifests,
                                {name: Path(path) for name, path in args.model})
        print(f"{args.out / 'configmaps.yaml'}: releases for "
              f"{', '.join(entry['model'] for entry in releases)}; apply with "
              f"kubectl apply -k {args.out}")
        return 0

    if args.command == "kubernetes":
        return _kubernetes_generate(args)

    if args.command == "keybroker":
        from ppml_serve.keybroker.server import build_keybroker_server

        exit_when_orphaned()
        settings = _settings(args)
        if args.keybroker_port is not None:
            settings.keybroker.port = args.keybroker_port
        build_keybroker_server(settings).run()
        return 0
    raise PPMLError(f"unknown command {args.command!r}")  # argparse normally stops it first


def _kubernetes_generate(args: argparse.Namespace) -> int:
    from ppml_serve.cluster.kubernetes import generate

    done = generate(args.out, args.overlay, args.manifests,
                    {name: Path(path) for name, path in args.model}, args.image,
                    tuple(args.gateway_host), args.redis_address, args.redis_image)
    print(f"wrote {len(done.secrets)} Secrets, 2 ConfigMaps and kustomization.yaml to "
          f"{done.directory}")
    print(f"  apply:       kubectl apply -k {done.directory}")
    print(f"  admin key:   {done.api_key_file} (Authorization: Bearer …; not in the cluster)")
    if args.overlay == "external-redis":
        print(f"  Redis users: add {done.directory / 'redis-users.acl'} to your Redis's ACL")
    print(f"  models:      ppml-serve model encrypt --state-dir {done.directory / 'state'} "
          "MODEL.onnx demo.onnx, copy it into the ppml-models volume, then "
          f"ppml-serve kubernetes policy --out {done.directory} --model demo=demo.onnx")
    print("  keep this directory private: it holds every key of the deployment")
    return 0


def _ray_pool(args: argparse.Namespace) -> int:
    import threading

    from ppml_serve.cluster.ray_pool import PoolSpec, RayWorkerPool, queue_stats_source, ray_module

    settings = _settings(args)
    name, path = args.model
    spec = PoolSpec(name, Path(path).resolve(), args.config.resolve() if args.config else None,
                    settings.state_dir.resolve(), args.min_replicas, args.max_replicas,
                    args.target_backlog, args.num_cpus, args.num_gpus, args.max_restarts,
                    scale_down_cooldown_s=args.scale_down_cooldown)
    ray_module().init(address=args.address, logging_level="WARNING")
    pool = RayWorkerPool(spec, queue_stats_source(settings, name))
    stop = threading.Event()
    _stop_on_signals(stop.set)
    print(f"serving model {name!r} with {spec.min_replicas}-{spec.max_replicas} Ray actor(s)",
          flush=True)
    pool.run(stop)
    return 0


def _choices(text: str, flag: str, allowed: set[str]) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(values) - allowed)
    if unknown or not values:
        raise PPMLError(f"{flag}: unknown value(s) {unknown}; choose from {sorted(allowed)}")
    return values


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise PPMLError(f"{flag}: expected a comma list of integers, got {text!r}") from None
    if not values or any(value < 1 for value in values):
        raise PPMLError(f"{flag}: values must be positive integers")
    return values


def _bench(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from ppml_serve.bench.runner import (
        BenchConfig,
        BenchOptions,
        is_int8,
        run_benchmark,
    )
    from ppml_serve.models import DEMO_NAME, demo_model_path

    if args.from_json is not None:
        try:
            runs = json.loads(args.from_json.read_text())
        except (OSError, ValueError):
            raise PPMLError(f"--from-json: cannot read runs from {args.from_json}") from None
        _report(runs, args)
        return 0
    kinds = _choices(args.configs, "--configs",
                     {"secure", "plain", "secure-memory", "secure-tls"})
    engines = _choices(args.engines, "--engines", {"onnxruntime", "openvino"})
    precisions = _choices(args.precisions, "--precisions", {"fp32", "bf16", "fp16", "int8"})
    models = list(args.model)
    if args.null_model:
        import tempfile

        from ppml_serve.bench.null_model import build_null_model

        scratch = Path(tempfile.mkdtemp(prefix="ppml-null-"))
        models.append(("null", build_null_model(scratch / "null.onnx")))
    models = models or [(DEMO_NAME, demo_model_path())]
    for _, path in models:
        if not Path(path).is_file():
            raise PPMLError(f"--model: no such file: {path}")
    configs = []
    for name, path in models:
        for engine in engines:
            for precision in precisions:
                if precision == "bf16" and (engine != "openvino" or is_int8(Path(path))):
                    continue  # bf16 is an OpenVINO choice for float models only
                if precision in ("fp16", "int8") and (engine != "onnxruntime"
                                                      or args.device == "cpu"):
                    continue  # TensorRT's, on a GPU
                for kind in kinds:
                    label = "int8" if is_int8(Path(path)) else precision
                    configs.append(BenchConfig(
                        f"{name}-{engine}-{label}-{kind}", name, Path(path), engine, precision,
                        kind != "plain", "none" if kind == "secure-memory" else "aof",
                        local_socket=kind != "secure-tls"))
    if not configs:
        raise PPMLError("no configuration to run (bf16 needs --engines openvino; fp16 and "
                        "int8 need --device cuda)")
    options = BenchOptions(
        concurrencies=_int_list(args.concurrency, "--concurrency"),
        duration_s=args.duration, warmup_s=args.warmup, items_per_request=args.items,
        workers=args.workers, gateways=args.gateways,
        max_batch_size=args.max_batch_size or 16,
        max_batch_delay_ms=args.max_batch_delay_ms if args.max_batch_delay_ms is not None
        else 2.0, threads=args.threads or 0, streams=args.streams, repeats=args.repeats,
        device=args.device, protocol=args.protocol)
    if args.url is not None:
        if args.protocol != "http":
            raise PPMLError("--url measures over HTTP only: leave out --protocol grpc, or let "
                            "bench start its own service")
        return _bench_external(args, configs, options)
    raw_steps = 1 if options.max_batch_size == 1 else 2
    groups = len({(c.model, c.model_path, c.engine, c.precision) for c in configs})
    steps = len(configs) + options.repeats * (
        groups * raw_steps + len(configs) * len(options.concurrencies))
    with tqdm(total=steps, unit="run", file=sys.stderr) as bar:
        def step(description: str) -> None:
            if bar.n or bar.desc:
                bar.update(1)
            bar.set_description(description)

        runs = run_benchmark(configs, options, step)
        bar.update(1)
    _report(runs, args)
    return 0


def _bench_external(args: argparse.Namespace, configs: list[Any], options: Any) -> int:
    from tqdm import tqdm

    from ppml_serve.bench.runner import ExternalService, run_external

    if args.api_key_file is None:
        raise PPMLError("--url needs --api-key-file")
    try:
        api_key = args.api_key_file.read_text().strip()
    except OSError as exc:
        raise PPMLError(f"--api-key-file: cannot read {args.api_key_file} ({exc.strerror})"
                        ) from None
    service = ExternalService(args.url.rstrip("/"), api_key, args.ca_file)
    chosen = {(c.model, c.engine, c.precision): c for c in configs}  # secure/plain: n/a here
    runs: list[dict[str, Any]] = []
    steps = len(chosen) * options.repeats * (1 + len(options.concurrencies))
    with tqdm(total=steps, unit="run", file=sys.stderr) as bar:
        def step(description: str) -> None:
            bar.update(1)
            bar.set_description(description)

        for config in chosen.values():
            external = type(config)(f"{config.model}-{config.engine}-{config.precision}-external",
                                    config.model, config.model_path, config.engine,
                                    config.precision, args.url.startswith("https"))
            runs.extend(run_external(service, external, options, step))
    _report(runs, args)
    return 0


def _report(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import json

    from ppml_serve.bench.runner import summarize

    header = (f"{'name':<40} {'mode':<8} {'conc':>4} {'items/s':>9} {'p50 ms':>8} "
              f"{'p99 ms':>8} err  CPU ms/request gateway/redis/worker")
    print(header)
    for run in runs:
        cpu = run.get("cpu_ms_per_request")
        parts = (f"  {cpu['gateway']:.2f}/{cpu['redis']:.2f}/{cpu['worker']:.2f}"
                 if cpu else "")
        if cpu and cpu.get("front"):
            parts += f" (front {cpu['front']:.2f} of gateway)"
        print(f"{run['name']:<40} {run['mode']:<8} {run['concurrency']:>4} "
              f"{run['throughput']:>9.1f} {run['p50_ms']:>8.2f} {run['p99_ms']:>8.2f} "
              f"{run['errors']:>3}{parts}")
    for line in summarize(runs):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    if args.plot:
        from ppml_serve.bench.plot import plot

        plot(runs, args.plot)


def _init_hint(args: argparse.Namespace, message: str) -> str:
    """Most errors on a machine without a state directory mean 'ppml-serve init' was not run."""
    state = getattr(args, "state_dir", None) or Path(".ppml-serve")
    if args.command in ("init", "up", "bench", "kubernetes") or Path(state).exists() \
            or "init" in message:  # kubernetes generate makes a deployment's keys itself
        return ""
    if args.command == "model" and getattr(args, "model_command", "") in ("quantize",
                                                                         "convert"):
        return ""  # these need no state directory unless the model is encrypted
    return (f"\n  (there is no state directory at {state}: run 'ppml-serve init' first, "
            "or pass --state-dir / --config)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"))
    try:
        code = run(args)
    except PPMLError as exc:
        print(f"error: {exc}{_init_hint(args, str(exc))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
