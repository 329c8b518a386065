"""The bundled demo model (a digits CNN trained by scripts/train_demo_model.py)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

DEMO_NAME = "demo"


def demo_model_path() -> Path:
    return Path(str(files(__package__) / "demo.onnx"))


def demo_samples() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Held-out images (UINT8 [N, 8, 8]) and their labels."""
    with np.load(str(files(__package__) / "demo-samples.npz"), allow_pickle=False) as data:
        return data["images"], data["labels"]
