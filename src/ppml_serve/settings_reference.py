"""The configuration reference (``docs/configuration-reference.md``), generated from the
settings models: every setting with its type, default, environment variable and the
docstring under its field. ``python -m ppml_serve.settings_reference > FILE`` writes it; a
test keeps the committed page equal to what this makes."""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ppml_serve.settings import Settings

_HEAD = """# Configuration reference

Generated from the settings models (`python -m ppml_serve.settings_reference`); do not edit.
Settings come from defaults < a YAML file (`--config`) < environment variables < command-line
flags (see [Configuration](configuration.md)). A section's setting `S` of section `X` is `X.S`
in YAML and `PPML_X__S` in the environment.
"""


def _type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(arg) for arg in typing.get_args(annotation))
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in typing.get_args(annotation))}]"
    if annotation is type(None):
        return "null"
    if annotation is SecretStr:
        return "secret string"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, Path):
        return f"`{value}`"
    if isinstance(value, SecretStr):
        return "(secret)"
    return f"`{json.dumps(value, default=str)}`"


def _description(field: FieldInfo) -> str:
    text = " ".join((field.description or "").split())
    return re.sub(r"``([^`]+)``", r"`\1`", text).replace("|", "\\|")


def _rows(model: type[BaseModel], yaml_prefix: str, env_prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue  # a section: its own table
        rows.append(f"| `{yaml_prefix}{name}` | {_type(annotation)} | {_default(field)} | "
                    f"`{env_prefix}{name.upper()}` | {_description(field)} |")
    return rows


def reference_markdown() -> str:
    """The whole page."""
    header = ["| setting | type | default | environment | what |", "|---|---|---|---|---|"]
    parts = [_HEAD, "## Top level\n", *header, *_rows(Settings, "", "PPML_"), ""]
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            doc = " ".join((section.__doc__ or "").split())
            parts += [f"## `{name}`\n", *([doc, ""] if doc else []), *header,
                      *_rows(section, f"{name}.", f"PPML_{name.upper()}__"), ""]
    return "\n".join(parts)


def undocumented() -> list[str]:
    """Settings without a docstring (each must say what it does)."""
    missing = [name for name, field in Settings.model_fields.items() if not field.description
               and not (isinstance(field.annotation, type)
                        and issubclass(field.annotation, BaseModel))]
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            missing += [f"{name}.{key}" for key, inner in section.model_fields.items()
                        if not inner.description]
    return missing


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
