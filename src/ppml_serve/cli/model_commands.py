"""``ppml-serve model …`` and ``ppml-serve keys …`` and ``ppml-serve attest …``."""

from __future__ import annotations

import argparse
import json
import logging
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
from ppml_serve.private_files import write_private
from ppml_serve.settings import Settings


def _bar(total: int, label: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr,
                leave=False)


def model_encrypt(settings: Settings, args: argparse.Namespace) -> int:
    source, target = Path(args.input), Path(args.output)
    if source.suffix == ".xml" or source.is_dir():
        return _encrypt_ir(settings, source, target, args.force)
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


def _encrypt_ir(settings: Settings, source: Path, target: Path, force: bool) -> int:
    """An OpenVINO IR (``.xml`` + ``.bin``, or their directory) as one sealed archive."""
    from ppml_serve.crypto.model_file import encrypt_bytes
    from ppml_serve.engines.package import IR_GRAPH, ModelPackage

    graph = source / IR_GRAPH if source.is_dir() else source
    if not graph.is_file():
        raise ConfigError(f"model encrypt: no OpenVINO IR at {graph}")
    if target.exists() and not force:
        raise ConfigError(f"model encrypt: {target} exists (use --force to replace it)")
    package = ModelPackage.read_ir(graph)
    encrypt_bytes(package.to_bytes(), target, open_kms(settings))
    with target.open("rb") as handle:
        header = read_header(handle, str(target))
    print(json.dumps({"file": str(target), "content": "OpenVINO IR archive",
                      **header.describe()}, indent=2))
    return 0


def _existing(path: Path, command: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{command}: no such file: {path}")
    return path


def model_decrypt(settings: Settings, args: argparse.Namespace) -> int:
    source, target = _existing(Path(args.input), "model decrypt"), Path(args.output)
    if target.exists() and not args.force:
        raise ConfigError(f"model decrypt: {target} exists (use --force to replace it)")
    with source.open("rb") as handle:
        size = read_header(handle, str(source)).size
    with _bar(size, "decrypting") as bar:
        plaintext = decrypt_model(source, kms=open_kms(settings), progress=bar.update)
    write_private(target, bytes(plaintext))
    print(f"wrote the plaintext model to {target} (mode 0600; keep it safe: it is not "
          "encrypted)",
          file=sys.stderr)
    return 0


def model_inspect(args: argparse.Namespace) -> int:
    path = _existing(Path(args.file), "model inspect")
    with path.open("rb") as handle:
        header = read_header(handle, str(path))
    print(json.dumps({"file": str(path), **header.describe()}, indent=2))
    return 0


def keys_rotate(settings: Settings) -> int:
    kms = open_kms(settings)
    primary = kms.rotate()
    data_key = data_key_table(settings).rotate(kms)
    logging.getLogger("ppml_serve.audit").info(
        "keys rotated: new primary key version and active record key %s", data_key)
    print(f"primary key: {primary}")
    print(f"active record data key: {data_key} (older keys still open existing records; "
          "restart the key broker, gateways and workers to use it)")
    return 0


def attest_measure(settings: Settings, model: str, path: Path,
                   hardware: dict[str, object] | None = None) -> int:
    """The software measurement and its policy entry; with ``hardware`` (a TEE's verified
    measurements), the entry names those instead, still bound to this model and key."""
    import yaml

    from ppml_serve.worker.runner import release_entry, worker_measurement

    print(json.dumps(worker_measurement(settings, model, path).describe(), indent=2))
    entry: dict[str, object] = dict(release_entry(settings, model, path))
    if hardware is not None:
        entry.update(hardware)
    print("# key-broker policy entry (add it under 'releases:'):", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False).rstrip(), file=sys.stderr)
    return 0


def model_quantize(settings: Settings, args: argparse.Namespace) -> int:
    """Static INT8 quantization; encrypted in, encrypted out, plaintext only in memory/RAM."""
    from ppml_serve.crypto.model_file import encrypt_bytes
    from ppml_serve.engines.onnxruntime_engine import OnnxRuntimeEngine
    from ppml_serve.engines.quantize import (
        Samples,
        load_samples,
        not_quantizable,
        quality_report,
        quantize_bytes,
    )

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise ConfigError(f"model quantize: no such file: {source}")
    if target.exists() and not args.force:
        raise ConfigError(f"model quantize: {target} exists (use --force to replace it)")
    encrypted = is_encrypted(source)
    kms = open_kms(settings) if encrypted else None
    model = bytes(decrypt_model(source, kms=kms)) if encrypted else source.read_bytes()
    why_not = not_quantizable(model)
    if why_not is not None:
        raise ConfigError(f"model quantize: {source.name} cannot be quantized: {why_not}")
    spec = OnnxRuntimeEngine("model", model).spec
    if len(spec.inputs) != 1:
        raise ConfigError("model quantize: only single-input models are supported")
    input_name = spec.inputs[0].name
    samples = load_samples(Path(args.calibration), input_name)
    if args.eval is not None:
        calibration, holdout = samples.inputs, load_samples(Path(args.eval), input_name)
    else:
        split = max(1, int(len(samples.inputs) * (1 - args.holdout)))
        calibration = samples.inputs[:split]
        labels = samples.labels[split:] if samples.labels is not None else None
        holdout = Samples(samples.inputs[split:], labels)
        if len(holdout.inputs) == 0:
            holdout = Samples(samples.inputs, samples.labels)
    if args.limit:
        calibration = calibration[: args.limit]
    chatty = logging.getLogger()  # the quantizer logs every scale adjustment at INFO
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        with tqdm(total=len(calibration), unit="sample", desc="calibrating",
                  file=sys.stderr) as bar:
            int8 = quantize_bytes(model, calibration, input_name, progress=bar.update,
                                  in_ram=encrypted)
    except ConfigError:
        raise
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:  # the quantizer's own
        detail = (str(exc).splitlines() or ["no detail"])[0][:200]
        raise ConfigError(f"model quantize: ONNX Runtime could not quantize {source.name} "
                          f"({type(exc).__name__}: {detail})") from None
    finally:
        chatty.setLevel(level)
    report = {"output": str(target), "encrypted": encrypted,
              "calibration_samples": len(calibration),
              **quality_report(model, int8, holdout, input_name)}
    if encrypted and kms is not None:
        encrypt_bytes(int8, target, kms)
    else:
        target.write_bytes(int8)
    print(json.dumps(report, indent=2))
    return 0


def model_convert(settings: Settings, args: argparse.Namespace) -> int:
    """PyTorch / TensorFlow -> ONNX or OpenVINO IR in a repository version directory."""
    from ppml_serve.crypto.model_file import encrypt_bytes
    from ppml_serve.repository.convert import InputSpec, convert

    source, output_dir = Path(args.source), Path(args.output_dir)
    if not source.exists():
        raise ConfigError(f"model convert: no such model: {source}")
    written = [output_dir / "model.ppml"] if args.encrypt else [
        output_dir / name for name in (["model.onnx"] if args.to == "onnx"
                                       else ["model.xml", "model.bin"])]
    if any(path.exists() for path in written) and not args.force:
        raise ConfigError(f"model convert: {output_dir} already holds a model (use --force "
                          "to replace it)")
    inputs = [InputSpec.parse(text) for text in args.input]
    with tqdm(total=2, desc="converting and checking", file=sys.stderr, leave=False) as bar:
        result = convert(source, args.to, inputs, args.output or None)
        bar.update(2)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.encrypt:  # straight from memory: no plaintext model file is ever written
        encrypt_bytes(result.package.to_bytes(), written[0], open_kms(settings))
    else:
        for path in written:
            path.write_bytes(result.package.files[path.name])
    print(json.dumps({"files": [str(p) for p in written], "format": result.package.format,
                      "encrypted": bool(args.encrypt), "sha256": result.package.sha256,
                      "max_abs_diff_vs_source": result.max_abs_diff}, indent=2))
    return 0


def model_add(settings: Settings, args: argparse.Namespace) -> int:
    """Allow every version of a repository model in the key-release policy (owner only)."""
    import yaml

    from ppml_serve.crypto.attestation.policy import Policy
    from ppml_serve.repository import Repository
    from ppml_serve.worker.runner import repository_releases

    repository = Repository(Path(args.repository))
    names = args.model or repository.names()
    for name in names:
        repository.entry(name)  # an unknown model or a bad version is an error now
    policy_file = settings.policy_file
    if not policy_file.exists():
        raise ConfigError(f"model add: no policy file at {policy_file} (set "
                          "security.policy_file, or run 'ppml-serve up' once)")
    text = policy_file.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    document = yaml.safe_load(text) or {}
    Policy.model_validate(document)  # refuse to edit a policy that is not valid
    added = repository_releases(settings, repository, names)
    kept = [r for r in document.get("releases", []) if r.get("model") not in names]
    document["releases"] = kept + added
    Policy.model_validate(document)
    write_private(policy_file, (header + yaml.safe_dump(document, sort_keys=False)).encode())
    logging.getLogger("ppml_serve.audit").info(
        "policy updated: releases for model(s) %s (%d version(s))", ",".join(names), len(added))
    for release in added:
        print(f"allowed {release['model']} version {release['version']}: measurement "
              f"{release['measurement'][:16]}…")
    print(f"wrote {policy_file}; the key broker re-reads it. Now load the model: POST "
          "/v2/repository/models/NAME/load (tritonclient's load_model) with an admin key.")
    return 0
