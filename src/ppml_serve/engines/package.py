"""A model as the engines take it, in memory: one ONNX file, or an OpenVINO IR (``.xml``
graph + ``.bin`` weights).

A multi-file model travels, is measured and is encrypted as one archive: an uncompressed
tar with fixed names, times and owners, so the same files always give the same bytes (and
the same digest). Archives are only ever read in memory; nothing is extracted to disk.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ppml_serve.errors import ConfigError, EngineError

Format = Literal["onnx", "openvino"]

IR_GRAPH, IR_WEIGHTS = "model.xml", "model.bin"
_TAR_MAGIC_OFFSET = 257
MAX_ARCHIVE_MEMBERS = 8


@dataclass(frozen=True)
class ModelPackage:
    format: Format
    files: dict[str, bytes] = field(repr=False)
    """ONNX: {"model.onnx": ...}; OpenVINO IR: {"model.xml": ..., "model.bin": ...}."""

    @classmethod
    def onnx(cls, model: bytes) -> ModelPackage:
        return cls("onnx", {"model.onnx": model})

    @classmethod
    def openvino_ir(cls, graph: bytes, weights: bytes) -> ModelPackage:
        return cls("openvino", {IR_GRAPH: graph, IR_WEIGHTS: weights})

    def to_bytes(self) -> bytes:
        """One blob: the ONNX file itself, or the archive of an IR."""
        if self.format == "onnx":
            return self.files["model.onnx"]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for name in sorted(self.files):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(self.files[name]), 0o600, 0
                archive.addfile(info, io.BytesIO(self.files[name]))
        return buffer.getvalue()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, blob: bytes, name: str = "model") -> ModelPackage:
        """The package a blob holds: an IR archive (tar), else an ONNX model."""
        if blob[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] != b"ustar":
            return cls.onnx(blob)
        files: dict[str, bytes] = {}
        try:
            with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as archive:
                for index, member in enumerate(archive):
                    if index >= MAX_ARCHIVE_MEMBERS or not member.isfile() \
                            or member.name not in (IR_GRAPH, IR_WEIGHTS):
                        raise EngineError(f"{name}: the model archive holds {member.name!r}; "
                                          f"only {IR_GRAPH} and {IR_WEIGHTS} are allowed")
                    handle = archive.extractfile(member)
                    files[member.name] = handle.read() if handle is not None else b""
        except tarfile.TarError:
            raise EngineError(f"{name}: the model archive is damaged") from None
        if set(files) != {IR_GRAPH, IR_WEIGHTS}:
            raise EngineError(f"{name}: an OpenVINO model archive needs {IR_GRAPH} and "
                              f"{IR_WEIGHTS}")
        return cls("openvino", files)

    @classmethod
    def read_ir(cls, graph: Path) -> ModelPackage:
        """An IR from its ``.xml`` file and the ``.bin`` beside it."""
        weights = graph.with_suffix(".bin")
        if not weights.is_file():
            raise ConfigError(f"{graph}: OpenVINO IR needs its weights file {weights.name} "
                              "beside it")
        return cls.openvino_ir(graph.read_bytes(), weights.read_bytes())
