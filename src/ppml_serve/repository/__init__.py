"""The model repository: ``DIR/<model>/config.yaml`` and ``DIR/<model>/<version>/``."""

from ppml_serve.repository.config import ModelConfig, VersionPolicy
from ppml_serve.repository.layout import ModelEntry, Repository, VersionSource

__all__ = ["ModelConfig", "ModelEntry", "Repository", "VersionPolicy", "VersionSource"]
