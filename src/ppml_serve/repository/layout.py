"""Reading a model repository from disk (Triton's layout)::

    DIR/
      fraud/
        config.yaml         optional (see repository.config)
        labels.txt          optional, named by config.yaml
        1/model.onnx        ONNX
        2/model.xml         OpenVINO IR (with model.bin beside it)
        3/model.ppml        encrypted (``ppml-serve model encrypt``): ONNX or an IR archive

A version is a directory named by a positive integer holding exactly one model. The
repository is read again whenever a model is loaded, so files dropped in while the service
runs are picked up by the next load. ``--model NAME=PATH`` adds a one-version model (version
1) to the same view.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ppml_serve.crypto.model_file import ModelHeader, is_encrypted, read_header
from ppml_serve.engines.package import ModelPackage
from ppml_serve.errors import ConfigError
from ppml_serve.queue.contract import VERSION_PATTERN
from ppml_serve.repository.config import ModelConfig, read_model_file

MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Kind = Literal["onnx", "openvino", "encrypted"]


@dataclass(frozen=True)
class VersionSource:
    """Where one version's model is, and what kind of file it is."""

    path: Path
    kind: Kind

    @property
    def encrypted(self) -> bool:
        return self.kind == "encrypted"

    def header(self) -> ModelHeader:
        with self.path.open("rb") as handle:
            return read_header(handle, str(self.path))

    def plain_package(self) -> ModelPackage:
        """The model of a plaintext version."""
        if self.kind == "openvino":
            return ModelPackage.read_ir(self.path)
        if self.kind == "onnx":
            return ModelPackage.onnx(self.path.read_bytes())
        raise ConfigError(f"{self.path} is encrypted: it needs its key")

    def sha256(self) -> str:
        """Digest of the plaintext package (from the authenticated header when encrypted)."""
        if self.kind == "encrypted":
            return self.header().sha256
        if self.kind == "onnx":
            digest = hashlib.sha256()
            with self.path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()
        return self.plain_package().sha256


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: ModelConfig
    versions: dict[str, VersionSource] = field(default_factory=dict)
    """Every version present, valid or not yet."""
    labels: tuple[str, ...] = ()

    def served_versions(self) -> list[str]:
        """The versions the version policy serves, newest first."""
        return self.config.version_policy.select(list(self.versions))


def source_of(path: Path) -> VersionSource:
    """A model file's kind: an encrypted model, an IR graph (``.xml``), else ONNX."""
    if not path.is_file():
        raise ConfigError(f"no such model file: {path}")
    if is_encrypted(path):
        return VersionSource(path, "encrypted")
    if path.suffix == ".xml":
        return VersionSource(path, "openvino")
    return VersionSource(path, "onnx")


def _version_source(directory: Path) -> VersionSource:
    files = sorted(p for p in directory.iterdir() if p.is_file()
                   and not p.name.startswith(".") and not p.name.endswith(".partial"))
    encrypted = [p for p in files if is_encrypted(p)]
    graphs = [p for p in files if p.suffix == ".xml"]
    onnx = [p for p in files if p.suffix == ".onnx"]
    candidates = encrypted or graphs or onnx
    if len(candidates) != 1:
        found = ", ".join(p.name for p in files) or "nothing"
        raise ConfigError(
            f"{directory}: a version directory holds exactly one model (model.onnx, "
            f"model.xml + model.bin, or one encrypted file from 'ppml-serve model "
            f"encrypt'); found {found}")
    return source_of(candidates[0])


class Repository:
    """A repository directory, plus models given one by one (``--model NAME=PATH``)."""

    def __init__(self, root: Path | None, single: dict[str, Path] | None = None) -> None:
        if root is not None and not root.is_dir():
            raise ConfigError(f"model_repository: no such directory: {root}")
        self.root = root
        self._single = dict(single or {})
        for path in self._single.values():
            source_of(path)  # a missing file is an error now, not at the first load
        clash = set(self._single) & set(self._directory_names())
        if clash:
            raise ConfigError(f"model {sorted(clash)[0]!r} is both in the repository and "
                              "given with --model; drop one")

    def _directory_names(self) -> list[str]:
        if self.root is None:
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and MODEL_NAME.fullmatch(p.name)
                      and not p.name.startswith("."))

    def names(self) -> list[str]:
        return sorted({*self._directory_names(), *self._single})

    def entry(self, name: str) -> ModelEntry:
        """Read ``name``'s config and versions now. Invalid versions raise ``ConfigError``."""
        if name in self._single:
            return ModelEntry(name, ModelConfig(), {"1": source_of(self._single[name])})
        if self.root is None or name not in self._directory_names():
            raise ConfigError(f"model {name!r} is not in the repository")
        directory = self.root / name
        config = ModelConfig.load(directory / "config.yaml")
        versions = {p.name: _version_source(p) for p in sorted(directory.iterdir())
                    if p.is_dir() and VERSION_PATTERN.fullmatch(p.name)}
        labels: tuple[str, ...] = ()
        if config.labels is not None:
            label_file = directory / config.labels
            if label_file.parent != directory or not label_file.is_file():
                raise ConfigError(f"{directory / 'config.yaml'}: labels: no file "
                                  f"{config.labels!r} beside it")
            text = read_model_file(directory, config.labels).decode("utf-8", "replace")
            labels = tuple(line.strip() for line in text.splitlines() if line.strip())
        return ModelEntry(name, config, versions, labels)

    def available(self) -> dict[str, list[str]]:
        """Every model and the version directories present (no file is opened)."""
        present: dict[str, list[str]] = {name: ["1"] for name in self._single}
        root = self.root
        if root is None:
            return present
        for name in self._directory_names():
            present[name] = sorted((p.name for p in (root / name).iterdir()
                                    if p.is_dir() and VERSION_PATTERN.fullmatch(p.name)), key=int)
        return present
