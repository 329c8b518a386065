"""``config.yaml`` of one model in the repository: engine, batching, versions, post-processing.

Every field is optional; what is left out comes from the worker's settings (``worker.*``).
Example::

    engine: openvino          # onnxruntime | openvino | auto
    precision: fp32           # fp32 | bf16 (OpenVINO) | fp16, int8 (TensorRT)
    device: cuda:0            # cpu (default) | cuda | cuda:N
    execution_provider: auto  # auto | cpu | cuda | tensorrt
    max_batch_size: 32
    max_batch_delay_ms: 2
    instances: 1              # batch loops per worker process sharing one loaded model
    version_policy:
      latest: 2               # or: specific: [1, 3]   or: all: true
    labels: labels.txt        # one class name per line, beside config.yaml
    top_k: 5                  # add OUTPUT_topk_indices / OUTPUT_topk_scores outputs
    top_k_output: scores      # the output they are computed from (default: the first)
    warmup:                   # run the engine before the version is READY (first requests
      batch_size: 8           #   then do not pay for lazy initialisation)
      runs: 2
      data: random            # zeros (default) | random
      shapes: {tokens: [-1, 128]}  # sizes of an input's other -1 dimensions
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ppml_serve.errors import ConfigError
from ppml_serve.settings import WorkerSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VersionPolicy(_Strict):
    """Which of the versions present are served (Triton's three policies)."""

    latest: int | None = Field(None, ge=1, le=100)
    """Serve the N highest versions (the default: the highest one)."""
    specific: tuple[int, ...] | None = None
    """Serve exactly these versions."""
    all: bool = False
    """Serve every version present."""

    @model_validator(mode="after")
    def _one_policy(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.specific is not None, self.all]
        if sum(chosen) > 1:
            raise ValueError("give one of latest, specific or all")
        if self.specific is not None and (not self.specific or min(self.specific) < 1):
            raise ValueError("specific must list positive version numbers")
        return self

    def select(self, present: list[str]) -> list[str]:
        """The versions to serve, newest first."""
        ordered = sorted(present, key=int, reverse=True)
        if self.all:
            return ordered
        if self.specific is not None:
            wanted = {str(version) for version in self.specific}
            return [version for version in ordered if version in wanted]
        return ordered[: self.latest or 1]

    def describe(self) -> dict[str, Any]:
        """Triton's ``version_policy`` shape (for ``get_model_config``)."""
        if self.all:
            return {"all": {}}
        if self.specific is not None:
            return {"specific": {"versions": list(self.specific)}}
        return {"latest": {"num_versions": self.latest or 1}}


MAX_CONFIG_BYTES = 1 << 20
"""A model's config.yaml (or labels file) larger than this is refused before it is parsed:
a real one is a few hundred bytes, and parsing megabytes of YAML stalls the worker."""


def read_model_file(directory: Path, name: str, max_bytes: int = MAX_CONFIG_BYTES) -> bytes:
    """A small file of one model's directory: a link may point only inside that directory
    (never at the state directory's keys), and at most ``max_bytes`` are read."""
    base = directory.resolve()
    path = (directory / name).resolve()
    if not path.is_relative_to(base) or path == base:
        raise ConfigError(f"{directory / name}: leads outside the model's directory "
                          f"({path}); repository files must lie inside it")
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"{directory / name}: cannot read it ({exc.strerror})") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{directory / name}: larger than {max_bytes // 1024} KiB; is it the "
                          "right file?")
    return data


class Warmup(_Strict):
    """Synthetic requests the engine runs once loaded, before the version is published
    READY (Triton's ``model_warmup``)."""

    batch_size: int = Field(1, ge=1, le=4096)
    """Rows of each warm-up batch (an input's first -1 dimension)."""
    runs: int = Field(1, ge=1, le=100)
    data: Literal["zeros", "random"] = "zeros"
    """Zeros (empty strings for BYTES) or random values of each input's type."""
    shapes: dict[str, list[int]] = Field(default_factory=dict)
    """Per input, its full shape when it has dynamic dimensions past the first (``-1`` there
    takes ``batch_size``)."""


class ModelConfig(_Strict):
    engine: Literal["onnxruntime", "openvino", "auto"] | None = None
    precision: Literal["fp32", "bf16", "fp16", "int8"] | None = None
    device: str | None = Field(None, pattern=r"^(cpu|cuda(:\d{1,2})?)$")
    execution_provider: Literal["auto", "cpu", "cuda", "tensorrt"] | None = None
    engine_threads: int | None = Field(None, ge=0, le=256)
    streams: int | None = Field(None, ge=1, le=64)
    max_batch_size: int | None = Field(None, ge=1, le=4096)
    max_batch_delay_ms: float | None = Field(None, ge=0, le=10_000)
    instances: int = Field(1, ge=1, le=16)
    """Batch loops per worker process for this model; they share the one loaded model."""
    version_policy: VersionPolicy = VersionPolicy()
    labels: str | None = None
    """File beside ``config.yaml`` with one class name per line (shown in the model's
    config, so clients can name ``top_k`` indices)."""
    top_k: int | None = Field(None, ge=1, le=1000)
    """Add the k best classes of the first output (or ``top_k_output``) as two outputs."""
    top_k_output: str | None = None
    warmup: Warmup | None = None

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        """The config at ``path``; defaults when there is none."""
        if not path.is_file():
            return cls()
        text = read_model_file(path.parent, path.name, MAX_CONFIG_BYTES).decode(
            "utf-8", "replace")
        try:
            return cls.model_validate(yaml.safe_load(text) or {})
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg']}"
                + (f" (got {error['input']!r})" if isinstance(error.get("input"), str | int)
                   else "") for error in exc.errors())
            raise ConfigError(f"{path}: {problems}") from None

    def worker_settings(self, base: WorkerSettings) -> WorkerSettings:
        """The worker settings for this model: ``base`` with this config's choices."""
        chosen = self.model_dump(include={"engine", "precision", "device", "execution_provider",
                                          "engine_threads", "streams",
                                          "max_batch_size", "max_batch_delay_ms"},
                                 exclude_none=True)
        return base.model_copy(update=chosen)

    def measured(self) -> dict[str, Any]:
        """What of this config changes what a worker computes (part of its measurement)."""
        return self.model_dump(mode="json", exclude={"instances", "version_policy", "warmup"})
