"""Inference engines behind one contract: load from bytes, describe, infer a batch."""

from ppml_serve.engines.base import Engine, load_engine

__all__ = ["Engine", "load_engine"]
