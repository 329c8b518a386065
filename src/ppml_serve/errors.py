"""The exception tree. Messages never carry payloads, keys or credentials.

HTTP status codes are chosen by the gateway (``gateway/errors.py``), not here.
"""

from __future__ import annotations


class PPMLError(Exception):
    """Base of every error ppml-serve raises on purpose."""


class ConfigError(PPMLError):
    """A setting is missing or invalid; the message names the setting."""


class InvalidInput(PPMLError):
    """A request does not match the model's declared inputs or the protocol."""


class Unauthorized(PPMLError):
    """No valid credentials were presented."""


class Forbidden(PPMLError):
    """Valid credentials, but not allowed to use this resource."""


class ModelNotFound(PPMLError):
    """No model is served under this name."""


class PayloadTooLarge(PPMLError):
    """The request body exceeds the configured limit."""


class UnsupportedEncoding(PPMLError):
    """The request body's Content-Encoding is not one the gateway decodes."""


class Overloaded(PPMLError):
    """The queue is over its backlog bound; the caller should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(PPMLError):
    """The service (queue, workers or keys) cannot serve the request now."""


class QueueStalled(NotReady):
    """Redis did not answer within the command deadline (frozen, or its disk stalled):
    nothing is known to be lost, what it holds is answered once it recovers."""


class KMSUnavailable(NotReady):
    """The KMS could not be reached: retry later (not a refusal)."""


class DeadlineExceeded(PPMLError):
    """No answer arrived within the request timeout."""


class IntegrityError(PPMLError):
    """A sealed record failed authentication: tampered, truncated, or bound to other data."""


class EngineError(PPMLError):
    """The inference engine failed to load or run a model."""


class ProtocolError(PPMLError):
    """A queue message is malformed (wrong framing, unknown version)."""
