"""ppml-serve: privacy-preserving model inference over an encrypted Redis Streams pipeline."""

__version__ = "0.1.0"
