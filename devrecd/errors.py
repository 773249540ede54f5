"""Typed errors. The library raises these; only the CLI turns them into a message and an exit code.

Every error carries a short machine-readable ``reason`` (used as a metric label and stored in the
journal) and a human message that says what is wrong and, where useful, what to do.
"""

from __future__ import annotations


class DevrecdError(Exception):
    """Base class of every error devrecd raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(DevrecdError):
    """The configuration is invalid (unknown key, wrong type, bad value)."""

    reason = "config"


class UsageError(ConfigError):
    """A command was given something it cannot use (the wrong kind of file for an option, say)."""

    reason = "usage"


class MissingDependency(DevrecdError):
    """An optional dependency (TensorRT, pycuda, sounddevice, ...) is not installed."""

    reason = "missing_dependency"


class ArtifactError(DevrecdError):
    """A checkpoint, ONNX model, engine or contract is missing, corrupt or does not match."""

    reason = "artifact"


class DatasetError(DevrecdError):
    """A dataset cannot be loaded or split as asked."""

    reason = "dataset"
